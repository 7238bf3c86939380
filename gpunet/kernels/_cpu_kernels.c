/* CPU kernels: the compiled fast paths of gpunet's formulas on NumPy arrays.
 *
 * The CPU twin of cuda_kernels.py. A training step on the CPU spends most of its time outside
 * the matrix products in NumPy's one-operation-per-pass model: y += b then max(y, 0) is two
 * passes, the cross-entropy is eight calls, the optimizer is two BLAS passes. Each function here
 * does one of those jobs in one pass, with the formula of its NumPy twin (which stays the
 * reference, and the path taken where this module is not built):
 *
 *     bias_relu               functional.bias_relu_
 *     relu_backward           functional.relu_backward
 *     cross_entropy           functional._CrossEntropyPlan.loss_and_grad (class-index targets)
 *     sgd, adam               optim.SGD._update, optim.Adam._update (and the CUDA `sgd_one`)
 *
 * Arrays arrive through the buffer protocol (no NumPy headers needed to build), must be
 * C-contiguous, and are float32 or float64 ("f"/"d"); labels and indices are int64. The Python
 * side (cpu_kernels.py) decides when to call here; these functions still check every shape and
 * dtype they rely on and raise TypeError/ValueError rather than read out of bounds.
 *
 * Reductions accumulate in the array's own precision, as the NumPy path and the CUDA kernels do,
 * except the cross-entropy's batch total, which is summed in double.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* --- arguments ------------------------------------------------------------------------------ */

enum { F32 = 0, F64 = 1, I64 = 2, OTHER = -1 };

typedef struct {
    Py_buffer view;
    int kind;
    int held;
} Array;

static int kind_of(const Py_buffer* v) {
    const char* f = v->format ? v->format : "B";
    if (*f == '=' || *f == '<' || *f == '@') {
#if PY_BIG_ENDIAN
        if (*f == '<') return OTHER;
#endif
        ++f;
    }
    if (f[1] != '\0') return OTHER;
    if (*f == 'f' && v->itemsize == 4) return F32;
    if (*f == 'd' && v->itemsize == 8) return F64;
    if ((*f == 'l' || *f == 'q') && v->itemsize == 8) return I64;
    return OTHER;
}

static const char* kind_name(int kind) {
    return kind == F32 ? "float32" : kind == F64 ? "float64" : kind == I64 ? "int64" : "another dtype";
}

/* Fill `a` from `obj`: C-contiguous (writable if asked), of the given ndim. */
static int get_array(PyObject* obj, Array* a, const char* name, int ndim, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    a->held = 0;
    if (PyObject_GetBuffer(obj, &a->view, flags) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s array, got %.80s", name,
                     writable ? ", writable" : "", Py_TYPE(obj)->tp_name);
        return -1;
    }
    a->held = 1;
    a->kind = kind_of(&a->view);
    if (a->view.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), got %d", name, ndim,
                     a->view.ndim);
        return -1;
    }
    return 0;
}

static void release(Array* arrays, int n) {
    for (int i = 0; i < n; ++i)
        if (arrays[i].held) PyBuffer_Release(&arrays[i].view);
}

static Py_ssize_t dim(const Array* a, int i) { return a->view.shape[i]; }

static int same_float_kind(Array* a, const char* name, Array* b, const char* other) {
    if (a->kind != F32 && a->kind != F64) {
        PyErr_Format(PyExc_TypeError, "%s must be float32 or float64, got %s", name,
                     kind_name(a->kind));
        return -1;
    }
    if (b->kind != a->kind) {
        PyErr_Format(PyExc_TypeError, "%s must have the dtype of %s (%s), got %s", other, name,
                     kind_name(a->kind), kind_name(b->kind));
        return -1;
    }
    return 0;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* fn) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments, got %zd", fn, want, nargs);
    return -1;
}

/* --- gemm through numpy's own OpenBLAS ------------------------------------------------------ */

/* The ILP64 CBLAS gemm of numpy's OpenBLAS; blas.py finds it and hands its address over through
 * set_gemm (this file links no BLAS of its own). numpy's matmul always has beta = 0; gemm adds a
 * product into beta * out in the same pass: a gradient added into a momentum buffer. */
typedef void (*sgemm_fn)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
typedef void (*dgemm_fn)(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t,
                         const double*, int64_t, double, double*, int64_t);
