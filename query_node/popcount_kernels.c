/*
 * Exact top-k Hamming scan of binary codes (the 'binary' codecs scored by Hamming distance).
 *
 * The byte-table kernel scores a B-bit code with B/8 float table lookups; the Hamming
 * distance is one XOR and one popcount per 64 bits. For 64-bit codes the avx512 variant
 * computes 8 distances per instruction (vpopcntq, AVX-512 VPOPCNTDQ) and compares them
 * with the heap's threshold in one vpcmpq; the avx2 variant counts bits with the nibble
 * lookup (vpshufb) and sums each 64-bit lane (vpsadbw), 4 rows per vector. Only rows whose
 * distance beats the threshold leave the vector loop. Other widths use a scalar popcnt loop.
 *
 * Results equal the table kernel's: the heap is the same (score = -distance as float32,
 * exact below 2^24; ties keep the lower row; rows numbered row_offset + i), and a row
 * enters only when its distance is strictly below the current k-th best (rows arrive in
 * increasing order, so an equal distance never displaces an earlier row). Tombstones are
 * read only for rows that would enter. Queries are scanned block by block (BLOCK rows
 * stay in cache while every query of the batch scans them).
 */
#include "popcount_kernels.h"
#include "topk_heap.h"

#if FASTSCAN_X86

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define BLOCK 8192
#define NO_THRESHOLD INT64_MAX   /* an empty heap slot (-inf) lets every row in */

/* Rows with a distance below this may enter the heap (its root is the k-th best). */
static inline int64_t threshold_of(const float *hs) {
    return hs[0] == -INFINITY ? NO_THRESHOLD : (int64_t)(-hs[0]);
}

/* Offer row i (distance d) of the block; returns the new threshold. */
static inline int64_t offer(float *hs, int64_t *hr, int k, int64_t d, int64_t row, const uint8_t *skip,
                            int32_t has_skip, int64_t local, int64_t thr) {
    if (d >= thr || (has_skip && skip[local])) return thr;
    replace_root(hs, hr, k, -(float)d, row);
    return threshold_of(hs);
}

/* Offer the rows of group i.. flagged in `below` (bit j: row i + j) with distances dist[j]; returns the threshold. */
static inline int64_t offer_group(float *hs, int64_t *hr, int k, const int64_t *dist, unsigned below, int64_t i,
                                  int64_t row_offset, const uint8_t *skip, int32_t has_skip, int64_t thr) {
    while (below) {
        int j = __builtin_ctz(below);
        below &= below - 1;
        thr = offer(hs, hr, k, dist[j], row_offset + i + j, skip, has_skip, i + j, thr);
    }
    return thr;
}

static inline __attribute__((always_inline)) int64_t row_distance(const uint8_t *row, const uint8_t *q,
                                                                  int32_t width) {
    int64_t d = 0;
    int32_t w = 0;
    for (; w + 8 <= width; w += 8) {
        uint64_t a, b;
        memcpy(&a, row + w, 8);
        memcpy(&b, q + w, 8);
        d += __builtin_popcountll(a ^ b);
    }
    for (; w < width; w++) d += __builtin_popcount((unsigned)(row[w] ^ q[w]));
    return d;
}

/* Scalar scan of rows [start, stop) for one query: any width, and the tails of the vector loops. */
static inline __attribute__((always_inline)) int64_t scan_rows_scalar(
    const uint8_t *codes, int64_t start, int64_t stop, int32_t width, const uint8_t *q, const uint8_t *skip,
    int32_t has_skip, int64_t row_offset, float *hs, int64_t *hr, int k, int64_t thr) {
    for (int64_t i = start; i < stop; i++) {
        int64_t d = row_distance(codes + i * width, q, width);
        if (d < thr) thr = offer(hs, hr, k, d, row_offset + i, skip, has_skip, i, thr);
    }
    return thr;
}

static int check_args(int64_t n, int32_t width, int32_t nq, int32_t k) {
    return (n < 0 || width < 1 || width > (1 << 20) || nq < 0 || k < 1) ? SCAN_BAD_ARGS : SCAN_OK;
}

typedef int64_t (*scan8_fn)(const uint8_t *codes, int64_t start, int64_t stop, const uint8_t *q,
                            const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *hs, int64_t *hr, int k,
                            int64_t thr);
typedef int64_t (*scan_any_fn)(const uint8_t *codes, int64_t start, int64_t stop, int32_t width, const uint8_t *q,
                               const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *hs, int64_t *hr,
                               int k, int64_t thr);

