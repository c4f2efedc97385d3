/*
 * Native scan kernels: exact top-k of packed 4-bit PQ codes with quantized SIMD lookup
 * tables (fs4_scan_avx2; fs4_scan_blocks_avx2 on 32-row blocks), of 8-bit codes in 32-row blocks
 * through nibble bounds (q8_scan_blocks_avx2), and of 8-bit codes with float tables (pq8_scan_avx2);
 * the two 8-bit kernels scan a batch side by side instead (qpar_scan: groups of 16 queries, quantized where they can).
 *
 * Built at install time into the extension module query_node._fastscan (setup.py; the
 * Python side is _fastscan.c and query_node/fastscan.py). The file is compiled without
 * -mavx2: AVX2 functions carry __attribute__((target("avx2"))) and run only when
 * _fastscan.c finds AVX2 on this CPU. Never -ffast-math, and no FMA contraction
 * (-ffp-contract=off), so float sums round exactly like the numba kernels.
 *
 * Why: a float table lookup per sub-code tops out near one gather per byte; with
 * 16-entry tables quantized to 7 bits, one vpshufb looks up 32 codes at once (the
 * FAISS "fast scan" idea). Quantized scores are only bounds, so this kernel stays
 * exact: a row whose quantized score cannot reach the current k-th best exact score
 * is dropped, every other row is re-scored with the float pair tables, in the same
 * byte order as the numba kernel (query_node/scan.py), and offered to the same
 * (score desc, row asc) heap. Results are bit-identical to the numba kernel.
 *
 * Layout: codes are row-major [n, width] bytes (the index's on-disk layout, read
 * through a memory map); byte b of a row holds sub-code 2b in its low nibble and
 * 2b+1 in its high nibble. Blocks of 32 rows are transposed in registers to one
 * 32-byte vector per byte column, so no second, transposed copy of the codes is
 * kept in memory.
 *
 * Bound used for pruning (per query; see query_node/fastscan.py, nibble_tables, for how
 * the tables are made):
 *   exact(row) = base + delta * (Q(row) + F), 0 <= F < terms (+ float rounding),
 * so a row can reach threshold T only if Q(row) > floor((T - base) / delta) - terms - slack.
 */
#include "fastscan_kernels.h"
#include "topk_heap.h"

#include <math.h>

/* Arguments: fastscan_kernels.h. */
void quantize_query(const float *vq, int cols, int nv, uint8_t *oq, int stride, int copies, int code_bytes,
                    int row_terms, int levels, double *base, double *delta, int32_t *terms) {
    double col_lo[QUANTIZE_MAX_COLS];   /* each column's minimum, from the first pass */
    double range = 0.0, amax = 0.0, sum = 0.0;
    for (int c = 0; c < cols; c++) {
        double lo = vq[c * nv], hi = lo;   /* float -> double is exact: min/max as numpy's */
        for (int i = 0; i < nv; i++) {
            double x = vq[c * nv + i];
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
            amax = fabs(x) > amax ? fabs(x) : amax;
        }
        range = hi - lo > range ? hi - lo : range;
        sum += lo;
        col_lo[c] = lo;
    }
    double step = range / levels;
    if (step == 0.0) step = 1.0;
    for (int c = 0; c < cols; c++) {
        for (int i = 0; i < nv; i++) {
            double level = floor(((double)vq[c * nv + i] - col_lo[c]) / step);
            uint8_t u = (uint8_t)(level < 0 ? 0 : level > levels ? levels : level);
            for (int j = 0; j < copies; j++) oq[(long long)c * stride + j * nv + i] = u;
        }
    }
    double eps = 4.0 * (code_bytes + 2) * row_terms * amax * 0x1p-24;
    double n_terms = row_terms + ceil(eps / step) + 2;
    *base = sum;
    *delta = step;
    *terms = (int32_t)(n_terms < (double)(1 << 20) ? n_terms : (double)(1 << 20));
}

#if FASTSCAN_X86   /* the rest of the file: on other machines the module has no kernels */

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2")))
#if defined(__clang__)
#define NO_TREE_VECTORIZE
#else
#define NO_TREE_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#endif

#define EMPTY_ROW INT64_MAX

typedef struct {
    const float *pair;      /* [width * 256] exact byte tables of this query */
    const uint8_t *nib;     /* [width8][2][32] quantized nibble tables, each lane-duplicated */
    double base, delta;
    int terms;              /* quantized terms summed per row, plus the rounding slack */
    float *hs;
    int64_t *hr;
    int k;
    int16_t thr;            /* a row is a candidate when its quantized score > thr */
    int blocks, passed;     /* 8-bit blocks: blocks bounded in this window (heap full), rows their bound passed */
    int dense_left;         /* 8-bit blocks: blocks still to score densely (dense_block8) before bounding again */
} query_t;

/* Offer (s, r) to a full or filling min-heap of size k (rows merged from another thread's heap). */
void heap_offer(float *hs, int64_t *hr, int k, float s, int64_t r) {
    if (worse(hs[0], hr[0], s, r)) replace_root(hs, hr, k, s, r);
}

/* The exact score of a row whose byte b is at row[b * stride] (1: row-major codes, 32: code blocks). */
static inline float exact_score(const float *pair, const uint8_t *row, size_t stride, int width) {
    float s = 0.0f;
    for (int b = 0; b < width; b++) s += pair[(size_t)b * 256 + row[(size_t)b * stride]];
    return s;
}

static void update_threshold(query_t *q) {
    if (q->hr[0] == EMPTY_ROW) {   /* heap not full: every row is a candidate */
        q->thr = -1;
        return;
    }
    double t = floor(((double)q->hs[0] - q->base) / q->delta) - q->terms;
    if (t < -1) t = -1;
    if (t > 32767) t = 32767;
    q->thr = (int16_t)t;
}

/* Per-query state of the float kernels: their byte tables and heaps (malloc'd; NULL when out of memory). */
static query_t *float_queries(int nq, int width, const float *tables, float *heap_s, int64_t *heap_r, int k) {
    query_t *qs = malloc(sizeof(query_t) * (size_t)nq);
    if (!qs) return NULL;
    for (int q = 0; q < nq; q++) {
        qs[q].pair = tables + (size_t)q * width * 256;
        qs[q].hs = heap_s + (size_t)q * k;
        qs[q].hr = heap_r + (size_t)q * k;
        qs[q].k = k;
    }
    return qs;
}

/* Per-query state of the quantized kernels (malloc'd; NULL when out of memory). qstride: table bytes per query. */
static query_t *make_queries(int nq, int width, const float *pair, const uint8_t *qtab, size_t qstride,
                             const double *base, const double *delta, const int32_t *terms, float *heap_s,
                             int64_t *heap_r, int k) {
    query_t *qs = float_queries(nq, width, pair, heap_s, heap_r, k);
    if (!qs) return NULL;
    for (int q = 0; q < nq; q++) {
        qs[q].nib = qtab + (size_t)q * qstride;
        qs[q].base = base[q];
        qs[q].delta = delta[q];
        qs[q].terms = terms[q];
        qs[q].blocks = qs[q].passed = qs[q].dense_left = 0;
        update_threshold(&qs[q]);
    }
    return qs;
}

/* Offer row i, of exact score s, to the query's heap, and move its quantized threshold. */
static inline void offer_exact(query_t *q, float s, int64_t i, const uint8_t *skip, int has_skip,
                               int64_t row_offset) {
    int64_t r = row_offset + i;
    if (s >= q->hs[0] && worse(q->hs[0], q->hr[0], s, r) && !(has_skip && skip[i])) {
        replace_root(q->hs, q->hr, q->k, s, r);
        update_threshold(q);
    }
}

/* Re-score row i (its first byte at `row`, bytes `stride` apart) exactly and offer it to the query's heap. */
static inline void offer_at(query_t *q, const uint8_t *row, size_t stride, int width, int64_t i, const uint8_t *skip,
                            int has_skip, int64_t row_offset) {
    offer_exact(q, exact_score(q->pair, row, stride, width), i, skip, has_skip, row_offset);
}

/* offer_at for row i of row-major codes [n, width]. */
static inline void offer(query_t *q, const uint8_t *codes, int width, int64_t i, const uint8_t *skip,
                         int has_skip, int64_t row_offset) {
    offer_at(q, codes + (size_t)i * width, 1, width, i, skip, has_skip, row_offset);
}

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/*
 * Transpose bytes [8g, 8g+8) of 32 rows (row stride `stride`, rows at `src`) into
 * out[0..7]: out[c] holds byte column 8g+c of the 32 rows. Within out[c], 16-bit
 * element e (lane L = e / 8, t = e % 8) holds rows 4t+2L (low byte) and 4t+2L+1 (high).
 */