static sgemm_fn sgemm_ptr;
static dgemm_fn dgemm_ptr;

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* The conv and pooling loops are memory-bound passes over tiles in cache, which the baseline
 * x86-64 target (SSE2) runs 4 floats at a time: their entry points are compiled for AVX-512 and
 * AVX2 as well, and the loader picks what the CPU has (GCC's target_clones, through an ifunc).
 * Their helpers are inlined into each. -ffp-contract=off (setup.py) keeps a * b + c two
 * roundings in every clone, as in NumPy. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
#define INLINE inline __attribute__((always_inline))

/* The geometry of a convolution or pooling over NHWC images (see _cpu_conv.h). */
typedef struct {
    Py_ssize_t n, h, w, c, o, kh, kw, sh, sw, ph, pw, oh, ow;
    Py_ssize_t pool, qh, qw;  /* a fused max pooling of window and stride `pool` (0: none) */
} ConvGeometry;

/* --- the kernels, once per float type ------------------------------------------------------- */

#define CONCAT(a, b) a##_##b
#define SUFFIXED(f, s) CONCAT(f, s)

#define T float
#define NAME(f) SUFFIXED(f, f32)
#define EXP expf
#define LOG logf
#define SQRT sqrtf
#define GEMM sgemm_ptr
#include "_cpu_kernels.h"
#include "_cpu_conv.h"
#undef GEMM
#undef T
#undef NAME
#undef EXP
#undef LOG
#undef SQRT

#define T double
#define NAME(f) SUFFIXED(f, f64)
#define EXP exp
#define LOG log
#define SQRT sqrt
#define GEMM dgemm_ptr
#include "_cpu_kernels.h"
#include "_cpu_conv.h"
#undef GEMM
#undef T
#undef NAME
#undef EXP
#undef LOG
#undef SQRT

/* --- Python entry points ---------------------------------------------------------------------- */

/* bias_relu(y, b): y = max(y + b, 0) in place; y (N, C), b (C,). */
static PyObject* py_bias_relu(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[2];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    if (check_nargs(nargs, 2, "bias_relu") || get_array(args[0], &a[0], "y", 2, 1)
        || get_array(args[1], &a[1], "b", 1, 0) || same_float_kind(&a[0], "y", &a[1], "b"))
        goto done;
    if (dim(&a[1], 0) != dim(&a[0], 1)) {
        PyErr_Format(PyExc_ValueError, "b must have shape (%zd,) to match y, got (%zd,)",
                     dim(&a[0], 1), dim(&a[1], 0));
        goto done;
    }
    if (a[0].kind == F32)
        bias_relu_f32(a[0].view.buf, a[1].view.buf, dim(&a[0], 0), dim(&a[0], 1));
    else
        bias_relu_f64(a[0].view.buf, a[1].view.buf, dim(&a[0], 0), dim(&a[0], 1));
    result = Py_NewRef(Py_None);
done:
    release(a, 2);
    return result;
}

/* relu_backward(dy, y, dz, db or None, beta): dz = dy where y > 0, else 0;
 * db = dz.sum(axis=0) + beta * db (beta = 0: db's old values are ignored). */
static PyObject* py_relu_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[4];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    void* sums = NULL;
    int with_db;
    if (check_nargs(nargs, 5, "relu_backward")) return NULL;
    double beta = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) return NULL;
    with_db = args[3] != Py_None;
    if (get_array(args[0], &a[0], "dy", 2, 0) || get_array(args[1], &a[1], "y", 2, 0)
        || get_array(args[2], &a[2], "dz", 2, 1)
        || (with_db && get_array(args[3], &a[3], "db", 1, 1))
        || same_float_kind(&a[1], "y", &a[0], "dy") || same_float_kind(&a[1], "y", &a[2], "dz")
        || (with_db && same_float_kind(&a[1], "y", &a[3], "db")))
        goto done;
    Py_ssize_t n = dim(&a[1], 0), c = dim(&a[1], 1);
    for (int k = 0; k < 3; k += 2) {
        if (dim(&a[k], 0) != n || dim(&a[k], 1) != c) {
            PyErr_Format(PyExc_ValueError, "%s must have the shape of y (%zd, %zd), got (%zd, %zd)",
                         k ? "dz" : "dy", n, c, dim(&a[k], 0), dim(&a[k], 1));
            goto done;
        }
    }
    if (with_db && dim(&a[3], 0) != c) {
        PyErr_Format(PyExc_ValueError, "db must have shape (%zd,), got (%zd,)", c, dim(&a[3], 0));
        goto done;
    }
    void* db = with_db ? a[3].view.buf : NULL;
    sums = db;  /* beta = 0: the sums go straight to db */
    if (db && beta != 0.0) {  /* the sums go to scratch first, then into beta * db */
        if (!(sums = PyMem_Malloc((size_t)(c ? c : 1) * a[1].view.itemsize))) {
            PyErr_NoMemory();
            goto done;
        }
    } else {
        db = NULL;
    }
    if (a[1].kind == F32)
        relu_backward_f32(a[0].view.buf, a[1].view.buf, a[2].view.buf, sums, db, (float)beta, n, c);
    else
        relu_backward_f64(a[0].view.buf, a[1].view.buf, a[2].view.buf, sums, db, beta, n, c);
    result = Py_NewRef(Py_None);
done:
    if (sums && sums != a[3].view.buf) PyMem_Free(sums);
    release(a, 4);
    return result;
}

/* cross_entropy(x, t, weight or None, grad, loss, ignore_index, eps, grad_output, reduction):
 * x, grad (N, C); t (N,) int64; weight (C,); loss (N,) for reduction 2, else 0-d. */
static PyObject* py_cross_entropy(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[5];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    int with_weight;
    long long ignore_index;
    double eps, grad_output;
    int reduction;
    if (check_nargs(nargs, 9, "cross_entropy")) return NULL;
    with_weight = args[2] != Py_None;
    ignore_index = PyLong_AsLongLong(args[5]);
    eps = PyFloat_AsDouble(args[6]);
    grad_output = PyFloat_AsDouble(args[7]);
    reduction = (int)PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (reduction < 0 || reduction > 2) {
        PyErr_Format(PyExc_ValueError, "reduction must be 0 (mean), 1 (sum) or 2 (none), got %d",
                     reduction);
        return NULL;
    }
    if (get_array(args[0], &a[0], "logits", 2, 0) || get_array(args[1], &a[1], "target", 1, 0)
        || (with_weight && get_array(args[2], &a[2], "weight", 1, 0))
        || get_array(args[3], &a[3], "grad", 2, 1)
        || get_array(args[4], &a[4], "loss", reduction == 2 ? 1 : 0, 1)
        || same_float_kind(&a[0], "logits", &a[3], "grad")
        || same_float_kind(&a[0], "logits", &a[4], "loss")
        || (with_weight && same_float_kind(&a[0], "logits", &a[2], "weight")))
        goto done;
    Py_ssize_t n = dim(&a[0], 0), c = dim(&a[0], 1);
    if (a[1].kind != I64 || dim(&a[1], 0) != n) {
        PyErr_Format(PyExc_ValueError, "target must be int64 of shape (%zd,), got %s of shape (%zd,)",
                     n, kind_name(a[1].kind), dim(&a[1], 0));
        goto done;
    }
    if (dim(&a[3], 0) != n || dim(&a[3], 1) != c || (with_weight && dim(&a[2], 0) != c)
        || (reduction == 2 && dim(&a[4], 0) != n) || c == 0) {
        PyErr_SetString(PyExc_ValueError, "cross_entropy: grad must match logits (N, C > 0), "
                        "weight be (C,), and loss (N,) for reduction 2, else 0-d");
        goto done;
    }
    Py_ssize_t bad;
    if (a[0].kind == F32)
        bad = cross_entropy_f32(a[0].view.buf, a[1].view.buf, with_weight ? a[2].view.buf : NULL,
                                a[3].view.buf, a[4].view.buf, n, c, ignore_index, (float)eps,
                                (float)grad_output, reduction);
    else
        bad = cross_entropy_f64(a[0].view.buf, a[1].view.buf, with_weight ? a[2].view.buf : NULL,
                                a[3].view.buf, a[4].view.buf, n, c, ignore_index, eps, grad_output,
                                reduction);
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "target has label %lld at row %zd but logits have %zd classes",
                     (long long)((const int64_t*)a[1].view.buf)[bad], bad, c);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release(a, 5);
    return result;
}

