"""Fixtures: the real padlockd and padlock binaries (from the repository's
target directory, or `PADLOCK_BIN_DIR`), started on free ports with fresh
lock directories, and a redis-server of the test's own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import padlock

REPO = Path(__file__).resolve().parents[3]


def skip_if_opted_out(var: str, what: str) -> None:
    """Skips the test when `var=1` opts out of `what` (a machine without
    it), visibly: run with `-rs` the reason is in the summary. Under
    `CI=true` an opt-out is refused and the test fails: CI runs everything."""
    if os.environ.get(var) != '1':
        return
    if os.environ.get('CI') in ('true', '1'):
        pytest.fail(f'{var}=1 is refused under CI=true: CI runs every test; unset {var}')
    pytest.skip(f'{what} opted out by {var}=1')


def bin_path(name: str) -> Path:
    base = Path(os.environ.get('PADLOCK_BIN_DIR', REPO / 'target' / 'debug'))
    path = base / name
    if not path.is_file():
        pytest.fail(
            f'{path} is missing: build it first with `cargo build --workspace --bins` '
            '(bash tests/run.sh does), or point PADLOCK_BIN_DIR at the binaries'
        )
    return path


class Server:
    """A running padlockd, stopped at the end of the test."""

    def __init__(self, args=(), lock_dir: Path | None = None) -> None:
        self._temp = None
        if lock_dir is None:
            self._temp = tempfile.TemporaryDirectory()
            lock_dir = Path(self._temp.name)
        self.lock_dir = lock_dir
        env = dict(os.environ, PADLOCK_LOG=os.environ.get('PADLOCK_LOG', 'warn'))
        self.process = subprocess.Popen(
            [str(bin_path('padlockd')), '--listen', '127.0.0.1:0', '--lock-dir', str(lock_dir), *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith('padlockd listening on '):
                self.addr = line.split()[3]
                break
        else:
            raise RuntimeError(f'padlockd exited before listening: {self.process.wait()}')
        # Keep draining stdout so padlockd never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        self.url = f'http://{self.addr}'

    def client(self, **kwargs) -> padlock.Client:
        return padlock.Client(self.url, **kwargs)

    def cli(self, *args: str, **kwargs) -> subprocess.Popen:
        """The padlock CLI pointed at this server."""
        env = dict(os.environ, PADLOCK_SERVER=self.url)
        return subprocess.Popen([str(bin_path('padlock')), *args], env=env, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._temp is not None:
            self._temp.cleanup()


def until(what: str, check, limit: float = 20.0):
    """Polls `check` until it returns something true; fails after `limit`."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f'{what}: not within {limit} s')
        time.sleep(0.01)


def until_waiters(client: padlock.Client, name: str, n: int, kind: str = 'file') -> None:
    def seen():
        info = client.show(name, kind)
        return info is not None and info.waiters_total == n

    until(f'{n} waiter(s) on {name}', seen)


@pytest.fixture
def start_server():
    servers = []

    def start(*args, lock_dir=None) -> Server:
        server = Server(args, lock_dir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> Server:
    return start_server()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_port():
    """A redis-server of the test's own, on a free port."""
    skip_if_opted_out('PADLOCK_SKIP_REDIS', 'redis tests')
    binary = shutil.which('redis-server')
    if binary is None:
        pytest.fail(
            'redis-server is missing: install it (`apt-get install redis-server`; '
            'bash tests/run.sh does), or opt out with PADLOCK_SKIP_REDIS=1'
        )
    port = free_port()
    process = subprocess.Popen(
        [binary, '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers():
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1) as s:
                s.sendall(b'PING\r\n')
                return s.recv(7) == b'+PONG\r\n'
        except OSError:
            return False

    until('redis-server answers', answers, 10)
    yield port
    process.kill()
    process.wait()
