/*
 * query_node._fastscan: the extension module behind query_node/fastscan.py, which calls the
 * native scan kernels (fastscan_kernels.c). Built by `pip install .` (setup.py).
 *
 * Arguments arrive through the buffer protocol: y* for what a kernel reads (so read-only,
 * memory-mapped numpy arrays are scanned in place), w* for the heaps it updates; numpy
 * refuses the buffer of a non-contiguous array. fastscan.py checks dtypes; here each
 * buffer's size is checked against the others, so a wrong argument raises ValueError
 * instead of reading past a buffer. The GIL is released while a kernel runs.
 *
 * Dispatch: each kernel lists its variants best first (an AVX-512 variant would go above
 * the AVX2 one), and the first this CPU runs is picked at import. `kernels` maps each
 * kernel to its picked variant's instruction set, or None when no variant runs here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastscan_kernels.h"
#include "popcount_kernels.h"

/* Calls are split over threads only where kernels exist (gcc/clang on x86-64) and pthreads with them. */
#if FASTSCAN_X86 && !defined(_WIN32)
#define SPLIT_THREADS 1
#include <pthread.h>
#else
#define SPLIT_THREADS 0
#endif

static PyObject *self_module;   /* borrowed: use() updates its `kernels` */

static fs4_scan_fn fs4_impl;
static block_scan_fn fs4_blocks_impl, q8_blocks_impl;
static pq8_scan_fn pq8_impl;
static q8_scan_fn q8_impl;
static hamming_scan_fn hamming_impl;
static const char *fs4_isa, *fs4_blocks_isa, *q8_blocks_isa, *pq8_isa, *q8_isa, *hamming_isa;

/* Instruction sets, best first; FACEPQ_SIMD=<isa> (or _fastscan.use) caps the pick at one of them. */
static const char *const ISAS[] = {"avx512", "avx2"};
#define N_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

/* The position of `isa` in ISAS (N_ISAS when unknown). */
static int isa_rank(const char *isa) {
    for (int i = 0; i < N_ISAS; i++)   /* a variant named for an extension ranks as its set: avx512_vpopcntdq */
        if (!strncmp(ISAS[i], isa, strlen(ISAS[i])) && (!isa[strlen(ISAS[i])] || isa[strlen(ISAS[i])] == '_'))
            return i;
    return N_ISAS;
}

#if FASTSCAN_X86
static int cpu_has_avx2(void) { return __builtin_cpu_supports("avx2"); }
static int cpu_has_avx512(void) {   /* what the AVX-512 variants' target attributes name */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi");
}

/* A variant of a quantized-table kernel (fs4_scan and q8_scan share the signature). */
typedef struct {
    const char *isa;
    int (*runs_here)(void);
    fs4_scan_fn fn;
} quantized_variant_t;

static const quantized_variant_t FS4_VARIANTS[] = {
    {"avx512", cpu_has_avx512, fs4_scan_avx512},
    {"avx2", cpu_has_avx2, fs4_scan_avx2},
};

/* A variant of a kernel on 32-row blocks. */
typedef struct {
    const char *isa;
    int (*runs_here)(void);
    block_scan_fn fn;
} block_variant_t;

/* 4-bit codes in 32-row blocks (query_node.code_blocks): a node keeps them where fs4_scan runs AVX2. */
static const block_variant_t FS4_BLOCK_VARIANTS[] = {
    {"avx2", cpu_has_avx2, fs4_scan_blocks_avx2},
};

/* 8-bit codes in 32-row blocks, pruned by their nibble bounds: where no AVX-512 q8_scan runs. */
static const block_variant_t Q8_BLOCK_VARIANTS[] = {
    {"avx2", cpu_has_avx2, q8_scan_blocks_avx2},
};

static const struct {
    const char *isa;
    int (*runs_here)(void);
    pq8_scan_fn fn;
} PQ8_VARIANTS[] = {
    {"avx2", cpu_has_avx2, pq8_scan_avx2},
};

static int cpu_has_avx512_vpopcntdq(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
}

static const struct {
    const char *isa;
    int (*runs_here)(void);
    hamming_scan_fn fn;
} HAMMING_VARIANTS[] = {
    {"avx512_vpopcntdq", cpu_has_avx512_vpopcntdq, hamming_scan_avx512},
    {"avx2", cpu_has_avx2, hamming_scan_avx2},
};

static const quantized_variant_t Q8_VARIANTS[] = {
    {"avx512", cpu_has_avx512, q8_scan_avx512},
};

/* Set impl_out and isa_out to the first of `variants` at or below rank `cap` that runs on this CPU. */
#define PICK(variants, impl_out, isa_out, cap)                                                    \
    impl_out = NULL;                                                                              \
    isa_out = NULL;                                                                               \
    for (size_t i_ = 0; i_ < sizeof(variants) / sizeof(variants[0]); i_++) {                       \
        if (isa_rank(variants[i_].isa) >= (cap) && variants[i_].runs_here()) {                     \
            impl_out = variants[i_].fn;                                                           \
            isa_out = variants[i_].isa;                                                           \
            break;                                                                                \
        }                                                                                         \
    }
#endif