/* Check that optimizer buffers p, g, s1 (and s2) are flat, of one float dtype and one length. */
static int optimizer_arrays(PyObject* const* args, Array* a, int count) {
    static const char* names[] = {"params", "grad", "state", "state2"};
    for (int k = 0; k < count; ++k)
        if (get_array(args[k], &a[k], names[k], 1, k != 1)) return -1;
    for (int k = 1; k < count; ++k) {
        if (same_float_kind(&a[0], "params", &a[k], names[k])) return -1;
        if (dim(&a[k], 0) != dim(&a[0], 0)) {
            PyErr_Format(PyExc_ValueError, "%s must have the length of params (%zd), got %zd",
                         names[k], dim(&a[0], 0), dim(&a[k], 0));
            return -1;
        }
    }
    return 0;
}

/* sgd(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first) */
static PyObject* py_sgd(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[3];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    if (check_nargs(nargs, 9, "sgd")) return NULL;
    double lr = PyFloat_AsDouble(args[3]), momentum = PyFloat_AsDouble(args[4]);
    double dampening = PyFloat_AsDouble(args[5]), weight_decay = PyFloat_AsDouble(args[6]);
    int nesterov = PyObject_IsTrue(args[7]), first = PyObject_IsTrue(args[8]);
    if (PyErr_Occurred() || optimizer_arrays(args, a, 3)) goto done;
    Py_ssize_t n = dim(&a[0], 0);
    Py_BEGIN_ALLOW_THREADS
    if (a[0].kind == F32)
        sgd_f32(a[0].view.buf, a[1].view.buf, a[2].view.buf, n, (float)lr, (float)momentum,
                (float)dampening, (float)weight_decay, nesterov, first);
    else
        sgd_f64(a[0].view.buf, a[1].view.buf, a[2].view.buf, n, lr, momentum, dampening,
                weight_decay, nesterov, first);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(a, 3);
    return result;
}

/* adam(p, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2) */
static PyObject* py_adam(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[4];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    if (check_nargs(nargs, 12, "adam")) return NULL;
    double lr = PyFloat_AsDouble(args[4]), b1 = PyFloat_AsDouble(args[5]);
    double b2 = PyFloat_AsDouble(args[6]), eps = PyFloat_AsDouble(args[7]);
    double weight_decay = PyFloat_AsDouble(args[8]);
    int decoupled = PyObject_IsTrue(args[9]);
    double bc1 = PyFloat_AsDouble(args[10]), bc2 = PyFloat_AsDouble(args[11]);
    if (PyErr_Occurred() || optimizer_arrays(args, a, 4)) goto done;
    Py_ssize_t n = dim(&a[0], 0);
    Py_BEGIN_ALLOW_THREADS
    if (a[0].kind == F32)
        adam_f32(a[0].view.buf, a[1].view.buf, a[2].view.buf, a[3].view.buf, n, (float)lr,
                 (float)b1, (float)b2, (float)eps, (float)weight_decay, decoupled, (float)bc1,
                 sqrtf((float)bc2));
    else
        adam_f64(a[0].view.buf, a[1].view.buf, a[2].view.buf, a[3].view.buf, n, lr, b1, b2, eps,
                 weight_decay, decoupled, bc1, sqrt(bc2));
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(a, 4);
    return result;
}

/* --- gemm ----------------------------------------------------------------------------------- */

/* set_gemm(sgemm address or None, dgemm address or None) */
static PyObject* py_set_gemm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    uintptr_t f[2] = {0, 0};  /* an address as an integer, as dlsym's callers do */
    if (check_nargs(nargs, 2, "set_gemm")) return NULL;
    for (int i = 0; i < 2; ++i)
        if (args[i] != Py_None) {
            f[i] = (uintptr_t)PyLong_AsUnsignedLongLong(args[i]);
            if (PyErr_Occurred()) return NULL;
        }
    sgemm_ptr = (sgemm_fn)f[0];
    dgemm_ptr = (dgemm_fn)f[1];
    return Py_NewRef(Py_None);
}

/* A 2-D operand of gemm: C-contiguous (no transpose) or F-contiguous (a transposed view such as
 * x.T). Sets the transpose flag and leading dimension; returns 0, or 1 for any other layout. */
static int gemm_layout(const Py_buffer* v, int* op, int64_t* ld) {
    if (PyBuffer_IsContiguous(v, 'C')) {
        *op = NO_TRANS;
        *ld = v->shape[1] > 1 ? v->shape[1] : 1;
    } else if (PyBuffer_IsContiguous(v, 'F')) {
        *op = TRANS;
        *ld = v->shape[0] > 1 ? v->shape[0] : 1;
    } else {
        return 1;
    }
    return 0;
}

static int overlap(const Py_buffer* a, const Py_buffer* b) {
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len && b->len && a0 < b0 + b->len && b0 < a0 + a->len;
}

/* gemm(a, b, beta, out): out = a @ b + beta * out (beta = 0: out's old values are ignored), for
 * a (M, K), b (K, N) and out (M, N) of one float dtype. Returns False, having done nothing, where
 * BLAS cannot take the call (no gemm was set, K = 0, an operand neither C- nor F-contiguous, out
 * read-only, not C-contiguous or overlapping an operand): the caller computes it another way. */
