"""facepq_core.redact: URLs in logs and errors carry no credentials."""
from __future__ import annotations

import pytest

from facepq_core.redact import redact_url


@pytest.mark.parametrize("url,shown", [
    # a password containing '@': the credentials end at the authority's last '@'
    ("redis://app:p@ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://user:secret@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:secret@host:6379/0", "redis://***@host:6379/0"),  # password only (requirepass)
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
    ("rediss://user:secret@host:6380/0", "rediss://***@host:6380/0"),
    ("rediss://user:secret@host:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem",
     "rediss://***@host:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem"),
    ("redis://u:p@host/0?client_name=a@b", "redis://***@host/0?client_name=a@b"),
    ("redis://host:6379/0?password=secret&db=1", "redis://host:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=0&password=secret", "unix:///run/redis.sock?db=0&password=***"),
    # an unescaped '/' or '?' in a password ends the authority early: hide everything up to the last '@'
    ("redis://app:pa/ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://app:pa?ss@host:6379/0", "redis://***@host:6379/0"),
    # ambiguous: an '@' after the path may end a password too, so this hides more than it must
    ("redis://host:6379/0?client_name=a@b", "redis://***@b"),
    ("localhost:6379", "localhost:6379"),
    ("", ""),
])
def test_redact_url_hides_credentials_and_keeps_the_rest(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("secret", ["Pw1@Pw2", "Pw1@Pw2@Pw3", "Pw1/Pw2", "Pw1?Pw2", "Pw1#Pw2", "Pw1:Pw2@"])
def test_no_part_of_a_password_survives(secret):
    for url in (f"redis://app:{secret}@host:6379/0", f"redis://:{secret}@host:6379/0",
                f"rediss://app:{secret}@host:6380/0?ssl_ca_certs=/ca.pem", f"redis://host:6379/0?password={secret}"):
        shown = redact_url(url)
        assert "host" in shown and "Pw" not in shown, (url, shown)