/* Pick every kernel's best variant of rank >= cap (0: the best this CPU runs). */
static void pick_kernels(int cap) {
#if FASTSCAN_X86
    __builtin_cpu_init();
    PICK(FS4_VARIANTS, fs4_impl, fs4_isa, cap)
    PICK(FS4_BLOCK_VARIANTS, fs4_blocks_impl, fs4_blocks_isa, cap)
    PICK(Q8_BLOCK_VARIANTS, q8_blocks_impl, q8_blocks_isa, cap)
    PICK(PQ8_VARIANTS, pq8_impl, pq8_isa, cap)
    PICK(Q8_VARIANTS, q8_impl, q8_isa, cap)
    PICK(HAMMING_VARIANTS, hamming_impl, hamming_isa, cap)
#else
    (void)cap;
#endif
}

/* Raise ValueError unless buffer `what` holds exactly `want` bytes. */
static int check_size(const char *kernel, const char *what, const Py_buffer *buf, long long want) {
    if ((long long)buf->len == want) return 0;
    PyErr_Format(PyExc_ValueError, "%s: %s holds %zd bytes, expected %lld", kernel, what, buf->len, want);
    return -1;
}

/*
 * Shapes shared by every kernel, from the codes and heap buffers: n rows of `width` bytes,
 * nq heaps of k entries. Checks the heaps, the byte tables and the tombstones against them.
 * `rows` >= 0: the codes are 32-row blocks (query_node.code_blocks) of that many rows, padded to
 * whole blocks; -1: row-major codes, n = their bytes / width.
 */
static int check_shapes(const char *kernel, const Py_buffer *codes, long long rows, int width,
                        const Py_buffer *tables, const Py_buffer *skip, int has_skip, const Py_buffer *heap_s,
                        const Py_buffer *heap_r, int k, long long *n, int *nq) {
    if (width < 1 || k < 1) {
        PyErr_Format(PyExc_ValueError, "%s: width and k must be >= 1, got %d and %d", kernel, width, k);
        return -1;
    }
    if (codes->len % width) {
        PyErr_Format(PyExc_ValueError, "%s: codes hold %zd bytes, not whole rows of %d bytes", kernel,
                     codes->len, width);
        return -1;
    }
    if (rows >= 0 && (rows + 31) / 32 * 32 * width != (long long)codes->len) {
        PyErr_Format(PyExc_ValueError, "%s: code blocks hold %zd bytes, expected %lld for %lld rows of %d bytes",
                     kernel, codes->len, (rows + 31) / 32 * 32 * width, rows, width);
        return -1;
    }
    long long heap_bytes = (long long)k * (long long)sizeof(float);
    if (heap_s->len == 0 || heap_s->len % heap_bytes || heap_s->len / heap_bytes > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: heap scores hold %zd bytes, not whole float32 heaps of k=%d",
                     kernel, heap_s->len, k);
        return -1;
    }
    *n = rows >= 0 ? rows : codes->len / width;
    *nq = (int)(heap_s->len / heap_bytes);
    if (check_size(kernel, "heap rows (int64 [nq, k])", heap_r, (long long)*nq * k * 8) ||
        check_size(kernel, "byte tables (float32 [nq, width * 256])", tables, (long long)*nq * width * 256 * 4))
        return -1;
    if (has_skip && check_size(kernel, "skip mask (bool [n])", skip, *n)) return -1;
    return 0;
}

/* Map a kernel's return code to an exception; 0 when it succeeded. */
static int check_rc(const char *kernel, int rc) {
    if (rc == SCAN_OK) return 0;
    if (rc == SCAN_NO_MEMORY)
        PyErr_NoMemory();
    else
        PyErr_Format(PyExc_ValueError, "%s rejected its arguments (code %d)", kernel, rc);
    return -1;
}

static PyObject *no_variant(const char *kernel) {
    PyErr_Format(PyExc_RuntimeError, "%s: no variant of this kernel runs here (see _fastscan.kernels)", kernel);
    return NULL;
}

/*
 * Splitting one call across native threads: rows [0, n) are cut into `threads` runs of
 * whole 64-row blocks; run 0 scans into the caller's heaps, every other run into heaps
 * of its own (empty), merged into the caller's afterwards. The heap order is total
 * (score desc, row asc), so the merged top-k is exactly the one thread's top-k.
 * Threads are started per call (tens of microseconds) and only for runs of at least
 * MIN_SPLIT_ROWS rows, so small segments never pay for them.
 */
#define MIN_SPLIT_ROWS (1 << 16)
#define MAX_THREADS 256

typedef struct {
    fs4_scan_fn qfn;     /* quantized kernels on row-major codes (fs4, q8) ... */
    block_scan_fn bfn;   /* ... or on 32-row blocks ... */
    pq8_scan_fn ffn;     /* ... or the float one */
    const uint8_t *codes;
    int64_t n, row_offset;
    int width, nq, has_skip, k, stream, rc;
    const float *tables;
    const uint8_t *qt, *skip;
    const double *base, *delta;
    const int32_t *terms;
    float *hs;
    int64_t *hr;
} job_t;

static void *run_job(void *arg) {
    job_t *j = arg;
    if (j->qfn)
        j->rc = j->qfn(j->codes, j->n, j->width, j->nq, j->tables, j->qt, j->base, j->delta, j->terms, j->skip,
                       j->has_skip, j->row_offset, j->hs, j->hr, j->k);
    else if (j->bfn)
        j->rc = j->bfn(j->codes, j->n, j->width, j->nq, j->tables, j->qt, j->base, j->delta, j->terms, j->skip,
                       j->has_skip, j->row_offset, j->hs, j->hr, j->k, j->stream);
    else
        j->rc = j->ffn(j->codes, j->n, j->width, j->nq, j->tables, j->skip, j->has_skip, j->row_offset, j->hs,
                       j->hr, j->k);
    return NULL;
}