static PyObject* py_gemm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[3];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    int op_a, op_b;
    int64_t ld_a, ld_b;
    if (check_nargs(nargs, 4, "gemm")) return NULL;
    double beta = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred()) return NULL;
    const char* names[2] = {"a", "b"};
    for (int i = 0; i < 2; ++i) {
        if (PyObject_GetBuffer(args[i], &a[i].view, PyBUF_STRIDES | PyBUF_FORMAT) != 0) goto done;
        a[i].held = 1;
        a[i].kind = kind_of(&a[i].view);
        if (a[i].view.ndim != 2) {
            PyErr_Format(PyExc_ValueError, "%s must have 2 dimensions, got %d", names[i],
                         a[i].view.ndim);
            goto done;
        }
    }
    if (PyObject_GetBuffer(args[3], &a[2].view, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE)) {
        PyErr_Clear();  /* read-only: the caller's fallback says what is wrong */
        result = Py_NewRef(Py_False);
        goto done;
    }
    a[2].held = 1;
    a[2].kind = kind_of(&a[2].view);
    if (same_float_kind(&a[2], "out", &a[0], "a") || same_float_kind(&a[2], "out", &a[1], "b"))
        goto done;
    if (a[2].view.ndim != 2) {
        PyErr_Format(PyExc_ValueError, "out must have 2 dimensions, got %d", a[2].view.ndim);
        goto done;
    }
    int64_t m = dim(&a[0], 0), k = dim(&a[0], 1), n = dim(&a[1], 1);
    if (dim(&a[1], 0) != k || dim(&a[2], 0) != m || dim(&a[2], 1) != n) {
        PyErr_Format(PyExc_ValueError, "gemm needs a (M, K), b (K, N) and out (M, N), got a "
                     "(%zd, %zd), b (%zd, %zd) and out (%zd, %zd)", dim(&a[0], 0), dim(&a[0], 1),
                     dim(&a[1], 0), dim(&a[1], 1), dim(&a[2], 0), dim(&a[2], 1));
        goto done;
    }
    int f32 = a[2].kind == F32;
    if ((f32 ? sgemm_ptr == NULL : dgemm_ptr == NULL) || k == 0  /* BLASes differ at K = 0 */
        || gemm_layout(&a[0].view, &op_a, &ld_a) || gemm_layout(&a[1].view, &op_b, &ld_b)
        || !PyBuffer_IsContiguous(&a[2].view, 'C')
        || overlap(&a[0].view, &a[2].view) || overlap(&a[1].view, &a[2].view)) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (m && n) {
        int64_t ldc = n;
        Py_BEGIN_ALLOW_THREADS
        if (f32)
            sgemm_ptr(ROW_MAJOR, op_a, op_b, m, n, k, 1.0f, a[0].view.buf, ld_a, a[1].view.buf,
                      ld_b, (float)beta, a[2].view.buf, ldc);
        else
            dgemm_ptr(ROW_MAJOR, op_a, op_b, m, n, k, 1.0, a[0].view.buf, ld_a, a[1].view.buf,
                      ld_b, beta, a[2].view.buf, ldc);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_True);
done:
    release(a, 3);
    return result;
}

/* --- convolution and max pooling (NHWC; see _cpu_conv.h) ------------------------------------- */

/* The rows of im2col a tile holds: about conv_tile_bytes of cols and of the product's output,
 * which stay in the L2 cache, and at least 64 rows, so that each gemm stays large. Images go to
 * threads in ranges, and a range is worth a thread above part_min_work multiply-adds. Both are
 * settable (conv_tuning) so that the tests can cross every tile and thread boundary with small
 * inputs. 1 MiB tiles: 7.3 ms for the small CNN's second convolution forward at batch 128,
 * against 8.1 ms with 256 KiB (2 threads, medians of 15). */
static Py_ssize_t conv_tile_bytes = 1024 * 1024, part_min_work = 1 << 20;
#define MAX_PARTS 64

/* conv_tuning(tile_bytes, min_work): set each that is > 0; returns the previous pair. */
static PyObject* py_conv_tuning(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "conv_tuning")) return NULL;
    Py_ssize_t tile = PyLong_AsSsize_t(args[0]), work = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return NULL;
    PyObject* old = Py_BuildValue("(nn)", conv_tile_bytes, part_min_work);
    if (tile > 0) conv_tile_bytes = tile;
    if (work > 0) part_min_work = work;
    return old;
}

/* numpy's OpenBLAS set_num_threads and get_num_threads (set_blas_threads); NULL: unknown, and
 * the conv kernels then run on the calling thread alone, with BLAS threading as it is. */
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);
static set_threads_fn blas_set_threads;
static get_threads_fn blas_get_threads;

/* set_blas_threads(set address or None, get address or None) */
static PyObject* py_set_blas_threads(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    uintptr_t f[2] = {0, 0};
    if (check_nargs(nargs, 2, "set_blas_threads")) return NULL;
    for (int i = 0; i < 2; ++i)
        if (args[i] != Py_None) {
            f[i] = (uintptr_t)PyLong_AsUnsignedLongLong(args[i]);
            if (PyErr_Occurred()) return NULL;
        }
    blas_set_threads = f[0] && f[1] ? (set_threads_fn)f[0] : NULL;
    blas_get_threads = f[0] && f[1] ? (get_threads_fn)f[1] : NULL;
    return Py_NewRef(Py_None);
}

enum { CONV_FORWARD, CONV_BACKWARD, POOL_FORWARD, POOL_BACKWARD };

/* One call's arguments, shared by its parts. */
typedef struct {
    int op, kind, relu;
    const ConvGeometry* g;
    Py_ssize_t tile;
    const void *x, *w, *b, *dy, *y;
    void *out, *dx, *pooled;
    uint8_t* index;
} ConvCall;

/* One thread's share: images [img0, img1), its scratch (buf, dzbuf) and where its partial sums
 * go (dw, sums). */
typedef struct {
    const ConvCall* call;
    Py_ssize_t img0, img1;
    void *buf, *dzbuf, *dw, *sums;
} ConvPart;