static inline AVX2 void transpose32x8(const uint8_t *src, size_t stride, int g, __m256i *out) {
    const __m256i pairs = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                           0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m256i y[8];
    for (int t = 0; t < 8; t++) {
        __m256i v;
        if (stride == 8) {
            v = _mm256_loadu_si256((const __m256i *)(src + 32 * t));
        } else {
            const uint8_t *p = src + (size_t)(4 * t) * stride + 8 * g;
            v = _mm256_set_epi64x((long long)load64(p + 3 * stride), (long long)load64(p + 2 * stride),
                                  (long long)load64(p + stride), (long long)load64(p));
        }
        /* lane: row a bytes 0..7, row b bytes 0..7 -> (a0 b0)(a1 b1)...(a7 b7) */
        y[t] = _mm256_shuffle_epi8(v, pairs);
    }
    /* 8x8 transpose of 16-bit elements within each 128-bit lane */
    __m256i a0 = _mm256_unpacklo_epi16(y[0], y[1]), a1 = _mm256_unpackhi_epi16(y[0], y[1]);
    __m256i a2 = _mm256_unpacklo_epi16(y[2], y[3]), a3 = _mm256_unpackhi_epi16(y[2], y[3]);
    __m256i a4 = _mm256_unpacklo_epi16(y[4], y[5]), a5 = _mm256_unpackhi_epi16(y[4], y[5]);
    __m256i a6 = _mm256_unpacklo_epi16(y[6], y[7]), a7 = _mm256_unpackhi_epi16(y[6], y[7]);
    __m256i b0 = _mm256_unpacklo_epi32(a0, a2), b1 = _mm256_unpackhi_epi32(a0, a2);
    __m256i b2 = _mm256_unpacklo_epi32(a1, a3), b3 = _mm256_unpackhi_epi32(a1, a3);
    __m256i b4 = _mm256_unpacklo_epi32(a4, a6), b5 = _mm256_unpackhi_epi32(a4, a6);
    __m256i b6 = _mm256_unpacklo_epi32(a5, a7), b7 = _mm256_unpackhi_epi32(a5, a7);
    out[0] = _mm256_unpacklo_epi64(b0, b4);
    out[1] = _mm256_unpackhi_epi64(b0, b4);
    out[2] = _mm256_unpacklo_epi64(b1, b5);
    out[3] = _mm256_unpackhi_epi64(b1, b5);
    out[4] = _mm256_unpacklo_epi64(b2, b6);
    out[5] = _mm256_unpackhi_epi64(b2, b6);
    out[6] = _mm256_unpacklo_epi64(b3, b7);
    out[7] = _mm256_unpackhi_epi64(b3, b7);
}

#define MAX_WIDTH8 FS4_MAX_CODE_BYTES

/*
 * The quantized scores of 32 rows held as byte columns cols[0..ncols) (one vector per byte column): sets
 * *me / *mo to the rows that can still reach the query's threshold, bit 2e of each standing for the low
 * (*me) and high (*mo) byte of the columns' 16-bit element e (which rows those are depends on the layout).
 *
 * Two columns' byte sums r_a, r_b (each <= 254) are averaged before they are widened: vpavgb gives
 * ceil((r_a + r_b) / 2), so S = the sum of the averages is at least Q / 2 (Q: the row's quantized score)
 * and 2S > thr whenever Q > thr. The test keeps every row the bound Q > thr keeps, plus the few whose
 * rounding lifts them over (all re-scored exactly), and widens half as many vectors: 0.265 -> 0.240 ms
 * per 1M 8-byte codes in a C harness (candidates 198 -> 214 for one top-100 query).
 */
static inline __attribute__((always_inline)) AVX2 __m256i column_sums(const query_t *qq, const __m256i *cols, int c) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i tlo = _mm256_loadu_si256((const __m256i *)(qq->nib + (size_t)c * 64));
    const __m256i thi = _mm256_loadu_si256((const __m256i *)(qq->nib + (size_t)c * 64 + 32));
    __m256i v = _mm256_loadu_si256(cols + c);
    __m256i lo = _mm256_and_si256(v, low4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    /* each table entry <= 127, so the pair sum fits a byte */
    return _mm256_add_epi8(_mm256_shuffle_epi8(tlo, lo), _mm256_shuffle_epi8(thi, hi));
}

/*
 * 8-bit codes (one sub-code per byte, K <= 256) bounded through their nibbles: byte column c's 256-entry
 * table T, seen as 16 x 16 (row: the byte's high nibble h, column: its low nibble l), is bounded by
 * min(A[h] + B[l], R[h], C[l]) with R / C the row / column maxima and A[h] + B[l] >= T[h, l] an additive
 * cover (query_node/fastscan.py, bound8_tables). Four 16-entry tables, four vpshufb a column: the
 * lookups of the 4-bit kernel plus two, and an exact re-score of the rows that pass (1-3% of 1M random 8-byte
 * codes for a top-100 query when the codewords are in nibble order, facepq_core/nibble_order.py; most of
 * 1M in any other order).
 */
static inline __attribute__((always_inline)) AVX2 __m256i column_bound8(const query_t *qq, const __m256i *cols,
                                                                         int c) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const uint8_t *t = qq->nib + (size_t)c * 128;
    __m256i v = _mm256_loadu_si256(cols + c);
    __m256i lo = _mm256_and_si256(v, low4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    /* A, B entries <= 127: their sum fits a byte */
    __m256i add = _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)t), hi),
                                  _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(t + 32)), lo));
    __m256i rc = _mm256_min_epu8(_mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(t + 64)), hi),
                                 _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(t + 96)), lo));
    return _mm256_min_epu8(add, rc);
}

/* A column's quantized byte values: the 4-bit kernel's nibble sums, or (bound8) the 8-bit nibble bound. */
static inline __attribute__((always_inline)) AVX2 __m256i column_value(const query_t *qq, const __m256i *cols,
                                                                        int c, int bound8) {
    return bound8 ? column_bound8(qq, cols, c) : column_sums(qq, cols, c);
}

static inline __attribute__((always_inline)) AVX2 void candidates32_of(const query_t *qq, const __m256i *cols,
                                                                        int ncols, uint32_t *me, uint32_t *mo,
                                                                        int bound8, const char *ahead) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (int c = 0; c < ncols; c += 2) {
        if (ahead) _mm_prefetch(ahead + 32 * c, _MM_HINT_T0);   /* two 32-byte columns: one cache line */
        __m256i r = column_value(qq, cols, c, bound8);
        /* an odd last column is averaged with 0: ceil(r / 2) >= r / 2 still */
        r = _mm256_avg_epu8(r, c + 1 < ncols ? column_value(qq, cols, c + 1, bound8) : _mm256_setzero_si256());
        /* 16-bit sums of the even (low byte) and odd (high byte) rows */
        acc0 = _mm256_add_epi16(acc0, r);
        acc1 = _mm256_add_epi16(acc1, _mm256_srli_epi16(r, 8));
    }
    __m256i even = _mm256_sub_epi16(acc0, _mm256_slli_epi16(acc1, 8));
    /* 2S > thr <=> S > floor(thr / 2) for integer S (thr >= -1) */
    __m256i thr = _mm256_set1_epi16((int16_t)(qq->thr < 0 ? -1 : qq->thr / 2));
    /* two mask bits per 16-bit element: keep one */
    *me = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(even, thr)) & 0x55555555u;
    *mo = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(acc1, thr)) & 0x55555555u;
}

/*
 * 4-bit codes of at most 8 bytes in 32-row blocks: the columns' byte sums r_0..r_7 (each <= 254; columns past
 * the code's width 0) are averaged as a tree, avg(avg(avg(r0, r1), avg(r2, r3)), avg(avg(r4, r5), avg(r6, r7))),
 * and vpavgb rounds up, so the byte F it leaves is at least Q / 8 (Q: the row's quantized score): Q > thr
 * implies F > floor(thr / 8). One unsigned byte compare then gives the 32 rows' mask in row order, where
 * candidates32_of widens pair averages to 16-bit sums and tests even and odd rows apart (some 14 fewer of
 * about 100 vector operations a block). The coarser bound keeps a few more rows for exact re-scoring. 1M
 * 8-byte codes, one top-100 query, kernel alone: 0.38 -> 0.34 ms (AVX2-only EPYC, A/B in one process); the same
 * tree for any width up to 8, its depth fitted to the width, measured 0.35 (a loop the compiler keeps less of
 * in registers), so narrower codes share the depth of 8.
 */
