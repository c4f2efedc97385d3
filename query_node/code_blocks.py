"""A segment's 4-bit codes in 32-row blocks: the layout the AVX2 4-bit kernel reads without transposing.

The stored codes are row-major (a row's bytes together, `facepq_core.codes`). The AVX2 kernel looks
32 rows up at once with one vpshufb per byte column, so it needs each column's 32 bytes in one
vector: from row-major codes it transposes every block in registers first, ~40 of its ~130 vector
operations a block, most on the shuffle port its lookups need too. `CodeBlocks` holds the codes
already in that order, block j being rows [32j, 32j + 32) as `width` columns of 32 bytes (byte v of
column c is byte c of row 32j + v; the last block zero-padded). Measured on the 2-vCPU AMD EPYC
machine, capped at AVX2 (`facepq bench scan --simd avx2`), see the README's scan kernel table.

A query node keeps this copy in place of the map's code pages (`SegmentView.release_code_pages`), so
a node's memory stays about the code bytes; only a node whose 4-bit kernel runs AVX2 makes it
(`query_node.fastscan.blocks_preferred`): the AVX-512 kernels read row-major codes as fast, and the
cell gather of a partitioned index copies row ranges of the map (`query_node.cell_gather`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 32
_CHUNK_BLOCKS = 1 << 15   # blocks transposed per numpy call (1M rows): bounds the temporary copy


@dataclass(frozen=True, eq=False)
class CodeBlocks:
    """Codes uint8 [rows, width] as 32-row blocks (`blocks`: uint8 [ceil(rows / 32), width, 32])."""

    blocks: np.ndarray
    rows: int

    @classmethod
    def of(cls, codes: np.ndarray) -> CodeBlocks:
        """The blocks of row-major codes uint8 [N, B] (read once, front to back; N = 0 allowed)."""
        if codes.ndim != 2 or codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8 [N, B], got {codes.dtype} {codes.shape}")
        rows, width = codes.shape
        full = rows // BLOCK_ROWS
        blocks = np.empty((-(-rows // BLOCK_ROWS), width, BLOCK_ROWS), dtype=np.uint8)
        for lo in range(0, full, _CHUNK_BLOCKS):
            hi = min(lo + _CHUNK_BLOCKS, full)
            part = codes[lo * BLOCK_ROWS:hi * BLOCK_ROWS].reshape(hi - lo, BLOCK_ROWS, width)
            blocks[lo:hi] = part.transpose(0, 2, 1)
        if rows % BLOCK_ROWS:   # the last, partial block: its rows past N are zero (never offered)
            tail = np.zeros((BLOCK_ROWS, width), dtype=np.uint8)
            tail[:rows % BLOCK_ROWS] = codes[full * BLOCK_ROWS:]
            blocks[full] = tail.T
        return cls(blocks, rows)

    @property
    def width(self) -> int:
        return self.blocks.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width), as the row-major codes' shape."""
        return self.rows, self.width

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def row(self, i: int) -> bytes:
        """Row i's bytes (0 <= i < rows)."""
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} outside 0..{self.rows - 1}")
        return self.blocks[i // BLOCK_ROWS, :, i % BLOCK_ROWS].tobytes()

    def codes(self) -> np.ndarray:
        """The row-major codes uint8 [rows, width] (a new array)."""
        return np.ascontiguousarray(self.blocks.transpose(0, 2, 1).reshape(-1, self.width)[:self.rows])