static void* run_part(void* arg) {
    const ConvPart* p = arg;
    const ConvCall* c = p->call;
    int f32 = c->kind == F32;
    switch (c->op) {
    case CONV_FORWARD:
        if (f32)
            conv_forward_f32(c->x, c->w, c->b, c->out, p->buf, c->g, c->tile, c->relu, p->img0,
                             p->img1, c->pooled, c->index);
        else
            conv_forward_f64(c->x, c->w, c->b, c->out, p->buf, c->g, c->tile, c->relu, p->img0,
                             p->img1, c->pooled, c->index);
        break;
    case CONV_BACKWARD:
        if (f32)
            conv_backward_f32(c->x, c->w, c->dy, c->y, p->dw, p->sums, c->dx, p->buf, p->dzbuf,
                              c->g, c->tile, p->img0, p->img1, c->pooled, c->index);
        else
            conv_backward_f64(c->x, c->w, c->dy, c->y, p->dw, p->sums, c->dx, p->buf, p->dzbuf,
                              c->g, c->tile, p->img0, p->img1, c->pooled, c->index);
        break;
    case POOL_FORWARD:
        if (f32) max_pool_forward_f32(c->x, c->out, c->index, c->g, p->img0, p->img1);
        else max_pool_forward_f64(c->x, c->out, c->index, c->g, p->img0, p->img1);
        break;
    case POOL_BACKWARD:
        if (f32) max_pool_backward_f32(c->dy, c->index, c->dx, c->g, p->img0, p->img1);
        else max_pool_backward_f64(c->dy, c->index, c->dx, c->g, p->img0, p->img1);
        break;
    }
    return NULL;
}

/* How many parts to split n images into: one per BLAS thread, each with enough work. */
static int part_count(Py_ssize_t n, double work) {
    int threads = blas_get_threads ? blas_get_threads() : 1;
    Py_ssize_t parts = threads < 1 ? 1 : threads;
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    if (parts > n) parts = n;
    while (parts > 1 && work / (double)parts < (double)part_min_work) --parts;
    return parts < 1 ? 1 : (int)parts;
}

/* Run parts[0..count) (their image ranges set here, in order) with the GIL released: part 0 on
 * this thread, the others on threads of their own, BLAS one thread each meanwhile. A thread that
 * cannot be started runs its part here instead, so the result never depends on it. */
static void run_parts(ConvPart* parts, int count, Py_ssize_t n) {
    pthread_t threads[MAX_PARTS];
    int started[MAX_PARTS];
    for (int i = 0; i < count; ++i) {
        parts[i].img0 = n * i / count;
        parts[i].img1 = n * (i + 1) / count;
    }
    Py_BEGIN_ALLOW_THREADS
    int blas = count > 1 && blas_set_threads ? blas_get_threads() : 0;
    if (blas) blas_set_threads(1);
    for (int i = 1; i < count; ++i) started[i] = pthread_create(&threads[i], NULL, run_part, &parts[i]) == 0;
    run_part(&parts[0]);
    for (int i = 1; i < count; ++i) {
        if (started[i]) pthread_join(threads[i], NULL);
        else run_part(&parts[i]);
    }
    if (blas) blas_set_threads(blas);
    Py_END_ALLOW_THREADS
}

static Py_ssize_t conv_tile(const ConvGeometry* g, Py_ssize_t itemsize) {
    Py_ssize_t k = g->kh * g->kw * g->c, per_row = (k + g->o) * itemsize;
    Py_ssize_t tile = conv_tile_bytes / (per_row ? per_row : 1);
    return tile < 64 ? 64 : tile;
}

/* Read kh, kw, sh, sw (and ph, pw when `padded`) from args; fill g's window and output size from
 * the input (N, H, W, C) of `x`. */
static int conv_geometry(PyObject* const* args, int padded, const Array* x, ConvGeometry* g) {
    long v[6] = {0, 0, 0, 0, 0, 0};
    for (int i = 0; i < (padded ? 6 : 4); ++i) {
        v[i] = PyLong_AsLong(args[i]);
        if (PyErr_Occurred()) return -1;
    }
    if (v[0] < 1 || v[1] < 1 || v[2] < 1 || v[3] < 1 || v[4] < 0 || v[5] < 0) {
        PyErr_Format(PyExc_ValueError, "kernel and stride must be >= 1 and padding >= 0, got "
                     "kernel (%ld, %ld), stride (%ld, %ld), padding (%ld, %ld)", v[0], v[1], v[2],
                     v[3], v[4], v[5]);
        return -1;
    }
    g->n = dim(x, 0), g->h = dim(x, 1), g->w = dim(x, 2), g->c = dim(x, 3);
    g->kh = v[0], g->kw = v[1], g->sh = v[2], g->sw = v[3], g->ph = v[4], g->pw = v[5];
    Py_ssize_t hh = g->h + 2 * g->ph - g->kh, ww = g->w + 2 * g->pw - g->kw;
    if (hh < 0 || ww < 0) {
        PyErr_Format(PyExc_ValueError, "the kernel %ldx%ld does not fit the input %zdx%zd "
                     "(padding %ld, %ld)", v[0], v[1], g->h, g->w, v[4], v[5]);
        return -1;
    }
    g->oh = hh / g->sh + 1, g->ow = ww / g->sw + 1;
    g->pool = g->qh = g->qw = 0;
    return 0;
}

/* The fused pooling's window from `arg` (0: none), checked against g's output. */
static int pool_geometry(PyObject* arg, ConvGeometry* g) {
    long pool = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return -1;
    if (pool < 0 || pool > 16 || (pool && (g->oh < pool || g->ow < pool))) {
        PyErr_Format(PyExc_ValueError, "pool must be 0 (none) or a window of 1 to 16 that fits "
                     "the output %zdx%zd, got %ld", g->oh, g->ow, pool);
        return -1;
    }
    g->pool = pool, g->qh = pool ? g->oh / pool : 0, g->qw = pool ? g->ow / pool : 0;
    return 0;
}

/* A conv's tile: whole images when a pooling is fused (see conv_forward). */
static Py_ssize_t conv_tile_for(const ConvGeometry* g, Py_ssize_t itemsize) {
    Py_ssize_t tile = conv_tile(g, itemsize), pixels = g->oh * g->ow;
    if (g->pool && pixels) tile = (tile / pixels > 0 ? tile / pixels : 1) * pixels;
    return tile;
}