static inline __attribute__((always_inline)) AVX2 uint32_t rows32_tree(const query_t *qq, const __m256i *cols,
                                                                        int ncols) {
    __m256i r[8];
    for (int c = 0; c < 8; c++) r[c] = c < ncols ? column_sums(qq, cols, c) : _mm256_setzero_si256();
    __m256i f = _mm256_avg_epu8(_mm256_avg_epu8(_mm256_avg_epu8(r[0], r[1]), _mm256_avg_epu8(r[2], r[3])),
                                _mm256_avg_epu8(_mm256_avg_epu8(r[4], r[5]), _mm256_avg_epu8(r[6], r[7])));
    int least = qq->thr < 0 ? 0 : qq->thr / 8 + 1;   /* a row passes when F >= least */
    if (least > 255) return 0;
    __m256i lv = _mm256_set1_epi8((char)least);
    return (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(f, lv), f));
}

static inline AVX2 void candidates32(const query_t *qq, const __m256i *cols, int ncols, uint32_t *me, uint32_t *mo) {
    candidates32_of(qq, cols, ncols, me, mo, 0, NULL);
}

/* Arguments: fastscan_kernels.h. */
AVX2 int fs4_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                       const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                       const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                       int64_t *heap_r, int32_t k) {
    int width8 = (width + 7) / 8 * 8;
    if (width < 1 || width8 > MAX_WIDTH8 || nq < 1 || k < 1) return SCAN_BAD_ARGS;
    query_t *qs = make_queries(nq, width, pair, nib, (size_t)width8 * 64, base, delta, terms, heap_s, heap_r, k);
    if (!qs) return SCAN_NO_MEMORY;
    __m256i cols[MAX_WIDTH8];
    uint8_t padded[32 * MAX_WIDTH8];
    int64_t full = n / 32 * 32;
    for (int64_t start = 0; start < full; start += 32) {
        const uint8_t *block = codes + (size_t)start * width;
        const uint8_t *src = block;
        size_t stride = (size_t)width;
        /* Rows of width % 8 bytes are read as whole 8-byte groups: the bytes past a row's width belong to the
         * next row, and the tables of those columns are all 0, so they add nothing. Near the end of the
         * codes, where that read would pass the last row, the rows are copied to zero-padded ones. */
        if (width % 8 && start + 32 + 8 > n) {
            memset(padded, 0, (size_t)32 * width8);
            for (int r = 0; r < 32; r++) memcpy(padded + (size_t)r * width8, block + (size_t)r * width, width);
            src = padded;
            stride = (size_t)width8;
        }
        for (int g = 0; g < width8 / 8; g++) transpose32x8(src, stride, g, cols + 8 * g);
        for (int q = 0; q < nq; q++) {
            query_t *qq = &qs[q];
            uint32_t me, mo;
            candidates32(qq, cols, width8, &me, &mo);
            while (me | mo) {
                uint32_t m = me | mo;
                int bit = __builtin_ctz(m);
                int e = bit / 2;
                int64_t row = start + 4 * (e & 7) + 2 * (e >> 3);
                if (me & (1u << bit)) offer(qq, codes, width, row, skip, has_skip, row_offset);
                if (mo & (1u << bit)) offer(qq, codes, width, row + 1, skip, has_skip, row_offset);
                me &= ~(1u << bit);
                mo &= ~(1u << bit);
            }
        }
    }
    for (int64_t i = full; i < n; i++)
        for (int q = 0; q < nq; q++) offer(&qs[q], codes, width, i, skip, has_skip, row_offset);
    free(qs);
    return SCAN_OK;
}

/* Offer row i, of exact score s, to the query's heap (the float kernels: no quantized threshold to move). */
static inline void offer_scored(query_t *q, float s, int64_t i, const uint8_t *skip, int has_skip,
                                int64_t row_offset) {
    int64_t r = row_offset + i;
    if (worse(q->hs[0], q->hr[0], s, r) && !(has_skip && skip[i])) replace_root(q->hs, q->hr, q->k, s, r);
}

/* ---- A batch's queries side by side: one code byte, every query's table entry in one vector ---- */

/*
 * Why: the single-query kernels look up one table entry per code byte and query, so a batch of Q queries costs
 * Q passes of lookups, the codes' loads being all it shares. With the batch's byte tables transposed to
 * [byte column][256 codewords][lanes] (lanes = 8 or 16 queries, padded with zeros), one code byte selects the
 * entries of every query at once, contiguous: one 8-float vector load and add serves 8 queries. Each lane's sum
 * still runs over the byte columns in order from 0.0f, exactly like exact_score, so the scores, and the answers,
 * are bit-identical to the single-query kernels'. Four rows at a time keep independent sums (the adds' latency),
 * compared with their queries' k-th best scores; the rare row that reaches one is offered to that query's heap.
 * Tables of up to 8 byte columns go quantized instead (qparq_rows, below): same answers, one pass for up to 16
 * queries whatever their number. What a pass costs against the one-query kernel of the same codes decides how
 * many of a call's queries go side by side (AVX2-only EPYC, one thread, CPU time, `TopKHeap`, 2026-12-03): on
 * 32-row blocks a quantized pass of 16 lanes cost 5.1-5.4 ms on 1M 8-byte codes and 19-24 ms on 5M, against
 * 0.63-0.67 ms (top-10) and 0.84-0.88 ms (top-100) a query on the bound kernel at 1M and 3.2-4.5 ms at 5M, i.e.
 * 6-8 of its queries; on row-major codes the one-query kernel (pq8_scan) takes 2.7 ms at 1M and the pass 4.6-5.4.
 * So every full group of 16 goes side by side, and the rest r of a call too when r >= QPAR_BLOCKS_MIN (8) or
 * QPAR_ROWS_MIN (3); fewer stay on the one-query kernel. (The float passes, 4.2 ms for 8 lanes and 7.1 for 16 at
 * 1M, are left to tables the quantized pass cannot take: non-finite entries, more than 8 columns.)
 */
#define QPAR_MAX_LANES 16
#define QPAR_BLOCKS_MIN 8
#define QPAR_ROWS_MIN 3

static uint64_t qpar_queries;   /* queries scanned side by side since the module loaded, every thread's */
static uint64_t qparq_queries;  /* ... of them on quantized tables */

uint64_t query_parallel_queries(void) { return __atomic_load_n(&qpar_queries, __ATOMIC_RELAXED); }
uint64_t query_parallel_quantized(void) { return __atomic_load_n(&qparq_queries, __ATOMIC_RELAXED); }

/* How many of a call's nq queries to scan side by side: every full group of 16, and the rest r too when r >= min. */
static inline int qpar_count(int nq, int min) {
    int rest = nq % QPAR_MAX_LANES;
    return rest >= min ? nq : nq - rest;
}

/* Byte 0 of row `first` (a multiple of 4) and of the 3 rows after it: in a 32-row block (`blocked`, the rows' byte c
 * then 32 * c further, the 4 rows side by side) or row-major. */
static inline const uint8_t *qpar_first_byte(const uint8_t *codes, int64_t first, int width, const int blocked) {
    return blocked ? codes + (size_t)(first & ~(int64_t)31) * width + (first & 31) : codes + (size_t)first * width;
}

/* Byte c of the 4 rows at col0 (qpar_first_byte), row j's in bits 8j..8j+7. */
static inline uint32_t qpar_column(const uint8_t *col0, int c, int width, const int blocked) {
    uint32_t w;
    if (blocked) {
        memcpy(&w, col0 + (size_t)c * 32, 4);
    } else {
        const uint8_t *r = col0 + c;
        w = (uint32_t)r[0] | (uint32_t)r[width] << 8 | (uint32_t)r[2 * width] << 16 | (uint32_t)r[3 * width] << 24;
    }
    return w;
}

/* Rows [stop, n) of row-major codes (fewer than 4, past the side-by-side groups), one query at a time. */
static inline void qpar_tail(query_t *qs, int used, const uint8_t *codes, int64_t stop, int64_t n, int width,
                             const uint8_t *skip, int has_skip, int64_t row_offset) {
    for (int64_t i = stop; i < n; i++)
        for (int q = 0; q < used; q++)
            offer_scored(&qs[q], exact_score(qs[q].pair, codes + (size_t)i * width, 1, width), i, skip, has_skip,
                         row_offset);
}

/* Offer the (row, query) pairs of a 4-row group whose bit is set in rows[j] (row first + j, query bit q) to the
 * queries' heaps, sums [4][16] their scores; thr follows each heap's k-th best. */
static inline AVX2 void qpar_offer(query_t *qs, float *thr, const float *sums, const uint32_t *rows, int64_t first,
                                   int live_rows, const uint8_t *skip, int has_skip, int64_t row_offset) {
    for (int j = 0; j < live_rows; j++)
        for (uint32_t bits = rows[j]; bits; bits &= bits - 1) {
            int q = __builtin_ctz(bits);
            float s = sums[j * QPAR_MAX_LANES + q];
            if (s >= thr[q]) {   /* the threshold may have risen since the compare (an earlier row of the group) */
                offer_scored(&qs[q], s, first + j, skip, has_skip, row_offset);
                thr[q] = qs[q].hs[0];
            }
        }
}

