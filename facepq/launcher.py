"""A local multi-process cluster: redis-server, N query nodes, one coordinator.

    with LocalCluster(workdir, index, model, shards=2, replicas=1) as cluster:
        stub = CoordinatorStub(grpc.insecure_channel(cluster.coordinator_address))

Every process is a subprocess in its own process group (so a Ctrl-C in the
terminal reaches only the launcher, which then stops them in order), with its
output in `<workdir>/logs/<name>.log`. On Linux each child also gets
PR_SET_PDEATHSIG=SIGTERM, so even a launcher killed with SIGKILL leaves no
orphans. Servers listen on port 0 and print `facepq <what> listening on
HOST:PORT` when ready; the launcher reads that line from the log, then waits
for gRPC health SERVING (and for the coordinator to see every shard covered).

Shards are placed on nodes by `query_node.placement.assign_shards` (the formula the
Kubernetes StatefulSet in deploy/k8s uses too).

`<workdir>/cluster.json` records the processes (pid, start time, address) of
the last start; `stopped` is set once they are gone.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from facepq_core.errors import ConfigError, FacepqError
from query_node.placement import assign_shards

log = logging.getLogger(__name__)

START_TIMEOUT = 180.0  # a node compiles its scan kernels on first start: slow on a busy 2-core machine
STOP_GRACE = 10.0


class LaunchError(FacepqError):
    """A process of the local cluster did not start (the message names it and quotes its log)."""


def process_start_time(pid: int) -> int | None:
    """Kernel start time of a process (clock ticks since boot), None when it is gone; guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":  # a zombie is already dead, only not yet reaped
        return None
    return int(fields[19]) if len(fields) > 19 else None


def _libc_prctl():
    """libc's prctl, loaded in the parent: dlopen between fork and exec is not safe with threads."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _death_signal_hook():
    """A preexec_fn: the child gets SIGTERM when the launcher dies (PR_SET_PDEATHSIG = 1); None off Linux."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    return lambda: prctl(1, signal.SIGTERM)


@dataclass
class ManagedProcess:
    """One child: its name, command, pid, log file and (once ready) address."""

    name: str
    args: list
    log_path: str
    pid: int = 0
    start_time: int | None = None
    address: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def stop_processes(procs, grace: float = STOP_GRACE) -> int:
    """SIGTERM the process groups led by `procs` ((pid, start_time) pairs), SIGKILL what is left after `grace` s.

    A pid whose start time differs (recycled) is left alone. Works for processes that are
    not our children (`facepq down`): it waits by polling /proc, reaping our own children.
    Returns how many processes were signalled.
    """
    live = [(pid, st) for pid, st in procs if pid and process_start_time(pid) is not None
            and (st is None or process_start_time(pid) == st)]
    signalled = len(live)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid, _ in live:
            try:
                if os.getpgid(pid) == pid:  # a launched child leads its own group: reach its children too
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            for pid, _ in live:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            live = [(pid, st) for pid, st in live if process_start_time(pid) is not None]
            if live:
                time.sleep(0.05)
        if not live:
            break
        log.warning("pids %s did not stop after %s", [pid for pid, _ in live], sig.name)
    return signalled


