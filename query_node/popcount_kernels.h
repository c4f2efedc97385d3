/*
 * Popcount kernels (popcount_kernels.c): exact top-k Hamming scan of binary codes, as the
 * extension module query_node._fastscan calls them (binding: _fastscan.c, Python side:
 * query_node/hamming_scan.py).
 *
 * Variants per instruction set, picked at run time (__builtin_cpu_supports) like the other
 * kernels: avx512_vpopcntdq (8 rows of 64-bit codes per vpopcntq) and avx2 (vpshufb nibble
 * popcount, 4 rows per vector). Codes of another width than 8 bytes take a scalar popcnt
 * loop inside the same variant.
 */
#ifndef POPCOUNT_KERNELS_H
#define POPCOUNT_KERNELS_H

#include <stdint.h>

#include "fastscan_kernels.h"   /* FASTSCAN_X86, SCAN_OK / SCAN_BAD_ARGS */

/*
 * codes:   uint8 [n, width] binary codes (bit j of a code in byte j / 8)
 * queries: uint8 [nq, width] the queries' own codes
 * skip:    uint8 [n] tombstones (read only for rows entering a heap) when has_skip
 * heap_s, heap_r: float32 / int64 [nq, k] min-heaps (root = k-th best), updated in place; the
 *          score is minus the Hamming distance, ties keep the lower row (rows are row_offset + i)
 */
typedef int (*hamming_scan_fn)(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries,
                               const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                               int64_t *heap_r, int32_t k);

#if FASTSCAN_X86
int hamming_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries,
                        const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                        int32_t k);
int hamming_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries,
                      const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                      int32_t k);
#endif

#endif