/*
 * Scan rows [0, n) for `used` <= lanes queries with transposed tables tt [width][256][lanes]; `blocked`: the codes
 * are 32-row blocks (byte v of a block's column c is row v's byte c), else row-major [n, width]. nv = lanes / 8
 * vectors a row.
 */
static inline __attribute__((always_inline)) AVX2 void qpar_rows(
        query_t *qs, int used, const float *tt, const uint8_t *codes, int64_t n, int width, const int lanes,
        const int blocked, const uint8_t *skip, int has_skip, int64_t row_offset) {
    float thr[QPAR_MAX_LANES];
    float sums[4 * QPAR_MAX_LANES];
    for (int q = 0; q < QPAR_MAX_LANES; q++) thr[q] = q < used ? qs[q].hs[0] : INFINITY;
    const int nv = lanes == 16 ? 2 : 1;
    const uint32_t mine = (1u << used) - 1;
    __m256 t0 = _mm256_loadu_ps(thr), t1 = _mm256_loadu_ps(thr + 8);
    /* blocks: every 4 rows of every block, its zero padding too (never offered); row-major: whole groups of 4 */
    int64_t stop = blocked ? (n + 31) / 32 * 32 : n / 4 * 4;
    for (int64_t first = 0; first < stop; first += 4) {
        const uint8_t *col0 = qpar_first_byte(codes, first, width, blocked);
        __m256 a0 = _mm256_setzero_ps(), b0 = a0, c0 = a0, d0 = a0, a1 = a0, b1 = a0, c1 = a0, d1 = a0;
        for (int c = 0; c < width; c++) {
            uint32_t w = qpar_column(col0, c, width, blocked);
            const float *t = tt + (size_t)c * 256 * lanes;
            const float *p0 = t + (w & 255) * lanes, *p1 = t + ((w >> 8) & 255) * lanes;
            const float *p2 = t + ((w >> 16) & 255) * lanes, *p3 = t + (w >> 24) * lanes;
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p0));
            b0 = _mm256_add_ps(b0, _mm256_loadu_ps(p1));
            c0 = _mm256_add_ps(c0, _mm256_loadu_ps(p2));
            d0 = _mm256_add_ps(d0, _mm256_loadu_ps(p3));
            if (nv == 2) {
                a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p0 + 8));
                b1 = _mm256_add_ps(b1, _mm256_loadu_ps(p1 + 8));
                c1 = _mm256_add_ps(c1, _mm256_loadu_ps(p2 + 8));
                d1 = _mm256_add_ps(d1, _mm256_loadu_ps(p3 + 8));
            }
        }
        __m256 any = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a0, t0, _CMP_GE_OQ), _mm256_cmp_ps(b0, t0, _CMP_GE_OQ)),
                                  _mm256_or_ps(_mm256_cmp_ps(c0, t0, _CMP_GE_OQ), _mm256_cmp_ps(d0, t0, _CMP_GE_OQ)));
        uint32_t hits = (uint32_t)_mm256_movemask_ps(any);
        if (nv == 2) {
            __m256 any1 = _mm256_or_ps(
                _mm256_or_ps(_mm256_cmp_ps(a1, t1, _CMP_GE_OQ), _mm256_cmp_ps(b1, t1, _CMP_GE_OQ)),
                _mm256_or_ps(_mm256_cmp_ps(c1, t1, _CMP_GE_OQ), _mm256_cmp_ps(d1, t1, _CMP_GE_OQ)));
            hits |= (uint32_t)_mm256_movemask_ps(any1) << 8;
        }
        if (__builtin_expect((hits & mine) != 0, 0)) {   /* rare once the heaps are full */
            _mm256_storeu_ps(sums, a0), _mm256_storeu_ps(sums + 16, b0);
            _mm256_storeu_ps(sums + 32, c0), _mm256_storeu_ps(sums + 48, d0);
            if (nv == 2) {
                _mm256_storeu_ps(sums + 8, a1), _mm256_storeu_ps(sums + 24, b1);
                _mm256_storeu_ps(sums + 40, c1), _mm256_storeu_ps(sums + 56, d1);
            }
            uint32_t rows[4];
            rows[0] = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a0, t0, _CMP_GE_OQ));
            rows[1] = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(b0, t0, _CMP_GE_OQ));
            rows[2] = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c0, t0, _CMP_GE_OQ));
            rows[3] = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(d0, t0, _CMP_GE_OQ));
            if (nv == 2) {
                rows[0] |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a1, t1, _CMP_GE_OQ)) << 8;
                rows[1] |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(b1, t1, _CMP_GE_OQ)) << 8;
                rows[2] |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c1, t1, _CMP_GE_OQ)) << 8;
                rows[3] |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(d1, t1, _CMP_GE_OQ)) << 8;
            }
            for (int j = 0; j < 4; j++) rows[j] &= mine;
            int live = n - first < 4 ? (int)(n - first) : 4;   /* rows past n: a last block's zero padding */
            qpar_offer(qs, thr, sums, rows, first, live, skip, has_skip, row_offset);
            t0 = _mm256_loadu_ps(thr), t1 = _mm256_loadu_ps(thr + 8);
        }
    }
    if (!blocked)   /* the last n % 4 rows of row-major codes, one query at a time */
        qpar_tail(qs, used, codes, stop, n, width, skip, has_skip, row_offset);
}

/*
 * Side by side on quantized tables: each query's byte tables quantized to `levels` = 255 / width steps a column
 * (quantize_query: exact = base + delta * (sum q + F), 0 <= F < terms), transposed to [byte column][256][16 lanes]
 * of one byte, so a row's quantized sums of 16 queries are `width` 16-byte adds that cannot overflow (width *
 * levels <= 255) from a table of width * 4 KiB, in L1 at width 8 (the float tables of 16 lanes are 16 times that).
 * A row whose sum reaches a query's threshold (qparq_threshold) is re-scored exactly and offered; every other row
 * cannot reach that query's k-th best score, so answers are the float kernels' bit for bit.
 */
#define QPARQ_LANES 16
/* Wider tables measured slower than float ones: at 16 columns (15 steps a column, 64 KiB of tables) a batch of 16
 * on 16x256 codes took 1.99 ms a query at 1M against 0.94 on float tables (`bench scan --batch 16`, same day). */
#define QPARQ_MAX_WIDTH 8

/* A query's quantized threshold: its rows are candidates when their quantized sum is at least this (0: all rows,
 * while the heap fills). Rounded down and clipped to a byte: a looser bound only re-scores more rows. */
static inline uint8_t qparq_threshold(const query_t *q) {
    if (q->hr[0] == EMPTY_ROW) return 0;
    double t = floor(((double)q->hs[0] - q->base) / q->delta) - q->terms + 1;
    return t < 0 ? 0 : t > 255 ? 255 : (uint8_t)t;
}

static inline __attribute__((always_inline)) AVX2 void qparq_rows(
        query_t *qs, int used, const uint8_t *tq, const uint8_t *codes, int64_t n, int width, const int blocked,
        const uint8_t *skip, int has_skip, int64_t row_offset) {
    uint8_t thr[QPARQ_LANES];
    for (int q = 0; q < QPARQ_LANES; q++) thr[q] = q < used ? qparq_threshold(&qs[q]) : 255;
    const uint32_t mine = (1u << used) - 1;
    __m128i t = _mm_loadu_si128((const __m128i *)thr);
    int64_t stop = blocked ? (n + 31) / 32 * 32 : n / 4 * 4;
    for (int64_t first = 0; first < stop; first += 4) {
        const uint8_t *col0 = qpar_first_byte(codes, first, width, blocked);
        __m128i a = _mm_setzero_si128(), b = a, c = a, d = a;
        for (int col = 0; col < width; col++) {
            uint32_t w = qpar_column(col0, col, width, blocked);
            const uint8_t *tc = tq + (size_t)col * 256 * QPARQ_LANES;
            a = _mm_add_epi8(a, _mm_load_si128((const __m128i *)(tc + (w & 255) * QPARQ_LANES)));
            b = _mm_add_epi8(b, _mm_load_si128((const __m128i *)(tc + ((w >> 8) & 255) * QPARQ_LANES)));
            c = _mm_add_epi8(c, _mm_load_si128((const __m128i *)(tc + ((w >> 16) & 255) * QPARQ_LANES)));
            d = _mm_add_epi8(d, _mm_load_si128((const __m128i *)(tc + (w >> 24) * QPARQ_LANES)));
        }
        /* lanes whose sum is >= the threshold: max(sum, thr) == sum */
        __m128i pa = _mm_cmpeq_epi8(_mm_max_epu8(a, t), a), pb = _mm_cmpeq_epi8(_mm_max_epu8(b, t), b);
        __m128i pc = _mm_cmpeq_epi8(_mm_max_epu8(c, t), c), pd = _mm_cmpeq_epi8(_mm_max_epu8(d, t), d);
        uint32_t hits = (uint32_t)_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(pa, pb), _mm_or_si128(pc, pd)));
        if (__builtin_expect((hits & mine) != 0, 0)) {   /* rare once the heaps are full */
            uint32_t rows[4] = {(uint32_t)_mm_movemask_epi8(pa) & mine, (uint32_t)_mm_movemask_epi8(pb) & mine,
                                (uint32_t)_mm_movemask_epi8(pc) & mine, (uint32_t)_mm_movemask_epi8(pd) & mine};
            int live = n - first < 4 ? (int)(n - first) : 4;   /* rows past n: a last block's zero padding */
            for (int j = 0; j < live; j++)
                for (uint32_t bits = rows[j]; bits; bits &= bits - 1) {
                    int q = __builtin_ctz(bits);
                    const uint8_t *row = blocked ? col0 + j : col0 + (size_t)j * width;
                    float s = exact_score(qs[q].pair, row, blocked ? 32 : 1, width);
                    offer_scored(&qs[q], s, first + j, skip, has_skip, row_offset);
                    thr[q] = qparq_threshold(&qs[q]);
                }
            t = _mm_loadu_si128((const __m128i *)thr);
        }
    }
    if (!blocked)   /* the last n % 4 rows of row-major codes, one query at a time */
        qpar_tail(qs, used, codes, stop, n, width, skip, has_skip, row_offset);
}

