"""The asyncio client."""

from __future__ import annotations

import asyncio
import time

import pytest

import padlock


def test_asyncio_locks_wait_in_order_and_time_out(server):
    async def main():
        async with padlock.aio.Client(server.url) as client:
            holder = await client.lock('aio', timeout=5).acquire()
            order = []

            async def wait(i):
                async with client.lock('aio', timeout=20) as lock:
                    order.append((i, lock.fence))

            tasks = []
            for i in range(3):
                tasks.append(asyncio.ensure_future(wait(i)))
                while True:
                    info = await client.show('aio')
                    if info is not None and info.waiters_total == i + 1:
                        break
                    await asyncio.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(padlock.AlreadyLocked):
                await client.lock('aio', timeout=0.5).acquire()
            assert time.monotonic() - started >= 0.45
            with pytest.raises(padlock.AlreadyLocked):
                await client.lock('aio', timeout=0).acquire()
            await holder.release()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
            assert [i for i, _ in order] == [0, 1, 2]
            fences = [holder.fence] + [f for _, f in order]
            assert fences == sorted(fences)
            assert await client.list() == []

    asyncio.run(main())


def test_asyncio_semaphores_and_errors(server):
    async def main():
        async with padlock.aio.Client(server.url) as client:
            async with client.lock('gpu', kind='semaphore', limit=2) as a:
                async with client.lock('gpu', kind='semaphore', limit=2) as b:
                    assert {a.slot, b.slot} == {0, 1}
            with pytest.raises(padlock.LockException) as raised:
                await client.lock('../x').acquire()
            assert 'invalid lock name' in str(raised.value)

    asyncio.run(main())
