"""facepq_core.addresses: a bare host means the coordinator's documented port (gRPC alone would use 443)."""
import pytest

from facepq_core.addresses import DEFAULT_COORDINATOR_PORT, parse_address
from facepq_core.errors import ConfigError


@pytest.mark.parametrize("text,expected", [
    ("localhost", "localhost:50050"),
    ("search.example.org", "search.example.org:50050"),
    ("10.0.0.7:7000", "10.0.0.7:7000"),
    (" 127.0.0.1:50061 ", "127.0.0.1:50061"),
    (":7000", "127.0.0.1:7000"),
    ("[::1]", "[::1]:50050"),
    ("[::1]:7000", "[::1]:7000"),
    ("::1", "[::1]:50050"),
    ("unix:/run/facepq.sock", "unix:/run/facepq.sock"),
    ("dns:///search.example.org:443", "dns:///search.example.org:443"),
])
def test_a_host_without_a_port_means_the_default_port(text, expected):
    assert DEFAULT_COORDINATOR_PORT == 50050
    assert parse_address(text) == expected


@pytest.mark.parametrize("text,message", [
    ("", "empty"), ("host:http", "must be a number"), ("host:0", "1..65535"), ("host:70000", "1..65535"),
    ("[::1", "IPv6"), ("[::1]x", "IPv6"),
])
def test_bad_addresses_are_refused_with_the_reason(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_address(text)