class LocalCluster:
    """redis-server (optional) + query nodes + a coordinator on loopback, as subprocesses.

    Args:
        workdir: where logs (`logs/*.log`), Redis' dir and `cluster.json` go.
        index: the index path (must exist: nodes load it at start).
        model: the checkpoint the coordinator loads (the index's model).
        shards: shard count of the index.
        replicas: nodes serving each shard (see `assign_shards`).
        nodes: query node processes (default `shards`).
        redis: True = start redis-server and use it as the registry (needs `redis-server` on PATH);
            False = static registry (`--nodes`).
        start_timeout: seconds each process may take to become ready.
    """

    def __init__(self, workdir, index, model, shards: int, replicas: int = 1, redis: bool = True,
                 nodes: int | None = None, host: str = "127.0.0.1", start_timeout: float = START_TIMEOUT,
                 poll_seconds: float = 0.5):
        self.workdir = pathlib.Path(workdir).resolve()
        self.index, self.model = str(pathlib.Path(index).resolve()), str(pathlib.Path(model).resolve())
        self.assignment = assign_shards(shards, nodes or shards, replicas)
        self.shards, self.replicas = shards, replicas
        self.use_redis, self.host = redis, host
        self.start_timeout, self.poll_seconds = start_timeout, poll_seconds
        self.processes: list[ManagedProcess] = []
        self._popen: dict[str, subprocess.Popen] = {}
        self.redis_url = ""
        self.coordinator_address = ""
        if redis and not shutil.which("redis-server"):
            raise ConfigError("redis-server is not installed (apt-get install redis-server, or use the static "
                              "registry: redis=False / --no-redis)")

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        """Start Redis, the nodes, the coordinator; return when all answer health checks."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if self.use_redis:
                self._start_redis()
            nodes = []
            for i, shards in enumerate(self.assignment):  # start all nodes, then wait: they load in parallel
                args = ["node", "--index", self.index, "--shards", ",".join(map(str, shards)), "--host", self.host,
                        "--port", "0", "--node-id", f"node-{i}", "--poll", str(self.poll_seconds)]
                if self.redis_url:
                    args += ["--redis", self.redis_url]
                nodes.append(self._spawn(f"node-{i}", [sys.executable, "-m", "facepq.cli", *args]))
            for proc in nodes:
                self._wait_listening(proc)
                self._wait_health(proc)
            registry = ["--redis", self.redis_url] if self.redis_url else ["--nodes", ",".join(p.address for p in nodes)]
            coord = self._spawn("coordinator", [sys.executable, "-m", "facepq.cli", "coordinator", "--model", self.model,
                                                "--index", self.index, *registry, "--host", self.host, "--port", "0"])
            self._wait_listening(coord)
            self._wait_health(coord)
            self.coordinator_address = coord.address
            self._wait_covered(coord)
        except BaseException:
            self.stop()
            raise
        self._write_state(stopped=False)
        return self

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop every process at once (SIGTERM, SIGKILL after `grace` s). Idempotent."""
        running = [(p.pid, p.start_time) for p in self.processes
                   if p.name in self._popen and self._popen[p.name].poll() is None]
        if running:
            stop_processes(running, grace)
        for popen in self._popen.values():
            try:
                popen.wait(1)
            except subprocess.TimeoutExpired:
                pass
        if self.processes:
            self._write_state(stopped=True)
        self._popen.clear()

    def alive(self) -> dict[str, bool]:
        return {p.name: self._popen[p.name].poll() is None for p in self.processes if p.name in self._popen}

    # ---- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list) -> ManagedProcess:
        log_path = self.workdir / "logs" / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_death_signal_hook())
        proc = ManagedProcess(name, [str(a) for a in args], str(log_path), popen.pid, process_start_time(popen.pid))
        self.processes.append(proc)
        self._popen[name] = popen
        log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(map(str, args)))
        return proc

    def _start_redis(self) -> None:
        import redis

        port = _free_port(self.host)
        rdir = self.workdir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("redis", [shutil.which("redis-server"), "--port", str(port), "--bind", self.host,
                                     "--save", "", "--appendonly", "no", "--dir", str(rdir)])
        proc.address = f"{self.host}:{port}"
        self.redis_url = f"redis://{self.host}:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._until(proc, lambda: _ping(client), 20.0, "did not answer PING")

    def _wait_listening(self, proc: ManagedProcess) -> None:
        def listening():
            text = pathlib.Path(proc.log_path).read_text(errors="replace")
            for line in text.splitlines():
                if "listening on " in line:
                    proc.address = line.rsplit("listening on ", 1)[1].strip()
                    return True
            return False

        self._until(proc, listening, self.start_timeout, "did not print its 'listening on' line")

    def _wait_health(self, proc: ManagedProcess) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(proc.address)
        stub = health_pb2_grpc.HealthStub(channel)

        def serving():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            self._until(proc, serving, 30.0, "did not report gRPC health SERVING")
        finally:
            channel.close()

    def _wait_covered(self, proc: ManagedProcess) -> None:
        """The coordinator sees a replica for every shard (Redis heartbeats or static Status calls)."""
        import grpc

        from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc

        channel = grpc.insecure_channel(proc.address)
        stub = facepq_pb2_grpc.CoordinatorStub(channel)

        def covered():
            try:
                return not stub.Status(facepq_pb2.StatusRequest(), timeout=3.0).uncovered_shards
            except grpc.RpcError:
                return False

        try:
            self._until(proc, covered, 30.0, "does not see a node for every shard")
        finally:
            channel.close()

    def _until(self, proc: ManagedProcess, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        popen = self._popen[proc.name]
        while time.monotonic() < deadline:
            if check():
                return
            if popen.poll() is not None:
                raise LaunchError(f"{proc.name} exited with code {popen.returncode} before it was ready"
                                  f"{self._tail(proc)}")
            time.sleep(0.1)
        raise LaunchError(f"{proc.name} {what} within {timeout:.0f} s{self._tail(proc)}")

    @staticmethod
    def _tail(proc: ManagedProcess, lines: int = 15) -> str:
        try:
            text = pathlib.Path(proc.log_path).read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return f"; last lines of {proc.log_path}:\n  " + "\n  ".join(text) if text else f" ({proc.log_path} is empty)"

    def state(self) -> dict:
        return {"workdir": str(self.workdir), "index": self.index, "model": self.model, "redis": self.redis_url,
                "coordinator": self.coordinator_address, "assignment": self.assignment,
                "processes": [p.to_dict() for p in self.processes]}

    def _write_state(self, stopped: bool) -> None:
        path = self.workdir / "cluster.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(self.state(), stopped=stopped), indent=1))
        os.replace(tmp, path)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ping(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
