"""facepq.parent_death and the launcher's start_child: children stop with their launcher, and start reliably
from a launcher that has used gRPC (the coordinator of `facepq up` once aborted before exec: grpc/grpc#43055)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from facepq.launcher import start_child
from tests.support.processes import live_grpc_channel

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def _trampoline(parent: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facepq.parent_death", str(parent), *args], capture_output=True,
                          text=True, timeout=120)


def test_children_start_from_a_process_that_uses_grpc(tmp_path):
    """With a preexec_fn, 2 starts in 100 aborted here ("epoll_wait error: Bad file descriptor"): 200 all start."""
    with live_grpc_channel():
        failed = []
        for i in range(200):
            log = tmp_path / f"{i}.log"
            with open(log, "wb") as out:
                code = start_child([shutil.which("true")], out).wait(timeout=120)
            if code != 0:
                failed.append(f"start {i}: exit {code}: {log.read_text(errors='replace')[-500:]}")
        assert not failed, "\n".join(failed)


def test_a_child_gets_sigterm_when_its_launcher_is_killed_with_sigkill(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom facepq.launcher import start_child\n"
         f"c = start_child(['sleep', '300'], open({str(tmp_path / 'sleep.log')!r}, 'wb'))\n"
         "print(c.pid, flush=True)\ntime.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(launcher.stdout.readline()))
        deadline = time.monotonic() + 60
        while child.cmdline()[:1] != ["sleep"]:  # the same pid, once the trampoline has exec'd the command
            assert time.monotonic() < deadline, child.cmdline()
            time.sleep(0.05)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        child.wait(timeout=60)  # psutil.TimeoutExpired if the signal never came
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_command_whose_launcher_died_before_the_signal_was_armed_never_runs(tmp_path):
    marker = tmp_path / "ran"
    assert os.getpid() != 1
    done = _trampoline(1, "touch", str(marker))  # 1 is not its parent (this process is): as if the launcher died
    assert done.returncode == -signal.SIGTERM, done
    assert not marker.exists()


def test_the_command_runs_with_sigpipe_at_its_default():
    """Python ignores SIGPIPE for itself; the command must not inherit that (as subprocess's restore_signals)."""
    done = _trampoline(os.getpid(), "grep", "^SigIgn:", "/proc/self/status")
    assert done.returncode == 0, done
    ignored = int(done.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), done.stdout


def test_a_program_that_cannot_run_and_bad_usage_are_one_line_errors():
    done = _trampoline(os.getpid(), "/no/such/program")
    assert done.returncode == 127
    assert done.stderr.strip() == "facepq: cannot run /no/such/program: No such file or directory"
    done = subprocess.run([sys.executable, "-m", "facepq.parent_death", "not-a-pid", "true"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("usage: python -m facepq.parent_death")
