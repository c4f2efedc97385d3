#!/usr/bin/env bash
# Install Debian/Ubuntu packages with apt-get, waiting (bounded) for another package manager to finish.
#   bash scripts/apt-install.sh PKG...        (as root; scripts/install.sh calls it)
# A freshly booted cloud machine often runs unattended-upgrades or cloud-init's apt for a few
# minutes, holding the dpkg lock: apt-get would fail at once with "Could not get lock
# /var/lib/dpkg/lock-frontend" (exit 100). This waits until no process holds the locks, saying
# which process does, for at most FACEPQ_APT_LOCK_TIMEOUT seconds (default 600), then runs
# apt-get with the time left as its own lock timeout (DPkg::Lock::Timeout, apt >= 1.9.11) for
# the moment between the check and apt-get taking the lock.
# Environment: FACEPQ_APT_LOCK_TIMEOUT (seconds); FACEPQ_DPKG_LOCKS (colon-separated lock files,
# default dpkg's and apt's); FACEPQ_APT_GET (the apt-get to run; tests point it elsewhere);
# PYTHON (a Python 3 to read the locks with, default python3).
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
TIMEOUT="${FACEPQ_APT_LOCK_TIMEOUT:-600}"
LOCKS="${FACEPQ_DPKG_LOCKS:-/var/lib/dpkg/lock-frontend:/var/lib/dpkg/lock:/var/lib/apt/lists/lock:/var/cache/apt/archives/lock}"
APT_GET="${FACEPQ_APT_GET:-apt-get}"
PY="${PYTHON:-python3}"
start=$(date +%s)

# dpkg and apt hold fcntl (POSIX) record locks, which flock(1) cannot see; F_GETLK asks the kernel
# who holds one without taking it. Prints nothing and exits 0 once every lock is free; exits 1 after
# the timeout with the holder named.
"$PY" - "$TIMEOUT" "$LOCKS" <<'PYTHON'
import fcntl, os, struct, sys, time

timeout, paths = float(sys.argv[1]), [p for p in sys.argv[2].split(":") if p]
FLOCK = "hhqqi"  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def holder(path):
    """(pid, name) of a process holding a lock on `path`, None when it is free or absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        asked = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, asked))
    finally:
        os.close(fd)
    if l_type == fcntl.F_UNLCK:
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except OSError:
        name = "an open file description lock" if pid == -1 else "unknown"
    return pid, name


start, told = time.monotonic(), 0.0
while True:
    held = next(((p, h) for p in paths for h in [holder(p)] if h), None)
    if held is None:
        sys.exit(0)
    (path, (pid, name)), waited = held, time.monotonic() - start
    who = f"process {pid} ({name})" if pid > 0 else name
    if waited >= timeout:
        print(f"[install] error: {path} is still held by {who} after {timeout:.0f} s: another package install is "
              f"running. Let it finish (or stop it), then run this again; FACEPQ_APT_LOCK_TIMEOUT=SECONDS waits "
              f"longer.", file=sys.stderr, flush=True)
        sys.exit(1)
    if told == 0.0 or waited - told >= 30:
        told = waited or 1e-9
        print(f"[install] waiting for {path}, held by {who} (another apt/dpkg run, e.g. unattended upgrades at "
              f"boot); waited {waited:.0f} s of at most {timeout:.0f} s", flush=True)
    time.sleep(min(1.0, max(0.05, timeout - waited)))
PYTHON

left=$(( TIMEOUT - ($(date +%s) - start) ))
[ "$left" -gt 10 ] || left=10
export DEBIAN_FRONTEND=noninteractive
"$APT_GET" -o "DPkg::Lock::Timeout=$left" update -qq >/dev/null
"$APT_GET" -o "DPkg::Lock::Timeout=$left" install -y -qq "$@" >/dev/null