/* Run job `whole` on up to `threads` threads (GIL released by the caller). */
static int run_split(const job_t *whole, int threads) {
    if (!SPLIT_THREADS) threads = 1;
    int64_t most = whole->n / MIN_SPLIT_ROWS;
    if (threads > most) threads = (int)most;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        job_t j = *whole;
        run_job(&j);
        return j.rc;
    }
#if SPLIT_THREADS
    int64_t chunk = (whole->n + threads - 1) / threads;
    chunk = (chunk + 63) / 64 * 64;
    size_t heap_len = (size_t)whole->nq * whole->k;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    float *hs = malloc(sizeof(float) * heap_len * (threads - 1));
    int64_t *hr = malloc(sizeof(int64_t) * heap_len * (threads - 1));
    if (!hs || !hr) {
        free(hs);
        free(hr);
        return SCAN_NO_MEMORY;
    }
    int used = 0;
    for (int t = 0; t < threads && (int64_t)t * chunk < whole->n; t++, used++) {
        job_t *j = &jobs[t];
        int64_t first = (int64_t)t * chunk;
        *j = *whole;
        j->codes = whole->codes + (size_t)first * whole->width;
        j->n = whole->n - first < chunk ? whole->n - first : chunk;
        j->row_offset = whole->row_offset + first;
        if (whole->has_skip) j->skip = whole->skip + first;
        if (t > 0) {
            j->hs = hs + heap_len * (t - 1);
            j->hr = hr + heap_len * (t - 1);
            for (size_t i = 0; i < heap_len; i++) {
                j->hs[i] = -INFINITY;
                j->hr[i] = INT64_MAX;
            }
            started[t] = pthread_create(&tids[t], NULL, run_job, j) == 0;
            if (!started[t]) run_job(j);   /* no thread to be had: scan it here, same result */
        }
    }
    run_job(&jobs[0]);
    int rc = jobs[0].rc;
    for (int t = 1; t < used; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        if (jobs[t].rc != SCAN_OK) rc = jobs[t].rc;
    }
    for (int t = 1; t < used && rc == SCAN_OK; t++)
        for (int q = 0; q < whole->nq; q++)
            for (int i = 0; i < whole->k; i++) {
                size_t at = (size_t)q * whole->k + i;
                if (jobs[t].hr[at] != INT64_MAX)
                    heap_offer(whole->hs + (size_t)q * whole->k, whole->hr + (size_t)q * whole->k, whole->k,
                               jobs[t].hs[at], jobs[t].hr[at]);
            }
    free(hs);
    free(hr);
    return rc;
#else
    return SCAN_BAD_ARGS;   /* not reached: threads is 1 here */
#endif
}

PyDoc_STRVAR(fs4_scan_doc,
             "fs4_scan(codes, width, byte_tables, nib, base, delta, terms, skip, has_skip, row_offset, heap_s,"
             " heap_r, k, threads=1)\n--\n\n"
             "Scan packed 4-bit codes with quantized nibble tables and re-score candidates exactly;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan_into.");

PyDoc_STRVAR(q8_scan_doc,
             "q8_scan(codes, width, byte_tables, qt, base, delta, terms, skip, has_skip, row_offset, heap_s,"
             " heap_r, k, threads=1)\n--\n\n"
             "Scan 8-bit codes with 7-bit quantized byte tables and re-score candidates exactly;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan_q8_into.");

/*
 * fs4_scan, q8_scan, fs4_scan_blocks and q8_scan_blocks: the same arguments, tables of `per_column` bytes per byte
 * column; `block_impl` (in place of impl): the codes are 32-row blocks, their row count follows them, and an
 * optional `stream` follows `threads`.
 */
static PyObject *quantized_scan(const char *kernel, fs4_scan_fn impl, block_scan_fn block_impl,
                                long long per_column, const char *what, PyObject *args) {
    Py_buffer codes, pair, qt, base, delta, terms, skip, heap_s, heap_r;
    int width, has_skip, k, nq, rc, threads = 1, stream = 0;
    long long rows = -1, row_offset, n, width8;
    PyObject *result = NULL;
    if (!impl && !block_impl) return no_variant(kernel);
    int blocked = block_impl != NULL;
    if (blocked ? !PyArg_ParseTuple(args, "y*Liy*y*y*y*y*y*pLw*w*i|ip", &codes, &rows, &width, &pair, &qt, &base,
                                    &delta, &terms, &skip, &has_skip, &row_offset, &heap_s, &heap_r, &k, &threads,
                                    &stream)
                : !PyArg_ParseTuple(args, "y*iy*y*y*y*y*y*pLw*w*i|i", &codes, &width, &pair, &qt, &base, &delta,
                                    &terms, &skip, &has_skip, &row_offset, &heap_s, &heap_r, &k, &threads))
        return NULL;
    if (blocked && rows < 0) {
        PyErr_Format(PyExc_ValueError, "%s: rows must be >= 0, got %lld", kernel, rows);
        goto done;
    }
    if (check_shapes(kernel, &codes, rows, width, &pair, &skip, has_skip, &heap_s, &heap_r, k, &n, &nq)) goto done;
    if (width > FS4_MAX_CODE_BYTES) {
        PyErr_Format(PyExc_ValueError, "%s: codes of %d bytes, at most %d", kernel, width, FS4_MAX_CODE_BYTES);
        goto done;
    }
    width8 = (width + 7) / 8 * 8;
    if (check_size(kernel, what, &qt, nq * width8 * per_column) ||
        check_size(kernel, "base (float64 [nq])", &base, (long long)nq * 8) ||
        check_size(kernel, "delta (float64 [nq])", &delta, (long long)nq * 8) ||
        check_size(kernel, "terms (int32 [nq])", &terms, (long long)nq * 4))
        goto done;
    job_t job = {.qfn = impl, .bfn = block_impl, .stream = stream, .codes = codes.buf, .n = n,
                 .row_offset = row_offset, .width = width, .nq = nq, .has_skip = has_skip, .k = k,
                 .tables = pair.buf, .qt = qt.buf, .skip = skip.buf, .base = base.buf, .delta = delta.buf,
                 .terms = terms.buf, .hs = heap_s.buf, .hr = heap_r.buf};
    Py_BEGIN_ALLOW_THREADS
    rc = run_split(&job, threads);
    Py_END_ALLOW_THREADS
    if (check_rc(kernel, rc) == 0) result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&pair);
    PyBuffer_Release(&qt);
    PyBuffer_Release(&base);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&terms);
    PyBuffer_Release(&skip);
    PyBuffer_Release(&heap_s);
    PyBuffer_Release(&heap_r);
    return result;
}

