"""The one serve() shape of facepq's gRPC servers, and the one place an error becomes a status code.

Both the query node and the coordinator start the same way: a server with the message
size limits and the token interceptor, the port (TLS or not), the servicer, health and
reflection, start. Stopping flips health to NOT_SERVING first, so load balancers and
coordinators stop sending before the port closes, then lets calls in flight finish.

Errors: servicers raise nothing of their own; a `facepq_core.errors.FacepqError` from
the logic they call is answered with `grpc.StatusCode[exc.status]` and the error's
message (`status_on_error`). The status of each error is chosen once, on its class.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facepq_core.errors import FacepqError
from query_node.security import add_port, interceptors
from query_node.wire import MESSAGE_OPTIONS

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # trailer of a refusal that says when to retry (gRPC retry design)
# Calls the server takes at most (running + queued inside gRPC), as a multiple of its worker threads. Beyond,
# gRPC refuses at once with RESOURCE_EXHAUSTED instead of queueing without bound; the servicers' own
# admission (query_node.admission) sheds expensive work well before that.
MAX_CALLS_PER_WORKER = 8
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status_code(exc: FacepqError) -> grpc.StatusCode:
    """The gRPC status for an error: the one its class names (facepq_core.errors)."""
    return grpc.StatusCode[exc.status]


@contextlib.contextmanager
def status_on_error(context):
    """Answer a FacepqError raised in the block with its status code and message (context.abort)."""
    try:
        yield
    except FacepqError as exc:
        retry_ms = getattr(exc, "retry_after_ms", None)
        if retry_ms is not None:  # load shedding: say when to retry (gRPC's own retry trailer)
            context.set_trailing_metadata(((RETRY_PUSHBACK, str(int(retry_ms))),))
        context.abort(status_code(exc), str(exc))


class GrpcServer:
    """A gRPC server serving one facepq service plus health and reflection.

    Args:
        service_name: full name of the service, e.g. "facepq.v1.QueryNode" (health and reflection use it).
        host, port: where to listen (port 0 = any free port; see `.port` after start()).
        workers: threads answering calls.
        tls: query_node.security.ServerTls, or None for plaintext.
        auth_tokens: when given, calls to `protected_methods` need `authorization: Bearer <token>`.
        protected_methods: method names of the service (e.g. "Search") the tokens protect.
    """

    def __init__(self, service_name: str, host: str = "127.0.0.1", port: int = 0, workers: int = 4, tls=None,
                 auth_tokens=(), protected_methods=()):
        self.service_name = service_name
        self.host, self.requested_port, self.workers = host, port, workers
        self.tls, self.auth_tokens = tls, list(auth_tokens)
        self.protected = {f"/{service_name}/{m}" for m in protected_methods}
        self.server = self.health = self.port = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, add_servicer: Callable[[grpc.Server], None],
              initial_health: Callable[[health.HealthServicer], None] | None = None) -> GrpcServer:
        """Create, bind, register, report health, start.

        Args:
            add_servicer: registers the service's servicer on the server; called once the port is bound,
                so it can read `.port` / `.address`.
            initial_health: sets the health statuses before the first call can arrive; default: the
                server ("") and the service SERVING.
        """
        # so_reuseport off: gRPC turns it on by default, and then a second server on a fixed port (two
        # coordinators on the default 50050) binds beside the first and silently takes half its calls.
        from query_node.metrics import grpc_interceptor

        # Metrics first: it times and counts every call, the token check's refusals included.
        metrics = grpc_interceptor(self.service_name.rsplit(".", 1)[-1].lower())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers),
                                  options=[*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)],
                                  interceptors=[metrics, *interceptors(self.auth_tokens, self.protected)],
                                  maximum_concurrent_rpcs=self.workers * MAX_CALLS_PER_WORKER)
        self.port = add_port(self.server, self.host, self.requested_port, self.tls)
        add_servicer(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((self.service_name, HEALTH_SERVICE, reflection.SERVICE_NAME),
                                            self.server)
        if initial_health is not None:
            initial_health(self.health)
        else:
            for name in ("", self.service_name):
                self.health.set(name, SERVING)
        self.server.start()
        return self

    def begin_shutdown(self) -> None:
        """Health NOT_SERVING for everything (and frozen there): callers stop sending new calls."""
        if self.health is not None:
            self.health.enter_graceful_shutdown()

    def stop(self, grace: float = 2.0) -> None:
        """begin_shutdown(), then let calls in flight finish for up to `grace` seconds and close the port."""
        self.begin_shutdown()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)


class ServedByGrpc:
    """Mixin of a server object that owns a `GrpcServer` as `self.grpc_server`: where it listens."""

    grpc_server: GrpcServer

    @property
    def host(self) -> str:
        return self.grpc_server.host

    @property
    def port(self) -> int | None:
        return self.grpc_server.port

    @property
    def address(self) -> str:
        return self.grpc_server.address
