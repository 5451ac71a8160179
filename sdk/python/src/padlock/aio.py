"""The asyncio client: the same locks as `padlock.Client`, awaited.

>>> async with padlock.aio.Client('http://127.0.0.1:7420') as client:  # doctest: +SKIP
...     async with client.lock('x', timeout=5) as lock:
...         await write(fence=lock.fence)

`lock.lost` is an `asyncio.Event`; `on_lost` is called in the event loop.
"""

from __future__ import annotations

import asyncio
import typing

import grpc
import grpc.aio

from . import _common as common
from ._common import Request
from ._errors import LockException, LockLost
from .v1 import padlock_pb2 as pb

RELEASE_WAIT = 10.0


class Client(common.ClientBase):
    """A connection to padlockd for asyncio code; see `padlock.Client`."""

    _channels = grpc.aio

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
        on_lost: typing.Callable[[LockHandle], typing.Any] | None = None,
    ) -> LockHandle:
        """A lock to take with ``async with`` (or `acquire` and `release`);
        the arguments are those of `padlock.Client.lock`."""
        request = self._request(name, timeout, kind, shared, limit, owner, labels)
        return LockHandle(self, request, on_lost)

    async def list(self, prefix: str = '') -> list:
        locks, cursor = [], ''
        while True:
            page = await self._call(self._stub.ListLocks, self._list_request(prefix, cursor))
            locks.extend(common.lock_info(info) for info in page.locks)
            if not page.next_cursor:
                return locks
            cursor = page.next_cursor

    async def show(self, name: str, kind: str = 'file') -> common.LockInfo | None:
        try:
            info = await self._stub.GetLock(self._show_request(name, kind), metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise common.status_error(err) from None
        return common.lock_info(info)

    async def _call(self, method, request):
        try:
            return await method(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise common.status_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class LockHandle:
    """One lock for asyncio code; see `padlock.LockHandle`. `lost` is an
    `asyncio.Event`."""

    def __init__(
        self,
        client: Client,
        request: Request,
        on_lost: typing.Callable[[LockHandle], typing.Any] | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self._on_lost = on_lost
        self.fence: int | None = None
        self.slot: int | None = None
        self.holder_id: str | None = None
        self.lost = asyncio.Event()
        self._loss: LockLost | None = None
        self._released = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self._request.name

    async def acquire(self, timeout: float | None | object = ...) -> LockHandle:
        """Takes the lock; raises `AlreadyLocked` or `LockException` as
        `padlock.LockHandle.acquire` does."""
        if self._call is not None:
            raise LockException(f'lock {self.name!r} is already acquired by this handle')
        if timeout is not ...:
            self._request.timeout = typing.cast('float | None', timeout)
        call = self._client._stub.Hold(metadata=self._client._metadata)
        try:
            await call.write(self._request.acquire_message())
            granted = await asyncio.wait_for(_grant(call), self._request.answer_within())
        except asyncio.TimeoutError:
            call.cancel()
            raise LockException(
                f'padlockd did not answer within {self._request.answer_within():.1f} s'
            ) from None
        except grpc.RpcError as err:
            call.cancel()
            raise common.error(err) from None
        except BaseException:
            call.cancel()
            raise
        self.fence = granted.fence
        self.slot = granted.slot if granted.HasField('slot') else None
        self.holder_id = granted.holder_id
        self.lost.clear()
        self._released.clear()
        self._loss = None
        self._call = call
        self._reader = asyncio.ensure_future(self._watch(call))
        return self

    async def _watch(self, call: grpc.aio.StreamStreamCall) -> None:
        """Reads the stream after the grant: a release, or a loss."""
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    if not self._released.is_set():
                        self._lose(LockLost('disconnected', 'the server ended the stream'))
                    return
                which = message.WhichOneof('msg')
                if which == 'released':
                    self._released.set()
                elif which == 'lost':
                    self._lose(common.lost_from(message.lost))
        except grpc.RpcError as err:
            if not self._released.is_set() and err.code() != grpc.StatusCode.CANCELLED:
                self._lose(LockLost('disconnected', err.details() or str(err.code())))
        except asyncio.CancelledError:
            pass

    def _lose(self, loss: LockLost) -> None:
        if self.lost.is_set() or self._released.is_set():
            return
        self._loss = loss
        self.lost.set()
        if self._on_lost is not None:
            result = self._on_lost(self)
            if asyncio.iscoroutine(result):
                asyncio.ensure_future(result)

    def check(self) -> None:
        """Raises `LockLost` if the lock was lost."""
        if self._loss is not None:
            raise self._loss

    @property
    def loss(self) -> LockLost | None:
        return self._loss

    async def release(self) -> None:
        """Releases and waits for the server to confirm; raises `LockLost`
        if the lock had been lost first."""
        call, reader = self._call, self._reader
        if call is None:
            return
        self._call = None
        if not self.lost.is_set():
            try:
                await call.write(common.RELEASE)
                done = asyncio.ensure_future(self._released.wait())
                lost = asyncio.ensure_future(self.lost.wait())
                await asyncio.wait(
                    [done, lost, reader] if reader else [done, lost],
                    timeout=RELEASE_WAIT,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                done.cancel()
                lost.cancel()
            except grpc.RpcError:
                pass
        if self._released.is_set():
            try:
                await call.done_writing()
            except grpc.RpcError:
                pass
        else:
            call.cancel()
        if self._loss is not None:
            raise self._loss

    async def __aenter__(self) -> LockHandle:
        if self._call is None:
            await self.acquire()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await self.release()
        except LockLost:
            if exc_type is None:
                raise

    def __del__(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()


async def _grant(call: grpc.aio.StreamStreamCall) -> pb.Granted:
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            raise LockException('the server ended the stream before a grant')
        which = message.WhichOneof('msg')
        if which == 'queued':
            continue
        if which == 'granted':
            return message.granted
        raise LockException(f'the server ended the stream before a grant ({which})')
