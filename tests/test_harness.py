"""bench.harness.ServerProcess (the tests' and benchmarks' server processes, on mirakuru): ready on the
'listening on' line, every line of output kept, failed starts explained."""
from __future__ import annotations

import signal
import sys

import pytest

from bench.harness import ServerProcess, StartFailed
from tests.support.processes import live_grpc_channel

PYTHON = [sys.executable, "-c"]

# 256 KiB before the ready line and more after it: more than a pipe holds, so nothing may sit unread.
CHATTY = """
import sys, time
print("early " * 50000, flush=True)
print("server listening on 127.0.0.1:", end="", flush=True)
time.sleep(0.5)
print("5555", flush=True)
print("late " * 50000, flush=True)
print("done talking", flush=True)
time.sleep(300)
"""


def test_ready_on_the_listening_line_with_all_output_kept():
    server = ServerProcess([CHATTY], program=PYTHON, timeout=60)
    try:
        assert server.alive() and server.pid > 0
        assert server.address == "127.0.0.1:5555"  # a line counts once complete, not "127.0.0.1:"
        text = server.text()
        assert text.startswith("early early")
    finally:
        assert server.terminate() == -signal.SIGTERM
    assert not server.alive() and "done talking" in server.text()


def test_a_server_that_exits_before_it_is_ready_fails_with_its_output():
    with pytest.raises(StartFailed) as info:
        ServerProcess(["import sys; print('cannot open the index /nowhere'); sys.exit(3)"], program=PYTHON,
                      timeout=60)
    assert info.value.returncode == 3 and "cannot open the index /nowhere" in info.value.output
    with pytest.raises(StartFailed) as info:  # exit code 0 is no start either
        ServerProcess(["print('nothing to serve')"], program=PYTHON, timeout=60)
    assert info.value.returncode == 0 and "nothing to serve" in str(info.value)


def test_a_silent_server_is_killed_at_the_timeout():
    with pytest.raises(StartFailed) as info:
        ServerProcess(["import time; print('loading', flush=True); time.sleep(300)"], program=PYTHON, timeout=1)
    assert info.value.returncode == -signal.SIGKILL and "loading" in info.value.output


def test_sigkill_is_a_crash_and_the_pid_stays_known():
    server = ServerProcess(["import time; print('listening on 127.0.0.1:7', flush=True); time.sleep(300)"],
                           program=PYTHON, timeout=60)
    pid = server.pid
    server.sigkill()
    assert not server.alive() and server.pid == pid
    server.kill()  # twice is fine


def test_servers_start_from_a_process_that_uses_grpc():
    """A preexec_fn in the spawn (mirakuru's default) lets gRPC's fork handlers abort the child before exec."""
    with live_grpc_channel():
        for _ in range(20):
            ServerProcess(["print('listening on 127.0.0.1:7', flush=True)"], program=PYTHON, timeout=60).kill()
