"""Shared fixtures: the real data in ../shared/data and real servers on loopback.

`../shared/data` (or $FACEPQ_SHARED_DATA) holds identity-labelled face photos for
tests. Tests that need it skip with the reason when it is absent; in CI it is
always present, so those tests run.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

from tests.support import run_summary
from tests.support.models import TinyModel, train_tiny_model
from tests.support.run_dir import worker_id

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("FACEPQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# torch's OpenMP threads spin while they wait for work. On a busy shared machine a spinning thread takes
# the core from the thread it waits for: training the session's tiny model took 20 s of CPU with 2 threads
# at load average ~5, against 3 s with the threads sleeping instead (and 3 s with one thread). Set here,
# before anything loads torch, so every subprocess (facepq CLIs, servers, Ray workers) inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if worker_id():  # pytest-xdist: each worker's local Ray clusters in a temp folder of their own, not /tmp/ray
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/facepq-ray-{worker_id()}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


def pytest_collection_modifyitems(items):
    """Test files with slow tests first, each file's tests in their order: scripts/test.sh hands whole files
    to its 2 workers as they free up (--dist loadfile), and a long file started last would leave one worker
    idle while the other finishes it."""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints the summary
        workeroutput["facepq_summary"] = run_summary.SECTIONS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    run_summary.merge(getattr(node, "workeroutput", {}).get("facepq_summary", {}))


def pytest_terminal_summary(terminalreporter):
    for section, lines in run_summary.SECTIONS.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.write_line(line)


def _shared_subdir(name: str) -> pathlib.Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs real face photos at {path} (../shared/data beside the repo, or $FACEPQ_SHARED_DATA); not present here")
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs ../shared/data at {SHARED_DATA}; not present here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def att_faces() -> pathlib.Path:
    """AT&T/ORL: 40 people x 10 grey 92x112 PGM photos."""
    return _shared_subdir("att_faces")


@pytest.fixture(scope="session")
def lfw5() -> pathlib.Path:
    """LFW deep-funneled, people with >= 5 photos, 250x250 colour JPEG."""
    return _shared_subdir("lfw5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server process on 127.0.0.1 and a free port (stop/start for fault tests)."""

    def __init__(self, workdir: pathlib.Path, password: str | None = None):
        self.binary = shutil.which("redis-server")
        if not self.binary:
            pytest.fail("redis-server is not installed; scripts/install.sh installs it (apt-get install redis-server)")
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.started = False   # once started, a restart keeps the port

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers as itself: its INFO names its own pid, not another
        server's that took the port first (another process's on this machine). A first start whose port was
        taken meanwhile moves to another free port; a restart keeps its port (clients know it)."""
        for _ in range(5):
            why = self._start_once()
            if why is None:
                self.started = True
                return
            if self.started:
                break
            self.port = free_port()
        pytest.fail(f"redis-server did not start on port {self.port}: {why}")

    def _start_once(self) -> str | None:
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if int(client.info("server")["process_id"]) == self.proc.pid:
                        return None
                except (redis.RedisError, OSError):
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        exited = self.proc.poll()
        self.stop()
        return f"it exited with {exited} (port taken?)" if exited is not None else "no answer within 10 s"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh real redis-server for one test; `.url`, `.stop()`, `.start()`."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """The session's trained checkpoint (tests/support/models.py): resnet20 (width 16) + OPQN head,
    32 bits (4 x 256), 32x32 crops of 24 x 6 generated faces, 2 epochs. Reuse it unless a test needs
    a model trained differently."""
    return train_tiny_model(tmp_path_factory.mktemp("tiny_model"))
