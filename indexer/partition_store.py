"""An index's cell partition on disk: fit at index creation, stored by content, loaded once per process.

The partition (facepq_core.partition.CellPartition) is one file, `partition/<sha256>.npz`, written
before the first commit that names it (the manifest's model section, `ModelMeta.partition`), and
never rewritten: another partition is another file and another index. Garbage collection only
touches `shards/` and `manifests/`, so the file stays for as long as the index does.
"""
from __future__ import annotations

import hashlib
import threading

from facepq_core.errors import IndexFormatError
from facepq_core.partition import CellPartition, CellProbe, PartitionRef
from indexer.manifest import ModelMeta
from indexer.store import IndexStore

_CACHE: dict[tuple[str, str], CellPartition] = {}  # (sha256, model fingerprint) -> partition
_PROBES: dict[tuple[str, str], CellProbe] = {}  # what readers keep: the probe alone
_CACHE_LOCK = threading.Lock()


def save_partition(store: IndexStore, partition: CellPartition) -> PartitionRef:
    """Write `partition` into the index (atomic; a no-op when the same content is there) and return its ref."""
    data = partition.to_bytes()
    ref = PartitionRef(cells=partition.cells, sha256=hashlib.sha256(data).hexdigest())
    if not store.file_exists(ref.path):
        store.write_bytes(ref.path, data)
    with _CACHE_LOCK:
        _CACHE[(ref.sha256, partition.fingerprint)] = partition
    return ref


def load_prober(store: IndexStore, model: ModelMeta) -> CellProbe | None:
    """What a query node keeps of the partition `model` names (None: none): the probe, built once per process.

    The partition itself (centroids for assignment, histograms) is read, checked, used and dropped: a node
    assigns no faces, and the histograms alone are L*M*K floats (8 MiB at 1024 cells of 8x256 codes).
    Raises IndexFormatError as `load_partition` does.
    """
    ref = model.partition
    if ref is None:
        return None
    key = (ref.sha256, model.fingerprint)
    with _CACHE_LOCK:
        found = _PROBES.get(key) or (_CACHE[key].prober() if key in _CACHE else None)
    if found is None:
        found = _read(store, model).prober()
    with _CACHE_LOCK:
        _PROBES[key] = found
    return found


def load_partition(store: IndexStore, model: ModelMeta) -> CellPartition | None:
    """The partition `model` names (None when it names none), checked against its sha256, cell count and model.

    Raises:
        IndexFormatError: the file is missing, altered, unreadable, or partitions another model's codes.
    """
    ref = model.partition
    if ref is None:
        return None
    key = (ref.sha256, model.fingerprint)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
    if found is not None:
        return found
    partition = _read(store, model)
    with _CACHE_LOCK:
        _CACHE[key] = partition
    return partition


def _read(store: IndexStore, model: ModelMeta) -> CellPartition:
    """Read and check the partition file `model` names (IndexFormatError: missing, altered, another model's)."""
    ref = model.partition
    where = f"cell partition {ref.path} of {store.uri}"
    try:
        data = store.read_bytes(ref.path)
    except (OSError, IndexFormatError) as exc:
        raise IndexFormatError(f"{where} cannot be read: {exc}"[:300]) from None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IndexFormatError(f"{where} fails its sha256 check (altered or corrupt); refusing it")
    partition = CellPartition.from_bytes(data, model.fingerprint, where)
    if partition.cells != ref.cells or partition.spec.M != model.M or partition.spec.K != model.K:
        raise IndexFormatError(f"{where} has {partition.cells} cells of M={partition.spec.M} K={partition.spec.K} "
                               f"codes; the manifest says {ref.cells} cells of M={model.M} K={model.K}")
    return partition