static int check_shape(const Array* a, const char* name, int ndim, const Py_ssize_t* want) {
    for (int i = 0; i < ndim; ++i)
        if (dim(a, i) != want[i]) {
            char text[160];
            int at = snprintf(text, sizeof text, "(");
            for (int j = 0; j < ndim && at < (int)sizeof text; ++j)
                at += snprintf(text + at, sizeof text - at, j ? ", %zd" : "%zd", want[j]);
            PyErr_Format(PyExc_ValueError, "%s must have shape %s), got a dimension %d of %zd",
                         name, text, i, dim(a, i));
            return -1;
        }
    return 0;
}

/* A uint8 array for max pooling's window offsets. */
static int get_index(PyObject* obj, Array* a, int writable) {
    if (get_array(obj, a, "index", 4, writable)) return -1;
    const char* f = a->view.format ? a->view.format : "B";
    if (a->view.itemsize != 1 || (strcmp(f, "B") && strcmp(f, "=B") && strcmp(f, "<B")
                                  && strcmp(f, "@B"))) {
        PyErr_SetString(PyExc_TypeError, "index must be a uint8 array");
        return -1;
    }
    return 0;
}

static int gemm_ready(int kind) {
    if (kind == F32 ? sgemm_ptr != NULL : dgemm_ptr != NULL) return 0;
    PyErr_SetString(PyExc_RuntimeError, "no BLAS gemm was set (set_gemm) for this dtype");
    return -1;
}

/* conv2d_forward(x, w, b or None, y, relu, kh, kw, sh, sw, ph, pw, pool, index or None):
 * y (N, OH, OW, O) = conv(x (N, H, W, C)) with w (K, O), K = kh * kw * C in (i, j, c) order.
 * With pool > 0, a max pooling of that window and stride is fused: y (N, OH / pool, OW / pool,
 * O) is the pooled output and index (uint8, its shape) the offsets of the maxima. */
static PyObject* py_conv2d_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[5];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    void* buf = NULL;
    ConvGeometry g;
    if (check_nargs(nargs, 13, "conv2d_forward")) return NULL;
    int with_b = args[2] != Py_None, relu = PyObject_IsTrue(args[4]);
    int with_index = args[12] != Py_None;
    if (relu < 0 || get_array(args[0], &a[0], "x", 4, 0) || get_array(args[1], &a[1], "w", 2, 0)
        || (with_b && get_array(args[2], &a[2], "b", 1, 0)) || get_array(args[3], &a[3], "y", 4, 1)
        || same_float_kind(&a[0], "x", &a[1], "w") || same_float_kind(&a[0], "x", &a[3], "y")
        || (with_b && same_float_kind(&a[0], "x", &a[2], "b"))
        || conv_geometry(args + 5, 1, &a[0], &g) || pool_geometry(args[11], &g)
        || gemm_ready(a[0].kind))
        goto done;
    if (with_index && (!g.pool || get_index(args[12], &a[4], 1))) {
        if (!g.pool) PyErr_SetString(PyExc_ValueError, "index belongs to a fused pooling (pool > 0)");
        goto done;
    }
    g.o = dim(&a[1], 1);
    Py_ssize_t w_shape[2] = {g.kh * g.kw * g.c, g.o};
    Py_ssize_t y_shape[4] = {g.n, g.pool ? g.qh : g.oh, g.pool ? g.qw : g.ow, g.o};
    if (check_shape(&a[1], "w", 2, w_shape) || (with_b && check_shape(&a[2], "b", 1, &g.o))
        || check_shape(&a[3], "y", 4, y_shape)
        || (with_index && check_shape(&a[4], "index", 4, y_shape)))
        goto done;
    if (overlap(&a[3].view, &a[0].view) || overlap(&a[3].view, &a[1].view)
        || (with_index && (overlap(&a[4].view, &a[0].view) || overlap(&a[4].view, &a[3].view)))) {
        PyErr_SetString(PyExc_ValueError, "y and index must not overlap x, w or each other");
        goto done;
    }
    Py_ssize_t tile = conv_tile_for(&g, a[0].view.itemsize), size = a[0].view.itemsize;
    ConvCall call = {.op = CONV_FORWARD, .kind = a[0].kind, .relu = relu, .g = &g, .tile = tile,
                     .x = a[0].view.buf, .w = a[1].view.buf, .b = with_b ? a[2].view.buf : NULL,
                     .out = g.pool ? NULL : a[3].view.buf, .pooled = g.pool ? a[3].view.buf : NULL,
                     .index = with_index ? a[4].view.buf : NULL};
    ConvPart parts[MAX_PARTS];
    int count = part_count(g.n, (double)(g.n * g.oh * g.ow) * w_shape[0] * g.o);
    Py_ssize_t each = tile * (w_shape[0] + (g.pool ? g.o : 0)) + 1;
    if (!(buf = PyMem_RawMalloc((size_t)(count * each) * size))) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < count; ++i)
        parts[i] = (ConvPart){.call = &call, .buf = (char*)buf + i * each * size};
    run_parts(parts, count, g.n);
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(buf);
    release(a, 5);
    return result;
}

/* conv2d_backward(x, w, dy, y or None, dw, db or None, beta, dx or None, kh, kw, sh, sw, ph, pw,
 * pool, index or None): dw (K, O) = the weight gradient (overwritten); db = the bias gradient +
 * beta * db; dx (N, H, W, C) = the input gradient (overwritten). With y (the forward's ReLU
 * output), dy is first masked by y > 0. With pool > 0 (conv2d_forward's fused pooling), dy is
 * the pooled output's gradient, y that output and index its offsets. */
