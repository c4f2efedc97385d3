"""A local multi-process cluster: redis-server, N query nodes, one coordinator.

    with LocalCluster(workdir, index, model, shards=2, replicas=1) as cluster:
        stub = CoordinatorStub(grpc.insecure_channel(cluster.coordinator_address))

Every process is a subprocess in its own process group (so a Ctrl-C in the
terminal reaches only the launcher, which then stops them in order), with its
output in `<workdir>/logs/<name>.log`. On Linux each child also gets
PR_SET_PDEATHSIG=SIGTERM (armed by `facepq.parent_death`, not between fork
and exec), so even a launcher killed with SIGKILL leaves no orphans. Servers
listen on port 0 and print `facepq <what> listening on HOST:PORT` when ready;
the launcher reads that line from the log, then waits for gRPC health SERVING
(and for the coordinator to see every shard covered).

Shards are placed on nodes by `query_node.placement.assign_shards` (the formula the
Kubernetes StatefulSet in deploy/k8s uses too).

`<workdir>/cluster.json` is the local cluster's one state file, written only
here: the launcher process and every child (pid, start time, address) of the
last start, and `stopped` once they are gone. `facepq up` refuses to start
while it records a running cluster; `facepq down` stops what it records
(`stop_recorded`). Process facts (start times, waits) come from psutil.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from facepq import parent_death
from facepq_core.atomic import write_bytes_atomic
from facepq_core.errors import ConfigError, FacepqError
from query_node.placement import assign_shards

log = logging.getLogger(__name__)

START_TIMEOUT = 180.0  # a node compiles its scan kernels on first start: slow on a busy 2-core machine
STOP_GRACE = 10.0
STATE_FILE = "cluster.json"
LAUNCHER_STOP_WAIT = 60.0  # `facepq down` gives the launcher this long to stop its processes in order
_SAME_START_S = 1.0


class LaunchError(FacepqError):
    """A process of the local cluster did not start (the message names it and quotes its log)."""


def process_start_time(pid: int) -> float | None:
    """Creation time of a process (epoch seconds, psutil), None when it is gone or a zombie.

    Recorded next to a pid, it tells that process from a later one given the same pid.
    """
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # already dead, only not yet reaped
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def same_process(pid: int, start_time: float | None) -> bool:
    """Whether `pid` is still the process that had `start_time` (any live one when `start_time` is None).

    psutil derives creation times from the boot time, which a clock step can move by a second,
    so times read by two processes (`facepq up` and `facepq down`) are compared to within one:
    a recycled pid would have to belong to a process created in that same second.
    """
    now = process_start_time(pid)
    return now is not None and (start_time is None or abs(now - start_time) < _SAME_START_S)


def start_child(args: list, out) -> subprocess.Popen:
    """Start `args` in its own session, output to the open file `out`, SIGTERM to it when this process dies.

    No preexec_fn: Python code between fork and exec runs the at-fork handlers of gRPC, which this process
    has used, and those can abort the child before exec (see facepq.parent_death, which arms the signal
    instead, after a plain vfork and exec).
    """
    return subprocess.Popen(parent_death.command(args), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)


@dataclass
class ManagedProcess:
    """One child: its name, command, pid, log file and (once ready) address."""

    name: str
    args: list
    log_path: str
    pid: int = 0
    start_time: float | None = None
    address: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def stop_processes(procs, grace: float = STOP_GRACE) -> int:
    """SIGTERM the process groups led by `procs` ((pid, start_time) pairs), SIGKILL what is left after `grace` s.

    A pid whose start time differs (recycled) is left alone. Works for processes that are
    not our children (`facepq down`); our own children are reaped. Returns how many
    processes were signalled.
    """
    live = [proc for proc in (_process(pid, st) for pid, st in procs) if proc is not None]
    signalled = len(live)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for proc in live:
            _signal_group(proc, sig)
        live = _wait_gone(live, wait)
        if not live:
            break
        log.warning("pids %s did not stop after %s", [proc.pid for proc in live], sig.name)
    return signalled


def _process(pid: int, start_time: float | None) -> psutil.Process | None:
    if not pid or not same_process(pid, start_time):
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _signal_group(proc: psutil.Process, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:  # a launched child leads its own group: reach its children too
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)  # psutil refuses a recycled pid
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """`psutil.wait_procs`, counting zombies as gone; returns the processes still alive after `timeout` s.

    psutil waits for a process that is not our child until it disappears, and a zombie
    stays until its own parent reaps it (`facepq down` waits for `facepq up`, whose parent
    may be a shell that reaps only later), so the wait goes in short rounds.
    """
    deadline = time.monotonic() + timeout
    while procs:
        _, procs = psutil.wait_procs(procs, timeout=max(0.0, min(0.25, deadline - time.monotonic())))
        procs = [proc for proc in procs if _alive(proc)]
        if time.monotonic() >= deadline:
            break
    return procs


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class LocalCluster:
    """redis-server (optional) + query nodes + a coordinator on loopback, as subprocesses.

    Args:
        workdir: where logs (`logs/*.log`), Redis' dir and `cluster.json` go.
        index: the index path (must exist: nodes load it at start).
        model: the checkpoint the coordinator loads (the index's model).
        shards: shard count of the index.
        replicas: nodes serving each shard (see `assign_shards`).
        nodes: query node processes (default `shards`).
        coordinator_port: where the coordinator listens (0 = any free port; `facepq up` uses 50050,
            the port clients assume).
        http_port: also serve the coordinator's HTTP API and web page there (None: off; 0: any free port).
        metrics_port: Prometheus /metrics of the coordinator on this port and of node i on port + 1 + i
            (None: off; 0: any free ports).
        redis: True = start redis-server and use it as the registry (needs `redis-server` on PATH);
            False = static registry (`--nodes`).
        start_timeout: seconds each process may take to become ready.
    """

    def __init__(self, workdir, index, model, shards: int, replicas: int = 1, redis: bool = True,
                 nodes: int | None = None, host: str = "127.0.0.1", start_timeout: float = START_TIMEOUT,
                 poll_seconds: float = 0.5, coordinator_port: int = 0, http_port: int | None = None,
                 metrics_port: int | None = None):
        self.workdir = pathlib.Path(workdir).resolve()
        self.index, self.model = str(pathlib.Path(index).resolve()), str(pathlib.Path(model).resolve())
        self.assignment = assign_shards(shards, nodes or shards, replicas)
        self.shards, self.replicas = shards, replicas
        self.use_redis, self.host = redis, host
        self.start_timeout, self.poll_seconds = start_timeout, poll_seconds
        self.coordinator_port = coordinator_port
        self.http_port, self.metrics_port = http_port, metrics_port
        check_port_free(host, coordinator_port)
        if http_port:
            check_port_free(host, http_port)
        self.http_url = ""
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
                if self.metrics_port is not None:
                    args += ["--metrics-port", str(self.metrics_port + 1 + i if self.metrics_port else 0)]
                nodes.append(self._spawn(f"node-{i}", [sys.executable, "-m", "facepq.cli", *args]))
            for proc in nodes:
                self._wait_listening(proc)
                self._wait_health(proc)
            registry = ["--redis", self.redis_url] if self.redis_url else ["--nodes", ",".join(p.address for p in nodes)]
            extra = (["--http-port", str(self.http_port)] if self.http_port is not None else []) + \
                (["--metrics-port", str(self.metrics_port)] if self.metrics_port is not None else [])
            coord = self._spawn("coordinator", [sys.executable, "-m", "facepq.cli", "coordinator", "--model", self.model,
                                                "--index", self.index, *registry, "--host", self.host,
                                                "--port", str(self.coordinator_port), *extra])
            self._wait_listening(coord)
            found = re.search(r"facepq http serving on (\S+)", pathlib.Path(coord.log_path).read_text(errors="replace"))
            self.http_url = found.group(1) if found else ""
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
        with open(log_path, "wb") as out:
            popen = start_child(args, out)
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
        from facepq.client import CoordinatorClient

        client = CoordinatorClient(proc.address, timeout=3.0, retry_unavailable=False)

        def covered():
            try:
                return client.status().complete
            except FacepqError:
                return False

        try:
            self._until(proc, covered, 30.0, "does not see a node for every shard")
        finally:
            client.close()

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
        """What `cluster.json` records: addresses, every child, and as `pid`/`start_time` the launcher
        (the process holding this LocalCluster, which `facepq down` asks to stop the rest)."""
        return {"workdir": str(self.workdir), "index": self.index, "model": self.model, "redis": self.redis_url,
                "coordinator": self.coordinator_address, "assignment": self.assignment,
                "pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                "processes": [p.to_dict() for p in self.processes]}

    def _write_state(self, stopped: bool) -> None:
        _write_state_file(self.workdir, dict(self.state(), stopped=stopped))


# ---- the state file, read and stopped from other processes (`facepq up`, `facepq down`) ----------------
def read_state(workdir) -> dict | None:
    """What `<workdir>/cluster.json` records (see `LocalCluster.state`), None when there is none."""
    try:
        return json.loads((pathlib.Path(workdir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def running_state(workdir) -> dict | None:
    """The recorded state while its launcher runs and has not stopped the cluster, else None."""
    state = read_state(workdir)
    if state and not state.get("stopped") and state.get("pid") and \
            same_process(state["pid"], state.get("start_time")):
        return state
    return None


def stop_recorded(workdir, grace: float = STOP_GRACE) -> int | None:
    """Stop the cluster `<workdir>/cluster.json` records, from another process (`facepq down`).

    The launcher is asked first (SIGTERM: it stops its processes in order and records that);
    whatever is left after `LAUNCHER_STOP_WAIT` s (a launcher killed with SIGKILL, or one that
    did not stop in time) is stopped here, and the file is marked stopped. Returns how many
    processes were signalled, None when the file records no running cluster (safe to call twice).
    """
    state = read_state(workdir)
    if state is None or state.get("stopped"):
        return None
    pid, start_time = state.get("pid", 0), state.get("start_time")
    stopped = 0
    launcher = _process(pid, start_time)
    if launcher is not None:
        try:
            launcher.send_signal(signal.SIGTERM)  # the launcher alone: it stops its processes in order
        except psutil.NoSuchProcess:
            pass
        _wait_gone([launcher], LAUNCHER_STOP_WAIT)
        stopped += 1
    left = [(p["pid"], p.get("start_time")) for p in state.get("processes", [])]
    stopped += stop_processes(left + ([(pid, start_time)] if pid else []), grace)
    _write_state_file(workdir, dict(read_state(workdir) or state, stopped=True))
    return stopped


def _write_state_file(workdir, state: dict) -> None:
    write_bytes_atomic(pathlib.Path(workdir) / STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))


def check_port_free(host: str, port: int) -> None:
    """ConfigError when `port` (not 0) cannot be bound on `host`: a fixed port in use fails before any work."""
    if not port:
        return
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(f"port {port} on {host} is in use (another `facepq up` or coordinator?): stop it, "
                              f"or pass another --port (0 = any free port)") from None


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


# ---- one launcher per workdir ---------------------------------------------------------------------
LOCK_FILE = "launcher.lock"


class WorkdirLock:
    """Held by `facepq demo` and `facepq up` for as long as they run: one launcher per workdir.

    A second `demo` or `up` on the same workdir would rebuild the index the first one serves and
    overwrite its state file, so it is refused with who holds the workdir. The lock is an flock on
    `<workdir>/launcher.lock`, so the kernel releases it when its holder exits, however it exits
    (SIGKILL included): a stale lock cannot block the next run.
    """

    def __init__(self, workdir, command: str):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(self._held_message()) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": self.command}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def _held_message(self) -> str:
        workdir = self.path.parent
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        state = running_state(workdir) or {}
        who = holder.get("command", "another facepq demo or up")
        pid = f"pid {holder['pid']}" if holder.get("pid") else "pid unknown"
        serving = f", coordinator {state['coordinator']}" if state.get("coordinator") else ""
        stop = f"stop it with `facepq down --workdir {workdir}`" if who == "facepq up" else "wait for it to finish"
        return (f"{who} is already running in {workdir} ({pid}{serving}) and would lose its index and state to "
                f"this {self.command}: {stop}, or give this one another --workdir")