static PyObject *fs4_scan(PyObject *self, PyObject *args) {
    (void)self;
    return quantized_scan("fs4_scan", fs4_impl, NULL, 64, "nibble tables (uint8 [nq, width8, 2, 32])", args);
}

PyDoc_STRVAR(fs4_scan_blocks_doc,
             "fs4_scan_blocks(blocks, rows, width, byte_tables, nib, base, delta, terms, skip, has_skip, row_offset,"
             " heap_s, heap_r, k, threads=1, stream=False)\n--\n\n"
             "fs4_scan of 4-bit codes in 32-row blocks (query_node.code_blocks); same results.\n"
             "Arguments: query_node.fastscan.scan_blocks_into.");

static PyObject *fs4_scan_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return quantized_scan("fs4_scan_blocks", NULL, fs4_blocks_impl, 64, "nibble tables (uint8 [nq, width8, 2, 32])",
                          args);
}

PyDoc_STRVAR(q8_scan_blocks_doc,
             "q8_scan_blocks(blocks, rows, width, byte_tables, bound, base, delta, terms, skip, has_skip, row_offset,"
             " heap_s, heap_r, k, threads=1, stream=False)\n--\n\n"
             "Scan 8-bit codes in 32-row blocks, pruned by nibble bound tables, re-scored exactly;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan_blocks_into.");

static PyObject *q8_scan_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return quantized_scan("q8_scan_blocks", NULL, q8_blocks_impl, 128, "bound tables (uint8 [nq, width8, 4, 32])",
                          args);
}

static PyObject *q8_scan(PyObject *self, PyObject *args) {
    (void)self;
    return quantized_scan("q8_scan", q8_impl, NULL, 256, "quantized byte tables (uint8 [nq, width8, 256])", args);
}

PyDoc_STRVAR(pq8_scan_doc,
             "pq8_scan(codes, width, byte_tables, skip, has_skip, row_offset, heap_s, heap_r, k, threads=1)\n--\n\n"
             "Scan codes with float byte tables in one fused score-and-compare loop;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan8_into.");

static PyObject *pq8_scan(PyObject *self, PyObject *args) {
    Py_buffer codes, tables, skip, heap_s, heap_r;
    int width, has_skip, k, nq, rc, threads = 1;
    long long row_offset, n;
    PyObject *result = NULL;
    (void)self;
    if (!pq8_impl) return no_variant("pq8_scan");
    if (!PyArg_ParseTuple(args, "y*iy*y*pLw*w*i|i:pq8_scan", &codes, &width, &tables, &skip, &has_skip,
                          &row_offset, &heap_s, &heap_r, &k, &threads))
        return NULL;
    if (check_shapes("pq8_scan", &codes, -1, width, &tables, &skip, has_skip, &heap_s, &heap_r, k, &n, &nq) == 0) {
        job_t job = {.ffn = pq8_impl, .codes = codes.buf, .n = n, .row_offset = row_offset, .width = width,
                     .nq = nq, .has_skip = has_skip, .k = k, .tables = tables.buf, .skip = skip.buf,
                     .hs = heap_s.buf, .hr = heap_r.buf};
        Py_BEGIN_ALLOW_THREADS
        rc = run_split(&job, threads);
        Py_END_ALLOW_THREADS
        if (check_rc("pq8_scan", rc) == 0) result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&tables);
    PyBuffer_Release(&skip);
    PyBuffer_Release(&heap_s);
    PyBuffer_Release(&heap_r);
    return result;
}

static PyObject *kernels_dict(void);

PyDoc_STRVAR(use_doc,
             "use(isa=None)\n--\n\n"
             "Re-pick every kernel's variant, using none better than `isa` ('avx512', 'avx2'; None: the\n"
             "best this CPU runs, as at import without FACEPQ_SIMD). Returns the new `kernels` dict.\n"
             "For tests and benchmarks: call it while no scan runs.");