/* Quantize the byte tables of queries qs[0, used) into tq [width][256][16] (unused lanes 0) and set their base,
 * delta and terms; 0 when a table is not finite (no bound then: the float side-by-side pass takes the group). */
static int qparq_tables(query_t *qs, int used, int width, uint8_t *tq, uint8_t *one) {
    for (int q = 0; q < used; q++)
        for (int i = 0; i < width * 256; i++)
            if (!isfinite(qs[q].pair[i])) return 0;
    memset(tq, 0, (size_t)width * 256 * QPARQ_LANES);
    for (int q = 0; q < used; q++) {
        quantize_query(qs[q].pair, width, 256, one, 256, 1, width, width, 255 / width, &qs[q].base, &qs[q].delta,
                       &qs[q].terms);
        for (int i = 0; i < width * 256; i++) tq[(size_t)i * QPARQ_LANES + q] = one[i];
    }
    return 1;
}

/*
 * Scan every query of `qs` side by side in groups of 16, on quantized tables where it can (else on float tables, a
 * last group of 8 or fewer in 8 lanes); SCAN_NO_MEMORY when the transposed tables cannot be had. Arguments as
 * pq8_scan's; `blocked` as qpar_rows'.
 */
static inline __attribute__((always_inline)) AVX2 int qpar_scan(
        query_t *qs, int nq, const uint8_t *codes, int64_t n, int width, const int blocked, const uint8_t *skip,
        int has_skip, int64_t row_offset) {
    /* Entries of 16 lanes are 16 bytes quantized, 64 bytes float: on cache-line boundaries either way. */
    uint8_t *tq = width <= QPARQ_MAX_WIDTH ? aligned_alloc(64, (size_t)width * 256 * QPARQ_LANES) : NULL;
    uint8_t *one = tq ? malloc((size_t)width * 256) : NULL;   /* one query's quantized tables, then transposed */
    float *tt = NULL;   /* made for the first group the quantized pass cannot take */
    int rc = SCAN_OK, quantized = 0;
    for (int q0 = 0; q0 < nq && rc == SCAN_OK;) {
        int used = nq - q0 < QPARQ_LANES ? nq - q0 : QPARQ_LANES;
        if (tq && one && qparq_tables(qs + q0, used, width, tq, one)) {
            if (width == 8)   /* the product's code: its column loop unrolled, its table offsets constants */
                qparq_rows(qs + q0, used, tq, codes, n, 8, blocked, skip, has_skip, row_offset);
            else
                qparq_rows(qs + q0, used, tq, codes, n, width, blocked, skip, has_skip, row_offset);
            q0 += used, quantized += used;
            continue;
        }
        if (!tt && !(tt = aligned_alloc(64, (size_t)width * 256 * QPAR_MAX_LANES * sizeof(float)))) {
            rc = SCAN_NO_MEMORY;
            break;
        }
        int lanes = nq - q0 > 8 ? 16 : 8;
        used = nq - q0 < lanes ? nq - q0 : lanes;
        for (int c = 0; c < width; c++)
            for (int v = 0; v < 256; v++) {
                float *entry = tt + ((size_t)c * 256 + v) * lanes;
                for (int q = 0; q < lanes; q++) entry[q] = q < used ? qs[q0 + q].pair[(size_t)c * 256 + v] : 0.0f;
            }
        if (lanes == 16)
            qpar_rows(qs + q0, used, tt, codes, n, width, 16, blocked, skip, has_skip, row_offset);
        else
            qpar_rows(qs + q0, used, tt, codes, n, width, 8, blocked, skip, has_skip, row_offset);
        q0 += used;
    }
    free(tt);
    free(tq);
    free(one);
    if (rc != SCAN_OK) return rc;
    __atomic_fetch_add(&qparq_queries, (uint64_t)quantized, __ATOMIC_RELAXED);
    __atomic_fetch_add(&qpar_queries, (uint64_t)nq, __ATOMIC_RELAXED);
    return SCAN_OK;
}

/*
 * Dense mode of the 8-bit block kernel. The nibble bound prunes only where a codebook is numbered so that a
 * byte's two nibbles say much about its table entry (facepq_core/nibble_order.py) and a query's top scores
 * stand out. Where they do not (heads whose codewords have no nibble structure, e.g. nearly orthogonal ones
 * of a short OPQN training), most rows pass, and bounding then re-scoring each one costs 1.5-2x the float
 * loop (8.9 vs 4.4-6.3 ms per 1M rows, 60% passing). So a query watches its bound over windows of
 * DENSE_WINDOW blocks (once its heap is full): when more than DENSE_ROWS_PER_BLOCK of 32 rows a block passed,
 * it scores the next DENSE_BLOCKS blocks' every row exactly instead, then bounds a window again (the k-th
 * best may have risen enough meanwhile). Dense scoring reads one 8-byte word a byte column for 8 rows and
 * keeps 8 independent sums, each in byte order from 0.0f like exact_score (so bit-identical); only rows
 * reaching the current k-th best go to the heap. Gathers (vpgatherdd, 8 rows a column) measured slower here.
 * Break-even, from those figures, is near 30% passing; 25% is the switch.
 */
#define DENSE_WINDOW 64
#define DENSE_ROWS_PER_BLOCK 8
#define DENSE_BLOCKS 512

static uint64_t dense_blocks_scored;   /* since the module loaded, every thread's (q8_dense_blocks) */

uint64_t q8_dense_blocks(void) { return __atomic_load_n(&dense_blocks_scored, __ATOMIC_RELAXED); }

static inline AVX2 void dense_block8(query_t *q, const uint8_t *block, int width, uint32_t live, int64_t start,
                                     const uint8_t *skip, int has_skip, int64_t row_offset) {
    float s[32];
    for (int g = 0; g < 4; g++) {   /* 8 rows at a time: one 8-byte load a column, 8 independent sums */
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f, s6 = 0.0f, s7 = 0.0f;
        for (int c = 0; c < width; c++) {
            const float *t = q->pair + (size_t)c * 256;
            uint64_t w = load64(block + (size_t)c * 32 + 8 * g);
            s0 += t[w & 255];
            s1 += t[(w >> 8) & 255];
            s2 += t[(w >> 16) & 255];
            s3 += t[(w >> 24) & 255];
            s4 += t[(w >> 32) & 255];
            s5 += t[(w >> 40) & 255];
            s6 += t[(w >> 48) & 255];
            s7 += t[w >> 56];
        }
        s[8 * g] = s0, s[8 * g + 1] = s1, s[8 * g + 2] = s2, s[8 * g + 3] = s3;
        s[8 * g + 4] = s4, s[8 * g + 5] = s5, s[8 * g + 6] = s6, s[8 * g + 7] = s7;
    }
    __m256 acc[4];
    for (int g = 0; g < 4; g++) acc[g] = _mm256_loadu_ps(s + 8 * g);
    __m256 kth = _mm256_set1_ps(q->hs[0]);
    uint32_t rows = 0;
    for (int g = 0; g < 4; g++)
        rows |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(acc[g], kth, _CMP_GE_OQ)) << (8 * g);
    rows &= live;
    while (rows) {   /* the k-th best only rises: offer_exact checks each row against the current one */
        int r = __builtin_ctz(rows);
        offer_exact(q, s[r], start + r, skip, has_skip, row_offset);
        rows &= rows - 1;
    }
}

