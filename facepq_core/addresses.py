"""Server addresses as users type them: `host`, `host:port`, `[::1]:port`, with the coordinator's default port.

The coordinator listens on DEFAULT_COORDINATOR_PORT unless told otherwise, and every client
(`facepq search`, `facepq enrol`, `facepq status`, the Python client, the README's snippets,
deploy/) reads a bare host as that port. gRPC itself would read a bare host as port 443,
so an address is always normalised here before it reaches a channel.
"""
from __future__ import annotations

from facepq_core.errors import ConfigError

DEFAULT_COORDINATOR_PORT = 50050
DEFAULT_COORDINATOR_ADDRESS = f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}"
# Targets gRPC resolves itself (Unix sockets, explicit resolvers): passed through unchanged.
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def parse_address(text: str, default_port: int = DEFAULT_COORDINATOR_PORT) -> str:
    """`host[:port]` -> `host:port` for a gRPC channel, the port defaulting to `default_port`.

    Accepts `host`, `host:port`, `:port` (loopback), `[v6]`, `[v6]:port` and a bare IPv6
    address (`::1`); `unix:...`, `dns:...` and the other gRPC target schemes pass unchanged.

    Raises:
        ConfigError: an empty address, or a port that is not a number in 1..65535.
    """
    address = (text or "").strip()
    if not address:
        raise ConfigError("empty server address: give host or host:port")
    if address.startswith(_SCHEMES):
        return address
    if address.startswith("["):  # [v6] or [v6]:port
        host, bracket, rest = address[1:].partition("]")
        if not host or not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r}: write an IPv6 address as [addr] or [addr]:port")
        return f"[{host}]:{_port(rest[1:], text) if rest else default_port}"
    if address.count(":") > 1:  # a bare IPv6 address: no port can be told apart from it
        return f"[{address}]:{default_port}"
    host, sep, port = address.partition(":")
    return f"{host or '127.0.0.1'}:{_port(port, text) if sep else default_port}"


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"bad address {address!r}: the port must be a number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"bad address {address!r}: the port must be in 1..65535, got {port}")
    return port