static PyObject *use(PyObject *self, PyObject *args) {
    const char *isa = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|z:use", &isa)) return NULL;
    int cap = 0;
    if (isa) {
        cap = isa_rank(isa);
        if (cap == N_ISAS) {
            PyErr_Format(PyExc_ValueError, "use: unknown instruction set %R (known: avx512, avx2)",
                         PyTuple_GET_ITEM(args, 0));
            return NULL;
        }
    }
    pick_kernels(cap);
    PyObject *kernels = kernels_dict();
    if (!kernels || PyObject_SetAttrString(self_module, "kernels", kernels)) {
        Py_XDECREF(kernels);
        return NULL;
    }
    return kernels;
}

PyDoc_STRVAR(hamming_scan_doc,
             "hamming_scan(codes, width, queries, skip, has_skip, row_offset, heap_s, heap_r, k, isa)\n--\n\n"
             "Exact top-k Hamming scan of binary codes (score = -distance); updates the heaps in place.\n"
             "isa: '' for the best variant this CPU runs, or a variant's name (hamming_variants).\n"
             "Arguments: query_node.hamming_scan.scan_into.");

/* check_shapes' checks with query codes uint8 [nq, width] in place of byte tables. */
static int check_hamming(const Py_buffer *codes, int width, const Py_buffer *queries, const Py_buffer *skip,
                         int has_skip, const Py_buffer *heap_s, const Py_buffer *heap_r, int k, long long *n,
                         int *nq) {
    if (width < 1 || k < 1 || codes->len % width) {
        PyErr_Format(PyExc_ValueError, "hamming_scan: codes of %zd bytes are not rows of width %d (k=%d)",
                     codes->len, width, k);
        return -1;
    }
    if (queries->len % width || queries->len / width > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "hamming_scan: queries hold %zd bytes, not rows of %d", queries->len, width);
        return -1;
    }
    *n = codes->len / width;
    *nq = (int)(queries->len / width);
    if (check_size("hamming_scan", "heap scores (float32 [nq, k])", heap_s, (long long)*nq * k * 4) ||
        check_size("hamming_scan", "heap rows (int64 [nq, k])", heap_r, (long long)*nq * k * 8))
        return -1;
    if (has_skip && check_size("hamming_scan", "skip mask (bool [n])", skip, *n)) return -1;
    return 0;
}

/* The variant named `isa` ('' = the one picked at import); NULL with an exception when it does not run here. */
static hamming_scan_fn hamming_variant(const char *isa) {
    if (!*isa) {
        if (!hamming_impl) no_variant("hamming_scan");
        return hamming_impl;
    }
#if FASTSCAN_X86
    for (size_t i = 0; i < sizeof(HAMMING_VARIANTS) / sizeof(HAMMING_VARIANTS[0]); i++)
        if (!strcmp(HAMMING_VARIANTS[i].isa, isa)) {
            if (HAMMING_VARIANTS[i].runs_here()) return HAMMING_VARIANTS[i].fn;
            PyErr_Format(PyExc_RuntimeError, "hamming_scan: this CPU does not run the %s variant", isa);
            return NULL;
        }
#endif
    PyErr_Format(PyExc_ValueError, "hamming_scan: no variant named '%s'", isa);
    return NULL;
}

static PyObject *hamming_scan(PyObject *self, PyObject *args) {
    Py_buffer codes, queries, skip, heap_s, heap_r;
    int width, has_skip, k, nq, rc;
    long long row_offset, n;
    const char *isa;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*y*pLw*w*is:hamming_scan", &codes, &width, &queries, &skip, &has_skip,
                          &row_offset, &heap_s, &heap_r, &k, &isa))
        return NULL;
    hamming_scan_fn fn = hamming_variant(isa);
    if (fn && check_hamming(&codes, width, &queries, &skip, has_skip, &heap_s, &heap_r, k, &n, &nq) == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = fn(codes.buf, n, width, nq, queries.buf, skip.buf, has_skip, row_offset, heap_s.buf, heap_r.buf, k);
        Py_END_ALLOW_THREADS
        if (check_rc("hamming_scan", rc) == 0) result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&queries);
    PyBuffer_Release(&skip);
    PyBuffer_Release(&heap_s);
    PyBuffer_Release(&heap_r);
    return result;
}

PyDoc_STRVAR(bound8_tables_doc,
             "bound8_tables(byte_tables, nq, width, levels, out, base, delta, terms) -> bool\n--\n\n"
             "The nibble bound tables of query_node.fastscan.bound8_tables in one call (its docstring has the\n"
             "formulas). byte_tables: float32 [nq, width * 256]; out: uint8 [nq, width8, 4, 32] (A, B, R, C\n"
             "of each column, both lanes; padding columns 0); base, delta: float64 [nq]; terms: int32 [nq].\n"
             "False (nothing written) when a value is not finite.");