/*
 * `stream`: the caller's codes come from memory, not from the last-level cache (a query's scan covers more code
 * bytes than that cache holds: query_node.fastscan.streams). A single query then scans 4-bit blocks as fast as
 * one core reads memory, so the loop prefetches the block PREFETCH_BLOCKS ahead, one cache line per column pair:
 * 10M 8-byte 4-bit codes 5.0 -> 4.0 ms per query on an AVX2-only EPYC. On codes the cache holds the same
 * prefetches cost time (1M: 0.41 -> 0.44 ms), and with many queries per call the lookups, not memory, bound the
 * loop (16 queries, 10M: 2.9 -> 3.1 ms per query), hence the caller's choice. Every other line only: 9 ms.
 */
#define PREFETCH_BLOCKS 16

static uint64_t streamed_scans;   /* block kernel calls told to stream since the module loaded, every thread's */

uint64_t streamed_calls(void) { return __atomic_load_n(&streamed_scans, __ATOMIC_RELAXED); }

/*
 * 4-bit codes in 32-row blocks (query_node/code_blocks.py): block j holds rows [32j, 32j + 32) as `width`
 * byte columns of 32 bytes, byte v of column c being byte c of row 32j + v. The columns load as they are,
 * where fs4_scan_avx2 transposes every block of row-major codes in registers first (~40 of its ~130
 * vector operations per block, most on the shuffle port that the lookups need too): 0.41 -> 0.26 ms per
 * 1M 8-byte codes in a C harness on this machine. Candidates are re-scored from the block itself.
 * Arguments: fastscan_kernels.h; `codes` is the blocks, ceil(n / 32) * 32 * width bytes. This loop serves
 * both block kernels: per_column table bytes a byte column, `bound8` picks the column values.
 */
static inline __attribute__((always_inline)) AVX2 int scan_blocks(
        const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair, const uint8_t *nib,
        const double *base, const double *delta, const int32_t *terms, const uint8_t *skip, int32_t has_skip,
        int64_t row_offset, float *heap_s, int64_t *heap_r, int32_t k, int32_t stream, size_t per_column,
        int bound8) {
    int width8 = (width + 7) / 8 * 8;
    if (width < 1 || width8 > MAX_WIDTH8 || nq < 1 || k < 1) return SCAN_BAD_ARGS;
    query_t *qs = make_queries(nq, width, pair, nib, (size_t)width8 * per_column, base, delta, terms, heap_s,
                               heap_r, k);
    if (!qs) return SCAN_NO_MEMORY;
    int64_t dense = 0;   /* blocks scored densely, all queries: added to dense_blocks_scored once, at the end */
    for (int64_t start = 0; start < n; start += 32) {
        const uint8_t *block = codes + (size_t)start * width;
        /* rows in this block: the last one's rows past n are zero padding, never offered */
        uint32_t live = n - start >= 32 ? 0xFFFFFFFFu : (uint32_t)((1ull << (n - start)) - 1);
        for (int q = 0; q < nq; q++) {
            query_t *qq = &qs[q];
            if (bound8 && qq->dense_left > 0) {
                qq->dense_left--;
                dense++;
                dense_block8(qq, block, width, live, start, skip, has_skip, row_offset);
                continue;
            }
            uint32_t me, mo, rows;
            const char *ahead = stream && q == 0 && start + 32 * PREFETCH_BLOCKS < n
                                    ? (const char *)(block + (size_t)PREFETCH_BLOCKS * 32 * width) : NULL;
            if (!bound8 && width <= 8) {
                if (ahead)
                    for (int l = 0; l < 32 * width; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
                rows = rows32_tree(qq, (const __m256i *)block, width) & live;
            } else {
                candidates32_of(qq, (const __m256i *)block, width, &me, &mo, bound8, ahead);
                /* bit 2e of me / mo: rows 2e / 2e + 1 of the block; bit r of `rows`: row r */
                rows = (me | (mo << 1)) & live;
            }
            if (bound8 && qq->hr[0] != EMPTY_ROW) {   /* (a heap still filling passes every row) */
                qq->passed += __builtin_popcount(rows);
                if (++qq->blocks == DENSE_WINDOW) {
                    qq->dense_left = qq->passed > DENSE_ROWS_PER_BLOCK * DENSE_WINDOW ? DENSE_BLOCKS : 0;
                    qq->blocks = qq->passed = 0;
                }
            }
            while (rows) {
                int r = __builtin_ctz(rows);
                offer_at(qq, block + r, 32, width, start + r, skip, has_skip, row_offset);
                rows &= rows - 1;
            }
        }
    }
    if (dense) __atomic_fetch_add(&dense_blocks_scored, (uint64_t)dense, __ATOMIC_RELAXED);
    if (stream) __atomic_fetch_add(&streamed_scans, 1, __ATOMIC_RELAXED);
    free(qs);
    return SCAN_OK;
}

AVX2 int fs4_scan_blocks_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                              const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                              const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                              int64_t *heap_r, int32_t k, int32_t stream) {
    /* two copies of the loop (scan_blocks is inlined): the one for cached codes has no prefetch test */
    return stream ? scan_blocks(codes, n, width, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset,
                                heap_s, heap_r, k, 1, 64, 0)
                  : scan_blocks(codes, n, width, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset,
                                heap_s, heap_r, k, 0, 64, 0);
}

/*
 * 8-bit codes in 32-row blocks, pruned by the nibble bound (column_bound8) and re-scored exactly from the
 * block with the float byte tables `pair` [width * 256]: results bit-identical to pq8_scan's. Arguments:
 * fastscan_kernels.h, `nib` being the bound tables uint8 [nq, width8, 4, 32].
 */
AVX2 int q8_scan_blocks_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                             const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                             const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                             int64_t *heap_r, int32_t k, int32_t stream) {
    int side = width >= 1 && k >= 1 ? qpar_count(nq, QPAR_BLOCKS_MIN) : 0;
    if (side) {   /* a batch: its queries side by side (qpar_scan), the rest below */
        query_t *qs = float_queries(side, width, pair, heap_s, heap_r, k);
        if (!qs) return SCAN_NO_MEMORY;
        int rc = qpar_scan(qs, side, codes, n, width, 1, skip, has_skip, row_offset);
        free(qs);
        if (rc != SCAN_OK || side == nq) return rc;
        int width8 = (width + 7) / 8 * 8;
        nq -= side, pair += (size_t)side * width * 256, nib += (size_t)side * width8 * 128;
        base += side, delta += side, terms += side, heap_s += (size_t)side * k, heap_r += (size_t)side * k;
    }
    /* two copies of the loop (scan_blocks is inlined): the one for cached codes has no prefetch test */
    return stream ? scan_blocks(codes, n, width, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset,
                                heap_s, heap_r, k, 1, 128, 1)
                  : scan_blocks(codes, n, width, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset,
                                heap_s, heap_r, k, 0, 128, 1);
}

/* ---- 8-bit codes (one sub-code per byte, K <= 256): float tables, fused score + select ---- */

static inline uint64_t row64(const uint8_t *p) { return load64(p); }

#define LOOKUP8(t, c, base) \
    s += t[(base + 0) * 256 + (c & 255)];         \
    s += t[(base + 1) * 256 + ((c >> 8) & 255)];  \
    s += t[(base + 2) * 256 + ((c >> 16) & 255)]; \
    s += t[(base + 3) * 256 + ((c >> 24) & 255)]; \
    s += t[(base + 4) * 256 + ((c >> 32) & 255)]; \
    s += t[(base + 5) * 256 + ((c >> 40) & 255)]; \
    s += t[(base + 6) * 256 + ((c >> 48) & 255)]; \
    s += t[(base + 7) * 256 + (c >> 56)];

/*
 * Why a fused scalar loop: a table lookup per byte is bound by load ports, so AVX2
 * gathers score no faster than scalar loads here (measured: 2.0-2.2 ms per 1M rows
 * either way), while a separate selection pass over the scores cost another ~0.4 ms;
 * the threshold branch is almost never taken once the heap is full.
 * Scores are summed in byte order from 0.0f, exactly like the numba kernel. Scalar C, but
 * compiled for AVX2 (VEX encoding) it measured ~5% faster than for baseline x86-64, and
 * facepq uses the native kernels only where fs4_scan runs, i.e. with AVX2.
 */
