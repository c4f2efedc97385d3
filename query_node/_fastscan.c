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

#include "fastscan_kernels.h"
#include "popcount_kernels.h"

static fs4_scan_fn fs4_impl;
static pq8_scan_fn pq8_impl;
static const char *fs4_isa, *pq8_isa;
static hamming_scan_fn hamming_impl;
static const char *hamming_isa;

#if FASTSCAN_X86
static int cpu_has_avx2(void) { return __builtin_cpu_supports("avx2"); }

static const struct {
    const char *isa;
    int (*runs_here)(void);
    fs4_scan_fn fn;
} FS4_VARIANTS[] = {
    {"avx2", cpu_has_avx2, fs4_scan_avx2},
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

/* Set impl_out and isa_out to the first of `variants` that runs on this CPU. */
#define PICK(variants, impl_out, isa_out)                                   \
    for (size_t i_ = 0; i_ < sizeof(variants) / sizeof(variants[0]); i_++) { \
        if (variants[i_].runs_here()) {                                      \
            impl_out = variants[i_].fn;                                      \
            isa_out = variants[i_].isa;                                      \
            break;                                                           \
        }                                                                    \
    }
#endif

static void pick_kernels(void) {
#if FASTSCAN_X86
    __builtin_cpu_init();
    PICK(FS4_VARIANTS, fs4_impl, fs4_isa)
    PICK(PQ8_VARIANTS, pq8_impl, pq8_isa)
    PICK(HAMMING_VARIANTS, hamming_impl, hamming_isa)
#endif
}

/* Raise ValueError unless buffer `what` holds exactly `want` bytes. */
static int check_size(const char *kernel, const char *what, const Py_buffer *buf, long long want) {
    if ((long long)buf->len == want) return 0;
    PyErr_Format(PyExc_ValueError, "%s: %s holds %zd bytes, expected %lld", kernel, what, buf->len, want);
    return -1;
}

/*
 * Shapes shared by both kernels, from the codes and heap buffers: n rows of `width` bytes,
 * nq heaps of k entries. Checks the heaps, the byte tables and the tombstones against them.
 */
static int check_common(const char *kernel, const Py_buffer *codes, int width, const Py_buffer *tables,
                        const Py_buffer *skip, int has_skip, const Py_buffer *heap_s, const Py_buffer *heap_r,
                        int k, long long *n, int *nq) {
    if (width < 1 || k < 1) {
        PyErr_Format(PyExc_ValueError, "%s: width and k must be >= 1, got %d and %d", kernel, width, k);
        return -1;
    }
    if (codes->len % width) {
        PyErr_Format(PyExc_ValueError, "%s: codes hold %zd bytes, not whole rows of %d bytes", kernel,
                     codes->len, width);
        return -1;
    }
    long long heap_bytes = (long long)k * (long long)sizeof(float);
    if (heap_s->len == 0 || heap_s->len % heap_bytes || heap_s->len / heap_bytes > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: heap scores hold %zd bytes, not whole float32 heaps of k=%d",
                     kernel, heap_s->len, k);
        return -1;
    }
    *n = codes->len / width;
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

PyDoc_STRVAR(fs4_scan_doc,
             "fs4_scan(codes, width, byte_tables, nib, base, delta, terms, skip, has_skip, row_offset, heap_s,"
             " heap_r, k)\n--\n\n"
             "Scan packed 4-bit codes with quantized nibble tables and re-score candidates exactly;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan_into.");

static PyObject *fs4_scan(PyObject *self, PyObject *args) {
    Py_buffer codes, pair, nib, base, delta, terms, skip, heap_s, heap_r;
    int width, has_skip, k, nq, rc;
    long long row_offset, n, width8;
    PyObject *result = NULL;
    (void)self;
    if (!fs4_impl) return no_variant("fs4_scan");
    if (!PyArg_ParseTuple(args, "y*iy*y*y*y*y*y*pLw*w*i:fs4_scan", &codes, &width, &pair, &nib, &base, &delta,
                          &terms, &skip, &has_skip, &row_offset, &heap_s, &heap_r, &k))
        return NULL;
    if (check_common("fs4_scan", &codes, width, &pair, &skip, has_skip, &heap_s, &heap_r, k, &n, &nq))
        goto done;
    if (width > FS4_MAX_CODE_BYTES) {
        PyErr_Format(PyExc_ValueError, "fs4_scan: codes of %d bytes, at most %d", width, FS4_MAX_CODE_BYTES);
        goto done;
    }
    width8 = (width + 7) / 8 * 8;
    if (check_size("fs4_scan", "nibble tables (uint8 [nq, width8, 2, 32])", &nib, nq * width8 * 64) ||
        check_size("fs4_scan", "base (float64 [nq])", &base, (long long)nq * 8) ||
        check_size("fs4_scan", "delta (float64 [nq])", &delta, (long long)nq * 8) ||
        check_size("fs4_scan", "terms (int32 [nq])", &terms, (long long)nq * 4))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = fs4_impl(codes.buf, n, width, nq, pair.buf, nib.buf, base.buf, delta.buf, terms.buf, skip.buf, has_skip,
                  row_offset, heap_s.buf, heap_r.buf, k);
    Py_END_ALLOW_THREADS
    if (check_rc("fs4_scan", rc) == 0) result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&pair);
    PyBuffer_Release(&nib);
    PyBuffer_Release(&base);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&terms);
    PyBuffer_Release(&skip);
    PyBuffer_Release(&heap_s);
    PyBuffer_Release(&heap_r);
    return result;
}

