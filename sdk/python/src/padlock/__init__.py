"""padlock: network locks from padlockd, shaped like portalocker.

A lock is held for exactly as long as its stream to padlockd is open:
leaving the ``with`` block, `release()`, garbage collection, the process
exiting or the connection breaking all hand it to the next waiter, in
arrival order and without polling.

>>> import padlock
>>> client = padlock.Client('http://127.0.0.1:7420')             # doctest: +SKIP
>>> with client.lock('reports/nightly', timeout=30) as lock:     # doctest: +SKIP
...     write_report(fence=lock.fence)
...     lock.check()               # raises padlock.LockLost if it was lost

Coming from portalocker, change the import:

>>> with padlock.Lock('reports/nightly', timeout=30):             # doctest: +SKIP
...     ...
>>> with padlock.BoundedSemaphore(4, name='gpu', timeout=30) as slot:  # doctest: +SKIP
...     ...
>>> with padlock.RedisLock('deploy/prod', timeout=30):            # doctest: +SKIP
...     ...

For asyncio, `padlock.aio.Client`. The full guide is docs/python.md in the
padlock repository.
"""

from . import aio
from ._client import Client, LockHandle
from ._common import DEFAULT_SERVER, Holder, LockInfo, Waiter
from ._errors import AlreadyLocked, LockException, LockLost, LockLostError
from ._portalocker import (
    DEFAULT_TIMEOUT,
    BoundedSemaphore,
    Lock,
    LockFlags,
    RedisLock,
    RLock,
    default_client,
)

__all__ = [
    'DEFAULT_SERVER',
    'DEFAULT_TIMEOUT',
    'AlreadyLocked',
    'BoundedSemaphore',
    'Client',
    'Holder',
    'Lock',
    'LockException',
    'LockFlags',
    'LockHandle',
    'LockInfo',
    'LockLost',
    'LockLostError',
    'RLock',
    'RedisLock',
    'Waiter',
    'aio',
    'default_client',
]

__version__ = '0.1.0'
