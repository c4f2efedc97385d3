"""A Ray cluster of virtual hosts (tests.support.netns): `ray start --head` on one, `ray start --address` on
the others, jobs through `ray job submit` from the test process, state through `ray list`.

The head gets no CPUs (`--num-cpus 0`), so every task and actor runs on a worker host; a job's driver
runs on the head. The cluster's session files live in a short temporary folder of its own (Unix
socket paths are limited to 107 bytes), not in /tmp/ray, so it never touches another Ray on the
machine. It is stopped by killing the processes of its hosts by pid (`ray stop` would stop every Ray
of the machine), then its folder is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from tests.support.netns import Host, kill_netns_processes

GCS_PORT = 6379
DASHBOARD_PORT = 8265


def ray_env(extra: dict | None = None) -> dict:
    """Environment of every Ray process and command: this interpreter's bin folder first on PATH (the `ray`
    and `facepq` commands), no usage reporting, no auth token."""
    bin_dir = os.path.dirname(sys.executable)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: a cluster of several hosts on purpose, whatever this process
    # inherited (an in-process ingest sets it to 0 to keep its own Ray on loopback: indexer.job)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled",
                RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **(extra or {}))


class RayCluster:
    """Ray on `head` plus `workers` (virtual hosts).

    Args:
        head, workers: the hosts.
        env: environment of the Ray processes (ray_env()).
        worker_cpus: logical CPUs each worker announces (the machine's real cores are shared by all).
        object_store_bytes: each node's object store (Ray's default is 30% of the machine's memory, per node).
    """

    def __init__(self, head: Host, workers: list[Host], env: dict, worker_cpus: int = 1,
                 object_store_bytes: int = 100 << 20):
        self.head, self.workers, self.env = head, list(workers), env
        self.worker_cpus, self.object_store_bytes = worker_cpus, object_store_bytes
        self.temp_dir = tempfile.mkdtemp(prefix="fqray", dir="/tmp")
        self.gcs_address = f"{head.ip}:{GCS_PORT}"
        self.dashboard = f"http://{head.ip}:{DASHBOARD_PORT}"
        self.cpu_seconds = 0.0

    def _run(self, host: Host | None, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        done = (host.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout) if host else
                subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout))
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done

    def start(self, timeout: float = 180) -> "RayCluster":
        store = ["--object-store-memory", self.object_store_bytes, "--disable-usage-stats"]
        self._run(self.head, ["ray", "start", "--head", "--node-ip-address", self.head.ip, "--port", GCS_PORT,
                              "--num-cpus", 0, "--include-dashboard", "true", "--dashboard-host", self.head.ip,
                              "--dashboard-port", DASHBOARD_PORT, "--temp-dir", self.temp_dir, *store], timeout)
        for w in self.workers:
            self._run(w, ["ray", "start", "--address", self.gcs_address, "--node-ip-address", w.ip,
                          "--num-cpus", self.worker_cpus, *store], timeout)
        return self

    def submit(self, entrypoint: list[str], runtime_env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit` from the test process; waits for the job and raises when it did not succeed."""
        env_json = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        return self._run(None, ["ray", "job", "submit", "--address", self.dashboard, *env_json, "--",
                                *entrypoint], timeout)

    def _list(self, what: str, *filters: str) -> list[dict]:
        args = ["ray", "list", what, "--address", self.gcs_address, "--format", "json", "--detail",
                "--limit", "10000"]
        for f in filters:
            args += ["--filter", f]
        return json.loads(self._run(None, args, 120).stdout)

    def node_ips(self) -> dict[str, str]:
        """node id -> the host address it runs on."""
        return {n["node_id"]: n["node_ip"] for n in self._list("nodes")}

    def actors(self, class_name: str | None = None) -> list[dict]:
        """Every actor the cluster has had (dead ones included), optionally of one class."""
        return self._list("actors", *([f"class_name={class_name}"] if class_name else []))

    def stop(self) -> None:
        """Kill every process of the cluster's hosts (by pid) and remove its session folder.
        `cpu_seconds` keeps what they had used."""
        self.cpu_seconds = sum(h.cpu_seconds() for h in [self.head, *self.workers])
        for host in [self.head, *self.workers]:
            kill_netns_processes(host.netns)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
