"""Transport security and authentication for every facepq gRPC server and client.

TLS (server side): `--tls-cert PEM --tls-key PEM` serve TLS; adding `--tls-client-ca PEM`
requires and verifies client certificates (mutual TLS). Client side: `--tls-ca PEM`
verifies the server against that CA; `--tls-cert/--tls-key` are presented as the client
certificate when the server asks for one. Every flag has an environment fallback
(FACEPQ_TLS_CERT, FACEPQ_TLS_KEY, FACEPQ_TLS_CLIENT_CA, FACEPQ_TLS_CA) so secrets need not
appear on a command line. Without TLS flags everything stays plaintext, which is only
sensible on loopback: a server that binds another address without TLS logs a WARNING.

Tokens: a server given a token (`--auth-token-file`, or the token itself in
FACEPQ_AUTH_TOKEN) requires `authorization: Bearer <token>` metadata on its protected
methods and answers UNAUTHENTICATED otherwise, before the servicer runs, so a refused
call changes nothing. A token file may hold several tokens, one per line (rotation: add
the new one, move the clients, remove the old one). Tokens are compared with
`hmac.compare_digest`, so the time a refusal takes says nothing about the token.
Health checks and reflection stay open: probes and tools need them and they hold no
gallery data.

Two tokens, two roles. The *admin* token (`--auth-token-file` of a coordinator) lets clients
change the index; it never leaves the coordinator. The *node* token (`--node-auth-token-file`
of a coordinator, `--auth-token-file` of its nodes) is shared by a coordinator and its nodes,
and works both ways without ever crossing the wire:
* coordinator -> node: the coordinator sends `node_bearer(token)`, a value derived from the
  token (HMAC), as its bearer; nodes accept it (and the token itself, for operators' tools);
* node -> coordinator: every call carries a fresh nonce (`x-facepq-nonce`), and a node signs
  its reply, `HMAC(node_reply_key(token), nonce || reply bytes)`, in the trailer
  `x-facepq-node-proof`. The coordinator drops the hits of a reply without a valid proof and
  asks another replica: a process that got itself listed (a static list, a password-less
  Redis) learns only the bearer, which cannot forge a proof, so it can neither collect the
  admin token nor put forged hits first. Mutual TLS (`--node-tls-ca` + node certificates)
  authenticates nodes by certificate instead, or as well.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

from facepq_core.errors import ConfigError

log = logging.getLogger(__name__)

ENV_TLS_CERT = "FACEPQ_TLS_CERT"
ENV_TLS_KEY = "FACEPQ_TLS_KEY"
ENV_TLS_CLIENT_CA = "FACEPQ_TLS_CLIENT_CA"
ENV_TLS_CA = "FACEPQ_TLS_CA"
ENV_AUTH_TOKEN = "FACEPQ_AUTH_TOKEN"
ENV_AUTH_TOKEN_FILE = "FACEPQ_AUTH_TOKEN_FILE"
ENV_NODE_AUTH_TOKEN = "FACEPQ_NODE_AUTH_TOKEN"

AUTH_HEADER = "authorization"


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"the {what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key (PEM bytes) and, for mutual TLS, the CA its clients must chain to."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> "ServerTls | None":
        """None when neither cert nor key is given (plaintext); ConfigError when only one is."""
        if not cert and not key:
            if client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
            return None
        if not (cert and key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (PEM files)")
        return cls(_read_pem(cert, "TLS certificate"), _read_pem(key, "TLS private key"),
                   _read_pem(client_ca, "TLS client CA"))

    def credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to talk TLS: the CA to verify servers, and an optional client certificate."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_paths(cls, ca: str | None, cert: str | None = None, key: str | None = None) -> "ClientTls | None":
        """None without a CA (plaintext); a client certificate needs both cert and key."""
        if not ca:
            return None
        if bool(cert) != bool(key):
            raise ConfigError("a TLS client certificate needs both --tls-cert and --tls-key")
        return cls(_read_pem(ca, "TLS CA"), _read_pem(cert, "TLS certificate"), _read_pem(key, "TLS private key"))

    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (resolving names)."""
    host = host.strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def add_port(server, host: str, port: int, tls: ServerTls | None) -> int:
    """Bind `server` on host:port with TLS when configured; returns the bound port (ConfigError if none)."""
    address = f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, tls.credentials())
        else:
            if not is_loopback(host):
                log.warning("serving %s WITHOUT TLS on a non-loopback address: anyone on the network can read and "
                            "alter traffic; pass --tls-cert/--tls-key", address)
            bound = server.add_insecure_port(address)
    except RuntimeError:  # recent grpcio raises "Failed to bind" where older ones returned 0
        bound = 0
    if not bound:
        raise ConfigError(f"cannot listen on {address} (port in use or bad address)")
    return bound


