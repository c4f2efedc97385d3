"""Native scan kernels (C, AVX2), exact and bit-identical to the numba kernels of `query_node.scan`.

* 4-bit codes: quantized nibble tables + vpshufb lookups of 32 rows at once prune the
  rows that cannot reach the k-th best; the rest are re-scored with the float tables.
* any byte tables (8-bit codes, or 4-bit pair tables): one fused scalar loop that
  scores a row and compares it with the heap's threshold (no second selection pass).

`fastscan4.c` is compiled on first use with the system C compiler (gcc -O3 -mavx2,
never -ffast-math, so float sums round exactly like the numba kernel), cached under
~/.cache/facepq/native (or $FACEPQ_NATIVE_DIR) keyed by the source, and called through ctypes
(which releases the GIL). `scripts/install.sh` builds it once so the first query of
a node does not pay for the compile.

When there is no compiler, no AVX2, or FACEPQ_NATIVE=0, `available()` is False and
`query_node.scan` keeps using its numba kernels: same results, slower (4-bit codes ~3-4x).
`status()` says which kernel runs and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("fastscan4.c")
CFLAGS = ("-O3", "-mavx2", "-std=gnu11", "-shared", "-fPIC")
# pq8_scan is used for 8-byte codes only: at 16 bytes a row's serial chain of 16 float adds
# makes the scalar loop latency-bound (5.7 vs 5.4 ms per 1M rows for numba's vectorised loop).
FUSED_WIDTH = 8
MAX_CODE_BYTES = 64          # the kernel keeps one block's transposed columns on the stack
QUANT_LEVELS = 127           # 7-bit entries: a byte's two nibble values still fit in a byte

_lock = threading.Lock()
_lib = None
_why_not = "not loaded yet"


class NativeBuildError(RuntimeError):
    """The native kernel could not be built or loaded (the numba kernel is used instead)."""


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(os.environ.get("FACEPQ_NATIVE_DIR") or pathlib.Path(base) / "facepq" / "native")


def build() -> pathlib.Path:
    """Compile fastscan4.c into the cache (once per source version); returns the library path."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeBuildError(f"the AVX2 kernel needs x86-64, this is {platform.machine()}")
    # keyed by source and flags, not the compiler, so an image can ship the built library
    # and drop the compiler (deploy/Dockerfile)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"fastscan4-{key}.so"
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise NativeBuildError("no C compiler (gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise NativeBuildError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)   # atomic: several node processes may build at once
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"compiling {SOURCE.name} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("built %s", out)
    return out


def _load():
    global _lib, _why_not
    with _lock:
        if _lib is not None or _why_not != "not loaded yet":
            return _lib
        if os.environ.get("FACEPQ_NATIVE", "1") == "0":
            _why_not = "disabled by FACEPQ_NATIVE=0"
            return None
        try:
            lib = ctypes.CDLL(str(build()))
            if not lib.fs4_supported():
                raise NativeBuildError("this CPU has no AVX2")
        except (NativeBuildError, OSError) as exc:
            _why_not = str(exc)
            log.warning("native 4-bit scan kernel unavailable (%s); using the numba kernel", exc)
            return None
        p = ctypes.c_void_p
        lib.fs4_scan.restype = ctypes.c_int
        lib.fs4_scan.argtypes = [p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, p, p, p, p, p, p,
                                 ctypes.c_int32, ctypes.c_int64, p, p, ctypes.c_int32]
        lib.pq8_scan.restype = ctypes.c_int
        lib.pq8_scan.argtypes = [p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, p, p, ctypes.c_int32,
                                 ctypes.c_int64, p, p, ctypes.c_int32]
        _lib, _why_not = lib, ""
        return _lib


def available() -> bool:
    """True when the native kernel is built and this CPU runs it."""
    return _load() is not None


def status() -> str:
    """'avx2' or 'numba (<why the native kernel is not used>)'."""
    return "avx2" if available() else f"numba ({_why_not})"


@dataclass(frozen=True)
class NibbleTables:
    """Per-query quantized tables: value(sub-code) ~ lo + delta * q, q in 0..127."""

    nib: np.ndarray     # uint8 [Q, width8, 2, 32]: byte column, (low, high) nibble, 16 entries twice (both lanes)
    base: np.ndarray    # float64 [Q]: sum of every table's minimum
    delta: np.ndarray   # float64 [Q]: one quantization step for all tables of the query
    terms: np.ndarray   # int32 [Q]: quantized terms per row + rounding slack, for the pruning bound


def nibble_values(lookup_tables: np.ndarray) -> np.ndarray:
    """float32 [Q, M, K<=16] tables -> float32 [Q, ceil(M/2), 2, 16] per byte and nibble (low, high).

    Byte j holds sub-code 2j in its low nibble and 2j+1 in its high nibble; entries the
    codes never address (k >= K, the missing high subspace of an odd M) are 0.
    """
    luts = np.asarray(lookup_tables, dtype=np.float32)
    nq, m, kk = luts.shape
    values = np.zeros((nq, (m + 1) // 2, 2, 16), dtype=np.float32)
    values[:, : (m + 1) // 2, 0, :kk] = luts[:, 0::2]
    values[:, : m // 2, 1, :kk] = luts[:, 1::2]
    return values


def nibble_tables(nibble_values: np.ndarray) -> NibbleTables | None:
    """Quantize `nibble_values` [Q, B, 2, 16] for the native kernel.

    Returns None when the kernel cannot take them (non-finite values, more than
    MAX_CODE_BYTES bytes), so the caller scans with float tables. The unaddressed
    entries are 0 in the float pair tables too (`query_node.scan.byte_tables`), so
    the pruning bound holds for every byte value.
    """
    nq, code_bytes = nibble_values.shape[:2]
    if code_bytes > MAX_CODE_BYTES or not np.isfinite(nibble_values).all():
        return None
    values = nibble_values.astype(np.float64)
    lo = values.min(axis=3)
    delta = (values.max(axis=3) - lo).max(axis=(1, 2)) / QUANT_LEVELS
    delta[delta == 0] = 1.0
    q = np.floor((values - lo[..., None]) / delta[:, None, None, None])
    width8 = (code_bytes + 7) // 8 * 8
    nib = np.zeros((nq, width8, 2, 32), dtype=np.uint8)
    nib[:, :code_bytes, :, :16] = np.clip(q, 0, QUANT_LEVELS)
    nib[:, :code_bytes, :, 16:] = nib[:, :code_bytes, :, :16]
    # float32 rounding of the exact sums (a pair add, then one add per byte): a generous bound
    eps = 4.0 * (code_bytes + 2) * (2 * code_bytes) * np.abs(values).max(axis=(1, 2, 3)) * 2.0 ** -24
    # (a huge slack only makes every row a candidate: slower, still exact)
    terms = np.minimum(2 * code_bytes + np.ceil(eps / delta) + 2, 1 << 20)
    return NibbleTables(nib, lo.sum(axis=(1, 2)), delta, terms.astype(np.int32))


def scan_into(codes: np.ndarray, byte_tables: np.ndarray, tables: NibbleTables, skip: np.ndarray,
              has_skip: bool, row_offset: int, heap_s: np.ndarray, heap_r: np.ndarray) -> None:
    """Native twin of `query_node.scan._scan_into` for packed codes (same heap, same results).

    Args:
        codes: C-contiguous uint8 [N, B] packed codes (may be a read-only memory map).
        byte_tables: float32 [Q, B*256] exact pair tables.
        tables: the same queries' `NibbleTables`.
        skip: bool [N] tombstones, read only when has_skip.
        heap_s, heap_r: C-contiguous float32 / int64 [Q, k] heaps, updated in place.
    """
    n, width = codes.shape
    rc = _native().fs4_scan(codes.ctypes.data, n, width, heap_s.shape[0], byte_tables.ctypes.data,
                      tables.nib.ctypes.data, tables.base.ctypes.data, tables.delta.ctypes.data,
                      tables.terms.ctypes.data, skip.ctypes.data, int(has_skip), row_offset,
                      heap_s.ctypes.data, heap_r.ctypes.data, heap_s.shape[1])
    _check(rc, "fs4_scan", codes)


def scan8_into(codes: np.ndarray, byte_tables: np.ndarray, skip: np.ndarray, has_skip: bool, row_offset: int,
               heap_s: np.ndarray, heap_r: np.ndarray) -> None:
    """Native twin of `query_node.scan._scan_into` for any byte tables (same heap, same results).

    Args as `scan_into`, without the nibble tables.
    """
    n, width = codes.shape
    rc = _native().pq8_scan(codes.ctypes.data, n, width, heap_s.shape[0], byte_tables.ctypes.data, skip.ctypes.data,
                      int(has_skip), row_offset, heap_s.ctypes.data, heap_r.ctypes.data, heap_s.shape[1])
    _check(rc, "pq8_scan", codes)


def _native():
    lib = _load()
    if lib is None:
        raise NativeBuildError(_why_not)
    return lib


def _check(rc: int, kernel: str, codes: np.ndarray) -> None:
    if rc != 0:
        raise NativeBuildError(f"{kernel} returned {rc} for codes {codes.shape}")