static PyObject* py_conv2d_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[8];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    void* buf = NULL;
    ConvGeometry g;
    if (check_nargs(nargs, 16, "conv2d_backward")) return NULL;
    double beta = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    int with_y = args[3] != Py_None, with_db = args[5] != Py_None, with_dx = args[7] != Py_None;
    if (get_array(args[0], &a[0], "x", 4, 0) || get_array(args[1], &a[1], "w", 2, 0)
        || get_array(args[2], &a[2], "dy", 4, 0) || (with_y && get_array(args[3], &a[3], "y", 4, 0))
        || get_array(args[4], &a[4], "dw", 2, 1) || (with_db && get_array(args[5], &a[5], "db", 1, 1))
        || (with_dx && get_array(args[7], &a[6], "dx", 4, 1))
        || same_float_kind(&a[0], "x", &a[1], "w") || same_float_kind(&a[0], "x", &a[2], "dy")
        || (with_y && same_float_kind(&a[0], "x", &a[3], "y"))
        || same_float_kind(&a[0], "x", &a[4], "dw")
        || (with_db && same_float_kind(&a[0], "x", &a[5], "db"))
        || (with_dx && same_float_kind(&a[0], "x", &a[6], "dx"))
        || conv_geometry(args + 8, 1, &a[0], &g) || pool_geometry(args[14], &g)
        || gemm_ready(a[0].kind))
        goto done;
    if (g.pool && (!with_y || args[15] == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a fused pooling (pool > 0) needs y (the pooled output) "
                        "and index");
        goto done;
    }
    if (!g.pool && args[15] != Py_None) {
        PyErr_SetString(PyExc_ValueError, "index belongs to a fused pooling (pool > 0)");
        goto done;
    }
    if (g.pool && get_index(args[15], &a[7], 0)) goto done;
    g.o = dim(&a[1], 1);
    Py_ssize_t k = g.kh * g.kw * g.c;
    Py_ssize_t w_shape[2] = {k, g.o};
    Py_ssize_t y_shape[4] = {g.n, g.pool ? g.qh : g.oh, g.pool ? g.qw : g.ow, g.o};
    Py_ssize_t x_shape[4] = {g.n, g.h, g.w, g.c};
    if (check_shape(&a[1], "w", 2, w_shape) || check_shape(&a[2], "dy", 4, y_shape)
        || (with_y && check_shape(&a[3], "y", 4, y_shape)) || check_shape(&a[4], "dw", 2, w_shape)
        || (with_db && check_shape(&a[5], "db", 1, &g.o))
        || (with_dx && check_shape(&a[6], "dx", 4, x_shape))
        || (g.pool && check_shape(&a[7], "index", 4, y_shape)))
        goto done;
    for (int out = 4; out < 7; ++out)
        for (int in = 0; in < 8; in += in == 3 ? 4 : 1)
            if (a[out].held && a[in].held && overlap(&a[out].view, &a[in].view)) {
                PyErr_SetString(PyExc_ValueError, "dw, db and dx must not overlap x, w, dy, y or index");
                goto done;
            }
    Py_ssize_t tile = conv_tile_for(&g, a[0].view.itemsize), size = a[0].view.itemsize;
    ConvCall call = {.op = CONV_BACKWARD, .kind = a[0].kind, .g = &g, .tile = tile,
                     .x = a[0].view.buf, .w = a[1].view.buf, .dy = a[2].view.buf,
                     .y = with_y && !g.pool ? a[3].view.buf : NULL,
                     .pooled = g.pool ? a[3].view.buf : NULL,
                     .index = g.pool ? a[7].view.buf : NULL, .dx = with_dx ? a[6].view.buf : NULL};
    ConvPart parts[MAX_PARTS];
    int count = part_count(g.n, (with_dx ? 2.0 : 1.0) * (double)(g.n * g.oh * g.ow) * k * g.o);
    /* each part: buf and dzbuf, then its own dw and sums (part 0 writes dw itself) */
    Py_ssize_t each = tile * (k + g.o) + k * g.o + g.o + 1;
    if (!(buf = PyMem_RawMalloc((size_t)(count * each) * size))) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < count; ++i) {
        char* mine = (char*)buf + i * each * size;
        parts[i] = (ConvPart){.call = &call, .buf = mine, .dzbuf = mine + tile * k * size,
                              .dw = i ? mine + tile * (k + g.o) * size : a[4].view.buf,
                              .sums = with_db ? mine + (tile * (k + g.o) + k * g.o) * size : NULL};
    }
    run_parts(parts, count, g.n);
    /* the parts' sums, added in part order: the same result for the same thread count */
    Py_ssize_t kw_o = k * g.o;
    if (a[0].kind == F32) {
        float* dw = a[4].view.buf;
        float* db = with_db ? a[5].view.buf : NULL;
        float* s0 = parts[0].sums;
        for (int i = 1; i < count; ++i) {
            const float *pw = parts[i].dw, *ps = parts[i].sums;
            for (Py_ssize_t t = 0; t < kw_o; ++t) dw[t] += pw[t];
            for (Py_ssize_t j = 0; db && j < g.o; ++j) s0[j] += ps[j];
        }
        for (Py_ssize_t j = 0; db && j < g.o; ++j)  /* as relu_backward: beta * db added last */
            db[j] = beta != 0.0 ? s0[j] + (float)beta * db[j] : s0[j];
    } else {
        double* dw = a[4].view.buf;
        double* db = with_db ? a[5].view.buf : NULL;
        double* s0 = parts[0].sums;
        for (int i = 1; i < count; ++i) {
            const double *pw = parts[i].dw, *ps = parts[i].sums;
            for (Py_ssize_t t = 0; t < kw_o; ++t) dw[t] += pw[t];
            for (Py_ssize_t j = 0; db && j < g.o; ++j) s0[j] += ps[j];
        }
        for (Py_ssize_t j = 0; db && j < g.o; ++j)
            db[j] = beta != 0.0 ? s0[j] + beta * db[j] : s0[j];
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(buf);
    release(a, 8);
    return result;
}

/* max_pool2d_forward(x, y, index or None, kh, kw, sh, sw): x (N, H, W, C), y and index
 * (N, OH, OW, C). */