/* Every query scans a block of BLOCK rows while it is in cache; a variant passes its two row loops. */
static inline __attribute__((always_inline)) int scan_blocks(
    const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries, const uint8_t *skip,
    int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r, int32_t k, scan8_fn scan8,
    scan_any_fn scan_any) {
    if (check_args(n, width, nq, k)) return SCAN_BAD_ARGS;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t stop = start + BLOCK < n ? start + BLOCK : n;
        for (int32_t qi = 0; qi < nq; qi++) {
            float *hs = heap_s + (int64_t)qi * k;
            int64_t *hr = heap_r + (int64_t)qi * k;
            const uint8_t *q = queries + (int64_t)qi * width;
            if (width == 8)
                scan8(codes, start, stop, q, skip, has_skip, row_offset, hs, hr, k, threshold_of(hs));
            else
                scan_any(codes, start, stop, width, q, skip, has_skip, row_offset, hs, hr, k, threshold_of(hs));
        }
    }
    return SCAN_OK;
}

/* ---- AVX-512 VPOPCNTDQ ---------------------------------------------------------------------- */
#define AVX512 __attribute__((target("avx512f,avx512vpopcntdq,popcnt")))

AVX512 static int64_t scan8_avx512(const uint8_t *codes, int64_t start, int64_t stop, const uint8_t *q,
                                   const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *hs,
                                   int64_t *hr, int k, int64_t thr) {
    uint64_t qword;
    memcpy(&qword, q, 8);
    const __m512i query = _mm512_set1_epi64((long long)qword);
    __m512i limit = _mm512_set1_epi64(thr);
    int64_t i = start;
    for (; i + 8 <= stop; i += 8) {
        __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + i * 8), query));
        __mmask8 below = _mm512_cmplt_epi64_mask(d, limit);
        if (below) {
            int64_t dist[8];
            _mm512_storeu_si512(dist, d);
            thr = offer_group(hs, hr, k, dist, below, i, row_offset, skip, has_skip, thr);
            limit = _mm512_set1_epi64(thr);
        }
    }
    return scan_rows_scalar(codes, i, stop, 8, q, skip, has_skip, row_offset, hs, hr, k, thr);
}

AVX512 static int64_t scan_any_avx512(const uint8_t *codes, int64_t start, int64_t stop, int32_t width,
                                      const uint8_t *q, const uint8_t *skip, int32_t has_skip,
                                      int64_t row_offset, float *hs, int64_t *hr, int k, int64_t thr) {
    return scan_rows_scalar(codes, start, stop, width, q, skip, has_skip, row_offset, hs, hr, k, thr);
}

int hamming_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries,
                        const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                        int32_t k) {
    return scan_blocks(codes, n, width, nq, queries, skip, has_skip, row_offset, heap_s, heap_r, k, scan8_avx512,
                       scan_any_avx512);
}

/* ---- AVX2 ----------------------------------------------------------------------------------- */
#define AVX2_POPCNT __attribute__((target("avx2,popcnt")))

/* Bits set in each 64-bit lane of v (nibble lookup, then a byte sum per lane). */
AVX2_POPCNT static inline __m256i popcount_epi64_avx2(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i counts = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                                     _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
    return _mm256_sad_epu8(counts, _mm256_setzero_si256());
}

AVX2_POPCNT static int64_t scan8_avx2(const uint8_t *codes, int64_t start, int64_t stop, const uint8_t *q,
                                      const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *hs,
                                      int64_t *hr, int k, int64_t thr) {
    uint64_t qword;
    memcpy(&qword, q, 8);
    const __m256i query = _mm256_set1_epi64x((long long)qword);
    __m256i limit = _mm256_set1_epi64x(thr);
    int64_t i = start;
    for (; i + 8 <= stop; i += 8) {
        __m256i d0 = popcount_epi64_avx2(
            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + i * 8)), query));
        __m256i d1 = popcount_epi64_avx2(
            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + i * 8 + 32)), query));
        int below = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(limit, d0))) |
                    _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(limit, d1))) << 4;
        if (below) {
            int64_t dist[8];
            _mm256_storeu_si256((__m256i *)dist, d0);
            _mm256_storeu_si256((__m256i *)(dist + 4), d1);
            thr = offer_group(hs, hr, k, dist, (unsigned)below, i, row_offset, skip, has_skip, thr);
            limit = _mm256_set1_epi64x(thr);
        }
    }
    return scan_rows_scalar(codes, i, stop, 8, q, skip, has_skip, row_offset, hs, hr, k, thr);
}

AVX2_POPCNT static int64_t scan_any_avx2(const uint8_t *codes, int64_t start, int64_t stop, int32_t width,
                                         const uint8_t *q, const uint8_t *skip, int32_t has_skip,
                                         int64_t row_offset, float *hs, int64_t *hr, int k, int64_t thr) {
    return scan_rows_scalar(codes, start, stop, width, q, skip, has_skip, row_offset, hs, hr, k, thr);
}

int hamming_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const uint8_t *queries,
                      const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r,
                      int32_t k) {
    return scan_blocks(codes, n, width, nq, queries, skip, has_skip, row_offset, heap_s, heap_r, k, scan8_avx2,
                       scan_any_avx2);
}

#endif /* FASTSCAN_X86 */
