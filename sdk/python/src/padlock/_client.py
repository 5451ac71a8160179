"""The blocking client: `Client` and the `LockHandle` its `lock()` returns.

A lock is held for exactly as long as its Hold stream is open. The stream
is fed from a queue (the Acquire, later the Release, then its end) and
read by a daemon thread, which records the grant and, afterwards, tells
the holder when the lock is lost: it sets `lost` and calls `on_lost`.
Leaving a ``with`` block, `release()`, garbage collection, the process
exiting and the connection breaking all end the stream, and the server
hands the lock to the next waiter.
"""

from __future__ import annotations

import queue
import threading
import time
import typing
import weakref

import grpc

from . import _common as common
from ._common import Request
from ._errors import LockException, LockLost
from .v1 import padlock_pb2 as pb

#: How long `release()` waits for the server to confirm.
RELEASE_WAIT = 10.0

_END = object()


class Client(common.ClientBase):
    """A connection to padlockd, shared by every lock taken through it
    (each lock is one stream on it). Thread-safe: many threads may hold
    different locks through one client.

    >>> client = padlock.Client('http://127.0.0.1:7420')   # doctest: +SKIP
    >>> with client.lock('reports/nightly', timeout=30) as lock:   # doctest: +SKIP
    ...     write_report(fence=lock.fence)
    """

    def lock(
        self,
        name: str,
        timeout: float | None = None,
        *,
        kind: str = 'file',
        shared: bool = False,
        limit: int = 0,
        owner: str | None = None,
        labels: dict | None = None,
        on_lost: typing.Callable[[LockHandle], None] | None = None,
    ) -> LockHandle:
        """A lock to take: use it in a ``with`` block, or call
        `~LockHandle.acquire` and `~LockHandle.release`.

        `timeout`: ``None`` waits as long as it takes, ``0`` tries once,
        otherwise seconds. `kind` is ``'file'``, ``'semaphore'`` (with a
        `limit`) or ``'redis'``; `shared` asks for a shared (read) lock.
        `on_lost` is called (from a background thread) if the lock is lost.
        """
        request = self._request(name, timeout, kind, shared, limit, owner, labels)
        return LockHandle(self, request, on_lost)

    def list(self, prefix: str = '') -> list:
        """Every lock with holders or waiters whose name starts with `prefix`."""
        locks, cursor = [], ''
        while True:
            page = self._call(self._stub.ListLocks, self._list_request(prefix, cursor))
            locks.extend(common.lock_info(info) for info in page.locks)
            if not page.next_cursor:
                return locks
            cursor = page.next_cursor

    def show(self, name: str, kind: str = 'file') -> common.LockInfo | None:
        """One lock, or ``None`` when nobody holds or waits for it."""
        try:
            info = self._stub.GetLock(self._show_request(name, kind), metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise common.status_error(err) from None
        return common.lock_info(info)

    def server_info(self) -> pb.ServerInfo:
        """The server's version, memory and counts."""
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise common.status_error(err) from None

    def close(self) -> None:
        """Closes the connection: every lock taken through it is released."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LockHandle:
    """One lock: a context manager, or `acquire()` then `release()`.

    While held: `fence` (strictly increasing per name for exclusive
    grants: hand it to the resource you protect), `slot` (semaphores),
    `holder_id`, and `lost`, a `threading.Event` set when the lock is lost
    (`check()` then raises `LockLost`).
    """

    def __init__(
        self,
        client: Client,
        request: Request,
        on_lost: typing.Callable[[LockHandle], None] | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self.fence: int | None = None
        self.slot: int | None = None
        self.holder_id: str | None = None
        # What the reader thread shares with this handle. The thread holds
        # no reference to the handle itself, so a handle that nobody
        # references is collected, and its `__del__` ends the stream.
        self._state = _State(weakref.ref(self), on_lost)
        self._requests: queue.SimpleQueue | None = None
        self._answers: queue.SimpleQueue | None = None
        self._call = None
        self._guard = threading.Lock()

    @property
    def lost(self) -> threading.Event:
        """Set when the lock is lost (never for a normal release)."""
        return self._state.lost

    @property
    def _released(self) -> threading.Event:
        return self._state.released

    @property
    def _loss(self) -> LockLost | None:
        return self._state.loss

    @property
    def name(self) -> str:
        return self._request.name

    @property
    def held(self) -> bool:
        """Held, as far as this client knows."""
        return self._call is not None and not self.lost.is_set() and not self._released.is_set()

    def acquire(self, timeout: float | None | object = ..., **_ignored) -> LockHandle:
        """Takes the lock; returns this handle. Raises `AlreadyLocked` when
        it was not acquired within the timeout (at once for ``0``), and
        `LockException` when the server refused or failed the request.
        `timeout`, when given, replaces the one of `Client.lock`."""
        with self._guard:
            if self._call is not None:
                raise LockException(f'lock {self.name!r} is already acquired by this handle')
            if timeout is not ...:
                self._request.timeout = typing.cast('float | None', timeout)
            self._open()
            return self

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        answers: queue.SimpleQueue = queue.SimpleQueue()
        requests.put(self._request.acquire_message())

        def outgoing():
            while True:
                item = requests.get()
                if item is _END:
                    return
                yield item

        call = self._client._stub.Hold(outgoing(), metadata=self._client._metadata)
        self._requests, self._answers = requests, answers
        self._state = _State(weakref.ref(self), self._state.on_lost)
        reader = threading.Thread(
            target=_read,
            args=(call, answers, self._state),
            name=f'padlock hold {self.name}',
            daemon=True,
        )
        reader.start()
        try:
            granted = self._await_grant(answers)
        except BaseException:
            requests.put(_END)
            call.cancel()
            raise
        self.fence = granted.fence
        self.slot = granted.slot if granted.HasField('slot') else None
        self.holder_id = granted.holder_id
        self._call = call

    def _await_grant(self, answers: queue.SimpleQueue) -> pb.Granted:
        limit = self._request.answer_within()
        deadline = None if limit is None else _now() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _now())
            try:
                kind, value = answers.get(timeout=remaining)
            except queue.Empty:
                raise LockException(
                    f'padlockd did not answer within {limit:.1f} s (the timeout plus '
                    f'{common.STREAM_GRACE:.0f} s)'
                ) from None
            if kind == 'queued':
                continue
            if kind == 'granted':
                return value
            if kind == 'error':
                raise value
            raise LockException(f'the server ended the stream before a grant ({kind})')

    def check(self) -> None:
        """Raises `LockLost` if the lock was lost."""
        if self._loss is not None:
            raise self._loss

    @property
    def loss(self) -> LockLost | None:
        """Why the lock was lost, once it was."""
        return self._loss

    def release(self) -> None:
        """Releases the lock and waits until the server confirms. Raises
        `LockLost` if the lock had been lost first (the server says so
        instead of confirming a release it could not vouch for)."""
        with self._guard:
            call, requests, answers = self._call, self._requests, self._answers
            if call is None or requests is None or answers is None:
                return
            self._call = None
            if not self.lost.is_set():
                requests.put(common.RELEASE)
                deadline = _now() + RELEASE_WAIT
                while not (self._released.is_set() or self.lost.is_set()):
                    try:
                        kind, _ = answers.get(timeout=max(0.0, deadline - _now()))
                    except queue.Empty:
                        break
                    if kind in ('end', 'error'):
                        break
            requests.put(_END)
            if not self._released.is_set():
                call.cancel()
            if self._loss is not None:
                raise self._loss

    def __enter__(self) -> LockHandle:
        if self._call is None:
            self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except LockLost:
            # Say so, unless the block already failed on its own.
            if exc_type is None:
                raise

    def __del__(self) -> None:
        # Garbage collected while held: end the stream, the server releases.
        requests, call = self._requests, self._call
        if call is not None and requests is not None:
            requests.put(_END)
            call.cancel()

    def __repr__(self) -> str:
        state = 'lost' if self.lost.is_set() else 'held' if self.held else 'not held'
        return f'<padlock lock {self.name!r} ({self._request.kind}) {state} fence={self.fence}>'


class _State:
    """A held lock's end, as the reader thread sees it."""

    def __init__(self, handle: weakref.ref, on_lost) -> None:
        self.handle = handle
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.released = threading.Event()
        self.loss: LockLost | None = None

    def lose(self, loss: LockLost) -> None:
        if self.lost.is_set() or self.released.is_set():
            return
        self.loss = loss
        self.lost.set()
        handle = self.handle()
        if self.on_lost is not None and handle is not None:
            try:
                self.on_lost(handle)
            except Exception:  # noqa: BLE001: a callback's failure must not hide the loss
                import traceback

                traceback.print_exc()


def _read(call, answers: queue.SimpleQueue, state: _State) -> None:
    """Reads a Hold stream to its end (a daemon thread per lock)."""
    granted = False
    try:
        for message in call:
            which = message.WhichOneof('msg')
            if which == 'queued':
                answers.put(('queued', message.queued))
            elif which == 'granted':
                granted = True
                answers.put(('granted', message.granted))
            elif which == 'released':
                state.released.set()
                answers.put(('released', None))
            elif which == 'lost':
                state.lose(common.lost_from(message.lost))
                answers.put(('lost', None))
        if granted and not state.released.is_set():
            state.lose(LockLost('disconnected', 'the server ended the stream'))
        answers.put(('end', None))
    except grpc.RpcError as err:
        if not granted:
            answers.put(('error', common.error(err)))
        elif not state.released.is_set() and err.code() != grpc.StatusCode.CANCELLED:
            state.lose(LockLost('disconnected', err.details() or str(err.code())))
        answers.put(('end', None))


def _now() -> float:
    return time.monotonic()
