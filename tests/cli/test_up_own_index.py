"""`facepq up --model M --index I` serves a user's own index, supervised, until Ctrl-C; `demo` and a second
`up` are refused beside it; what it was given is checked before any process starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from facepq.launcher import process_start_time
from tests.support.processes import REPO_ROOT, popen_with_sigint, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


def _wait_for(proc, log, text, timeout):
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def test_up_serves_a_users_index_until_ctrl_c_and_refuses_a_demo_beside_it(gallery, index, tmp_path):
    workdir, log = tmp_path / "work", tmp_path / "up.log"
    args = [sys.executable, "-m", "facepq.cli", "up", "--model", str(gallery["model"]), "--index", str(index),
            "--workdir", str(workdir), "--port", "0", "--nodes", "1", "--replicas", "1", "--http-port", "0",
            "--metrics-port", "0"]
    with open(log, "w") as out:
        up = popen_with_sigint(args, cwd=REPO_ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(up, log, "facepq up: serving; coordinator", timeout=300)
        text = log.read_text()
        assert f"{gallery['faces']} faces of" in text and "in 2 shard(s)" in text
        assert "node-0" in text and "shards [0, 1]" in text  # --nodes 1: one node serves both shards
        state = json.loads((workdir / "cluster.json").read_text())
        address = state["coordinator"]
        import re

        import requests

        web = re.search(r"web page and HTTP API: (http://\S+)/ ", text).group(1)
        assert requests.get(web + "/v1/status", timeout=30).json()["shard_count"] == 2

        photo = gallery["photos"][sorted(gallery["photos"])[0]][0]
        found = run_cli("search", photo, "--coordinator", address, "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["complete"] is True
        person = gallery["enrol_people"][1]
        enrolled = run_cli("enrol", "--person", person, *gallery["photos"][person][:2], "--coordinator", address)
        assert enrolled.returncode == 0 and "enrolled 2 face(s)" in enrolled.stdout, enrolled.stderr

        demo = run_cli("demo", "--small", "--workdir", workdir, "--no-progress")
        assert demo.returncode == 2 and "facepq up is already running" in demo.stderr
        assert f"pid {up.pid}" in demo.stderr and "facepq down" in demo.stderr
        second = run_cli("up", "--model", gallery["model"], "--index", index, "--workdir", workdir, "--port", "0")
        assert second.returncode == 2 and "already running" in second.stderr
        assert json.loads(run_cli("search", photo, "--coordinator", address, "--json").stdout)["complete"]

        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0
        assert "facepq up: stopping" in log.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(30)
    state = json.loads((workdir / "cluster.json").read_text())
    assert state["stopped"] is True
    deadline = time.monotonic() + 15
    while any(process_start_time(p["pid"]) == p["start_time"] for p in state["processes"]):
        assert time.monotonic() < deadline, f"left running: {state['processes']}"
        time.sleep(0.2)


def test_up_checks_what_it_was_given_before_starting_anything(gallery, index, tmp_path):
    workdir = tmp_path / "work"
    cases = [
        (["--model", gallery["model"]], "--model and --index go together"),
        (["--model", gallery["model"], "--index", tmp_path / "nothing"], "no facepq index"),
        (["--model", gallery["model"], "--index", index, "--shards", "3"], "--shards shape the demo's own index"),
        (["--model", gallery["model"], "--index", index, "--nodes", "3"], "without shards"),
        (["--nodes", "2"], "--nodes applies to serving your own index"),
    ]
    for extra, message in cases:
        out = run_cli("up", "--workdir", workdir, "--port", "0", *extra)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (extra, out.stderr)
    assert not (workdir / "cluster.json").exists()  # nothing was started
