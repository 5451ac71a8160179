"""What the blocking and the asyncio clients share: addresses, channel
settings, requests, and how the server's answers map to results and
exceptions."""

from __future__ import annotations

import os
import socket
import sys
import typing
from dataclasses import dataclass, field

import grpc

from ._errors import AlreadyLocked, LockException, LockLost
from .v1 import padlock_pb2 as pb
from .v1 import padlock_pb2_grpc as pb_grpc

DEFAULT_SERVER = 'http://127.0.0.1:7420'

#: Extra time, past the wait, that an acquire gives the server to answer
#: before giving up on it (as the Rust SDK's STREAM_GRACE).
STREAM_GRACE = 2.0

#: The client pings an idle connection this often and gives up on it after
#: this long without an answer: a server that vanishes without closing the
#: connection is noticed (and every lock's `lost` set) within their sum.
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_TIMEOUT = 5.0

CHANNEL_OPTIONS = [
    ('grpc.keepalive_time_ms', int(KEEPALIVE_INTERVAL * 1000)),
    ('grpc.keepalive_timeout_ms', int(KEEPALIVE_TIMEOUT * 1000)),
    ('grpc.keepalive_permit_without_calls', 1),
    ('grpc.http2.max_pings_without_data', 0),
]

KINDS = {
    'file': pb.KIND_FILE,
    'semaphore': pb.KIND_SEMAPHORE,
    'redis': pb.KIND_REDIS,
}
KIND_NAMES = {v: k for k, v in KINDS.items()}
MODE_NAMES = {pb.MODE_EXCLUSIVE: 'exclusive', pb.MODE_SHARED: 'shared'}
LOST_REASONS = {
    pb.LOST_REASON_SHUTDOWN: 'shutdown',
    pb.LOST_REASON_REVOKED: 'revoked',
    pb.LOST_REASON_BACKEND: 'backend',
}

Pem = typing.Union[bytes, str, 'os.PathLike[str]', None]


@dataclass(frozen=True)
class Target:
    """Where and how to connect: `host:port`, TLS or not."""

    address: str
    secure: bool


def parse_url(url: str | None) -> Target:
    """`http://host:port`, `https://host:port`, or `host:port` (plain);
    default `$PADLOCK_SERVER`, then ``http://127.0.0.1:7420``."""
    url = url or os.environ.get('PADLOCK_SERVER') or DEFAULT_SERVER
    secure = url.startswith('https://')
    address = url.split('://', 1)[1] if '://' in url else url
    address = address.rstrip('/')
    if not address or '/' in address:
        raise ValueError(f'invalid padlockd URL {url!r}: expected http://HOST:PORT')
    return Target(address, secure)


def read_pem(value: Pem) -> bytes | None:
    """PEM given as bytes, or the path of a file holding it."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    with open(value, 'rb') as f:
        return f.read()


def credentials(
    target: Target, ca_cert: Pem, client_cert: Pem, client_key: Pem
) -> grpc.ChannelCredentials | None:
    """TLS settings for an ``https://`` URL; `None` for plain ones."""
    tls = any(v is not None for v in (ca_cert, client_cert, client_key))
    if not target.secure:
        if tls:
            raise ValueError('TLS settings were given for a plain http:// URL; use https://')
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError('client_cert and client_key go together')
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_cert),
        private_key=read_pem(client_key),
        certificate_chain=read_pem(client_cert),
    )


def metadata(token: str | None) -> tuple:
    return (('authorization', f'Bearer {token.strip()}'),) if token else ()


def default_owner() -> str:
    """What `padlock list` shows as the holder: program, pid and host."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'python'
    return f'{program}[{os.getpid()}]@{socket.gethostname()}'


@dataclass
class Request:
    """One lock request, as the server will see it."""

    name: str
    timeout: float | None = None
    kind: str = 'file'
    shared: bool = False
    limit: int = 0
    owner: str | None = None
    labels: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f'unknown kind {self.kind!r}: file, semaphore or redis')
        if self.timeout is not None and self.timeout < 0:
            raise ValueError('timeout must be None (wait as long as it takes), 0 (try once) or positive')

    def acquire_message(self) -> pb.HoldRequest:
        acquire = pb.Acquire(
            name=self.name,
            kind=KINDS[self.kind],
            mode=pb.MODE_SHARED if self.shared else pb.MODE_EXCLUSIVE,
            limit=self.limit,
            owner=self.owner if self.owner is not None else default_owner(),
            labels=self.labels,
        )
        if self.timeout is not None:
            acquire.wait_ms = round(self.timeout * 1000)
        return pb.HoldRequest(acquire=acquire)

    def answer_within(self) -> float | None:
        """How long to wait for the server's answer before giving up."""
        return None if self.timeout is None else self.timeout + STREAM_GRACE


