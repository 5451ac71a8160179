"""Exceptions, named as portalocker names them so `except` clauses carry over."""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    import grpc


class LockException(Exception):
    """Any failure to take or keep a lock. `code` is the gRPC status code
    the server answered with (`None` when the failure is the client's own),
    and the message is the server's."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class AlreadyLocked(LockException):
    """The lock was not acquired within the timeout (or at once, for
    ``timeout=0``): someone else holds it."""


class LockLost(LockException):
    """The lock ended without being released: the server shut down, an
    administrator revoked it, its backend failed, or the connection to the
    server broke. `reason` is one of ``'shutdown'``, ``'revoked'``,
    ``'backend'``, ``'disconnected'``, ``'other'``."""

    def __init__(self, reason: str, detail: str) -> None:
        # The server's details are whole sentences that say the reason;
        # the client's own (a broken connection) need the reason first.
        said = _REASONS.get(reason, reason)
        if not detail:
            text = f'lock lost: {said}'
        elif reason in ('disconnected', 'other'):
            text = f'lock lost: {said} ({detail})'
        else:
            text = f'lock lost: {detail}'
        super().__init__(text)
        self.reason = reason
        self.detail = detail


# portalocker's name for the same thing.
LockLostError = LockLost

_REASONS = {
    'shutdown': 'the server is shutting down',
    'revoked': 'revoked by an administrator',
    'backend': 'the lock backend failed',
    'disconnected': 'the connection to the server broke',
    'other': 'lost',
}
