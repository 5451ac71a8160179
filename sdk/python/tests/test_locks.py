"""Taking, waiting for and releasing locks through the Python client."""

from __future__ import annotations

import gc
import threading
import time

import pytest
from conftest import until, until_waiters

import padlock


def test_a_lock_is_held_until_released_with_increasing_fences(server):
    client = server.client()
    with client.lock('reports/nightly', timeout=5) as first:
        assert first.held
        assert first.fence > 0
        assert first.slot is None
        info = client.show('reports/nightly')
        assert info is not None and info.holders[0].id == first.holder_id
    assert not first.held
    assert client.show('reports/nightly') is None
    second = client.lock('reports/nightly', timeout=5).acquire()
    assert second.fence > first.fence
    second.release()


def test_timeout_zero_raises_already_locked_at_once(server):
    client = server.client()
    with client.lock('busy'):
        started = time.monotonic()
        with pytest.raises(padlock.AlreadyLocked) as raised:
            client.lock('busy', timeout=0).acquire()
        assert time.monotonic() - started < 2
        assert "lock 'busy' is held" in str(raised.value)
        assert isinstance(raised.value, padlock.LockException)


def test_a_timeout_raises_after_about_that_long(server):
    client = server.client()
    with client.lock('busy'):
        started = time.monotonic()
        with pytest.raises(padlock.AlreadyLocked):
            client.lock('busy', timeout=0.5).acquire()
        waited = time.monotonic() - started
        # About 0.5 s: not before, and not much after (a loose upper bound,
        # this machine may be busy).
        assert 0.45 <= waited < 5, waited
    assert client.show('busy') is None, 'the timed-out waiter left the queue'


def test_python_waiters_are_served_in_arrival_order(server):
    client = server.client()
    holder = client.lock('fifo').acquire()
    order = []
    threads = []
    for i in range(5):
        def wait(i=i):
            with client.lock('fifo', timeout=20) as lock:
                order.append((i, lock.fence))

        thread = threading.Thread(target=wait)
        thread.start()
        threads.append(thread)
        until_waiters(client, 'fifo', i + 1)
    holder.release()
    for thread in threads:
        thread.join(20)
    assert [i for i, _ in order] == [0, 1, 2, 3, 4]
    fences = [f for _, f in order]
    assert fences == sorted(fences) and len(set(fences)) == 5
    assert fences[0] > holder.fence


def test_one_client_serves_many_threads(server):
    client = server.client()
    counter = {'n': 0, 'inside': 0, 'max_inside': 0}
    guard = threading.Lock()

    def work():
        for _ in range(20):
            with client.lock('shared-counter', timeout=30):
                with guard:
                    counter['inside'] += 1
                    counter['max_inside'] = max(counter['max_inside'], counter['inside'])
                counter['n'] += 1
                with guard:
                    counter['inside'] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counter['n'] == 160
    assert counter['max_inside'] == 1, 'two threads held the lock at once'


def test_semaphores_shared_locks_owner_and_labels(server):
    client = server.client()
    a = client.lock('gpu', kind='semaphore', limit=2).acquire()
    b = client.lock('gpu', kind='semaphore', limit=2, owner='trainer', labels={'job': '7'}).acquire()
    assert {a.slot, b.slot} == {0, 1}
    with pytest.raises(padlock.AlreadyLocked):
        client.lock('gpu', kind='semaphore', limit=2, timeout=0).acquire()
    with pytest.raises(padlock.LockException) as mismatch:
        client.lock('gpu', kind='semaphore', limit=3, timeout=0).acquire()
    assert 'limit 2' in str(mismatch.value)
    info = client.show('gpu', 'semaphore')
    assert info.kind == 'semaphore' and info.limit == 2 and info.holders_total == 2
    trainer = next(h for h in info.holders if h.owner == 'trainer')
    assert trainer.labels == {'job': '7'}
    a.release()
    b.release()
    r1 = client.lock('db', shared=True).acquire()
    r2 = client.lock('db', shared=True, timeout=0).acquire()
    with pytest.raises(padlock.AlreadyLocked):
        client.lock('db', timeout=0).acquire()
    assert [l.name for l in client.list('db')] == ['db']
    r1.release()
    r2.release()


def test_bad_requests_carry_the_servers_message(server):
    client = server.client()
    with pytest.raises(padlock.LockException) as raised:
        client.lock('../../etc/passwd').acquire()
    assert 'invalid lock name' in str(raised.value)
    assert raised.value.code is not None and raised.value.code.name == 'INVALID_ARGUMENT'


def test_dropping_a_held_lock_releases_it(server):
    client = server.client()
    lock = client.lock('gc').acquire()
    del lock
    gc.collect()
    again = until('the dropped lock is released', lambda: _try(client, 'gc'))
    again.release()


def test_the_default_server_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv('PADLOCK_SERVER', server.addr)  # host:port means http://
    client = padlock.Client()
    with client.lock('env', timeout=5) as lock:
        assert lock.fence > 0


def _try(client, name):
    try:
        return client.lock(name, timeout=0).acquire()
    except padlock.AlreadyLocked:
        return None