RELEASE = pb.HoldRequest(release=pb.Release())


class ClientBase:
    """The connection settings both clients share; `_channels` is the
    module that makes channels (`grpc` or `grpc.aio`)."""

    _channels: typing.Any = grpc

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        ca_cert: Pem = None,
        client_cert: Pem = None,
        client_key: Pem = None,
        owner: str | None = None,
    ) -> None:
        """Connects lazily to `url` (default `$PADLOCK_SERVER`, then
        ``http://127.0.0.1:7420``; ``https://`` for TLS). `ca_cert`,
        `client_cert` and `client_key` are PEM bytes or file paths;
        `token` is sent as ``authorization: Bearer <token>``; `owner` is
        what `padlock list` shows as the holder (default: program, pid and
        host)."""
        target = parse_url(url)
        creds = credentials(target, ca_cert, client_cert, client_key)
        if creds is None:
            self._channel = self._channels.insecure_channel(target.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = self._channels.secure_channel(
                target.address, creds, options=CHANNEL_OPTIONS
            )
        self._stub = pb_grpc.PadlockStub(self._channel)
        self._metadata = metadata(token)
        self.owner = owner

    def _request(
        self,
        name: str,
        timeout: float | None,
        kind: str,
        shared: bool,
        limit: int,
        owner: str | None,
        labels: dict | None,
    ) -> Request:
        return Request(
            name=name,
            timeout=timeout,
            kind=kind,
            shared=shared,
            limit=limit,
            owner=owner if owner is not None else self.owner,
            labels=dict(labels or {}),
        )

    def _list_request(self, prefix: str, cursor: str) -> pb.ListLocksRequest:
        return pb.ListLocksRequest(prefix=prefix, limit=1000, cursor=cursor)

    def _show_request(self, name: str, kind: str) -> pb.GetLockRequest:
        return pb.GetLockRequest(name=name, kind=KINDS[kind])


def status_error(err: grpc.RpcError) -> LockException:
    """The exception for a failed inspection call."""
    return LockException(err.details() or str(err.code()), err.code())


def error(err: grpc.RpcError) -> LockException:
    """The exception for a status that ended a Hold stream before a grant."""
    code = err.code()
    details = err.details() or str(code)
    # The server's --request-timeout is marked: it is not "not acquired".
    cut = any(
        k == 'padlock-error' and v == 'request-timeout'
        for k, v in (err.trailing_metadata() or ())
    )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not cut:
        return AlreadyLocked(details, code)
    return LockException(details, code)


def lost_from(message: pb.Lost) -> LockLost:
    return LockLost(LOST_REASONS.get(message.reason, 'other'), message.detail)


@dataclass(frozen=True)
class Holder:
    id: str
    owner: str
    peer: str
    since_unix_ms: int
    fence: int
    slot: int | None
    mode: str
    labels: dict


@dataclass(frozen=True)
class Waiter:
    id: str
    owner: str
    peer: str
    position: int
    since_unix_ms: int
    mode: str
    labels: dict


@dataclass(frozen=True)
class LockInfo:
    """Who holds and who waits for one lock (a list shows the first few of
    each; `holders_total` and `waiters_total` count them all)."""

    name: str
    kind: str
    mode: str | None
    limit: int
    holders: list
    waiters: list
    holders_total: int
    waiters_total: int


def lock_info(info: pb.LockInfo) -> LockInfo:
    return LockInfo(
        name=info.name,
        kind=KIND_NAMES.get(info.kind, 'file'),
        mode=MODE_NAMES.get(info.mode),
        limit=info.limit,
        holders=[
            Holder(
                h.id,
                h.owner,
                h.peer,
                h.since_unix_ms,
                h.fence,
                h.slot if h.HasField('slot') else None,
                MODE_NAMES.get(h.mode, 'exclusive'),
                dict(h.labels),
            )
            for h in info.holders
        ],
        waiters=[
            Waiter(
                w.id,
                w.owner,
                w.peer,
                w.position,
                w.since_unix_ms,
                MODE_NAMES.get(w.mode, 'exclusive'),
                dict(w.labels),
            )
            for w in info.waiters
        ],
        holders_total=max(info.holders_total, len(info.holders)),
        waiters_total=max(info.waiters_total, len(info.waiters)),
    )
