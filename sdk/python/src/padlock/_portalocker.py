"""portalocker-shaped locks: change ``import portalocker`` to ``import
padlock`` and `Lock`, `BoundedSemaphore` and `RedisLock` take the same
arguments (those that mean nothing for a network lock are accepted and
ignored), have the same defaults (a 5 s timeout) and raise the same
exceptions, but the lock lives on padlockd: it holds across machines,
waiters are served in order without polling, and every grant has a fence.

The server is `$PADLOCK_SERVER` (default ``http://127.0.0.1:7420``), or
the `client` given.
"""

from __future__ import annotations

import enum
import threading
import typing

from ._client import Client, LockHandle
from ._errors import AlreadyLocked

#: portalocker's default timeout, in seconds, when `timeout` is None.
DEFAULT_TIMEOUT = 5.0
DEFAULT_CHECK_INTERVAL = 0.25


class LockFlags(enum.IntFlag):
    """portalocker's flags (the values of `fcntl`'s)."""

    SHARED = 1
    EXCLUSIVE = 2
    NON_BLOCKING = 4
    UNBLOCK = 8


_default: Client | None = None
_default_guard = threading.Lock()


def default_client() -> Client:
    """The client of the drop-in locks: one per process, on
    `$PADLOCK_SERVER`."""
    global _default
    with _default_guard:
        if _default is None:
            _default = Client()
        return _default


class _PortalockerShaped(LockHandle):
    """`LockHandle` with portalocker's defaults and `acquire` arguments."""

    def _setup(
        self,
        client: Client | None,
        name: str,
        timeout: float | None,
        fail_when_locked: bool | None,
        on_lost: typing.Callable[[LockHandle], None] | None,
        *,
        kind: str = 'file',
        shared: bool = False,
        limit: int = 0,
        owner: str | None = None,
        labels: dict | None = None,
    ) -> None:
        client = client or default_client()
        # portalocker: a timeout of None means its default, 5 s.
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        request = client._request(name, timeout, kind, shared, limit, owner, labels)
        LockHandle.__init__(self, client, request, on_lost)
        self._fail_when_locked = bool(fail_when_locked)

    def acquire(
        self,
        timeout: float | None | object = ...,
        check_interval: float | None = None,
        fail_when_locked: bool | None = None,
    ) -> _PortalockerShaped:
        """Takes the lock: waits at most `timeout` seconds (this call
        only; default the lock's), or fails at once with `AlreadyLocked`
        when `fail_when_locked`."""
        if fail_when_locked is None:
            fail_when_locked = self._fail_when_locked
        if timeout is ... or timeout is None:
            timeout = self._request.timeout
        if fail_when_locked:
            timeout = 0
        super().acquire(timeout)
        return self


class Lock(_PortalockerShaped):
    """portalocker's `Lock`, as a padlock file lock named `filename`
    (the name of the lock on the server; with a file kind it is a file in
    padlockd's lock directory, which local portalocker users of that
    directory share)."""

    def __init__(
        self,
        filename: str,
        mode: str = 'a',
        timeout: float | None = None,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        fail_when_locked: bool = False,
        flags: int = LockFlags.EXCLUSIVE | LockFlags.NON_BLOCKING,
        *,
        client: Client | None = None,
        owner: str | None = None,
        labels: dict | None = None,
        on_lost: typing.Callable[[LockHandle], None] | None = None,
        **_file_open_kwargs: typing.Any,
    ) -> None:
        del mode, check_interval
        shared = bool(flags & LockFlags.SHARED)
        self._setup(client, str(filename), timeout, fail_when_locked, on_lost,
                    shared=shared, owner=owner, labels=labels)


class RLock(Lock):
    """portalocker's `RLock`: the same thread may take it again; it is
    released when every acquire has been released."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = 0

    def acquire(self, *args: typing.Any, **kwargs: typing.Any) -> RLock:
        if self._depth == 0:
            super().acquire(*args, **kwargs)
        self._depth += 1
        return self

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            super().release()


class BoundedSemaphore(_PortalockerShaped):
    """portalocker's `BoundedSemaphore`: `maximum` slots of the semaphore
    `name`. As in portalocker, a full semaphore is waited for the whole
    `timeout`; then ``fail_when_locked=True`` (the default) raises
    `AlreadyLocked` and ``False`` makes `acquire` return ``None``. The
    held slot is `slot`."""

    def __init__(
        self,
        maximum: int,
        name: str = 'bounded_semaphore',
        filename_pattern: str = '{name}.{number:02d}.lock',
        directory: str = '',
        timeout: float | None = DEFAULT_TIMEOUT,
        check_interval: float | None = DEFAULT_CHECK_INTERVAL,
        fail_when_locked: bool | None = True,
        *,
        client: Client | None = None,
        owner: str | None = None,
        labels: dict | None = None,
        on_lost: typing.Callable[[LockHandle], None] | None = None,
    ) -> None:
        del filename_pattern, directory, check_interval
        self._setup(client, name, timeout, fail_when_locked, on_lost,
                    kind='semaphore', limit=maximum, owner=owner, labels=labels)

    def acquire(  # type: ignore[override]
        self,
        timeout: float | None | object = ...,
        check_interval: float | None = None,
        fail_when_locked: bool | None = None,
    ) -> BoundedSemaphore | None:
        if fail_when_locked is None:
            fail_when_locked = self._fail_when_locked
        if timeout is ... or timeout is None:
            timeout = self._request.timeout
        try:
            LockHandle.acquire(self, timeout)
        except AlreadyLocked:
            if fail_when_locked:
                raise
            return None
        return self

    def __enter__(self) -> BoundedSemaphore:
        if self.acquire() is None:
            raise AlreadyLocked(f'all {self._request.limit} slots of {self.name!r} are taken')
        return self


class RedisLock(_PortalockerShaped):
    """portalocker's `RedisLock`, as a padlock redis lock on `channel`: it
    is held through padlockd (which must have ``--redis-url``), on the same
    Redis lock space as portalocker's `RedisLock` users. `connection` and
    `redis_kwargs` are accepted and ignored: padlockd has the Redis
    connection. ``flags=LockFlags.SHARED`` asks for a shared lock."""

    def __init__(
        self,
        channel: str,
        connection: typing.Any = None,
        timeout: float | None = None,
        check_interval: float | None = None,
        fail_when_locked: bool | None = False,
        thread_sleep_time: float = 0.1,
        unavailable_timeout: float = 1,
        redis_kwargs: dict | None = None,
        flags: int = LockFlags.EXCLUSIVE,
        on_lost: typing.Callable[[LockHandle], None] | None = None,
        interrupt_on_lost: bool | None = None,
        *,
        client: Client | None = None,
        owner: str | None = None,
        labels: dict | None = None,
        **_ignored: typing.Any,
    ) -> None:
        del connection, check_interval, thread_sleep_time, unavailable_timeout
        del redis_kwargs, interrupt_on_lost
        shared = bool(flags & LockFlags.SHARED)
        self._setup(client, channel, timeout, fail_when_locked, on_lost,
                    kind='redis', shared=shared, owner=owner, labels=labels)

    @property
    def fence_token(self) -> int | None:
        """portalocker's name for the fence."""
        return self.fence
