"""scripts/apt-install.sh waits (bounded, saying why) while another process holds the dpkg lock.

The lock is a real fcntl lock held by this test process on a temporary file the script is pointed
at (FACEPQ_DPKG_LOCKS); apt-get itself is replaced by a script that records its arguments
(FACEPQ_APT_GET), so the machine's apt is never touched.
"""
from __future__ import annotations

import fcntl
import os
import subprocess

import pytest

from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.timeout(120)
SCRIPT = REPO_ROOT / "scripts" / "apt-install.sh"


@pytest.fixture
def apt(tmp_path):
    """A fake apt-get, a lock file, and the environment that points the script at them."""
    calls = tmp_path / "apt-calls.txt"
    fake = tmp_path / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    lock = tmp_path / "lock-frontend"
    lock.touch()
    env = dict(os.environ, FACEPQ_APT_GET=str(fake), FACEPQ_DPKG_LOCKS=f"{tmp_path / 'absent'}:{lock}")
    return dict(calls=calls, lock=lock, env=env)


def _hold(path):
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # a POSIX record lock, as dpkg and apt take
    return fd


def test_waits_for_the_lock_then_installs(apt):
    fd = _hold(apt["lock"])
    proc = subprocess.Popen(["bash", str(SCRIPT), "redis-server", "gcc"], env=dict(apt["env"], FACEPQ_APT_LOCK_TIMEOUT="90"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # printed while the lock is held
        assert f"waiting for {apt['lock']}" in first and f"process {os.getpid()}" in first
        assert not apt["calls"].exists()  # nothing ran while the lock was held
    finally:
        os.close(fd)  # releases the lock
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = apt["calls"].read_text().splitlines()
    assert len(calls) == 2 and " update" in calls[0] and calls[1].endswith("install -y -qq redis-server gcc")
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls)  # apt's own wait covers the last moment


def test_gives_up_after_the_timeout_naming_the_holder(apt):
    fd = _hold(apt["lock"])
    try:
        done = subprocess.run(["bash", str(SCRIPT), "redis-server"], env=dict(apt["env"], FACEPQ_APT_LOCK_TIMEOUT="2"),
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert f"{apt['lock']} is still held by process {os.getpid()}" in done.stderr and "after 2 s" in done.stderr
    assert "FACEPQ_APT_LOCK_TIMEOUT" in done.stderr
    assert not apt["calls"].exists()


def test_free_locks_install_at_once(apt):
    done = subprocess.run(["bash", str(SCRIPT), "redis-server"], env=apt["env"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "waiting" not in done.stdout
    assert len(apt["calls"].read_text().splitlines()) == 2
