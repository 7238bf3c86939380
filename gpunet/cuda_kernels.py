"""CUDA kernels: the fast paths of gpunet's formulas on CuPy arrays.

Every kernel here is the twin of a NumPy formula elsewhere in gpunet, which stays the reference:

    cross_entropy_grad          functional.cross_entropy_grad_reference
    cross_entropy_loss_and_grad functional._CrossEntropyPlan.loss_and_grad (numpy branch)
    bias_relu_, relu_backward   functional.bias_relu_, functional.relu_backward
    count_correct               functional.count_correct
    optimizer_update            optim.SGD._update, optim.Adam._update

Kernels are built by small memoized factories on first use, never at import, so each compiles
once per process, one template instantiation at a time. CuPy also caches the compiled binaries on
disk (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``): only the first use on a machine pays the
NVRTC compile (not yet measured on a GPU; nvcc needs about 0.3 s per cross-entropy instantiation
on a 2-core CPU), and later processes load the cached binary.

Reductions accumulate in float32 for float16/bfloat16/float32 inputs and in float64 for float64;
half-precision values are converted with exact bit operations (bfloat16) or the PTX ``cvt``
instruction (float16), so the sources need no CUDA headers.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    import cupy
except ImportError:  # the sources stay importable: tests compile them with nvcc where it exists
    cupy = None

# --- shared device code ----------------------------------------------------------------------------

# Storage kinds: 0 float32, 1 float64, 2 float16, 3 bfloat16. Half kinds travel as raw 16 bits.
_KIND = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}

_PRELUDE = r"""
template <int KIND> struct Types { typedef float acc; typedef float raw; };
template <> struct Types<1> { typedef double acc; typedef double raw; };
template <> struct Types<2> { typedef float acc; typedef unsigned short raw; };
template <> struct Types<3> { typedef float acc; typedef unsigned short raw; };

template <int KIND> __device__ __forceinline__
typename Types<KIND>::acc load(const typename Types<KIND>::raw* p, long long i) {
    if constexpr (KIND == 2) {
        float f;
        unsigned short h = p[i];
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    } else if constexpr (KIND == 3) {
        return __uint_as_float(((unsigned int)p[i]) << 16);
    } else {
        return p[i];
    }
}

template <int KIND> __device__ __forceinline__
void store(typename Types<KIND>::raw* p, long long i, typename Types<KIND>::acc v) {
    if constexpr (KIND == 2) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        p[i] = h;
    } else if constexpr (KIND == 3) {
        unsigned int u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
        p[i] = (unsigned short)(u >> 16);
    } else {
        p[i] = v;
    }
}