NO_TREE_VECTORIZE AVX2 int pq8_scan_avx2(const uint8_t *codes, int64_t n, int32_t width, int32_t nq,
                                         const float *tables, const uint8_t *skip, int32_t has_skip,
                                         int64_t row_offset, float *heap_s, int64_t *heap_r, int32_t k) {
    if (width < 1 || nq < 1 || k < 1) return SCAN_BAD_ARGS;
    query_t *qs = float_queries(nq, width, tables, heap_s, heap_r, k);
    if (!qs) return SCAN_NO_MEMORY;
    int side = qpar_count(nq, QPAR_ROWS_MIN);   /* side by side; the rest in the loop below */
    if (side) {
        int rc = qpar_scan(qs, side, codes, n, width, 0, skip, has_skip, row_offset);
        if (rc != SCAN_OK || side == nq) {
            free(qs);
            return rc;
        }
    }
    const int64_t block = 4096;   /* every query scans a block while it is in cache */
    for (int64_t start = 0; start < n; start += block) {
        int64_t stop = start + block < n ? start + block : n;
        for (int q = side; q < nq; q++) {
            query_t *qq = &qs[q];
            const float *t = qq->pair;
            float thr = qq->hs[0];
            for (int64_t i = start; i < stop; i++) {
                const uint8_t *row = codes + (size_t)i * width;
                float s = 0.0f;
                if (width == 8) {
                    uint64_t c = row64(row);
                    LOOKUP8(t, c, 0)
                } else if (width == 16) {
                    uint64_t c = row64(row);
                    LOOKUP8(t, c, 0)
                    c = row64(row + 8);
                    LOOKUP8(t, c, 8)
                } else {
                    for (int b = 0; b < width; b++) s += t[(size_t)b * 256 + row[b]];
                }
                if (s >= thr) {
                    offer_scored(qq, s, i, skip, has_skip, row_offset);
                    thr = qq->hs[0];
                }
            }
        }
    }
    free(qs);
    return SCAN_OK;
}

/* ---- AVX-512 (F + BW + VBMI): 64 rows per block, 8-bit codes through 7-bit quantized byte tables ---- */

/*
 * Why: a 256-entry table of 7-bit values fits four zmm registers, and two vpermi2b
 * (entries 0..127, 128..255) plus a blend on the index's top bit look up 64 rows'
 * bytes at once, where the float kernel does one load per byte. The quantized sums
 * only bound the exact score (the same bound as the 4-bit kernel: each byte table
 * quantized as q = floor((v - min) / delta) with one delta per query), so rows that
 * can still enter the top-k are re-scored with the float tables, in byte order, into
 * the same heap: results are bit-identical to the float kernels. 4-bit codes take the
 * same path with their nibble tables (vpshufb within each 128-bit lane).
 *
 * Layout: 64 rows are transposed to one zmm per byte column, byte v of a column
 * holding row v of the block (three rounds of vpermt2b, see transpose64x8).
 */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi")))
#define MAX_WIDTH8_512 FS4_MAX_CODE_BYTES

typedef struct {
    __m512i l1[2], l2[2], l3[2];
} transpose_idx_t;

static AVX512 void transpose_indices(transpose_idx_t *t) {
    uint8_t a[6][64];
    for (int i = 0; i < 64; i++) {
        int c = i / 16, s = i % 16, c2 = i / 32, u = i % 32;
        /* round 1: rows s of two 8-row vectors (s >= 8: the second), byte columns c (+4) */
        a[0][i] = (uint8_t)((s >= 8) * 64 + 8 * (s & 7) + c);
        a[1][i] = (uint8_t)((s >= 8) * 64 + 8 * (s & 7) + c + 4);
        /* round 2: rows u of two 16-row vectors, columns c2 (+2) of their four */
        a[2][i] = (uint8_t)((u >= 16) * 64 + 16 * c2 + (u & 15));
        a[3][i] = (uint8_t)((u >= 16) * 64 + 16 * (c2 + 2) + (u & 15));
        /* round 3: rows i of two 32-row vectors, column 0 or 1 of their two */
        a[4][i] = (uint8_t)((i >= 32) * 64 + (i & 31));
        a[5][i] = (uint8_t)((i >= 32) * 64 + 32 + (i & 31));
    }
    for (int j = 0; j < 2; j++) {
        t->l1[j] = _mm512_loadu_si512(a[j]);
        t->l2[j] = _mm512_loadu_si512(a[2 + j]);
        t->l3[j] = _mm512_loadu_si512(a[4 + j]);
    }
}

/* z[t]: rows 8t..8t+7 of the block, 8 bytes each (one byte group) -> out[c]: byte c of rows 0..63. */
static inline AVX512 void transpose64x8(const __m512i *z, const transpose_idx_t *t, __m512i *out) {
    __m512i a[8], b[8];
    for (int p = 0; p < 4; p++) {   /* a[2p + h]: rows 16p.., columns 4h..4h+3 */
        a[2 * p] = _mm512_permutex2var_epi8(z[2 * p], t->l1[0], z[2 * p + 1]);
        a[2 * p + 1] = _mm512_permutex2var_epi8(z[2 * p], t->l1[1], z[2 * p + 1]);
    }
    for (int q = 0; q < 2; q++)     /* b[4q + 2h + j]: rows 32q.., columns 4h + 2j, +1 */
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 2; j++)
                b[4 * q + 2 * h + j] = _mm512_permutex2var_epi8(a[4 * q + h], t->l2[j], a[4 * q + 2 + h]);
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 2; j++)
            for (int c = 0; c < 2; c++)
                out[4 * h + 2 * j + c] = _mm512_permutex2var_epi8(b[2 * h + j], t->l3[c], b[4 + 2 * h + j]);
}

/* Byte columns of rows [0, 64) at src (row stride `width`, a multiple of 8) into cols[0..width). */
static inline AVX512 void load_columns64(const uint8_t *src, int width, const transpose_idx_t *t, __m512i *cols) {
    int groups = width / 8;
    __m512i z[8];
    if (groups == 1) {
        for (int i = 0; i < 8; i++) z[i] = _mm512_loadu_si512(src + 64 * i);
        transpose64x8(z, t, cols);
        return;
    }
    if (groups == 2) {
        const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
        const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
        __m512i w[16];
        for (int i = 0; i < 16; i++) w[i] = _mm512_loadu_si512(src + 64 * i);
        for (int i = 0; i < 8; i++) z[i] = _mm512_permutex2var_epi64(w[2 * i], even, w[2 * i + 1]);
        transpose64x8(z, t, cols);
        for (int i = 0; i < 8; i++) z[i] = _mm512_permutex2var_epi64(w[2 * i], odd, w[2 * i + 1]);
        transpose64x8(z, t, cols + 8);
        return;
    }
    const __m512i rows8 = _mm512_setr_epi64(0, width, 2 * width, 3 * width, 4 * width, 5 * width,
                                            6 * width, 7 * width);
    for (int g = 0; g < groups; g++) {
        for (int i = 0; i < 8; i++)
            z[i] = _mm512_i64gather_epi64(rows8, (const void *)(src + (size_t)(8 * i) * width + 8 * g), 1);
        transpose64x8(z, t, cols + 8 * g);
    }
}

/* 7-bit lookups of column c: 8-bit codes (tables [width8][256]) or nibbles (tables [width8][2][32]). */
static inline AVX512 __m512i lookup8(const uint8_t *qt, int c, __m512i v) {
    const uint8_t *t = qt + (size_t)c * 256;
    __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(t), v, _mm512_loadu_si512(t + 64));
    __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), v, _mm512_loadu_si512(t + 192));
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi);
}

static inline AVX512 __m512i lookup4(const uint8_t *nib, int c, __m512i v) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i tlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(nib + (size_t)c * 64)));
    __m512i thi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(nib + (size_t)c * 64 + 32)));
    __m512i lo = _mm512_and_si512(v, low4);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    return _mm512_add_epi8(_mm512_shuffle_epi8(tlo, lo), _mm512_shuffle_epi8(thi, hi));
}

/*
 * The shared block loop. `eight`: 8-bit codes (two columns' 7-bit lookups summed per
 * byte, <= 254), else 4-bit (one column's two nibble lookups, <= 254). Sums of bytes
 * are kept as 16-bit sums of the even and odd rows, as in the AVX2 kernel.
 */