def make_channel(address: str, tls: ClientTls | None = None, options=None):
    """A gRPC channel to `address`: TLS verified against `tls.ca` when given, else plaintext."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


# ---------------------------------------------------------------- tokens


def load_tokens(path: str | None = None, value: str | None = None) -> list[str]:
    """Tokens from a file (one per line, blank lines and '#' comments ignored) and/or a literal value.

    Raises:
        ConfigError: unreadable file, or a file with no token in it (an empty file would lock
        nobody out only by accident, so it is refused).
    """
    tokens: list[str] = []
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc
        tokens += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not tokens:
            raise ConfigError(f"the token file {path} holds no token (one token per line)")
    if value:
        tokens.append(value.strip())
    for t in tokens:
        if len(t) < 16:
            raise ConfigError("an auth token must be at least 16 characters (use e.g. `openssl rand -hex 32`)")
    return tokens


NONCE_HEADER = "x-facepq-nonce"
PROOF_HEADER = "x-facepq-node-proof"


def _derive(token: str, purpose: bytes) -> bytes:
    return hmac.new(token.encode("utf-8"), purpose, "sha256").digest()


def node_bearer(token: str) -> str:
    """What a coordinator sends nodes as its bearer: derived from the node token, useless for forging proofs."""
    return "fpqn1-" + _derive(token, b"facepq node bearer v1").hex()


def node_reply_key(token: str) -> bytes:
    """The key a node signs its replies with (never sent anywhere)."""
    return _derive(token, b"facepq node reply v1")


def reply_proof(key: bytes, nonce: str, reply_bytes: bytes) -> str:
    """HMAC-SHA256 of the call's nonce and the reply's deterministic serialisation, hex."""
    return hmac.new(key, nonce.encode("ascii") + b"\0" + reply_bytes, "sha256").hexdigest()


def proof_matches(key: bytes, nonce: str, reply_bytes: bytes, proofs: str) -> bool:
    """True when one of the comma-separated `proofs` (a node with rotated tokens signs with each) is valid."""
    want = reply_proof(key, nonce, reply_bytes).encode("ascii")
    ok = False
    for given in proofs.split(","):
        ok |= hmac.compare_digest(want, given.strip().encode("ascii", "replace"))
    return ok


def bearer_metadata(token: str | None) -> tuple:
    """Call metadata carrying `token` (empty when there is none)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def token_matches(header: str, tokens: list[str]) -> bool:
    """Constant-time check of an `authorization` header value against every accepted token."""
    if not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode("utf-8")
    ok = False
    for t in tokens:  # no early exit: every token is compared every time
        ok |= hmac.compare_digest(given, t.encode("utf-8"))
    return ok