template <typename S> __device__ __forceinline__ S warp_sum(S v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Combine two (max, sum of exp(x - max)) pairs: the online-softmax step.
template <typename S> __device__ __forceinline__ void merge(S& m, S& s, S m2, S s2) {
    S mx = m > m2 ? m : m2;
    if (mx == -INFINITY) { m = mx; s = 0; return; }  // both empty (or all -inf)
    s = s * exp(m - mx) + s2 * exp(m2 - mx);
    m = mx;
}

template <typename S> __device__ __forceinline__ void warp_merge(S& m, S& s) {
    for (int o = 16; o > 0; o >>= 1) {
        S m2 = __shfl_xor_sync(0xffffffffu, m, o);
        S s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
}

// Sum over a block, the same value returned to every thread, in a fixed (deterministic) order.
template <typename S> __device__ S block_sum(S v, S* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : (S)0;
    v = warp_sum(v);
    return v;
}
"""


def _kind(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return 3
    if dtype not in _KIND:
        raise TypeError(f"CUDA kernels take float16, bfloat16, float32 or float64, got {dtype}")
    return _KIND[dtype]


def _acc_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


@functools.cache
def _multiprocessors(device_id: int) -> int:
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


@functools.cache
def _shared_memory_optin(device_id: int) -> int:
    """The most dynamic shared memory one block may opt in to (227 KiB on an H100 or H200)."""
    return cupy.cuda.runtime.getDeviceProperties(device_id)["sharedMemPerBlockOptin"]


@functools.cache
def _compiled(source: str, name: str):
    """Kernel ``name`` (a template instantiation such as ``"relu_backward<0>"``) of ``source``,
    compiled on first use. One instantiation per compile keeps the first call short: a module's
    every dtype and size variant would be compiled at once otherwise."""
    module = cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=[name])
    return module.get_function(name)


# --- cross-entropy gradient from a kept log-sum-exp (backward after forward) -----------------------

# dx_ic = alpha_i p_ic - beta_i [c = t_i] - gamma_i smooth_c, p_ic = exp(x_ic - lse_i):
# per-row values broadcast from (N, 1), per-class ones from (1, C); S is float32 or float64.
CROSS_ENTROPY_GRAD = (
    "T x, S lse, I t, S alpha, S beta, S gamma, S smooth, I c",
    "T dx",
    "S p = exp((S)x - lse); dx = (T)(alpha * p - (c == t ? beta : (S)0) - gamma * smooth);",
    "gpunet_cross_entropy_grad")


@functools.cache
def _cross_entropy_grad_kernel():
    return cupy.ElementwiseKernel(*CROSS_ENTROPY_GRAD)


def cross_entropy_grad(x, lse, t, alpha, beta, gamma, smooth):
    """One fused kernel: the gradient of the softmax cross-entropy from the kept log-sum-exp."""
    acc = lse.dtype
    n, c = x.shape

    def column(v):  # a per-row value (or a scalar) as an (N, 1) or 0-d operand
        v = cupy.asarray(v, dtype=acc)
        return v[:, None] if v.ndim == 1 else v

    smooth = cupy.asarray(0.0 if smooth is None else smooth, dtype=acc)
    if smooth.ndim:
        smooth = smooth[None, :]  # per class, (1, C)
    classes = cupy.arange(c, dtype=cupy.int64)[None, :]
    return _cross_entropy_grad_kernel()(
        x, lse[:, None], t.astype(cupy.int64, copy=False)[:, None], column(alpha), column(beta),
        column(gamma), smooth, classes)


# --- single-pass cross-entropy: loss and gradient in one launch -------------------------------------

CROSS_ENTROPY_SOURCE = _PRELUDE + r"""
// Reduction codes: 0 mean, 1 sum, 2 none.
template <int KIND>
struct CE {
    typedef typename Types<KIND>::acc S;
    typedef typename Types<KIND>::raw R;
    const R* x; const long long* t; const S* weight; R* grad; R* loss; S* partials;
    unsigned int* counter;
    long long n, c, ignore_index; S eps, grad_output; int reduction;
};

#define CE_PARAMS(KIND)                                                                        \
    const typename Types<KIND>::raw* x, const long long* t, const typename Types<KIND>::acc* weight, \
    typename Types<KIND>::raw* grad, typename Types<KIND>::raw* loss,                          \
    typename Types<KIND>::acc* partials, unsigned int* counter, long long n, long long c,       \
    long long ignore_index, typename Types<KIND>::acc eps, typename Types<KIND>::acc grad_output, \
    int reduction
#define CE_ARGS {x, t, weight, grad, loss, partials, counter, n, c, ignore_index, eps, grad_output, reduction}

// The denominator of "mean" (summed weights of kept rows), computed by every block so that no
// block waits for another; cheap for training batches (it reads N labels per block).
template <int KIND> __device__ typename CE<KIND>::S
inverse_denominator(const CE<KIND>& a, typename CE<KIND>::S* scratch) {
    typedef typename CE<KIND>::S S;
    S den = 0;
    for (long long i = threadIdx.x; i < a.n; i += blockDim.x) {
        long long t = a.t[i];
        if (t != a.ignore_index) den += a.weight ? a.weight[t] : (S)1;
    }
    den = block_sum(den, scratch);
    return den != 0 ? (S)1 / den : (S)0;
}

template <int KIND> __device__ typename CE<KIND>::S
weight_sum(const CE<KIND>& a, typename CE<KIND>::S* scratch) {
    typedef typename CE<KIND>::S S;
    if (!a.weight) return (S)a.c;
    S w = 0;
    for (long long j = threadIdx.x; j < a.c; j += blockDim.x) w += a.weight[j];
    return block_sum(w, scratch);
}

// One step of the online softmax: fold value v into the running (max, sum of exp(x - max)).
template <typename S> __device__ __forceinline__ void fold(S& m, S& s, S v) {
    if (v > m) { s = s * exp(m - v) + (S)1; m = v; }      // exp(-inf) = 0 for the first value
    else if (v == v) { if (m != -INFINITY) s += exp(v - m); }
    else { m = v; s = v; }                                // NaN poisons the row, as in numpy
}

// Merge the (max, sum) pairs of the threads that share a row (a warp, or a whole block).
template <typename S, bool BLOCK> __device__ __forceinline__ S row_lse(S m, S s, S* scratch) {
    warp_merge(m, s);
    if (BLOCK) {
        int w = threadIdx.x >> 5, warps = blockDim.x >> 5;
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { scratch[2 * w] = m; scratch[2 * w + 1] = s; }
        __syncthreads();
        m = -INFINITY; s = 0;
        for (int k = 0; k < warps; ++k) merge(m, s, scratch[2 * k], scratch[2 * k + 1]);
    }
    return (m == -INFINITY || m == INFINITY || m != m) ? m : m + log(s);
}

// The per-row factors of dx_c = alpha p_c - beta [c = t] - gamma smooth_c (see functional.py).
template <typename S> struct Row { long long ts; bool valid; S coef, alpha, beta, gamma; };

template <int KIND> __device__ __forceinline__ Row<typename CE<KIND>::S>
row_factors(const CE<KIND>& a, long long row, typename CE<KIND>::S scale, typename CE<KIND>::S w_sum) {
    typedef typename CE<KIND>::S S;
    Row<S> r;
    long long t = a.t[row];
    r.valid = t != a.ignore_index;
    r.ts = r.valid ? t : 0;
    S w_t = r.valid ? (a.weight ? a.weight[r.ts] : (S)1) : (S)0;
    r.coef = ((S)1 - a.eps) * w_t;
    S big_a = r.coef + (r.valid ? a.eps / (S)a.c * w_sum : (S)0);
    r.gamma = r.valid ? scale : (S)0;
    r.alpha = r.gamma * big_a;
    r.beta = r.gamma * r.coef;
    return r;
}

// dx for element j of the row (p_y - 1 is formed in S and rounded once, by the caller's store);
// adds w_j (lse - x_j), the element's share of the smoothing term of the loss, to `smooth`.
template <int KIND> __device__ __forceinline__ typename CE<KIND>::S
grad_value(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long j,
           typename CE<KIND>::S v, typename CE<KIND>::S lse, typename CE<KIND>::S& smooth) {
    typedef typename CE<KIND>::S S;
    S w_j = a.weight ? a.weight[j] : (S)1;
    if (a.eps != 0) smooth += w_j * (lse - v);
    return r.alpha * exp(v - lse) - (j == r.ts ? r.beta : (S)0) - r.gamma * (a.eps / (S)a.c) * w_j;
}

template <int KIND> __device__ __forceinline__ void
write_grad(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long base, long long j,
           typename CE<KIND>::S v, typename CE<KIND>::S lse, typename CE<KIND>::S& smooth) {
    store<KIND>(a.grad, base + j, grad_value(a, r, j, v, lse, smooth));
}

template <int KIND> __device__ __forceinline__ typename CE<KIND>::S
row_loss(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long base,
         typename CE<KIND>::S lse, typename CE<KIND>::S smooth) {
    typedef typename CE<KIND>::S S;
    if (!r.valid) return (S)0;
    return r.coef * (lse - load<KIND>(a.x, base + r.ts)) + a.eps / (S)a.c * smooth;
}

// Sum the blocks' partial losses in a fixed order once the last block is done; reset the counter
// so that the next launch (or graph replay) starts from zero.
template <int KIND> __device__ void
finish(const CE<KIND>& a, typename CE<KIND>::S block_total, typename CE<KIND>::S inv_den,
       typename CE<KIND>::S* scratch) {
    typedef typename CE<KIND>::S S;
    __shared__ bool last;
    block_total = block_sum(block_total, scratch);
    if (threadIdx.x == 0) {
        a.partials[blockIdx.x] = block_total;
        __threadfence();
        last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    S total = 0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += ((volatile S*)a.partials)[b];
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) {
        store<KIND>(a.loss, 0, a.reduction == 0 ? total * inv_den : total);
        *a.counter = 0;
    }
}

#define CE_PROLOGUE                                                                            \
    typedef typename CE<KIND>::S S;                                                            \
    const CE<KIND> a = CE_ARGS;                                                                \
    __shared__ S scratch[64];                                                                  \
    const S inv_den = a.reduction == 0 ? inverse_denominator(a, scratch) : (S)1;              \
    const S w_sum = a.eps != 0 ? weight_sum(a, scratch) : (S)0;                              \
    const S scale = a.grad_output * inv_den;                                                   \
    S block_total = 0;

// Small C: one warp per row, blockDim.x / 32 rows at a time, grid-stride over rows. Two reads
// of a short row, the second from L1.
template <int KIND> __global__ void ce_warp_rows(CE_PARAMS(KIND)) {
    CE_PROLOGUE
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5); row < a.n;
         row += (long long)gridDim.x * warps) {
        const long long base = row * a.c;
        S m = -INFINITY, s = 0;
        for (long long j = lane; j < a.c; j += 32) fold(m, s, load<KIND>(a.x, base + j));
        const S lse = row_lse<S, false>(m, s, scratch);
        const Row<S> r = row_factors(a, row, scale, w_sum);
        S smooth = 0;
        for (long long j = lane; j < a.c; j += 32) write_grad(a, r, base, j, load<KIND>(a.x, base + j), lse, smooth);
        if (a.eps != 0) smooth = warp_sum(smooth);
        if (lane == 0) {
            S l = row_loss(a, r, base, lse, smooth);
            if (a.reduction == 2) store<KIND>(a.loss, row, l); else block_total += l;
        }
    }
    if (a.reduction != 2) finish(a, block_total, inv_den, scratch);
}

