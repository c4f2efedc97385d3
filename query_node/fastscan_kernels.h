/*
 * Native scan kernels (fastscan_kernels.c) as the extension module query_node._fastscan
 * (_fastscan.c) calls them: exact top-k of PQ codes, each query's min-heap updated in place.
 *
 * A kernel may have one variant per instruction set, named <kernel>_<isa>, each compiled
 * with __attribute__((target(...))) rather than a -m flag for the whole file, so one
 * binary loads on any x86-64 CPU; _fastscan.c lists a kernel's variants best first and
 * picks the first this CPU runs. On other machines (or compilers) no variant is compiled
 * and facepq scans with its numba kernels.
 */
#ifndef FASTSCAN_KERNELS_H
#define FASTSCAN_KERNELS_H

#include <stdint.h>

#ifndef FASTSCAN_X86   /* -DFASTSCAN_X86=0 builds the module without kernels, as on other machines */
#if defined(__x86_64__) && defined(__GNUC__)   /* gcc and clang: target attributes, __builtin_cpu_supports */
#define FASTSCAN_X86 1
#else
#define FASTSCAN_X86 0
#endif
#endif

#define FS4_MAX_CODE_BYTES 64   /* fs4_scan keeps one block's transposed byte columns on the stack */
#define QUANTIZE_MAX_COLS 256   /* 2 x 64 nibble columns, or 64 byte columns: the kernels' widest tables */

/*
 * One query's quantized tables (every machine: query_node.fastscan.nibble_tables / byte_quant_tables, and the
 * side-by-side 8-bit kernel). vq: float32 [cols, nv], all finite; oq: column c's nv entries at c * stride, `copies`
 * times side by side. lo_c = min of column c, delta = max_c (max_c - lo_c) / levels (1 when 0), q = clip(floor((v -
 * lo_c) / delta), 0, levels), base = sum_c lo_c, terms = min(row_terms + ceil(eps / delta) + 2, 2^20), eps = 4
 * (code_bytes + 2) row_terms max|v| 2^-24 (float32 rounding of a row's sum): exact = base + delta * (sum q + F),
 * 0 <= F < terms. float64 throughout, numpy's operations in numpy's order (base may differ in the last bit).
 */
void quantize_query(const float *vq, int cols, int nv, uint8_t *oq, int stride, int copies, int code_bytes,
                    int row_terms, int levels, double *base, double *delta, int32_t *terms);

/* Return codes of every kernel. */
#define SCAN_OK 0
#define SCAN_BAD_ARGS (-1)      /* a width, query count or k the kernel does not handle */
#define SCAN_NO_MEMORY (-2)

/*
 * 4-bit codes: scan codes [n, width] (byte b holds sub-code 2b in its low nibble, 2b+1 in
 * its high nibble) for nq queries.
 *
 * pair:   float32 [nq, width * 256] exact byte tables (query_node.scan.byte_tables)
 * nib:    uint8 [nq, width8, 2, 32] quantized nibble tables, width8 = width rounded up to 8
 * base, delta: float64 [nq]; terms: int32 [nq] (quantized terms + slack)
 * skip:   uint8 [n] tombstones (read only for rows entering a heap) when has_skip
 * heap_s, heap_r: float32 / int64 [nq, k] min-heaps (root = k-th best), updated in place
 */
typedef int (*fs4_scan_fn)(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                           const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                           const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                           int64_t *heap_r, int32_t k);

/*
 * 8-bit codes with quantized byte tables: arguments as fs4_scan's, `nib` replaced by
 * qt: uint8 [nq, width8, 256], 7-bit values (query_node.fastscan.byte_quant_tables).
 */
typedef fs4_scan_fn q8_scan_fn;

/* Codes in 32-row blocks: fs4_scan's arguments and `stream` (prefetch ahead: the codes come from memory). */
typedef int (*block_scan_fn)(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                             const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                             const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                             int64_t *heap_r, int32_t k, int32_t stream);

/* Any byte tables (8-bit codes, or 4-bit pair tables): arguments as fs4_scan's, without the nibble tables. */
typedef int (*pq8_scan_fn)(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *tables,
                           const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                           int64_t *heap_r, int32_t k);

#if FASTSCAN_X86
/* Offer (s, r) to the min-heap (hs, hr) of size k: it enters when it ranks above the root. */
void heap_offer(float *hs, int64_t *hr, int k, float s, int64_t r);

int fs4_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                  const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                  const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                  int32_t k);
/* fs4_scan of codes in 32-row blocks (query_node/code_blocks.py), ceil(n / 32) * 32 * width bytes;
 * stream: prefetch ahead, the codes coming from memory rather than the cache (fastscan_kernels.c). */
int fs4_scan_blocks_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                         const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                         const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                         int64_t *heap_r, int32_t k, int32_t stream);
/* 8-bit codes in 32-row blocks, pruned by nibble bound tables nib: uint8 [nq, width8, 4, 32]
 * (query_node.fastscan.bound8_tables), re-scored exactly with the byte tables; stream as above. */
int q8_scan_blocks_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                        const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                        const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                        int64_t *heap_r, int32_t k, int32_t stream);
/* Blocks q8_scan_blocks_avx2 scored densely (every row exactly, its bound passing most rows) since the module
 * loaded, summed over threads: how a test or a benchmark sees which mode ran. */
uint64_t q8_dense_blocks(void);
/* Block kernel calls (either kernel, any thread) told to stream (prefetch ahead) since the module loaded. */
uint64_t streamed_calls(void);
/* Queries scanned side by side (qpar_scan: a call's groups of 16 queries, and a last group of 8 or more in
 * q8_scan_blocks_avx2, of 3 or more in pq8_scan_avx2) since the module loaded, once per call and thread; and those of
 * them scanned on quantized tables (qparq_rows: tables of up to 8 byte columns, all finite). */
uint64_t query_parallel_queries(void);
uint64_t query_parallel_quantized(void);
int pq8_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *tables,
                  const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                  int32_t k);
int fs4_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                    const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                    const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                    int32_t k);
int q8_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *tables,
                   const uint8_t *qt, const double *base, const double *delta, const int32_t *terms,
                   const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                   int32_t k);
#endif

#endif
