"""A process's resident memory per mapped file, from /proc/PID/smaps (Linux)."""
from __future__ import annotations


def _vma_lines(pid: int, path: str):
    """The split lines of every VMA of `path` in /proc/PID/smaps, with its VmFlags last in each VMA."""
    current = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                current = len(parts) > 5 and parts[5] == path
            elif current:
                yield parts


def smaps_rss(pid: int, path: str) -> tuple[int, int]:
    """(kB resident in VMAs of `path` advised random = a segment's metadata, kB resident in all VMAs of `path`)."""
    meta = total = 0
    rss = None
    for parts in _vma_lines(pid, path):
        if parts[0] == "Rss:":
            rss = int(parts[1])
            total += rss
        elif parts[0] == "VmFlags:" and "rr" in parts[1:]:
            meta += rss
    return meta, total


def smaps_mapped_kb(pid: int, path: str) -> int:
    """kB of `path` mapped in the process (resident or not): shows a measurement of `smaps_rss` saw the map."""
    return sum(int(parts[1]) for parts in _vma_lines(pid, path) if parts[0] == "Size:")


def node_holds_code_blocks(packed: bool) -> bool:
    """Whether a `facepq node` started now, with this environment (FACEPQ_SIMD) on this CPU, keeps an unpartitioned
    index's codes as 32-row blocks (query_node.code_blocks) instead of the map's code pages."""
    from query_node.code_blocks import node_keeps_blocks

    return node_keeps_blocks(packed, partitioned=False)
