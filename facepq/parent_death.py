"""Run a command that gets SIGTERM when the process that started it dies (Linux PR_SET_PDEATHSIG).

    python -m facepq.parent_death PARENT_PID PROGRAM [ARGS...]

The local cluster's launcher (`facepq.launcher`) starts every child through this, so that even a
launcher killed with SIGKILL leaves no orphans. It used to set the signal in a `preexec_fn`, which
makes Python run its at-fork handlers in the forked child, gRPC's among them once the launcher has
used gRPC (its health checks): they restart gRPC's poller in the child, `close_fds` then closes the
poller's epoll descriptor under it, and the child aborts with "epoll_wait error: Bad file descriptor"
before it reaches exec (grpc/grpc#43055; 2 starts in 100 with one idle channel, measured on grpcio
1.85). The launcher therefore spawns with no Python in the child (no preexec_fn: vfork and exec, no
handlers run), and this small program, a fresh single-threaded process, arms the signal and execs the
command: the signal survives exec, and the pid stays the one the launcher recorded.
"""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
USAGE = "usage: python -m facepq.parent_death PARENT_PID PROGRAM [ARGS...]"


def command(args: list) -> list[str]:
    """The argv that runs `args` with the parent-death signal armed for this process as the parent (Linux), or
    `args` unchanged elsewhere."""
    args = [str(a) for a in args]
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-m", "facepq.parent_death", str(os.getpid()), *args]


def _arm() -> str | None:
    """Set PR_SET_PDEATHSIG=SIGTERM on this process; the reason when it could not be set."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        return f"no prctl in libc ({exc})"
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    parent, program = int(argv[0]), argv[1]
    why = _arm()
    if why is not None:  # the child still runs; it only loses the guarantee against a SIGKILLed launcher
        print(f"facepq: {program} will not stop with its launcher: PR_SET_PDEATHSIG failed: {why}", file=sys.stderr)
    if os.getppid() != parent:
        # The launcher died before the signal was armed, so the signal will never come: stop as it would have.
        os.kill(os.getpid(), signal.SIGTERM)
        return 128 + signal.SIGTERM  # only if SIGTERM is ignored
    # Python ignores SIGPIPE and SIGXFSZ for itself; an ignored signal stays ignored across exec, so give the
    # command the defaults (as subprocess's restore_signals does).
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(program, argv[1:])
    except OSError as exc:
        print(f"facepq: cannot run {program}: {exc.strerror or exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
