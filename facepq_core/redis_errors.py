"""What a Redis failure means to a caller: refused credentials are a misconfiguration, anything else a
reason to retry later. Shared by the commit lock (indexer.lock) and the node registry (query_node.registry).

Recognised by the exception's class name and Redis's reply text, so this foundation module imports no
Redis client.
"""
from __future__ import annotations

from facepq_core.errors import FacepqError, Misconfigured, Unavailable
from facepq_core.redact import redact_url

_AUTH_CLASSES = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError", "NoPermissionError")
_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password")


def is_auth_failure(exc: BaseException) -> bool:
    """True when Redis refused the credentials (wrong password or user, or an ACL user without the right)."""
    return type(exc).__name__ in _AUTH_CLASSES or any(r in str(exc) for r in _AUTH_REPLIES)


def redis_error(exc: BaseException, redis_url: str, what: str) -> FacepqError:
    """Misconfigured (FAILED_PRECONDITION) for refused credentials, else Unavailable (UNAVAILABLE: retry);
    the message names the URL with its password masked and says what to do."""
    where = redact_url(redis_url)
    if is_auth_failure(exc):
        return Misconfigured(f"Redis at {where} refused the credentials to {what} ({exc}); check the user and "
                             f"password in the URL")
    return Unavailable(f"cannot {what}: Redis at {where} is unreachable ({exc}); retry when it is back")
