"""Builds padlock-client, generating the gRPC stubs from the proto.

The stubs are not committed: protobuf's generated code checks at import
time that the protobuf runtime is at least as new as the generator, so the
stubs and the package's dependencies must come from one place. Here the
stubs are generated when the package is built, with the build
environment's grpcio-tools, and the package then requires grpcio and
protobuf at least as new as that grpcio-tools and its protobuf.
"""

import importlib.metadata
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO = 'padlock/v1/padlock.proto'


def proto_root() -> Path:
    """The directory holding padlock/v1/padlock.proto (the repository's
    proto/, reached through the `proto` link next to this file)."""
    for root in (HERE / 'proto', HERE.parent.parent / 'proto'):
        if (root / PROTO).is_file():
            return root
    raise FileNotFoundError(
        f'{PROTO} not found: build padlock-client from the padlock repository '
        '(sdk/python), where ../../proto holds the wire contract'
    )


class BuildWithStubs(build_py):
    """build_py, then the stubs into padlock/v1/ of the build tree."""

    def run(self) -> None:
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        includes = Path(grpc_tools.__file__).parent / '_proto'
        out = Path(self.build_lib)
        args = [
            'grpc_tools.protoc',
            f'-I{proto_root()}',
            f'-I{includes}',
            f'--python_out={out}',
            f'--pyi_out={out}',
            f'--grpc_python_out={out}',
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f'grpc_tools.protoc failed on {PROTO}')


def requirements() -> list:
    tools = importlib.metadata.version('grpcio-tools')
    protobuf = importlib.metadata.version('protobuf')
    major = int(protobuf.split('.')[0])
    return [f'grpcio>={tools}', f'protobuf>={protobuf},<{major + 1}']


setup(cmdclass={'build_py': BuildWithStubs}, install_requires=requirements())
