"""`facepq demo --small`, `facepq up` / `facepq down`, and Ctrl-C: real subprocesses, real Ray/Redis/gRPC.

The model trained by the first test is cached outside its workdir (FACEPQ_DEMO_CACHE) and reused by
the others: the next two in the same workdir, the last in a workdir of its own. Leftovers are checked by
the pids the launcher recorded (redis-server rewrites its command line, so /proc cmdlines alone would miss
it) and by scanning /proc for the workdir.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from facepq.launcher import process_start_time
from tests.support.processes import popen_with_sigint

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory) -> pathlib.Path:
    """A private demo-model cache (FACEPQ_DEMO_CACHE) for this module's runs: the first one trains."""
    CACHE["FACEPQ_DEMO_CACHE"] = str(tmp_path_factory.mktemp("demo-models"))
    return pathlib.Path(CACHE["FACEPQ_DEMO_CACHE"])


def facepq(*args) -> list[str]:
    return [sys.executable, "-m", "facepq.cli", *args]


CACHE: dict = {}  # FACEPQ_DEMO_CACHE of this module's runs (the model_cache fixture)


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **CACHE)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and process_start_time(int(entry.name)) is not None:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def assert_nothing_left(workdir: pathlib.Path, timeout: float = 15.0, orderly: bool = True) -> None:
    state = json.loads((workdir / "cluster.json").read_text())
    assert {p["name"] for p in state["processes"]} >= {"node-0", "node-1", "coordinator"}
    deadline = time.monotonic() + timeout
    while True:
        alive = [f"{p['name']} pid {p['pid']}" for p in state["processes"]
                 if process_start_time(p["pid"]) == p["start_time"]]
        strays = processes_mentioning(str(workdir))
        if not alive and not strays:
            break
        assert time.monotonic() < deadline, f"left running: {alive} {strays}"
        time.sleep(0.2)
    if orderly:  # the launcher itself stopped them (not only the kernel's parent-death signal)
        assert json.loads((workdir / "cluster.json").read_text())["stopped"] is True


class Background:
    """A facepq command in its own session, output to a file, killed (group) if the test fails."""

    def __init__(self, args, log: pathlib.Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = popen_with_sigint(args, cwd=REPO, env=env(), stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()


def test_demo_small_runs_every_step_reports_metrics_and_leaves_nothing(workdir, model_cache):
    out = subprocess.run(facepq("demo", "--small", "--workdir", str(workdir), "--no-progress"), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=360)
    text = out.stdout
    assert out.returncode == 0, f"exit {out.returncode}\n{text[-3000:]}\n{out.stderr[-3000:]}"
    for step in range(1, 7):
        assert f"[{step}/6]" in text
    assert re.search(r"query person\s+rank\s+hit person\s+score\s+shard", text)
    rows = re.findall(r"^\s+(?:synth_\d+)?\s+[123]\s+synth_\d+\s+-?\d+\.\d+\s+[01]\b", text, re.M)
    assert len(rows) >= 3, text
    # every number comes with what it means
    assert re.search(r"P@1 \(the first hit is the query's person\): [01]\.\d{3} over gRPC, [01]\.\d{3} computed "
                     r"offline .*\(chance: 0\.\d{3}\)", text), text
    assert re.search(r"shared by two people .*: \d+ over gRPC, \d+ offline", text)
    assert re.search(r"mAP@all .*: [01]\.\d{3} with the \d+-bit codes .*, [01]\.\d{3} with the float embeddings", text)
    assert re.search(r"p50 \d+\.\d ms, p99 \d+\.\d ms as the client saw them", text)
    assert re.search(r"finds them [\d.]+ s after enrolling .*rank \d+ of the \d+ faces returned", text), text
    assert "score: the log-likelihood" in text
    assert "reusing" not in text  # the first run trains, and caches the model outside the workdir
    (model,) = model_cache.glob("*/model.pt")
    assert (model.parent / "demo-key.json").is_file() and f"cached as {model}" in text
    assert_nothing_left(workdir)


def test_up_serves_until_down_and_down_is_safe_twice(workdir):
    up = Background(facepq("up", "--small", "--workdir", str(workdir), "--no-progress", "--port", "0"),
                    workdir / "up.log")
    try:
        up.wait_for(r"facepq up: serving; coordinator \S+", timeout=300)
        assert "reusing" in up.text()  # the model trained by the demo test is cached
        state = json.loads((workdir / "cluster.json").read_text())  # the one state file: the launcher's
        assert state["pid"] == up.proc.pid and state["coordinator"]
        photo = next((workdir / "faces").glob("synth_*/000.png"))
        search = subprocess.run(facepq("search", str(photo), "--coordinator", state["coordinator"], "--json"),
                                cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
        assert search.returncode == 0, search.stderr
        assert json.loads(search.stdout)["complete"] is True

        down = subprocess.run(facepq("down", "--workdir", str(workdir)), cwd=REPO, env=env(), capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert up.proc.wait(60) == 0
        assert not (workdir / "up.json").exists()
        assert_nothing_left(workdir)
        again = subprocess.run(facepq("down", "--workdir", str(workdir)), cwd=REPO, env=env(), capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "nothing running" in again.stdout
    finally:
        up.close()


def test_sigint_while_serving_stops_every_process(workdir):
    """Ctrl-C while the cluster serves. `facepq up` serves until stopped, so the signal always lands
    while serving (the demo's own serving steps now finish in about a second: too short to aim at)."""
    (workdir / "cluster.json").unlink(missing_ok=True)
    # --replicas 2: each node serves both shards (the replicated layout)
    up = Background(facepq("up", "--small", "--replicas", "2", "--workdir", str(workdir), "--no-progress", "--port",
                           "0"), workdir / "sigint.log")
    try:
        up.wait_for(r"facepq up: serving; coordinator \S+", timeout=300)
        assert re.search(r"node-0 .* shards \[0, 1\]", up.text()) and re.search(r"node-1 .* shards \[0, 1\]", up.text())
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
        assert "facepq up: stopping" in up.text()
        assert not (workdir / "up.json").exists()
        assert_nothing_left(workdir)
    finally:
        up.close()


def test_sigkill_of_the_demo_still_leaves_no_orphans(model_cache, tmp_path):
    """No chance to clean up: the children's parent-death signal (PR_SET_PDEATHSIG) stops them.

    In a workdir of its own: the demo there finds the model where the first test's demo cached it
    (outside its workdir), so a model is trained once per cache, not once per workdir."""
    workdir = tmp_path / "other"
    (model,) = model_cache.glob("*/model.pt")
    # --no-redis: the static registry (coordinator --nodes), the launcher's other path
    demo = Background(facepq("demo", "--small", "--no-redis", "--workdir", str(workdir), "--no-progress"),
                      tmp_path / "sigkill.log")
    try:
        demo.wait_for(r"\[5/6\]", timeout=300)
        assert f"reusing {model}" in demo.text()
        assert "static node list" in demo.text()
        demo.proc.kill()
        demo.proc.wait(30)
        assert_nothing_left(workdir, timeout=30, orderly=False)
    finally:
        demo.close()
