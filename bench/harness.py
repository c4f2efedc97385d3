"""A `facepq` server (node, coordinator) run as a child process, ready once it says where it listens.

Used by the tests and the benchmarks that start real servers on loopback (it is not
part of the installed package); the long-running launcher (`facepq.launcher`) adds
process groups and log files on top of the same idea.
"""
from __future__ import annotations

import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class StartFailed(RuntimeError):
    """The server exited or stayed silent before printing its 'listening on' line."""

    def __init__(self, returncode, output: str):
        self.returncode, self.output = returncode, output
        super().__init__(f"exit {returncode}: {output[-3000:]}")


class ServerProcess:
    """`python -m facepq.cli ARGS` as a child; `.address` is what it printed after 'listening on '.

    Args:
        args: the facepq command line, e.g. ["node", "--index", path, "--shards", "0"].
        env: extra environment variables.
        timeout: seconds to wait for the ready line before killing it and raising StartFailed.
    """

    def __init__(self, args, env: dict | None = None, timeout: float = 90):
        self.args = [str(a) for a in args]
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

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the rest of the cluster can tell)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    sigkill = kill

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)