// Large C: one block per row, the row held in registers (VPT values per thread), so the logits
// are read from memory exactly once and the gradient written once.
template <int KIND, int VPT> __global__ void __launch_bounds__(512) ce_block_rows(CE_PARAMS(KIND)) {
    CE_PROLOGUE
    S v[VPT];
    for (long long row = blockIdx.x; row < a.n; row += gridDim.x) {
        const long long base = row * a.c;
        S m = -INFINITY, s = 0;
        #pragma unroll
        for (int k = 0; k < VPT; ++k) {
            long long j = threadIdx.x + (long long)k * blockDim.x;
            v[k] = j < a.c ? load<KIND>(a.x, base + j) : (S)-INFINITY;
        }
        // The values are in registers, so max first and then the sum: no rescaling per value.
        #pragma unroll
        for (int k = 0; k < VPT; ++k) m = (v[k] > m || v[k] != v[k]) ? v[k] : m;
        if (m != -INFINITY) {
            #pragma unroll
            for (int k = 0; k < VPT; ++k) s += exp(v[k] - m);
        }
        const S lse = row_lse<S, true>(m, s, scratch);
        const Row<S> r = row_factors(a, row, scale, w_sum);
        S smooth = 0;
        #pragma unroll
        for (int k = 0; k < VPT; ++k) {
            long long j = threadIdx.x + (long long)k * blockDim.x;
            if (j < a.c) write_grad(a, r, base, j, v[k], lse, smooth);
        }
        if (a.eps != 0) smooth = block_sum(smooth, scratch);
        if (threadIdx.x == 0) {
            S l = row_loss(a, r, base, lse, smooth);
            if (a.reduction == 2) store<KIND>(a.loss, row, l); else block_total += l;
        }
        __syncthreads();  // scratch is reused by the next row
    }
    if (a.reduction != 2) finish(a, block_total, inv_den, scratch);
}