PyDoc_STRVAR(pq8_scan_doc,
             "pq8_scan(codes, width, byte_tables, skip, has_skip, row_offset, heap_s, heap_r, k)\n--\n\n"
             "Scan codes with float byte tables in one fused score-and-compare loop;\n"
             "updates the heaps in place. Arguments: query_node.fastscan.scan8_into.");

static PyObject *pq8_scan(PyObject *self, PyObject *args) {
    Py_buffer codes, tables, skip, heap_s, heap_r;
    int width, has_skip, k, nq, rc;
    long long row_offset, n;
    PyObject *result = NULL;
    (void)self;
    if (!pq8_impl) return no_variant("pq8_scan");
    if (!PyArg_ParseTuple(args, "y*iy*y*pLw*w*i:pq8_scan", &codes, &width, &tables, &skip, &has_skip, &row_offset,
                          &heap_s, &heap_r, &k))
        return NULL;
    if (check_common("pq8_scan", &codes, width, &tables, &skip, has_skip, &heap_s, &heap_r, k, &n, &nq) == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = pq8_impl(codes.buf, n, width, nq, tables.buf, skip.buf, has_skip, row_offset, heap_s.buf, heap_r.buf,
                      k);
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

PyDoc_STRVAR(hamming_scan_doc,
             "hamming_scan(codes, width, queries, skip, has_skip, row_offset, heap_s, heap_r, k, isa)\n--\n\n"
             "Exact top-k Hamming scan of binary codes (score = -distance); updates the heaps in place.\n"
             "isa: '' for the best variant this CPU runs, or a variant's name (hamming_variants).\n"
             "Arguments: query_node.hamming_scan.scan_into.");

/* check_common's checks with query codes uint8 [nq, width] in place of byte tables. */
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

static PyMethodDef methods[] = {
    {"fs4_scan", fs4_scan, METH_VARARGS, fs4_scan_doc},
    {"pq8_scan", pq8_scan, METH_VARARGS, pq8_scan_doc},
    {"hamming_scan", hamming_scan, METH_VARARGS, hamming_scan_doc},
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
    pick_kernels();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *kernels = PyDict_New();
    int failed = !kernels || add_isa(kernels, "fs4_scan", fs4_isa) || add_isa(kernels, "pq8_scan", pq8_isa) ||
                 add_isa(kernels, "hamming_scan", hamming_isa) || add_hamming_variants(m) ||
                 PyModule_AddObjectRef(m, "kernels", kernels) ||
                 PyModule_AddIntConstant(m, "FS4_MAX_CODE_BYTES", FS4_MAX_CODE_BYTES);
    Py_XDECREF(kernels);
    if (failed) Py_CLEAR(m);
    return m;
}