/* ~100 us of numpy calls a query in Python (a tenth of a 1M-row 8-bit scan), a few here. */
static PyObject *bound8_tables(PyObject *self, PyObject *args) {
    Py_buffer tables, out, base, delta, terms;
    int nq, width;
    double levels;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iidw*w*w*w*:bound8_tables", &tables, &nq, &width, &levels, &out, &base, &delta,
                          &terms))
        return NULL;
    int width8 = (width + 7) / 8 * 8;
    if (nq < 0 || width < 1 || width > FS4_MAX_CODE_BYTES || !(levels >= 1.0 && levels <= 127.0)) {
        PyErr_SetString(PyExc_ValueError, "bound8_tables: inconsistent shapes");
    } else if (!check_size("bound8_tables", "byte tables (float32 [nq, width * 256])", &tables,
                           (long long)nq * width * 256 * 4) &&
               !check_size("bound8_tables", "out (uint8 [nq, width8, 4, 32])", &out, (long long)nq * width8 * 128) &&
               !check_size("bound8_tables", "base (float64 [nq])", &base, (long long)nq * 8) &&
               !check_size("bound8_tables", "delta (float64 [nq])", &delta, (long long)nq * 8) &&
               !check_size("bound8_tables", "terms (int32 [nq])", &terms, (long long)nq * 4)) {
        const float *v = tables.buf;
        int finite = 1;
        for (long long i = 0; i < (long long)nq * width * 256 && finite; i++) finite = isfinite(v[i]);
        if (finite) {
            /* per column: A, B, R, C (16 each) and the bases of A and B */
            double cover[FS4_MAX_CODE_BYTES][4][16], lo_a[FS4_MAX_CODE_BYTES], lo_b[FS4_MAX_CODE_BYTES];
            uint8_t *o = out.buf;
            memset(o, 0, (size_t)nq * width8 * 128);
            for (int q = 0; q < nq; q++) {
                double steps = 0.0, amax = 0.0, sum = 0.0;
                for (int c = 0; c < width; c++) {
                    const float *t = v + ((long long)q * width + c) * 256;
                    double (*x)[16] = cover[c];
                    for (int h = 0; h < 16; h++) {
                        double total = 0.0, top = t[16 * h];
                        for (int l = 0; l < 16; l++) {
                            double e = t[16 * h + l];
                            total += e;
                            top = e > top ? e : top;
                            amax = fabs(e) > amax ? fabs(e) : amax;
                        }
                        x[0][h] = total / 16.0;
                        x[2][h] = top;
                    }
                    for (int l = 0; l < 16; l++) {
                        double b = t[l] - x[0][0], top = t[l];
                        for (int h = 1; h < 16; h++) {
                            double e = t[16 * h + l];
                            b = e - x[0][h] > b ? e - x[0][h] : b;
                            top = e > top ? e : top;
                        }
                        x[1][l] = b;
                        x[3][l] = top;
                    }
                    double a0 = x[0][0], a1 = x[0][0], b0 = x[1][0], b1 = x[1][0];
                    for (int i = 1; i < 16; i++) {
                        a0 = x[0][i] < a0 ? x[0][i] : a0;
                        a1 = x[0][i] > a1 ? x[0][i] : a1;
                        b0 = x[1][i] < b0 ? x[1][i] : b0;
                        b1 = x[1][i] > b1 ? x[1][i] : b1;
                    }
                    lo_a[c] = a0;
                    lo_b[c] = b0;
                    steps = a1 - a0 > steps ? a1 - a0 : steps;
                    steps = b1 - b0 > steps ? b1 - b0 : steps;
                    sum += a0 + b0;
                }
                double step = steps > 0.0 ? steps / levels : 1.0;
                uint8_t *oq = o + (long long)q * width8 * 128;
                for (int c = 0; c < width; c++) {
                    double lo[4] = {lo_a[c], lo_b[c], lo_a[c] + lo_b[c], lo_a[c] + lo_b[c]};
                    for (int i = 0; i < 4; i++)
                        for (int e = 0; e < 16; e++) {
                            double level = ceil((cover[c][i][e] - lo[i]) / step);
                            uint8_t u = (uint8_t)(level < 0 ? 0 : level > 255 ? 255 : level);
                            oq[c * 128 + i * 32 + e] = oq[c * 128 + i * 32 + 16 + e] = u;
                        }
                }
                double eps = 4.0 * (width + 2) * width * amax * 0x1p-24;
                double n_terms = ceil(eps / step) + 2;
                ((double *)base.buf)[q] = sum;
                ((double *)delta.buf)[q] = step;
                ((int32_t *)terms.buf)[q] = (int32_t)(n_terms < (double)(1 << 20) ? n_terms : (double)(1 << 20));
            }
        }
        result = PyBool_FromLong(finite);
    }
    PyBuffer_Release(&tables);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&terms);
    return result;
}

PyDoc_STRVAR(quantize_tables_doc,
             "quantize_tables(values, nq, cols, nv, out, out_cols, stride, copies, code_bytes, row_terms, levels,\n"
             "                base, delta, terms) -> bool\n--\n\n"
             "The quantized tables of query_node.fastscan.nibble_tables / byte_quant_tables in one call.\n"
             "values: float32 [nq, cols, nv]; out: uint8 [nq, out_cols, stride] (column c of query q at c,\n"
             "its nv entries `copies` times side by side; the rest 0); base, delta: float64 [nq]; terms:\n"
             "int32 [nq]. Per query: lo_c = min of column c, delta = max_c (max_c - lo_c) / levels (1 when 0),\n"
             "q = clip(floor((v - lo_c) / delta), 0, levels), base = sum_c lo_c, terms = min(row_terms +\n"
             "ceil(eps / delta) + 2, 2^20) with eps = 4 (code_bytes + 2) row_terms max|v| 2^-24 (float32\n"
             "rounding of a row's sum). False (nothing written) when a value is not finite.");

/* The numpy formulas of fastscan.py in one pass (they cost ~60 us of numpy calls per query, 15-20% of
 * a 1M-row 4-bit scan): quantize_query (fastscan_kernels.c), which the side-by-side kernel uses too. */