// Rows too long for registers: one block per row, staged in shared memory (in the storage type),
// so the logits leave memory exactly once. Rows whose bytes are 16-byte aligned move in 16-byte
// vectors with several loads in flight per thread: with one such block per multiprocessor, that
// is what keeps enough bytes in flight to approach the copy bandwidth.
template <int KIND> __global__ void __launch_bounds__(512) ce_block_rows_smem(CE_PARAMS(KIND)) {
    CE_PROLOGUE
    typedef typename Types<KIND>::raw R;
    constexpr int E = 16 / sizeof(R);  // elements per 16-byte vector
    extern __shared__ __align__(16) unsigned char staged_bytes[];
    R* staged = (R*)staged_bytes;
    const bool vec = ((reinterpret_cast<size_t>(a.x) | reinterpret_cast<size_t>(a.grad)
                       | (size_t)(a.c * sizeof(R))) & 15) == 0;
    const long long n_vec = vec ? a.c / E : 0;
    for (long long row = blockIdx.x; row < a.n; row += gridDim.x) {
        const long long base = row * a.c;
        const uint4* src = (const uint4*)(a.x + base);
        #pragma unroll 4
        for (long long i = threadIdx.x; i < n_vec; i += blockDim.x) ((uint4*)staged)[i] = src[i];
        for (long long j = n_vec * E + threadIdx.x; j < a.c; j += blockDim.x) staged[j] = a.x[base + j];
        __syncthreads();
        S m = -INFINITY, s = 0;
        for (long long j = threadIdx.x; j < a.c; j += blockDim.x) fold(m, s, load<KIND>(staged, j));
        const S lse = row_lse<S, true>(m, s, scratch);
        const Row<S> r = row_factors(a, row, scale, w_sum);
        S smooth = 0;
        for (long long i = threadIdx.x; i < n_vec; i += blockDim.x) {
            union { uint4 vector; R raw[E]; } out;
            #pragma unroll
            for (int e = 0; e < E; ++e) {
                long long j = i * E + e;
                store<KIND>(out.raw, e, grad_value(a, r, j, load<KIND>(staged, j), lse, smooth));
            }
            ((uint4*)(a.grad + base))[i] = out.vector;
        }
        for (long long j = n_vec * E + threadIdx.x; j < a.c; j += blockDim.x)
            write_grad(a, r, base, j, load<KIND>(staged, j), lse, smooth);
        if (a.eps != 0) smooth = block_sum(smooth, scratch);
        if (threadIdx.x == 0) {
            S l = row_loss(a, r, base, lse, smooth);
            if (a.reduction == 2) store<KIND>(a.loss, row, l); else block_total += l;
        }
        __syncthreads();  // scratch and staged are reused by the next row
    }
    if (a.reduction != 2) finish(a, block_total, inv_den, scratch);
}

