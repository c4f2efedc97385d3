"""A facepq serving cluster on virtual hosts: Redis, four query nodes (two replicas of each of two shards)
and a coordinator, each on a host of its own (tests.support.netns), over an index on the shared filesystem.

    redis      redis-server on 10.213.N.r:6379 (the registry and the commit lock)
    node-a0/1  `facepq node --shards 0`   node-b0/1  `facepq node --shards 1`   (port 7070 on each host)
    coord      `facepq coordinator` (port 7070); the test process reaches it over the bridge

Nodes announce themselves in Redis with a short TTL (REGISTRY_TTL) so a node cut from the registry
leaves the topology within seconds. Every server is a real `python -m facepq.cli` process started with
`ip netns exec`; `pid()` gives the pid to SIGSTOP. The processes die with the hosts (VirtualNetwork.close);
`stop()` ends them earlier.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc

from tests.support.netns import Host, VirtualNetwork
from tests.support.processes import ServerProcess

PORT = 7070
REDIS_PORT = 6379
REGISTRY_TTL = 2.0   # seconds a node's registry entry lives without a heartbeat
NODE_POLL = 0.2      # seconds between a node's checks for a new index version
REPLICAS = {0: ["node-a0", "node-a1"], 1: ["node-b0", "node-b1"]}
HOSTS = ["redis", *[n for names in REPLICAS.values() for n in names], "coord"]


def wait_for_port(ip: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class FaceCluster:
    """Redis, REPLICAS' nodes and a coordinator on the network's hosts of the same names."""

    net: VirtualNetwork
    model: str
    index: str
    workdir: str
    redis: subprocess.Popen | None = None
    servers: dict = field(default_factory=dict)  # host name -> ServerProcess
    replicas: dict = field(default_factory=lambda: {s: list(n) for s, n in REPLICAS.items()})

    @property
    def redis_url(self) -> str:
        return f"redis://{self.net['redis'].ip}:{REDIS_PORT}/0"

    @property
    def coordinator_address(self) -> str:
        return f"{self.net['coord'].ip}:{PORT}"

    def _facepq(self, host: Host, *args) -> ServerProcess:
        server = ServerProcess(args, program=host.command([sys.executable, "-m", "facepq.cli"]), timeout=120)
        self.servers[host.name] = server
        return server

    def start(self) -> "FaceCluster":
        redis_host = self.net["redis"]
        self.redis = redis_host.popen(["redis-server", "--port", REDIS_PORT, "--bind", redis_host.ip,
                                       "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                       "--dir", self.workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(redis_host.ip, REDIS_PORT)
        for shard, names in self.replicas.items():
            for name in names:
                host = self.net[name]
                self._facepq(host, "node", "--index", self.index, "--shards", shard, "--host", host.ip,
                             "--port", PORT, "--redis", self.redis_url, "--node-id", name, "--ttl", REGISTRY_TTL,
                             "--poll", NODE_POLL)
        coord = self.net["coord"]
        self._facepq(coord, "coordinator", "--model", self.model, "--index", self.index, "--redis", self.redis_url,
                     "--host", coord.ip, "--port", PORT)
        return self

    def pid(self, name: str) -> int:
        """The pid of the server on host `name` ("redis" included)."""
        return self.redis.pid if name == "redis" else self.servers[name].pid

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.coordinator_address)

    def output(self) -> str:
        """Every server's output (for a failure message)."""
        return "\n".join(f"--- {name}\n{server.text()[-4000:]}" for name, server in self.servers.items())

    def stop(self) -> None:
        for server in self.servers.values():
            server.terminate(timeout=5)
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait(10)
