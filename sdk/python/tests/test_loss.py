"""A holder is told when its lock is lost: `lost`, `on_lost`, `check()`."""

from __future__ import annotations

import asyncio
import signal
import threading
import urllib.request

import pytest
from conftest import until_waiters

import padlock


def test_lost_is_set_when_padlockd_shuts_down(server):
    client = server.client()
    called = threading.Event()
    lock = client.lock('drain', on_lost=lambda held: called.set()).acquire()
    lock.check()  # held: nothing to raise
    server.process.send_signal(signal.SIGTERM)
    assert lock.lost.wait(20), 'lost not set after SIGTERM'
    assert called.wait(5), 'on_lost not called'
    with pytest.raises(padlock.LockLost) as raised:
        lock.check()
    assert raised.value.reason == 'shutdown'
    assert 'shutting down' in str(raised.value)
    assert isinstance(raised.value, padlock.LockException)
    with pytest.raises(padlock.LockLost):
        lock.release()
    assert server.process.wait(20) == 0


def test_lost_is_set_when_an_administrator_revokes(start_server, tmp_path):
    token = tmp_path / 'admin-token'
    token.write_text('s3cret\n')
    token.chmod(0o600)
    server = start_server('--admin-token-file', str(token))
    client = server.client()
    seen = []
    lock = client.lock('jobs/nightly', on_lost=lambda held: seen.append(held.loss.reason)).acquire()
    waiter_got = []
    waiter = threading.Thread(
        target=lambda: waiter_got.append(client.lock('jobs/nightly', timeout=20).acquire())
    )
    waiter.start()
    until_waiters(client, 'jobs/nightly', 1)
    request = urllib.request.Request(
        f'{server.url}/v1/locks/jobs/nightly/holders/{lock.holder_id}',
        method='DELETE',
        headers={'Authorization': 'Bearer s3cret'},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert lock.lost.wait(10)
    assert seen == ['revoked']
    with pytest.raises(padlock.LockLost) as raised:
        with lock:
            pass  # leaving the block reports the loss
    assert raised.value.reason == 'revoked'
    waiter.join(20)
    assert waiter_got and waiter_got[0].fence > lock.fence
    waiter_got[0].release()


def test_asyncio_locks_are_told_too(server):
    async def main():
        async with padlock.aio.Client(server.url) as client:
            lock = await client.lock('aio-drain').acquire()
            assert isinstance(lock.lost, asyncio.Event)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(lock.lost.wait(), 20)
            with pytest.raises(padlock.LockLost):
                lock.check()

    asyncio.run(main())