// Rows too long even for shared memory: read twice, the second time mostly from L2.
template <int KIND> __global__ void __launch_bounds__(512) ce_block_rows_long(CE_PARAMS(KIND)) {
    CE_PROLOGUE
    for (long long row = blockIdx.x; row < a.n; row += gridDim.x) {
        const long long base = row * a.c;
        S m = -INFINITY, s = 0;
        for (long long j = threadIdx.x; j < a.c; j += blockDim.x) fold(m, s, load<KIND>(a.x, base + j));
        const S lse = row_lse<S, true>(m, s, scratch);
        const Row<S> r = row_factors(a, row, scale, w_sum);
        S smooth = 0;
        for (long long j = threadIdx.x; j < a.c; j += blockDim.x)
            write_grad(a, r, base, j, load<KIND>(a.x, base + j), lse, smooth);
        if (a.eps != 0) smooth = block_sum(smooth, scratch);
        if (threadIdx.x == 0) {
            S l = row_loss(a, r, base, lse, smooth);
            if (a.reduction == 2) store<KIND>(a.loss, row, l); else block_total += l;
        }
        __syncthreads();
    }
    if (a.reduction != 2) finish(a, block_total, inv_den, scratch);
}
"""

_BLOCK_THREADS = 512
# Values per thread held in registers, C up to 512 * VPT; beyond 16 (8 for doubles) they spill.
_VPT_CHOICES = (4, 8, 16)


def _max_vpt(kind: int) -> int:
    return 8 if kind == 1 else 16


CROSS_ENTROPY_ENTRIES = ([f"ce_warp_rows<{k}>" for k in range(4)]
               + [f"ce_block_rows<{k}, {v}>" for k in range(4) for v in _VPT_CHOICES if v <= _max_vpt(k)]
               + [f"ce_block_rows_smem<{k}>" for k in range(4)]
               + [f"ce_block_rows_long<{k}>" for k in range(4)])
_WARP_ROWS_MAX_C = 2048  # above this a row gets a whole block
_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


@functools.cache
def _ce_counter(device_id: int, stream_ptr: int):
    # One ticket counter per device and stream; the last block of every launch resets it to 0.
    return cupy.zeros(1, dtype=cupy.uint32)


_NULL = np.uint64(0)  # a null pointer argument (8 bytes, like a device pointer)


def cross_entropy_loss_and_grad(plan, grad_output=1.0):
    """(loss, dL/dlogits) for class-index targets in one kernel launch: one read of the logits
    for the row statistics, one more (from cache) for the gradient, one write of the gradient."""
    if hasattr(grad_output, "ndim") and grad_output.ndim:
        raise ValueError("the single-pass cross-entropy takes a scalar grad_output")
    x = cupy.ascontiguousarray(plan.logits)
    n, c = x.shape
    kind = _kind(x.dtype)
    t = cupy.ascontiguousarray(plan.target.astype(cupy.int64, copy=False))
    weight = None if plan.weight is None else \
        cupy.ascontiguousarray(plan.weight.astype(_acc_dtype(x.dtype), copy=False))
    grad = cupy.empty_like(x)
    loss = cupy.empty((n,) if plan.reduction == "none" else (), dtype=x.dtype)
    if n == 0:
        loss.fill(0)
        return loss, grad
    device = x.device.id
    shared = 0
    if c <= _WARP_ROWS_MAX_C:
        name, threads, rows_per_block = f"ce_warp_rows<{kind}>", 256, 8
    else:
        threads, rows_per_block = _BLOCK_THREADS, 1
        vpt = next((v for v in _VPT_CHOICES if v <= _max_vpt(kind) and c <= v * threads), None)
        if vpt:
            name = f"ce_block_rows<{kind}, {vpt}>"
        elif c * x.itemsize <= _shared_memory_optin(device) - 2048:  # room for the static scratch
            name, shared = f"ce_block_rows_smem<{kind}>", c * x.itemsize
        else:
            name = f"ce_block_rows_long<{kind}>"
    blocks = int(min(-(-n // rows_per_block), 4 * _multiprocessors(device)))
    partials = cupy.empty(blocks, dtype=_acc_dtype(x.dtype))
    counter = _ce_counter(device, cupy.cuda.get_current_stream().ptr)
    scalar = _acc_dtype(x.dtype)
    kernel = _compiled(CROSS_ENTROPY_SOURCE, name)
    if shared:
        kernel.max_dynamic_shared_size_bytes = shared  # opt in beyond the default 48 KiB
    kernel((blocks,), (threads,), (
        x, t, _NULL if weight is None else weight, grad, loss, partials, counter, np.int64(n),
        np.int64(c), np.int64(plan.ignore_index), scalar(plan.eps), scalar(float(grad_output)),
        np.int32(_REDUCTIONS[plan.reduction])), shared_mem=shared)
    return loss, grad


# --- Dense + ReLU ----------------------------------------------------------------------------------

# y = relu(y + b); `v < 0` rather than max() so that NaN passes through, as numpy's maximum does.
BIAS_RELU = ("T b", "T y", "T v = y + b; y = v < (T)0 ? (T)0 : v;", "gpunet_bias_relu")


@functools.cache
def _bias_relu_kernel():
    return cupy.ElementwiseKernel(*BIAS_RELU)


def bias_relu_(y, b):
    """y = max(y + b, 0) in place, one launch instead of two."""
    _bias_relu_kernel()(b, y)
    return y


# dz = dy where y > 0, and the bias gradient db = the column sums of dz. A block owns 32 columns;
# its 8 warps take every 8th row (32 consecutive columns per warp: coalesced), and the 8 partial
# sums of each column are added in a fixed order, so db is deterministic.
RELU_BACKWARD_SOURCE = _PRELUDE + r"""
template <int KIND> __global__ void relu_backward(
        const typename Types<KIND>::raw* dy, const typename Types<KIND>::raw* y,
        typename Types<KIND>::raw* dz, typename Types<KIND>::raw* db, long long n, long long c) {
    typedef typename Types<KIND>::acc S;
    __shared__ S partial[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (long long tile = blockIdx.x; tile * 32 < c; tile += gridDim.x) {
        const long long j = tile * 32 + lane;
        S total = 0;
        if (j < c) {
            for (long long i = warp; i < n; i += 8) {
                S g = load<KIND>(y, i * c + j) > 0 ? load<KIND>(dy, i * c + j) : (S)0;
                store<KIND>(dz, i * c + j, g);
                total += g;
            }
        }
        partial[warp][lane] = total;
        __syncthreads();
        if (warp == 0 && db && j < c) {
            S sum = 0;
            for (int w = 0; w < 8; ++w) sum += partial[w][lane];
            store<KIND>(db, j, sum);
        }
        __syncthreads();
    }
}
"""
RELU_BACKWARD_ENTRIES = [f"relu_backward<{k}>" for k in range(4)]


def relu_backward(dy, y, out, bias_grad=None):
    """out = dy * (y > 0) and, if given, bias_grad = out.sum(axis=0), in one launch."""
    dy, y = cupy.ascontiguousarray(dy), cupy.ascontiguousarray(y)
    n, c = y.shape
    blocks = max(1, min(-(-c // 32), 8 * _multiprocessors(y.device.id)))
    kernel = _compiled(RELU_BACKWARD_SOURCE, f"relu_backward<{_kind(y.dtype)}>")
    kernel((blocks,), (256,), (dy, y, out, _NULL if bias_grad is None else bias_grad,
                               np.int64(n), np.int64(c)))
    return out


# One thread per row: argmax (the first maximum, NaN counting as the maximum like numpy's) and a
# comparison with the label; integer atomics, so the count is exact.
COUNT_CORRECT_SOURCE = _PRELUDE + r"""
template <int KIND> __global__ void count_correct(
        const typename Types<KIND>::raw* x, const long long* y, unsigned long long* out,
        long long n, long long c) {
    typedef typename Types<KIND>::acc S;
    unsigned long long mine = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long best = 0;
        S top = load<KIND>(x, i * c);
        for (long long j = 1; j < c && top == top; ++j) {
            S v = load<KIND>(x, i * c + j);
            if (v > top || v != v) { top = v; best = j; }
        }
        mine += best == y[i];
    }
    if (mine) atomicAdd(out, mine);
}
"""
COUNT_CORRECT_ENTRIES = [f"count_correct<{k}>" for k in range(4)]


def count_correct(logits, labels, out):
    """out += number of rows whose argmax equals the label (out: a uint64 device scalar)."""
    x = cupy.ascontiguousarray(logits)
    n, c = x.shape
    if n == 0:
        return out
    threads = 256
    blocks = max(1, min(-(-n // threads), 4 * _multiprocessors(x.device.id)))
    kernel = _compiled(COUNT_CORRECT_SOURCE, f"count_correct<{_kind(x.dtype)}>")
    kernel((blocks,), (threads,), (x, cupy.ascontiguousarray(labels.astype(cupy.int64, copy=False)),
                                   out, np.int64(n), np.int64(c)))
    return out


# --- optimizers: one kernel per step over the flat parameter buffer --------------------------------

OPTIM_SOURCE = r"""
template <typename S> __device__ __forceinline__ void sgd_one(
        S& p, S g, S& buf, S lr, S momentum, S dampening, S weight_decay, bool nesterov, bool first) {
    S d = g + weight_decay * p;
    if (momentum != 0) {
        buf = first ? d : momentum * buf + (1 - dampening) * d;
        d = nesterov ? d + momentum * buf : buf;
    }
    p -= lr * d;
}