static inline __attribute__((always_inline)) AVX512 int scan64(
    int eight, const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
    const uint8_t *qtab, const double *base, const double *delta, const int32_t *terms, const uint8_t *skip,
    int32_t has_skip, int64_t row_offset, float *heap_s, int64_t *heap_r, int32_t k) {
    int width8 = (width + 7) / 8 * 8;
    size_t qstride = (size_t)width8 * (eight ? 256 : 64);
    if (width < 1 || width8 > MAX_WIDTH8_512 || nq < 1 || k < 1) return SCAN_BAD_ARGS;
    query_t *qs = make_queries(nq, width, pair, qtab, qstride, base, delta, terms, heap_s, heap_r, k);
    uint8_t *padded = width % 8 ? malloc((size_t)64 * width8) : NULL;
    if (!qs || (width % 8 && !padded)) {
        free(qs);
        free(padded);
        return SCAN_NO_MEMORY;
    }
    transpose_idx_t tidx;
    transpose_indices(&tidx);
    __m512i cols[MAX_WIDTH8_512];
    /* Rows narrower than 8 bytes (4- and 6-byte codes: 32 and 48 bits): one vpermb per 8 rows spreads them
     * to 8-byte groups straight from the codes. Byte b >= width of a row is then a byte of the next row;
     * the tables of those columns are all 0, so it adds nothing. (Copying the rows to a padded buffer
     * first cost 2.5x the 8-byte scan: its small stores stall the wide loads that read them back.) */
    uint8_t spread_bytes[64];
    for (int j = 0; j < 64; j++) spread_bytes[j] = (uint8_t)((j / 8) * width + j % 8);
    const __m512i spread = _mm512_loadu_si512(spread_bytes);
    int64_t full = n / 64 * 64;
    for (int64_t start = 0; start < full; start += 64) {
        const uint8_t *src = codes + (size_t)start * width;
        if (width < 8 && start + 128 <= n) {   /* the last load reads up to 64 bytes past row 56: in the codes */
            __m512i z[8];
            for (int i = 0; i < 8; i++)
                z[i] = _mm512_permutexvar_epi8(spread, _mm512_loadu_si512(src + (size_t)8 * i * width));
            transpose64x8(z, &tidx, cols);
        } else {
            if (padded) {   /* pad rows to whole 8-byte groups; padding bytes are 0, their tables 0 */
                memset(padded, 0, (size_t)64 * width8);
                for (int r = 0; r < 64; r++) memcpy(padded + (size_t)r * width8, src + (size_t)r * width, width);
                src = padded;
            }
            load_columns64(src, width8, &tidx, cols);
        }
        for (int q = 0; q < nq; q++) {
            query_t *qq = &qs[q];
            __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
            for (int c = 0; c < width8; c += eight ? 2 : 1) {
                __m512i r = eight ? _mm512_add_epi8(lookup8(qq->nib, c, cols[c]), lookup8(qq->nib, c + 1, cols[c + 1]))
                                  : lookup4(qq->nib, c, cols[c]);
                acc0 = _mm512_add_epi16(acc0, r);
                acc1 = _mm512_add_epi16(acc1, _mm512_srli_epi16(r, 8));
            }
            __m512i even = _mm512_sub_epi16(acc0, _mm512_slli_epi16(acc1, 8));
            __m512i thr = _mm512_set1_epi16(qq->thr);
            uint32_t me = _mm512_cmpgt_epi16_mask(even, thr), mo = _mm512_cmpgt_epi16_mask(acc1, thr);
            while (me | mo) {   /* 16-bit element e: rows 2e (even) and 2e+1 (odd), in row order */
                int e = __builtin_ctz(me | mo);
                if (me & (1u << e)) offer(qq, codes, width, start + 2 * e, skip, has_skip, row_offset);
                if (mo & (1u << e)) offer(qq, codes, width, start + 2 * e + 1, skip, has_skip, row_offset);
                me &= ~(1u << e);
                mo &= ~(1u << e);
            }
        }
    }
    for (int64_t i = full; i < n; i++)
        for (int q = 0; q < nq; q++) offer(&qs[q], codes, width, i, skip, has_skip, row_offset);
    free(qs);
    free(padded);
    return SCAN_OK;
}

/*
 * 4-bit codes of 8 bytes (16 sub-codes), without a transpose: a zmm holds 8 whole rows,
 * byte j being column j % 8 of row j / 8. The 16-entry nibble tables of all 8 columns
 * make one 128-entry table, so one vpermi2b per nibble looks up 64 bytes at
 * index (j % 8) * 16 + nibble, and vpsadbw sums each row's 8 bytes (<= 8 * 254) into
 * its 64-bit lane: ~7 vector operations per 8 rows instead of ~13 with the transpose.
 */
static AVX512 int fs4_scan_w8_avx512(const uint8_t *codes, int64_t n, int32_t nq, const float *pair,
                                     const uint8_t *nib, const double *base, const double *delta,
                                     const int32_t *terms, const uint8_t *skip, int32_t has_skip, int64_t row_offset,
                                     float *heap_s, int64_t *heap_r, int32_t k) {
    query_t *qs = make_queries(nq, 8, pair, nib, 8 * 64, base, delta, terms, heap_s, heap_r, k);
    uint8_t (*tab)[2][128] = malloc(sizeof(*tab) * (size_t)nq);
    if (!qs || !tab) {
        free(qs);
        free(tab);
        return SCAN_NO_MEMORY;
    }
    for (int q = 0; q < nq; q++) {
        for (int c = 0; c < 8; c++)
            for (int h = 0; h < 2; h++) memcpy(tab[q][h] + 16 * c, qs[q].nib + (size_t)c * 64 + 32 * h, 16);
    }
    uint8_t colbase_bytes[64];
    for (int j = 0; j < 64; j++) colbase_bytes[j] = (uint8_t)(16 * (j % 8));
    const __m512i colbase = _mm512_loadu_si512(colbase_bytes);
    const __m512i zero = _mm512_setzero_si512();
    int64_t full = n / 64 * 64;
    for (int64_t start = 0; start < full; start += 64) {
        const uint8_t *block = codes + (size_t)start * 8;
        __m512i lo[8], hi[8];
        for (int t = 0; t < 8; t++) {
            __m512i v = _mm512_loadu_si512(block + 64 * t);
            /* (v & 0x0F) | colbase, ((v >> 4) & 0x0F) | colbase: ternary logic 0xEA = (A & B) | C */
            lo[t] = _mm512_ternarylogic_epi32(v, _mm512_set1_epi8(0x0F), colbase, 0xEA);
            hi[t] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F), colbase, 0xEA);
        }
        for (int q = 0; q < nq; q++) {
            query_t *qq = &qs[q];
            const __m512i tl0 = _mm512_loadu_si512(tab[q][0]), tl1 = _mm512_loadu_si512(tab[q][0] + 64);
            const __m512i th0 = _mm512_loadu_si512(tab[q][1]), th1 = _mm512_loadu_si512(tab[q][1] + 64);
            const __m512i thr = _mm512_set1_epi64(qq->thr);
            /* The 8 groups' masks first, one branch per 64 rows: nearly every block has no candidate, and
             * 8 independent lookup chains keep the vector units busy. A mask computed before an offer
             * raised the threshold only lets more rows through; offer() checks each one exactly. */
            uint64_t mask = 0;
            for (int t = 0; t < 8; t++) {
                __m512i r = _mm512_add_epi8(_mm512_permutex2var_epi8(tl0, lo[t], tl1),
                                            _mm512_permutex2var_epi8(th0, hi[t], th1));
                mask |= (uint64_t)_mm512_cmpgt_epi64_mask(_mm512_sad_epu8(r, zero), thr) << (8 * t);
            }
            while (mask) {   /* bit 8t + i: row 8t + i */
                int i = __builtin_ctzll(mask);
                offer(qq, codes, 8, start + i, skip, has_skip, row_offset);
                mask &= mask - 1;
            }
        }
    }
    for (int64_t i = full; i < n; i++)
        for (int q = 0; q < nq; q++) offer(&qs[q], codes, 8, i, skip, has_skip, row_offset);
    free(qs);
    free(tab);
    return SCAN_OK;
}

/* Arguments: fastscan_kernels.h (fs4_scan_fn). */
AVX512 int fs4_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *pair,
                           const uint8_t *nib, const double *base, const double *delta, const int32_t *terms,
                           const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                           int64_t *heap_r, int32_t k) {
    if (width == 8 && nq >= 1 && k >= 1)
        return fs4_scan_w8_avx512(codes, n, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset, heap_s,
                                  heap_r, k);
    return scan64(0, codes, n, width, nq, pair, nib, base, delta, terms, skip, has_skip, row_offset, heap_s,
                  heap_r, k);
}

/* Arguments: fastscan_kernels.h (q8_scan_fn). */
AVX512 int q8_scan_avx512(const uint8_t *codes, int64_t n, int32_t width, int32_t nq, const float *tables,
                          const uint8_t *qt, const double *base, const double *delta, const int32_t *terms,
                          const uint8_t *skip, int32_t has_skip, int64_t row_offset, float *heap_s,
                          int64_t *heap_r, int32_t k) {
    return scan64(1, codes, n, width, nq, tables, qt, base, delta, terms, skip, has_skip, row_offset, heap_s,
                  heap_r, k);
}

#endif /* FASTSCAN_X86 */
