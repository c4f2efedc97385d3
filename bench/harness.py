"""A `facepq` server (node, coordinator) run as a child process, ready once it says where it listens.

Used by the tests and the benchmarks that start real servers on loopback (it is not
part of the installed package). Built on mirakuru's `Executor`: mirakuru spawns the
process in its own session, waits with a timeout, notices an early exit, and kills the
whole process tree (also any a test forgot, at interpreter exit). The readiness check
is ours: the server's output goes to an anonymous temporary file, searched for the
`listening on HOST:PORT` line. mirakuru's `OutputExecutor` reads its banner from a pipe
and discards what came before it, which is the text that explains a failed start, and
leaves the pipe unread afterwards, so a talkative server would block on a full pipe.
The session is started with `start_new_session`, not mirakuru's `preexec_fn` (see `_popen_kwargs`).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import mirakuru

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Servers print exactly one `... listening on HOST:PORT` line when ready (query_node/cli.py).
BANNER = re.compile(r"listening on (\S+)[ \t\r]*\n")
FACEPQ_CLI = (sys.executable, "-m", "facepq.cli")


class StartFailed(RuntimeError):
    """The server exited or stayed silent before printing its 'listening on' line."""

    def __init__(self, returncode, output: str):
        self.returncode, self.output = returncode, output
        super().__init__(f"exit {returncode}: {output[-3000:]}")


class ServerProcess(mirakuru.Executor):
    """`python -m facepq.cli ARGS` as a child; `.address` is what it printed after 'listening on '.

    Args:
        args: the facepq command line, e.g. ["node", "--index", path, "--shards", "0"].
        env: extra environment variables.
        timeout: seconds to wait for the ready line before killing it and raising StartFailed.
        program: what runs `args` (default `python -m facepq.cli`).

    Raises:
        StartFailed: with the exit code and everything the process printed.
    """

    def __init__(self, args, env: dict | None = None, timeout: float = 90, program=FACEPQ_CLI):
        self.args = [str(a) for a in args]
        self.address: str | None = None
        self._output = tempfile.TemporaryFile()  # shared with the child; read with pread, never moved
        super().__init__([*map(str, program), *self.args], cwd=str(REPO_ROOT), timeout=timeout,
                         envvars={"PYTHONUNBUFFERED": "1", **(env or {})},
                         stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self.start()
        except mirakuru.ProcessExitedWithError as exc:
            self.kill()
            raise StartFailed(exc.exit_code, self.text()) from None
        except mirakuru.TimeoutExpired:  # mirakuru has killed it
            raise StartFailed(-signal.SIGKILL, self.text()) from None
        self._popen = self.process  # mirakuru forgets its Popen once stopped; the pid and exit code stay here

    # ---- mirakuru's hooks ------------------------------------------------------------------------
    @property
    def _popen_kwargs(self) -> dict:
        # mirakuru starts the new session with preexec_fn=os.setsid. A preexec_fn makes Python run its
        # at-fork handlers in the child, gRPC's among them once this process has used gRPC, and those
        # restart gRPC's poller between close_fds and exec: the child aborts with "epoll_wait error:
        # Bad file descriptor" (grpc/grpc#43055; about 1 start in 4 with a live channel, here).
        # start_new_session is the same setsid, done in C with no Python in the child.
        kwargs = super()._popen_kwargs
        kwargs.pop("preexec_fn", None)
        kwargs["start_new_session"] = True
        return kwargs

    def pre_start_check(self) -> bool:
        return False  # port 0: never another server's address

    def after_start_check(self) -> bool:
        match = BANNER.search(self.text())
        if match:
            self.address = match.group(1)
            return True
        if self.process.poll() is not None:  # mirakuru raises only for a non-zero exit; 0 is no start either
            raise mirakuru.ProcessExitedWithError(self, self.process.returncode)
        return False

    # ---- what tests and benchmarks use ----------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._popen.pid

    def text(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        fd = self._output.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def alive(self) -> bool:
        return self._popen.poll() is None

    def sigkill(self) -> None:
        """SIGKILL (a crash, as far as the rest of the cluster can tell)."""
        self.kill()

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)  # its group, as mirakuru's kill reaches the whole group
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
        self.kill()
        return self._popen.returncode