static PyObject* py_max_pool2d_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[3];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    ConvGeometry g;
    if (check_nargs(nargs, 7, "max_pool2d_forward")) return NULL;
    int with_index = args[2] != Py_None;
    if (get_array(args[0], &a[0], "x", 4, 0) || get_array(args[1], &a[1], "y", 4, 1)
        || (with_index && get_index(args[2], &a[2], 1)) || same_float_kind(&a[0], "x", &a[1], "y"))
        goto done;
    memset(&g, 0, sizeof g);
    if (conv_geometry(args + 3, 0, &a[0], &g)) goto done;
    if (g.kh * g.kw > 256) {
        PyErr_SetString(PyExc_ValueError, "a window of more than 256 pixels needs a wider index");
        goto done;
    }
    Py_ssize_t y_shape[4] = {g.n, g.oh, g.ow, g.c};
    if (check_shape(&a[1], "y", 4, y_shape) || (with_index && check_shape(&a[2], "index", 4, y_shape)))
        goto done;
    if (overlap(&a[1].view, &a[0].view) || (with_index && overlap(&a[2].view, &a[0].view))) {
        PyErr_SetString(PyExc_ValueError, "y and index must not overlap x");
        goto done;
    }
    ConvCall call = {.op = POOL_FORWARD, .kind = a[0].kind, .g = &g, .x = a[0].view.buf,
                     .out = a[1].view.buf, .index = with_index ? a[2].view.buf : NULL};
    ConvPart parts[MAX_PARTS];
    int count = part_count(g.n, (double)(g.n * g.h * g.w * g.c));
    for (int i = 0; i < count; ++i) parts[i] = (ConvPart){.call = &call};
    run_parts(parts, count, g.n);
    result = Py_NewRef(Py_None);
done:
    release(a, 3);
    return result;
}

/* max_pool2d_backward(dy, index, dx, kh, kw, sh, sw): dy and index (N, OH, OW, C), dx
 * (N, H, W, C), overwritten. */
static PyObject* py_max_pool2d_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
    Array a[3];
    memset(a, 0, sizeof a);
    PyObject* result = NULL;
    ConvGeometry g;
    if (check_nargs(nargs, 7, "max_pool2d_backward")) return NULL;
    if (get_array(args[0], &a[0], "dy", 4, 0) || get_index(args[1], &a[1], 0)
        || get_array(args[2], &a[2], "dx", 4, 1) || same_float_kind(&a[2], "dx", &a[0], "dy"))
        goto done;
    memset(&g, 0, sizeof g);
    if (conv_geometry(args + 3, 0, &a[2], &g)) goto done;
    Py_ssize_t y_shape[4] = {g.n, g.oh, g.ow, g.c};
    if (check_shape(&a[0], "dy", 4, y_shape) || check_shape(&a[1], "index", 4, y_shape))
        goto done;
    if (overlap(&a[2].view, &a[0].view) || overlap(&a[2].view, &a[1].view)) {
        PyErr_SetString(PyExc_ValueError, "dx must not overlap dy or index");
        goto done;
    }
    ConvCall call = {.op = POOL_BACKWARD, .kind = a[2].kind, .g = &g, .dy = a[0].view.buf,
                     .index = a[1].view.buf, .dx = a[2].view.buf};
    ConvPart parts[MAX_PARTS];
    int count = part_count(g.n, (double)(g.n * g.h * g.w * g.c));
    for (int i = 0; i < count; ++i) parts[i] = (ConvPart){.call = &call};
    run_parts(parts, count, g.n);
    result = Py_NewRef(Py_None);
done:
    release(a, 3);
    return result;
}

static PyMethodDef methods[] = {
    {"bias_relu", (PyCFunction)(void (*)(void))py_bias_relu, METH_FASTCALL,
     "bias_relu(y, b): y = max(y + b, 0) in place."},
    {"relu_backward", (PyCFunction)(void (*)(void))py_relu_backward, METH_FASTCALL,
     "relu_backward(dy, y, dz, db, beta): dz = dy where y > 0, else 0; "
     "db = dz.sum(axis=0) + beta * db unless db is None."},
    {"cross_entropy", (PyCFunction)(void (*)(void))py_cross_entropy, METH_FASTCALL,
     "cross_entropy(logits, target, weight, grad, loss, ignore_index, eps, grad_output, "
     "reduction): loss and gradient in one pass (reduction 0 mean, 1 sum, 2 none)."},
    {"sgd", (PyCFunction)(void (*)(void))py_sgd, METH_FASTCALL,
     "sgd(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first): one pass."},
    {"adam", (PyCFunction)(void (*)(void))py_adam, METH_FASTCALL,
     "adam(p, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2): one pass."},
    {"set_gemm", (PyCFunction)(void (*)(void))py_set_gemm, METH_FASTCALL,
     "set_gemm(sgemm, dgemm): the addresses of an ILP64 cblas_sgemm and cblas_dgemm, or None."},
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL,
     "gemm(a, b, beta, out): out = a @ b + beta * out; False where BLAS cannot take it."},
    {"set_blas_threads", (PyCFunction)(void (*)(void))py_set_blas_threads, METH_FASTCALL,
     "set_blas_threads(set, get): the addresses of OpenBLAS's set/get_num_threads, or None."},
    {"conv_tuning", (PyCFunction)(void (*)(void))py_conv_tuning, METH_FASTCALL,
     "conv_tuning(tile_bytes, min_work): set each > 0; returns the previous pair."},
    {"conv2d_forward", (PyCFunction)(void (*)(void))py_conv2d_forward, METH_FASTCALL,
     "conv2d_forward(x, w, b, y, relu, kh, kw, sh, sw, ph, pw): NHWC convolution, tiled im2col."},
    {"conv2d_backward", (PyCFunction)(void (*)(void))py_conv2d_backward, METH_FASTCALL,
     "conv2d_backward(x, w, dy, y, dw, db, beta, dx, kh, kw, sh, sw, ph, pw): its gradients."},
    {"max_pool2d_forward", (PyCFunction)(void (*)(void))py_max_pool2d_forward, METH_FASTCALL,
     "max_pool2d_forward(x, y, index, kh, kw, sh, sw): NHWC max pooling and argmax offsets."},
    {"max_pool2d_backward", (PyCFunction)(void (*)(void))py_max_pool2d_backward, METH_FASTCALL,
     "max_pool2d_backward(dy, index, dx, kh, kw, sh, sw): its input gradient."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_cpu_kernels",
    .m_doc = "Compiled CPU kernels of gpunet (see cpu_kernels.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