static PyObject *quantize_tables(PyObject *self, PyObject *args) {
    Py_buffer values, out, base, delta, terms;
    int nq, cols, nv, out_cols, stride, copies, code_bytes, row_terms, levels;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiiw*iiiiiiw*w*w*:quantize_tables", &values, &nq, &cols, &nv, &out, &out_cols,
                          &stride, &copies, &code_bytes, &row_terms, &levels, &base, &delta, &terms))
        return NULL;
    if (nq < 0 || cols < 1 || cols > QUANTIZE_MAX_COLS || nv < 1 || copies < 1 || cols > out_cols ||
        (long long)nv * copies > stride ||
        levels < 1 || levels > 255) {
        PyErr_SetString(PyExc_ValueError, "quantize_tables: inconsistent shapes");
    } else if (!check_size("quantize_tables", "values (float32 [nq, cols, nv])", &values,
                           (long long)nq * cols * nv * 4) &&
               !check_size("quantize_tables", "out (uint8 [nq, out_cols, stride])", &out,
                           (long long)nq * out_cols * stride) &&
               !check_size("quantize_tables", "base (float64 [nq])", &base, (long long)nq * 8) &&
               !check_size("quantize_tables", "delta (float64 [nq])", &delta, (long long)nq * 8) &&
               !check_size("quantize_tables", "terms (int32 [nq])", &terms, (long long)nq * 4)) {
        const float *v = values.buf;
        int finite = 1;
        for (long long i = 0; i < (long long)nq * cols * nv && finite; i++) finite = isfinite(v[i]);
        if (finite) {
            memset(out.buf, 0, (size_t)nq * out_cols * stride);
            for (int q = 0; q < nq; q++)
                quantize_query(v + (long long)q * cols * nv, cols, nv, (uint8_t *)out.buf + (long long)q * out_cols *
                               stride, stride, copies, code_bytes, row_terms, levels, (double *)base.buf + q,
                               (double *)delta.buf + q, (int32_t *)terms.buf + q);
        }
        result = PyBool_FromLong(finite);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&terms);
    return result;
}

PyDoc_STRVAR(gather_rows_doc,
             "gather_rows(sources, width, seg, lo, hi, out) -> None\n\n"
             "Copy row ranges of several sources into one buffer, in order: range p is rows lo[p]..hi[p]\n"
             "of sources[seg[p]]. sources: buffers of whole rows of `width` bytes (read-only maps too);\n"
             "seg: int32 [P]; lo, hi: int64 [P]; out: exactly the ranges' rows (sum (hi - lo) * width\n"
             "bytes). ValueError for a range outside its source; the copy runs without the GIL.");

/* A partitioned search's many small cell ranges (~6,400 of ~250 rows at 100M faces) in one call:
 * numpy slicing and concatenating them cost ~1 us of interpreter work per range. */
static PyObject *gather_rows(PyObject *self, PyObject *args) {
    PyObject *sources, *seq = NULL, *result = NULL;
    int width;
    Py_buffer seg, lo, hi, out;
    Py_buffer *bufs = NULL;
    Py_ssize_t n_sources = 0, acquired = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oiy*y*y*w*:gather_rows", &sources, &width, &seg, &lo, &hi, &out)) return NULL;
    long long n_ranges = (long long)seg.len / 4;
    seq = PySequence_Fast(sources, "gather_rows: sources must be a sequence of buffers");
    if (!seq) goto done;
    n_sources = PySequence_Fast_GET_SIZE(seq);
    bufs = calloc(n_sources ? (size_t)n_sources : 1, sizeof(Py_buffer));
    if (!bufs) {
        PyErr_NoMemory();
        goto done;
    }
    if (width < 1 || seg.len % 4 || check_size("gather_rows", "lo (int64 [P])", &lo, n_ranges * 8) ||
        check_size("gather_rows", "hi (int64 [P])", &hi, n_ranges * 8)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "gather_rows: width %d or seg (int32 [P]) invalid", width);
        goto done;
    }
    for (; acquired < n_sources; acquired++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, acquired), &bufs[acquired], PyBUF_SIMPLE)) goto done;
        if (bufs[acquired].len % width) {
            PyErr_Format(PyExc_ValueError, "gather_rows: source %zd holds %zd bytes, not whole rows of %d bytes",
                         acquired, bufs[acquired].len, width);
            acquired++;
            goto done;
        }
    }
    const int32_t *sp = seg.buf;
    const int64_t *lp = lo.buf, *hp = hi.buf;
    long long total = 0;
    for (long long p = 0; p < n_ranges; p++) {
        if (sp[p] < 0 || sp[p] >= n_sources || lp[p] < 0 || hp[p] < lp[p] ||
            hp[p] > (long long)(bufs[sp[p]].len / width)) {
            PyErr_Format(PyExc_ValueError, "gather_rows: range %lld (source %d, rows %lld..%lld) is outside its source",
                         p, (int)sp[p], (long long)lp[p], (long long)hp[p]);
            goto done;
        }
        total += hp[p] - lp[p];
    }
    if (check_size("gather_rows", "out (the ranges' rows)", &out, total * width)) goto done;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *o = out.buf;
    for (long long p = 0; p < n_ranges; p++) {
        size_t bytes = (size_t)(hp[p] - lp[p]) * (size_t)width;
        memcpy(o, (const uint8_t *)bufs[sp[p]].buf + (size_t)lp[p] * (size_t)width, bytes);
        o += bytes;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < acquired; i++) PyBuffer_Release(&bufs[i]);
    free(bufs);
    Py_XDECREF(seq);
    PyBuffer_Release(&seg);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(counters_doc,
             "counters()\n--\n\n"
             "What the kernels did since the module loaded, summed over threads (all 0 where no native kernel\n"
             "runs): dense_blocks, the 32-row blocks q8_scan_blocks scored densely (every row exactly, where its\n"
             "nibble bound passed most rows); streamed_calls, the block kernel calls told to stream (prefetch\n"
             "ahead); query_parallel_queries, the queries of batches scanned side by side (q8_scan_blocks and\n"
             "pq8_scan: groups of 16, a last one of 8 or more, 3 or more on row-major codes), counted once per\n"
             "call and thread; query_parallel_quantized, those of them scanned on quantized tables.");