def auth_interceptor(tokens: list[str], protected: set[str]):
    """A grpc.ServerInterceptor that answers UNAUTHENTICATED on `protected` methods without a valid token.

    Args:
        tokens: accepted tokens (non-empty).
        protected: full method names, e.g. "/facepq.v1.Coordinator/Enrol".
    """
    import grpc

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "this call needs a valid token: send metadata 'authorization: Bearer <token>'")

    denied = grpc.unary_unary_rpc_method_handler(deny)

    class _AuthInterceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            if handler_call_details.method not in protected:
                return continuation(handler_call_details)
            header = ""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == AUTH_HEADER:
                    header = value if isinstance(value, str) else value.decode("utf-8", "replace")
            if token_matches(header, tokens):
                return continuation(handler_call_details)
            log.warning("refused an unauthenticated call to %s", handler_call_details.method)
            return denied

    return _AuthInterceptor()


def interceptors(tokens: list[str], protected: set[str]) -> list:
    """[auth interceptor] when tokens are configured, else []."""
    return [auth_interceptor(tokens, protected)] if tokens else []


# ---------------------------------------------------------------- CLI flags


def add_server_flags(parser, auth_help: str) -> None:
    """--tls-cert/--tls-key/--tls-client-ca and --auth-token-file/--auth-search with env fallbacks."""
    g = parser.add_argument_group("security")
    g.add_argument("--tls-cert", default=os.environ.get(ENV_TLS_CERT), help=f"PEM certificate (env {ENV_TLS_CERT})")
    g.add_argument("--tls-key", default=os.environ.get(ENV_TLS_KEY), help=f"PEM private key (env {ENV_TLS_KEY})")
    g.add_argument("--tls-client-ca", default=os.environ.get(ENV_TLS_CLIENT_CA),
                   help=f"require client certificates signed by this CA: mutual TLS (env {ENV_TLS_CLIENT_CA})")
    g.add_argument("--auth-token-file", default=os.environ.get(ENV_AUTH_TOKEN_FILE),
                   help=f"{auth_help}; one token per line (env {ENV_AUTH_TOKEN_FILE}, or the token in "
                        f"{ENV_AUTH_TOKEN})")
    g.add_argument("--auth-search", action="store_true",
                   help="require the token for Search and Status too (without it, anyone who can reach the "
                        "coordinator can read every name and source in the index)")


def add_client_flags(parser) -> None:
    """--tls-ca [--tls-cert --tls-key] and --auth-token-file for a client command."""
    g = parser.add_argument_group("security")
    g.add_argument("--tls-ca", default=os.environ.get(ENV_TLS_CA),
                   help=f"verify the server with this CA and talk TLS (env {ENV_TLS_CA})")
    g.add_argument("--tls-cert", default=os.environ.get(ENV_TLS_CERT), help="client certificate for mutual TLS")
    g.add_argument("--tls-key", default=os.environ.get(ENV_TLS_KEY), help="client private key for mutual TLS")
    g.add_argument("--auth-token-file", default=os.environ.get(ENV_AUTH_TOKEN_FILE),
                   help=f"send the (first) token in this file (env {ENV_AUTH_TOKEN_FILE} or {ENV_AUTH_TOKEN})")


def server_security(args) -> tuple[ServerTls | None, list[str]]:
    """(TLS config, accepted tokens) from parsed server flags and the environment."""
    tls = ServerTls.from_paths(args.tls_cert, args.tls_key, args.tls_client_ca)
    tokens = load_tokens(args.auth_token_file, os.environ.get(ENV_AUTH_TOKEN))
    if getattr(args, "auth_search", False) and not tokens:
        raise ConfigError(f"--auth-search needs a token: --auth-token-file or {ENV_AUTH_TOKEN}")
    return tls, tokens


def client_security(args) -> tuple[ClientTls | None, str | None]:
    """(TLS config, token to send) from parsed client flags and the environment."""
    tls = ClientTls.from_paths(args.tls_ca, args.tls_cert if args.tls_ca else None,
                               args.tls_key if args.tls_ca else None)
    tokens = load_tokens(args.auth_token_file, os.environ.get(ENV_AUTH_TOKEN))
    return tls, (tokens[0] if tokens else None)