template <typename S> __device__ __forceinline__ void adam_one(
        S& p, S g, S& m, S& v, S lr, S b1, S b2, S eps, S weight_decay, bool decoupled,
        S bc1, S bc2_sqrt) {
    if (decoupled) p *= 1 - lr * weight_decay;
    else g += weight_decay * p;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    p -= lr / bc1 * m / (sqrt(v) / bc2_sqrt + eps);
}

// Eager steps pass the learning rate and the step count by value. A captured CUDA graph passes
// `counters` = {optimizer steps taken so far, batch index in this epoch} on the device and a
// per-epoch table of learning rates indexed by the batch, so that replays need nothing from the
// host: that is how a schedule changes the rate without a re-capture.
template <typename S> __global__ void sgd(
        S* p, const S* g, S* buf, long long n, S lr, const S* lr_table, const long long* counters,
        long long steps_taken, S momentum, S dampening, S weight_decay, bool nesterov) {
    const long long t = counters ? counters[0] : steps_taken;
    const S rate = counters ? lr_table[counters[1]] : lr;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        S pi = p[i], bi = buf[i];
        sgd_one(pi, g[i], bi, rate, momentum, dampening, weight_decay, nesterov, t == 0);
        p[i] = pi; buf[i] = bi;
    }
}

template <typename S> __global__ void adam(
        S* p, const S* g, S* m, S* v, long long n, S lr, const S* lr_table, const long long* counters,
        long long steps_taken, S b1, S b2, S eps, S weight_decay, bool decoupled) {
    const long long t = (counters ? counters[0] : steps_taken) + 1;  // Adam counts from 1
    const S rate = counters ? lr_table[counters[1]] : lr;
    const S bc1 = 1 - pow(b1, (S)t), bc2_sqrt = sqrt(1 - pow(b2, (S)t));
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        S pi = p[i], mi = m[i], vi = v[i];
        adam_one(pi, g[i], mi, vi, rate, b1, b2, eps, weight_decay, decoupled, bc1, bc2_sqrt);
        p[i] = pi; m[i] = mi; v[i] = vi;
    }
}
"""


OPTIM_ENTRIES = ["sgd<float>", "sgd<double>", "adam<float>", "adam<double>"]


def _launch_shape(n: int, device_id: int):
    threads = 256
    return (max(1, min(-(-n // threads), 8 * _multiprocessors(device_id))),), (threads,)


def optimizer_update(opt, lr_table=None, counters=None) -> None:
    """One fused update of every parameter of ``opt`` (an SGD or Adam), in place.

    Eagerly (the default) the learning rate and step count come from ``opt``, whose ``step()``
    has already counted this step. With ``lr_table`` and ``counters`` (device arrays, see the
    kernel source) they are read on the device, as a captured CUDA graph needs.
    """
    from .optim import SGD, Adam

    p, g = opt.data, opt.grad
    if p.dtype not in (np.float32, np.float64):
        raise TypeError(f"the fused optimizer update takes float32 or float64 parameters, got {p.dtype}")
    scalar = p.dtype.type
    name = "float" if p.dtype == np.float32 else "double"
    grid, block = _launch_shape(p.size, p.device.id)
    table = _NULL if lr_table is None else lr_table
    device_counters = _NULL if counters is None else counters
    steps_taken = np.int64(opt.step_count - 1)  # step() counted this one already
    if isinstance(opt, SGD):
        buf = opt.state.get("momentum_buffer", opt._scratch)  # unused without momentum
        _compiled(OPTIM_SOURCE, f"sgd<{name}>")(grid, block, (
            p, g, buf, np.int64(p.size), scalar(opt.lr), table, device_counters, steps_taken,
            scalar(opt.momentum), scalar(opt.dampening), scalar(opt.weight_decay),
            np.bool_(opt.nesterov)))
    elif isinstance(opt, Adam):
        b1, b2 = opt.betas
        _compiled(OPTIM_SOURCE, f"adam<{name}>")(grid, block, (
            p, g, opt.state["exp_avg"], opt.state["exp_avg_sq"], np.int64(p.size), scalar(opt.lr),
            table, device_counters, steps_taken, scalar(b1), scalar(b2), scalar(opt.eps),
            scalar(opt.weight_decay), np.bool_(opt.decoupled)))
    else:  # an optimizer of the user's own: its NumPy-style update runs on cupy as well
        opt._update()


# --- pieces of a captured training step -------------------------------------------------------------

STEP_SOURCE = _PRELUDE + r"""
// xb[r] = x[order[batch * batch_size + r]] (and the labels), with the batch index read on the
// device, so that a captured graph gathers a different batch at every replay.
template <typename R> __global__ void gather_batch(
        const R* x, const long long* y, const long long* order, const long long* counters,
        R* xb, long long* yb, long long rows, long long features, long long batch_size) {
    const long long first = counters[1] * batch_size;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < rows * features;
         e += (long long)gridDim.x * blockDim.x) {
        long long r = e / features, f = e - r * features;
        long long source = order[first + r];
        xb[e] = x[source * features + f];
        if (f == 0) yb[r] = y[source];
    }
}

