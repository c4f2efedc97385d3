"""A URL safe to print: credentials (user:password@, ?password=) replaced by ***.

Redis URLs may carry a password or an ACL user (`redis://user:password@host:6379/0`);
every log line and error message that names a Redis server goes through `redact_url`.
"""
from __future__ import annotations

import re

# A `password=` query argument (redis-py's from_url passes query arguments on as client options),
# up to the next argument: an unescaped '@' or '#' in it is still part of the password.
_QUERY_PASSWORD = re.compile(r"([?&;]password=)[^&;]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its user:password part, and any `password=` query value, replaced by `***`.

    The credentials end at the LAST '@' of the authority: a password may itself contain '@'
    (`redis://app:p@ss@host:6379/0` -> `redis://***@host:6379/0`). A password with an unescaped
    '/', '?' or '#' ends the authority early; then everything up to the last '@' of the URL is
    hidden, which may hide more than the credentials but never shows part of them.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(ends, default=len(rest))
    authority, tail = rest[:end], _QUERY_PASSWORD.sub(r"\1***", rest[end:])
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    elif "@" in tail:
        authority, tail = "***@", tail.rpartition("@")[2]
    return f"{scheme}://{authority}{tail}"
