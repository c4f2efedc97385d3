"""The file-descriptor budget of a server: raise the soft limit at start, and say when it is too small.

A query node holds two descriptors per served segment (the descriptor it reads hit metadata with, and the
one its memory map keeps), plus sockets. Many shells start processes with a soft limit of 1024 and a hard
limit far above it; a node that stayed at 1024 turned its shards NOT_SERVING once an index grew past
~500 segments. Servers therefore raise the soft limit to the hard one when they start (no privilege
needed), and warn when what they serve needs more than that (merge small segments: indexer.upkeep).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

FDS_PER_SEGMENT = 2
FDS_RESERVED = 256  # sockets, the index's small files, libraries, the views kept for searches in flight


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (soft, hard) afterwards."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open (1,048,576 by default).
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("raised the open-file limit from %d to %d", soft, want)
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d (hard %d): %s", soft, hard, exc)
    return soft, hard


def check_fd_budget(segments: int, soft: int) -> bool:
    """Warn (and return False) when `segments` served segments need more descriptors than `soft` allows."""
    need = FDS_PER_SEGMENT * segments + FDS_RESERVED
    if soft > 0 and need > soft:
        log.warning("serving %d segments needs about %d open files but the limit is %d: raise it (ulimit -n) or "
                    "merge small segments (the coordinator's upkeep, --upkeep-seconds); shards that cannot open "
                    "their files will be NOT_SERVING", segments, need, soft)
        return False
    return True
