"""Python and Rust (the padlock CLI, built on the Rust SDK) share one queue
and one fence sequence."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest
from conftest import bin_path, until, until_waiters

import padlock


def test_a_python_holder_blocks_the_rust_cli_and_hands_it_the_lock(server):
    client = server.client()
    holder = client.lock('interop', timeout=5).acquire()
    script = 'echo "fence=$PADLOCK_FENCE"'
    cli = server.cli(
        'run', '--wait', '20', 'interop', '--', 'sh', '-c', script,
        stdout=subprocess.PIPE, text=True,
    )
    until_waiters(client, 'interop', 1)
    assert cli.poll() is None, 'the CLI ran while Python held the lock'
    holder.release()
    out, _ = cli.communicate(timeout=20)
    assert cli.returncode == 0
    cli_fence = int(out.strip().split('=')[1])
    assert cli_fence > holder.fence
    with client.lock('interop', timeout=5) as after:
        assert after.fence > cli_fence


def test_the_rust_cli_blocks_python_and_hands_it_the_lock(server):
    client = server.client()
    cli = server.cli('hold', 'interop2', stdout=subprocess.PIPE, text=True)
    line = cli.stdout.readline()
    assert line.startswith('granted interop2 fence='), line
    cli_fence = int(line.split('fence=')[1].split()[0])
    with pytest.raises(padlock.AlreadyLocked):
        client.lock('interop2', timeout=0).acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(client.lock('interop2', timeout=20).acquire()))
    waiter.start()
    until_waiters(client, 'interop2', 1)
    cli.send_signal(signal.SIGTERM)  # the CLI releases and exits 0
    assert cli.wait(20) == 0
    waiter.join(20)
    assert got and got[0].fence > cli_fence
    got[0].release()


def test_python_and_rust_clients_interleave_on_one_fence_sequence(server, tmp_path):
    client = server.client()
    fences = []
    for _ in range(5):
        with client.lock('sequence', timeout=10) as lock:
            fences.append(lock.fence)
        out = subprocess.run(
            [str(bin_path('padlock')), 'run', '--wait', '10', 'sequence', '--', 'sh', '-c', 'echo $PADLOCK_FENCE'],
            env=dict(os.environ, PADLOCK_SERVER=server.url),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        fences.append(int(out.stdout.strip()))
    assert fences == sorted(fences) and len(set(fences)) == len(fences), fences


def test_the_python_client_lists_what_rust_holds(server):
    cli = server.cli('hold', '--limit', '3', 'gpu', stdout=subprocess.PIPE, text=True)
    assert cli.stdout.readline().startswith('granted gpu')
    client = server.client()
    info = until('the CLI holder is listed', lambda: client.show('gpu', 'semaphore'))
    assert info.holders_total == 1
    assert info.holders[0].owner.startswith('padlock[')
    assert [l.name for l in client.list()] == ['gpu']
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(20) == 0
