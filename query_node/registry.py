"""Node registry: which query nodes are alive, where, serving which shards.

Redis mode: each node writes its record (JSON) under `facepq:node:<node_id>` with a
TTL (default 5 s) and refreshes it every TTL/3 from a heartbeat thread, so a dead
node disappears within one TTL. When Redis is down the node keeps retrying and
re-registers as soon as it is back; the coordinator keeps the last topology it saw.

Static mode (no Redis): `StaticRegistry(addresses)` asks each node's Status RPC
for its shards and version.

Redis URLs may carry a password or an ACL user (`redis://user:password@host:6379/0`)
and use TLS (`rediss://host:6380/0?ssl_ca_certs=/ca.pem` plus, for client
certificates, `&ssl_certfile=...&ssl_keyfile=...`); redis-py reads all of these from
the URL. Logs show URLs with the credentials masked (`facepq_core.redact`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

from facepq_core.redact import redact_url
from facepq_core.redis_errors import is_auth_failure, redis_error

log = logging.getLogger(__name__)

KEY_PREFIX = "facepq:node:"
DEFAULT_TTL = 5.0


@dataclass
class NodeRecord:
    """What a node announces."""

    node_id: str
    address: str
    shards: list[int]
    index_version: str = ""
    load: float = 0.0
    healthy: bool = True
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text) -> "NodeRecord":
        d = json.loads(text)
        return cls(node_id=str(d["node_id"]), address=str(d["address"]), shards=[int(s) for s in d["shards"]],
                   index_version=str(d.get("index_version", "")), load=float(d.get("load", 0.0)),
                   healthy=bool(d.get("healthy", True)), updated=float(d.get("updated", 0.0)))


def _client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


class Heartbeat:
    """Announce a node in Redis and keep the announcement alive.

    Args:
        url: Redis URL. record_fn: returns the current NodeRecord (called every beat).
        ttl: seconds the key lives without a refresh; refreshed every ttl/3.
    """

    def __init__(self, url: str, record_fn, ttl: float = DEFAULT_TTL):
        self.url, self.record_fn, self.ttl = url, record_fn, ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis = _client(url)
        self.connected = False
        self._warned = False

    def beat(self) -> bool:
        """Write the record once; False (logged once per outage) when Redis is unreachable."""
        import redis

        record = self.record_fn()
        try:
            self._redis.set(KEY_PREFIX + record.node_id, record.to_json(), px=int(self.ttl * 1000))
        except redis.RedisError as exc:  # down, wrong password, or an ACL user without rights on the key
            if self.connected or not self._warned:
                log.warning("registry %s unreachable (%s); will keep retrying", redact_url(self.url), exc)
                self._warned = True
            self.connected = False
            return False
        if not self.connected:
            log.info("registered node %s at %s in %s", record.node_id, record.address, redact_url(self.url))
        self.connected = True
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.beat()

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="facepq-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, deregister: bool = True) -> None:
        """Stop beating; by default delete the key so the node disappears at once."""
        import redis

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if deregister:
            try:
                self._redis.delete(KEY_PREFIX + self.record_fn().node_id)
            except (redis.ConnectionError, redis.TimeoutError):
                pass


class RedisRegistry:
    """The coordinator's view of live nodes in Redis (last known topology when Redis is down).

    Args:
        url: Redis URL.
        restart_grace: seconds after Redis comes back (reachable again, or a new server run id:
            restarted, possibly empty) during which nodes of the last known topology are kept
            alongside the listed ones, so searches do not lose every shard while the nodes
            re-announce themselves (they do within a third of their TTL). Nodes that really
            died answer UNAVAILABLE and the coordinator asks another replica.
    """

    def __init__(self, url: str, restart_grace: float = DEFAULT_TTL):
        self.url = url
        self.restart_grace = restart_grace
        self._redis = _client(url)
        self._last: list[NodeRecord] = []
        self.reachable = False
        self._ever_reached = False
        self._run_id = None
        self._grace_until = 0.0
        self._warned = False

    def check(self) -> None:
        """At start: refuse a registry that rejects our credentials; warn (and start) when it is down.

        A coordinator whose Redis refused its password used to start healthy, log nothing, and answer
        every search with every shard missing. Credentials do not fix themselves: that is Misconfigured
        (the server exits with one line). Redis being down can: the coordinator starts, logs it, and its
        answers name the missing shards until the nodes are listed.
        """
        import redis

        try:
            self._redis.ping()
        except redis.RedisError as exc:
            error = redis_error(exc, self.url, "list the query nodes")
            if is_auth_failure(exc):
                raise error from exc
            log.warning("%s; searches will report every shard missing until it is back", error)

    def _run_id_now(self):
        import redis

        try:
            return self._redis.info("server").get("run_id")
        except redis.ResponseError:  # an ACL user without INFO: rely on reachability alone
            return None

    def nodes(self) -> list[NodeRecord]:
        import redis

        try:
            run_id = self._run_id_now()
            keys = list(self._redis.scan_iter(match=KEY_PREFIX + "*", count=500))
            values = self._redis.mget(keys) if keys else []
        except redis.RedisError as exc:  # down, or credentials refused: keep serving the last topology
            if self.reachable or not self._warned:  # once per outage, and from the very first failure on
                log.warning("%s; using the last known %d nodes", redis_error(exc, self.url, "list the query nodes"),
                            len(self._last))
                self._warned = True
            self.reachable = False
            return list(self._last)
        back = self._ever_reached and (not self.reachable or (run_id and self._run_id and run_id != self._run_id))
        if back:
            log.info("registry %s is back; keeping the last known %d nodes for %g s while nodes re-register",
                     redact_url(self.url), len(self._last), self.restart_grace)
            self._grace_until = time.monotonic() + self.restart_grace
        self.reachable, self._ever_reached, self._warned = True, True, False
        self._run_id = run_id or self._run_id
        records = []
        for v in values:
            if v is None:  # expired between SCAN and MGET
                continue
            try:
                records.append(NodeRecord.from_json(v))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed registry entry: %r", v[:200])
        if time.monotonic() < self._grace_until:
            listed = {r.node_id for r in records}
            records += [r for r in self._last if r.node_id not in listed]
        self._last = sorted(records, key=lambda r: r.node_id)
        return list(self._last)


class StaticRegistry:
    """A fixed list of node addresses; shards and versions come from each node's Status RPC."""

    def __init__(self, addresses: list[str], timeout: float = 2.0, tls=None, token: str | None = None):
        from query_node.security import bearer_metadata, node_bearer

        self.addresses = list(addresses)
        self.timeout = timeout
        self.tls, self.metadata = tls, bearer_metadata(node_bearer(token)) if token else ()
        self._last: dict[str, NodeRecord] = {}

    def _status(self, addr: str) -> NodeRecord:
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
        from query_node.security import make_channel

        try:
            with make_channel(addr, self.tls) as channel:
                st = facepq_pb2_grpc.QueryNodeStub(channel).Status(facepq_pb2.NodeStatusRequest(),
                                                                 timeout=self.timeout, metadata=self.metadata)
            shards = [s.shard for s in st.shards if s.state == facepq_pb2.SHARD_SERVING]
            return NodeRecord(node_id=st.node_id or addr, address=addr, shards=shards, index_version=st.index_version)
        except grpc.RpcError:
            rec = NodeRecord(node_id=addr, address=addr, shards=[], healthy=False)
            if addr in self._last:  # keep its shards as a retry candidate, marked unhealthy
                rec.shards = self._last[addr].shards
            return rec

    def nodes(self) -> list[NodeRecord]:
        """Every address's Status, asked in parallel: a hung node costs one timeout, not one per node after it."""
        from concurrent.futures import ThreadPoolExecutor

        if len(self.addresses) <= 1:
            out = [self._status(a) for a in self.addresses]
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(self.addresses)),
                                    thread_name_prefix="facepq-static-registry") as pool:
                out = list(pool.map(self._status, self.addresses))
        for rec in out:
            self._last[rec.address] = rec
        return out