static PyObject *counters(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#if FASTSCAN_X86
    return Py_BuildValue("{sKsKsKsK}", "dense_blocks", (unsigned long long)q8_dense_blocks(), "streamed_calls",
                         (unsigned long long)streamed_calls(), "query_parallel_queries",
                         (unsigned long long)query_parallel_queries(), "query_parallel_quantized",
                         (unsigned long long)query_parallel_quantized());
#else
    return Py_BuildValue("{sisisisi}", "dense_blocks", 0, "streamed_calls", 0, "query_parallel_queries", 0,
                         "query_parallel_quantized", 0);
#endif
}

static PyMethodDef methods[] = {
    {"counters", counters, METH_NOARGS, counters_doc},
    {"fs4_scan", fs4_scan, METH_VARARGS, fs4_scan_doc},
    {"fs4_scan_blocks", fs4_scan_blocks, METH_VARARGS, fs4_scan_blocks_doc},
    {"q8_scan", q8_scan, METH_VARARGS, q8_scan_doc},
    {"q8_scan_blocks", q8_scan_blocks, METH_VARARGS, q8_scan_blocks_doc},
    {"pq8_scan", pq8_scan, METH_VARARGS, pq8_scan_doc},
    {"use", use, METH_VARARGS, use_doc},
    {"hamming_scan", hamming_scan, METH_VARARGS, hamming_scan_doc},
    {"quantize_tables", quantize_tables, METH_VARARGS, quantize_tables_doc},
    {"bound8_tables", bound8_tables, METH_VARARGS, bound8_tables_doc},
    {"gather_rows", gather_rows, METH_VARARGS, gather_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastscan",
    .m_doc = "Native scan kernels of query_node.fastscan (see fastscan_kernels.c).",
    .m_size = -1,
    .m_methods = methods,
};

/* None for a kernel with no variant on this CPU (or none compiled for this machine). */
static int add_isa(PyObject *kernels, const char *kernel, const char *isa) {
    PyObject *value = isa ? PyUnicode_FromString(isa) : Py_NewRef(Py_None);
    if (!value) return -1;
    int rc = PyDict_SetItemString(kernels, kernel, value);
    Py_DECREF(value);
    return rc;
}

/* {kernel: the instruction set of its picked variant, or None}. */
static PyObject *kernels_dict(void) {
    PyObject *kernels = PyDict_New();
    if (!kernels || add_isa(kernels, "fs4_scan", fs4_isa) || add_isa(kernels, "fs4_scan_blocks", fs4_blocks_isa) ||
        add_isa(kernels, "q8_scan", q8_isa) || add_isa(kernels, "q8_scan_blocks", q8_blocks_isa) ||
        add_isa(kernels, "pq8_scan", pq8_isa) ||
        add_isa(kernels, "hamming_scan", hamming_isa)) {
        Py_XDECREF(kernels);
        return NULL;
    }
    return kernels;
}

/* hamming_variants: {variant: whether this CPU runs it} (tests and the benchmark force each one). */
static int add_hamming_variants(PyObject *m) {
    PyObject *variants = PyDict_New();
    int rc = !variants;
#if FASTSCAN_X86
    for (size_t i = 0; !rc && i < sizeof(HAMMING_VARIANTS) / sizeof(HAMMING_VARIANTS[0]); i++)
        rc = PyDict_SetItemString(variants, HAMMING_VARIANTS[i].isa,
                                  HAMMING_VARIANTS[i].runs_here() ? Py_True : Py_False);
#endif
    rc = rc || PyModule_AddObjectRef(m, "hamming_variants", variants);
    Py_XDECREF(variants);
    return rc;
}

PyMODINIT_FUNC PyInit__fastscan(void) {
    const char *want = getenv("FACEPQ_SIMD");   /* e.g. avx2: the AVX2 kernels on an AVX-512 CPU */
    int cap = want && *want ? isa_rank(want) : 0;
    if (cap == N_ISAS) {
        PyErr_Format(PyExc_ImportError, "FACEPQ_SIMD=%s: unknown instruction set (known: avx512, avx2)", want);
        return NULL;
    }
    pick_kernels(cap);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    self_module = m;
    PyObject *kernels = kernels_dict();
    int failed = !kernels || add_hamming_variants(m) || PyModule_AddObjectRef(m, "kernels", kernels) ||
                 PyModule_AddIntConstant(m, "FS4_MAX_CODE_BYTES", FS4_MAX_CODE_BYTES);
    Py_XDECREF(kernels);
    if (failed) Py_CLEAR(m);
    return m;
}