// losses[batch] = loss, then both counters move on: the last kernel of every step.
template <int KIND> __global__ void finish_step(
        const typename Types<KIND>::raw* loss, double* losses, long long* counters) {
    losses[counters[1]] = (double)load<KIND>(loss, 0);
    counters[0] += 1;
    counters[1] += 1;
}
"""
STEP_ENTRIES = (["gather_batch<float>", "gather_batch<double>", "gather_batch<unsigned short>"]
                + [f"finish_step<{k}>" for k in range(4)])
_RAW_NAME = {4: "float", 8: "double", 2: "unsigned short"}


def gather_batch(x, y, order, counters, xb, yb, batch_size: int) -> None:
    """xb, yb = the rows of (x, y) that batch ``counters[1]`` of ``order`` names."""
    rows, features = xb.shape
    grid, block = _launch_shape(rows * features, x.device.id)
    kernel = _compiled(STEP_SOURCE, f"gather_batch<{_RAW_NAME[x.itemsize]}>")
    kernel(grid, block, (x, y, order, counters, xb, yb, np.int64(rows), np.int64(features),
                         np.int64(batch_size)))


def finish_step(loss, losses, counters) -> None:
    _compiled(STEP_SOURCE, f"finish_step<{_kind(loss.dtype)}>")((1,), (1,), (loss, losses, counters))


# --- matrix products that a CUDA graph can capture --------------------------------------------------
#
# CuPy refuses cuBLAS calls while a stream is being captured (cupy issue 6290), because some
# cuBLAS routines synchronise or allocate. A plain GEMM does neither once cuBLAS has a workspace
# of its own (cublasSetWorkspace) and reads alpha and beta from host memory at capture time,
# which is what the NVIDIA documentation asks for graph capture. So, while capturing, gpunet
# calls cuBLAS itself through CuPy's low-level binding, on the capturing stream; outside a capture
# it uses cupy.matmul. We chose this over GEMM kernels of our own: cuBLAS is faster on every
# shape, and the same library computes both the eager and the captured products.

_WORKSPACE_BYTES = 32 << 20
_ONE = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.zeros(1, np.float32), np.dtype(np.float64): np.zeros(1, np.float64)}
_CUDA_DATA_TYPE = {np.dtype(np.float16): 2}  # CUDA_R_16F; bfloat16 (CUDA_R_16BF) is 14
_CUBLAS_COMPUTE_32F = 68


@functools.cache
def _cublas_handle(device_id: int):
    """A cuBLAS handle of gpunet's own for captured products, with a workspace that outlives
    every graph. Its own, not CuPy's: a workspace must not be shared by work on two streams,
    and CuPy's handle serves every stream."""
    from cupy_backends.cuda.libs import cublas

    with cupy.cuda.Device(device_id):
        handle = cublas.create()
        workspace = cupy.empty(_WORKSPACE_BYTES, dtype=cupy.uint8)
    if hasattr(cublas, "setWorkspace"):
        cublas.setWorkspace(handle, workspace.data.ptr, _WORKSPACE_BYTES)
    return handle, workspace


