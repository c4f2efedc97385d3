"""Batched scans on a torch device: a GPU where one is lent (issue 16's CUDA path), the CPU in tests.

The same sum as the native kernels and facepq_core.codes.score_codes, score[q, n] = sum_m T[q, m, c_nm]
in float32 and in subspace order, for a batch of queries at once: the codes stay on the device as one
uint8 row of sub-codes per subspace, and each chunk of rows costs one gather of every query's table
row per subspace into a [Q, rows] sum. Each query's top-k is then taken in facepq's order (higher
score first, the lower row at equal scores: query_node.merge) by one `topk` over int64 keys that hold
both, so the answer equals the CPU scan's row for row, ties included.

Nothing in facepq needs it: `facepq bench scale` adds its rows where torch sees a CUDA device (or
where `--device-scan` names one). It scans whole galleries with no tombstones: the benchmark's case.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codes import CodeSpec, unpack_codes

DEFAULT_CHUNK_ROWS = 1 << 20  # rows a gather covers: [Q, rows] float32 sums, 64 MiB at 16 queries
_ROW_MASK = 0xFFFFFFFF        # rows below 2**32 sit in a key's low 32 bits


class DeviceCodes:
    """A gallery's codes resident on a torch device, scanned a batch of queries at a time.

    Args:
        chunks: stored codes uint8 [n, spec.code_bytes], one array or several in row order.
        spec: their layout (4-bit codes are unpacked to one byte per sub-code on the device).
        device: a torch device name ("cuda", "cuda:1", "cpu").
        chunk_rows: rows per gather (memory: 4 * queries * chunk_rows bytes at a time).
    """

    def __init__(self, chunks, spec: CodeSpec, device: str = "cuda", chunk_rows: int = DEFAULT_CHUNK_ROWS):
        import torch

        if isinstance(chunks, np.ndarray):
            chunks = [chunks]
        self.spec, self.device, self.chunk_rows = spec, torch.device(device), int(chunk_rows)
        parts = [torch.from_numpy(np.ascontiguousarray(unpack_codes(c, spec).T)).to(self.device) for c in chunks]
        self.codes = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # uint8 [M, N]
        self.rows = int(self.codes.shape[1])
        if self.rows >= 1 << 32:
            raise ValueError(f"{self.rows} rows: a device scan holds fewer than 2**32")

    @property
    def nbytes(self) -> int:
        """Bytes the codes take on the device."""
        return int(self.codes.numel())

    def search(self, tables: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's top-k rows: (scores float32 [Q, k'], rows int64 [Q, k']), k' = min(k, rows), best first.

        Args:
            tables: float32 [Q, M, K] lookup tables (facepq_core.codecs).
        """
        import torch

        t = torch.from_numpy(np.ascontiguousarray(tables, dtype=np.float32)).to(self.device)
        if t.ndim != 3 or tuple(t.shape[1:]) != (self.spec.M, self.spec.K):
            raise ValueError(f"tables must be [Q, {self.spec.M}, {self.spec.K}], got {tuple(tables.shape)}")
        k = min(int(k), self.rows)
        best = None  # int64 keys [Q, <= k] of the rows kept so far
        for lo in range(0, self.rows, self.chunk_rows):
            keys = self._chunk_keys(t, lo, min(lo + self.chunk_rows, self.rows))
            keys = keys if best is None else torch.cat([best, keys], dim=1)
            best = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
        rows = (_ROW_MASK - (best & _ROW_MASK)).cpu().numpy().astype(np.int64)
        scores = _float_of_key((best >> 32).to(torch.int32)).cpu().numpy()
        return scores, rows

    def _chunk_keys(self, t, lo: int, hi: int):
        """int64 keys [Q, hi - lo]: the order-preserving bits of the score above, the inverted row below."""
        import torch

        scores = torch.zeros((t.shape[0], hi - lo), dtype=torch.float32, device=self.device)
        for m in range(self.spec.M):  # in subspace order, as score_codes and the kernels sum
            scores += t[:, m, :].index_select(1, self.codes[m, lo:hi].to(torch.int32))
        # (no -0.0 whose key would differ from +0.0's: sums start at +0.0, and x + -x is +0.0)
        bits = scores.view(torch.int32)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int32 in the floats' order
        rows = torch.arange(lo, hi, dtype=torch.int64, device=self.device)
        return (ordered.to(torch.int64) << 32) | (_ROW_MASK - rows)[None, :]


def _float_of_key(ordered):
    """The float32 scores back from their order-preserving int32 bits (the map is its own inverse)."""
    import torch

    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
