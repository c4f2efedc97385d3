"""A segment's codes in 32-row blocks: the layout the AVX2 block kernels read without transposing.

The stored codes are row-major (a row's bytes together, `facepq_core.codes`). The AVX2 kernel looks
32 rows up at once with one vpshufb per byte column, so it needs each column's 32 bytes in one
vector: from row-major codes it transposes every block in registers first, ~40 of its ~130 vector
operations a block, most on the shuffle port its lookups need too. `CodeBlocks` holds the codes
already in that order, block j being rows [32j, 32j + 32) as `width` columns of 32 bytes (byte v of
column c is byte c of row 32j + v; the last block zero-padded). Measured on the 2-vCPU AMD EPYC
machine, capped at AVX2 (`facepq bench scan --simd avx2`), see the README's scan kernel table.

The AVX2 kernel of 8-bit codes reads the same blocks: it bounds each byte through its two nibbles
with four 16-entry tables (`query_node.fastscan.bound8_tables`), the 4-bit kernel's lookups.

A query node keeps this copy in place of the map's code pages (`SegmentView.release_code_pages`), so
a node's memory stays about the code bytes; only a node whose kernel for its codes runs AVX2 makes it
(`node_keeps_blocks`): the AVX-512 kernels look 64 rows up at once from row-major codes (8-byte
ones, the 16x16 code, without any transpose), and the cell gather of a partitioned index copies row
ranges of the map (`query_node.cell_gather`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from query_node import fastscan

BLOCK_ROWS = 32
CHUNK_ROWS = 1 << 20   # rows transposed per numpy call (a multiple of BLOCK_ROWS)


def node_keeps_blocks(packed: bool, partitioned: bool, hamming: bool = False) -> bool:
    """Whether a query node holds an index's codes as `CodeBlocks`: an index without cells (the cell gather
    copies row ranges of the map), and a block kernel that runs here: 4-bit codes where the 4-bit kernel runs
    AVX2, 8-bit codes where the nibble-bound kernel does (no AVX-512), unless their codec's tables may be
    Hamming tables (`hamming`: the popcount kernel reads row-major codes)."""
    if partitioned:
        return False
    return fastscan.blocks_preferred() if packed else not hamming and fastscan.blocks8_preferred()


@dataclass(frozen=True, eq=False)
class CodeBlocks:
    """Codes uint8 [rows, width] as 32-row blocks (`blocks`: uint8 [ceil(rows / 32), width, 32])."""

    blocks: np.ndarray
    rows: int

    @classmethod
    def of(cls, codes: np.ndarray, on_chunk=None, chunk_rows: int = CHUNK_ROWS) -> CodeBlocks:
        """The blocks of row-major codes uint8 [N, B] (read once, front to back; N = 0 allowed).

        `on_chunk(first, stop)` (optional) is called once rows [first, stop) are copied, in order, covering
        all rows: a node releases those rows' map pages there, so building the blocks of a big segment never
        holds more than one chunk of its map besides the blocks.
        """
        if codes.ndim != 2 or codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8 [N, B], got {codes.dtype} {codes.shape}")
        if chunk_rows < BLOCK_ROWS or chunk_rows % BLOCK_ROWS:
            raise ValueError(f"chunk_rows must be a positive multiple of {BLOCK_ROWS}, got {chunk_rows}")
        rows, width = codes.shape
        blocks = np.empty((-(-rows // BLOCK_ROWS), width, BLOCK_ROWS), dtype=np.uint8)
        for first in range(0, rows, chunk_rows):
            stop = min(first + chunk_rows, rows)
            whole = (stop - first) // BLOCK_ROWS   # whole blocks in this chunk (only the last chunk has a rest)
            part = codes[first:first + whole * BLOCK_ROWS].reshape(whole, BLOCK_ROWS, width)
            blocks[first // BLOCK_ROWS:first // BLOCK_ROWS + whole] = part.transpose(0, 2, 1)
            if stop - first > whole * BLOCK_ROWS:   # the last, partial block: rows past N are zero (never offered)
                tail = np.zeros((BLOCK_ROWS, width), dtype=np.uint8)
                tail[:stop - first - whole * BLOCK_ROWS] = codes[first + whole * BLOCK_ROWS:stop]
                blocks[-1] = tail.T
            if on_chunk is not None:
                on_chunk(first, stop)
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