def is_capturing() -> bool:
    return cupy.cuda.get_current_stream().is_capturing()


def matmul(a, b, out=None):
    """a @ b for 2-D arrays, also while a CUDA graph is being captured."""
    if not is_capturing():
        return cupy.matmul(a, b, out=out)
    from cupy_backends.cuda.libs import cublas

    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = cupy.empty((m, n), dtype=a.dtype)
    # Row-major C = A @ B is column-major C^T = B^T A^T: cuBLAS gets B first. A C-contiguous
    # operand is already its own transpose in column-major terms; an F-contiguous one (a .T view)
    # is passed with the transpose flag.
    a, b = (v if v.flags.c_contiguous or v.flags.f_contiguous else cupy.ascontiguousarray(v)
            for v in (a, b))
    op_b, ld_b = (cublas.CUBLAS_OP_N, n) if b.flags.c_contiguous else (cublas.CUBLAS_OP_T, k)
    op_a, ld_a = (cublas.CUBLAS_OP_N, k) if a.flags.c_contiguous else (cublas.CUBLAS_OP_T, m)
    handle, _ = _cublas_handle(a.device.id)
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    dtype = np.dtype(a.dtype)
    if dtype in _ONE:
        gemm = cublas.sgemm if dtype == np.float32 else cublas.dgemm
        gemm(handle, op_b, op_a, n, m, k, _ONE[dtype].ctypes.data, b.data.ptr, ld_b, a.data.ptr,
             ld_a, _ZERO[dtype].ctypes.data, out.data.ptr, n)
    else:  # half precision: float32 accumulation
        data_type = _CUDA_DATA_TYPE.get(dtype, 14)
        one, zero = _ONE[np.dtype(np.float32)], _ZERO[np.dtype(np.float32)]
        cublas.gemmEx(handle, op_b, op_a, n, m, k, one.ctypes.data, b.data.ptr, data_type, ld_b,
                      a.data.ptr, data_type, ld_a, zero.ctypes.data, out.data.ptr, data_type, n,
                      _CUBLAS_COMPUTE_32F, -1)
    return out
