"""Real `facepq` server processes for the reliability tests (with extra environment and a kill-all)."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

from tests.query_node.helpers import REPO_ROOT


class Proc:
    """A `facepq ...` subprocess that printed its 'listening on ADDR' line (or failed to start)."""

    def __init__(self, args, env=None, timeout=90):
        self.args = list(args)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "facepq.cli", *self.args], cwd=REPO_ROOT, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "listening on " in line:
                self.address = line.rsplit("listening on ", 1)[1].strip()
                return
        time.sleep(0.2)  # let the pump collect the last lines of a failed start
        self.kill()
        raise StartFailed(self.proc.returncode, "".join(self.output))

    def _pump(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return "".join(self.output)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigkill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    kill = sigkill

    def terminate(self, timeout=10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)


class StartFailed(RuntimeError):
    def __init__(self, returncode, output):
        self.returncode, self.output = returncode, output
        super().__init__(f"exit {returncode}: {output[-3000:]}")


class Procs:
    """Processes started by one test; all SIGKILLed at teardown."""

    def __init__(self):
        self.all: list[Proc] = []

    def start(self, *args, env=None, timeout=90) -> Proc:
        try:
            p = Proc(args, env=env, timeout=timeout)
        except StartFailed:
            raise
        self.all.append(p)
        return p

    def node(self, index, shards, *extra, env=None) -> Proc:
        return self.start("node", "--index", str(index), "--shards", ",".join(map(str, shards)), "--port", "0",
                          "--poll", "0.2", *extra, env=env)

    def coordinator(self, model, index, *extra, env=None) -> Proc:
        return self.start("coordinator", "--model", str(model), "--index", str(index), "--port", "0", *extra,
                          env=env)

    def kill_all(self):
        for p in self.all:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - teardown must reach every process
                pass


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run `facepq ARGS` to completion; returns the CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "facepq.cli", *map(str, args)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
