"""A portalocker script runs on padlock with only its import changed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import skip_if_opted_out

SCRIPT = textwrap.dedent(
    """\
    import portalocker
    import sys

    name, redis_port = sys.argv[1], int(sys.argv[2])
    events = []
    with portalocker.Lock(name, timeout=5):
        events.append('locked')
        try:
            portalocker.Lock(name, timeout=0.1, fail_when_locked=True).acquire()
        except portalocker.AlreadyLocked:
            events.append('busy')
    lock = portalocker.Lock(name, timeout=5)
    lock.acquire()
    lock.release()
    events.append('acquire-release')
    with portalocker.BoundedSemaphore(2, name='py-gpu', timeout=5):
        events.append('slot')
    with portalocker.RedisLock('py-deploy', timeout=5, redis_kwargs={'port': redis_port}):
        events.append('redis')
    try:
        raise portalocker.AlreadyLocked('caught as LockException')
    except portalocker.LockException:
        events.append('exceptions')
    print(' '.join(events))
    """
)

EXPECTED = 'locked busy acquire-release slot redis exceptions'


def portalocker_python() -> str:
    skip_if_opted_out('PADLOCK_SKIP_PORTALOCKER', 'portalocker interop')
    try:
        import portalocker  # noqa: F401
    except ImportError:
        pytest.fail(
            "portalocker is missing: pip install 'portalocker[redis]==4.4.2' "
            '(bash tests/run.sh does)'
        )
    return sys.executable


def test_the_same_script_runs_on_portalocker_and_on_padlock(start_server, redis_port, tmp_path):
    python = portalocker_python()
    server = start_server('--redis-url', f'redis://127.0.0.1:{redis_port}')
    original = tmp_path / 'with_portalocker.py'
    original.write_text(SCRIPT)
    switched = tmp_path / 'with_padlock.py'
    switched.write_text(SCRIPT.replace('import portalocker\n', 'import padlock as portalocker\n', 1))
    changed = [
        (a, b)
        for a, b in zip(original.read_text().splitlines(), switched.read_text().splitlines())
        if a != b
    ]
    assert changed == [('import portalocker', 'import padlock as portalocker')]
    env = dict(os.environ, PADLOCK_SERVER=server.url)
    for script in (original, switched):
        # In the lock directory, so both use the same lock file.
        run = subprocess.run(
            [python, str(script), 'dropin.lock', str(redis_port)],
            cwd=server.lock_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == EXPECTED, (script.name, run.stdout, run.stderr)
