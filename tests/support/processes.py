"""Real `facepq` server processes for the tests (bench.harness), a kill-all per test, and CLI runs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from bench.harness import REPO_ROOT, ServerProcess, StartFailed  # noqa: F401 (re-exported)


def node(index, shards, *extra) -> ServerProcess:
    return ServerProcess(["node", "--index", str(index), "--shards", ",".join(map(str, shards)), "--port", "0",
                          *extra])


class Procs:
    """Processes started by one test; all SIGKILLed at teardown."""

    def __init__(self):
        self.all: list[ServerProcess] = []

    def start(self, *args, env=None, timeout=90) -> ServerProcess:
        p = ServerProcess(args, env=env, timeout=timeout)
        self.all.append(p)
        return p

    def node(self, index, shards, *extra, env=None) -> ServerProcess:
        return self.start("node", "--index", str(index), "--shards", ",".join(map(str, shards)), "--port", "0",
                          "--poll", "0.2", *extra, env=env)

    def coordinator(self, model, index, *extra, env=None) -> ServerProcess:
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


def popen_with_sigint(args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new session with SIGINT at its default, as in a terminal.

    A test run started in the background (`cmd &`) inherits SIGINT ignored, and an ignored signal stays
    ignored across exec, so a Ctrl-C would never reach the command. A preexec_fn resetting it would run
    Python in the forked child, where gRPC's at-fork handlers (this process has used gRPC) can abort it
    before exec (grpc/grpc#43055, see facepq.parent_death). Instead SIGINT is handled here while the child
    is created: exec resets a handled signal to its default.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, start_new_session=True, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def live_grpc_channel():
    """A gRPC server in this process and a connected channel to it, for the duration: this process has used gRPC,
    so gRPC's at-fork handlers would run in a child forked with Python in it (grpc/grpc#43055)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel
    finally:
        channel.close()
        server.stop(None)
