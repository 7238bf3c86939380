"""CUDA kernels: the fast paths of gpunet's formulas on CuPy arrays.

Every kernel here is the twin of a NumPy formula elsewhere in gpunet, which stays the reference:

    cross_entropy_grad          functional.cross_entropy_grad_reference
    cross_entropy_loss_and_grad functional._CrossEntropyPlan.loss_and_grad (numpy branch)
    bias_relu_, relu_backward   functional.bias_relu_, functional.relu_backward
    count_correct               functional.count_correct
    dropout                     dropout.counter_mask (and counter_words)
    optimizer_update            optim.SGD._update, optim.Adam._update

Kernels are built by small memoized factories on first use, never at import, so each compiles
once per process, one template instantiation at a time. CuPy also caches the compiled binaries on
disk (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``): only the first use on a machine pays the
NVRTC compile (not yet measured on a GPU; NVRTC 13.5 takes 0.05-0.45 s per instantiation on a
2-core CPU), and later processes load the cached binary. tests/test_kernels_cuda_compile.py compiles
every instantiation exactly as CuPy will, with no GPU.

Reductions accumulate in float32 for float16/bfloat16/float32 inputs and in float64 for float64;
half-precision values are converted with exact bit operations (bfloat16) or the PTX ``cvt``
instruction (float16, with an integer twin for the CPU), so the sources need no CUDA headers:
NVRTC compiles them with none.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from ..backend import add_into
from . import cublas

try:
    import cupy
except ImportError:  # the sources and launch configurations stay importable for tests
    cupy = None

# --- shared device code ----------------------------------------------------------------------------

# Storage kinds: 0 float32, 1 float64, 2 float16, 3 bfloat16. Half kinds travel as raw 16 bits.
_KIND = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}

_PRELUDE = r"""
// NVRTC compiles these sources with no header at all (nvcc would bring math.h): the one macro
// they need from it, as the float bit pattern of +inf.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

template <int KIND> struct Types { typedef float acc; typedef float raw; };
template <> struct Types<1> { typedef double acc; typedef double raw; };
template <> struct Types<2> { typedef float acc; typedef unsigned short raw; };
template <> struct Types<3> { typedef float acc; typedef unsigned short raw; };

// float16 <-> float32. On the GPU one PTX cvt each (round to nearest even); elsewhere (the CPU
// harness in tests/) the same IEEE conversion in integer arithmetic, which tests hold equal to
// numpy's float16 casts. A NaN stays a NaN (as a half, the canonical 0x7fff).
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, em = h & 0x7fffu;
    if (em >= 0x7c00u) return __uint_as_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
    if (em >= 0x0400u) return __uint_as_float(sign | ((em << 13) + 0x38000000u));  // normal
    return __uint_as_float(sign | __float_as_uint((float)em * 5.9604644775390625e-8f));  // 2^-24
#endif
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int u = __float_as_uint(f);
    const unsigned int sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return 0x7fffu;                              // NaN
    if (u >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);    // rounds past 65504: inf
    if (u >= 0x38800000u) {                                           // a normal half
        u += 0xc8000fffu + ((u >> 13) & 1u);                          // rebias, round to even
        return (unsigned short)(sign | (u >> 13));
    }
    if (u < 0x33000000u) return (unsigned short)sign;                 // below half the least subnormal
    // A subnormal half, h * 2^-24: the 24-bit mantissa shifted right, rounded to nearest even.
    const unsigned int shift = 126u - (u >> 23), mantissa = (u & 0x7fffffu) | 0x800000u;
    unsigned int h = mantissa >> shift;
    const unsigned int rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
#endif
}

template <int KIND> __device__ __forceinline__
typename Types<KIND>::acc load(const typename Types<KIND>::raw* p, long long i) {
    if constexpr (KIND == 2) {
        return half_bits_to_float(p[i]);
    } else if constexpr (KIND == 3) {
        return __uint_as_float(((unsigned int)p[i]) << 16);
    } else {
        return p[i];
    }
}

template <int KIND> __device__ __forceinline__
void store(typename Types<KIND>::raw* p, long long i, typename Types<KIND>::acc v) {
    if constexpr (KIND == 2) {
        p[i] = float_to_half_bits(v);
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

// Combine two (max, sum of exp(x - max)) pairs: the online-softmax step. A NaN max wins either
// way round, so that a NaN is never dropped for an empty (all -inf) partner.
template <typename S> __device__ __forceinline__ void merge(S& m, S& s, S m2, S s2) {
    S mx = (m > m2 || m != m) ? m : m2;
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


# --- launch configurations ---------------------------------------------------------------------------
#
# Which kernel, how many blocks of how many threads, and how much dynamic shared memory: pure
# functions of the shapes and of two facts about the GPU, with no cupy in them. The GPU launch,
# the NVRTC compile tests (tests/test_kernels_cuda_compile.py) and the CPU harness all ask these same
# functions, so none of them restates a launch configuration.

@dataclass(frozen=True)
class DeviceFacts:
    """What the launch configurations depend on."""

    multiprocessors: int
    shared_memory_optin: int  # the most dynamic shared memory one block may opt in to, in bytes


# An H100 or H200: 132 multiprocessors, 227 KiB of shared memory per block. For tests.
HOPPER = DeviceFacts(multiprocessors=132, shared_memory_optin=227 * 1024)


@dataclass(frozen=True)
class Launch:
    kernel: str  # the template instantiation, as CuPy's name_expressions name it
    grid: int
    block: int
    shared_mem: int = 0  # dynamic shared memory, bytes


@functools.cache
def device_facts(device_id: int) -> DeviceFacts:
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return DeviceFacts(props["multiProcessorCount"], props["sharedMemPerBlockOptin"])


def grid_stride(elements: int, facts: DeviceFacts, threads: int = 256, per_sm: int = 8) -> tuple:
    """(blocks, threads) for a grid-stride loop over ``elements``: enough blocks to fill the GPU,
    never more than there is work for."""
    return max(1, min(-(-elements // threads), per_sm * facts.multiprocessors)), threads


COMPILE_OPTIONS = ("-std=c++17",)


@functools.cache
def _compiled(source: str, name: str):
    """Kernel ``name`` (a template instantiation such as ``"relu_backward<0>"``) of ``source``,
    compiled on first use. One instantiation per compile keeps the first call short: a module's
    every dtype and size variant would be compiled at once otherwise."""
    module = cupy.RawModule(code=source, options=COMPILE_OPTIONS, name_expressions=[name])
    return module.get_function(name)


def _launch(source: str, launch: Launch, args: tuple) -> None:
    kernel = _compiled(source, launch.kernel)
    if launch.shared_mem > 48 * 1024:  # beyond the default, a block must opt in
        kernel.max_dynamic_shared_size_bytes = launch.shared_mem
    kernel((launch.grid,), (launch.block,), args, shared_mem=launch.shared_mem)


def _require(array, name: str, shape=None, dtype=None) -> None:
    """Raise unless ``array`` is C-contiguous, of ``shape`` and ``dtype``: what a kernel that
    indexes raw memory assumes of an array it writes."""
    problems = []
    if shape is not None and tuple(array.shape) != tuple(shape):
        problems.append(f"shape {tuple(shape)}, got {tuple(array.shape)}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        problems.append(f"dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        problems.append("a C-contiguous array, got a strided one")
    if problems:
        raise ValueError(f"{name} must have " + " and ".join(problems))


# --- cross-entropy gradient from a kept log-sum-exp (backward after forward) -----------------------

# dx_ic = alpha_i p_ic - beta_i [c = t_i] - gamma_i smooth_c, p_ic = exp((x_ic - m_i) - log_sum_i),
# the log-sum-exp kept in its two parts, max first (functional.LogSumExp); per-row values
# broadcast from (N, 1), per-class ones from (1, C); S is float32 or float64.
CROSS_ENTROPY_GRAD = (
    "T x, S m, S log_sum, I t, S alpha, S beta, S gamma, S smooth, I c",
    "T dx",
    "S p = exp(((S)x - m) - log_sum); "
    "dx = (T)(alpha * p - (c == t ? beta : (S)0) - gamma * smooth);",
    "gpunet_cross_entropy_grad")


@functools.cache
def _cross_entropy_grad_kernel():
    return cupy.ElementwiseKernel(*CROSS_ENTROPY_GRAD)


def cross_entropy_grad(x, m, log_sum, t, alpha, beta, gamma, smooth):
    """One fused kernel: the gradient of the softmax cross-entropy from the kept log-sum-exp."""
    return _cross_entropy_grad_kernel()(
        *cross_entropy_grad_operands(cupy, x, m, log_sum, t, alpha, beta, gamma, smooth))


def cross_entropy_grad_operands(xp, x, m, log_sum, t, alpha, beta, gamma, smooth) -> tuple:
    """CROSS_ENTROPY_GRAD's inputs, in order, as arrays of ``xp`` that broadcast to x's shape
    (cupy for the GPU; numpy for the CPU harness in tests/simt)."""
    acc = m.dtype
    n, c = x.shape

    def column(v):  # a per-row value (or a scalar) as an (N, 1) or 0-d operand
        v = xp.asarray(v, dtype=acc)
        return v[:, None] if v.ndim == 1 else v

    smooth = xp.asarray(0.0 if smooth is None else smooth, dtype=acc)
    if smooth.ndim:
        smooth = smooth[None, :]  # per class, (1, C)
    classes = xp.arange(c, dtype=xp.int64)[None, :]
    return (x, m[:, None], log_sum[:, None], t.astype(xp.int64, copy=False)[:, None],
            column(alpha), column(beta), column(gamma), smooth, classes)


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

// A row's log-sum-exp kept as max and log(sum of exp(x - max)), never added up: log p_j is
// (x_j - max) - log_sum, which stays exact to float rounding however large the logits are
// (m + log(s) rounded first would cost 5e-4 relative at an offset of 1e4 in float32). A row
// whose max is not finite (all -inf, an inf, a NaN) keeps log_sum = 0, and its log p = x - max.
template <typename S> struct Lse {
    S m, log_sum;
    __device__ __forceinline__ S log_prob(S v) const { return (v - m) - log_sum; }
};

// Merge the (max, sum) pairs of the threads that share a row (a warp, or a whole block).
template <typename S, bool BLOCK> __device__ __forceinline__ Lse<S> row_lse(S m, S s, S* scratch) {
    warp_merge(m, s);
    if (BLOCK) {
        int w = threadIdx.x >> 5, warps = blockDim.x >> 5;
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { scratch[2 * w] = m; scratch[2 * w + 1] = s; }
        __syncthreads();
        m = -INFINITY; s = 0;
        for (int k = 0; k < warps; ++k) merge(m, s, scratch[2 * k], scratch[2 * k + 1]);
    }
    Lse<S> l;
    l.m = m;
    l.log_sum = (m == -INFINITY || m == INFINITY || m != m) ? (S)0 : log(s);
    return l;
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
// adds w_j (lse - x_j) = -w_j log p_j, the element's share of the smoothing term, to `smooth`.
template <int KIND> __device__ __forceinline__ typename CE<KIND>::S
grad_value(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long j,
           typename CE<KIND>::S v, const Lse<typename CE<KIND>::S>& lse, typename CE<KIND>::S& smooth) {
    typedef typename CE<KIND>::S S;
    S w_j = a.weight ? a.weight[j] : (S)1;
    const S log_p = lse.log_prob(v);
    if (a.eps != 0) smooth -= w_j * log_p;
    return r.alpha * exp(log_p) - (j == r.ts ? r.beta : (S)0) - r.gamma * (a.eps / (S)a.c) * w_j;
}

template <int KIND> __device__ __forceinline__ void
write_grad(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long base, long long j,
           typename CE<KIND>::S v, const Lse<typename CE<KIND>::S>& lse, typename CE<KIND>::S& smooth) {
    store<KIND>(a.grad, base + j, grad_value(a, r, j, v, lse, smooth));
}

template <int KIND> __device__ __forceinline__ typename CE<KIND>::S
row_loss(const CE<KIND>& a, const Row<typename CE<KIND>::S>& r, long long base,
         const Lse<typename CE<KIND>::S>& lse, typename CE<KIND>::S smooth) {
    typedef typename CE<KIND>::S S;
    if (!r.valid) return (S)0;
    return -r.coef * lse.log_prob(load<KIND>(a.x, base + r.ts)) + a.eps / (S)a.c * smooth;
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
        const Lse<S> lse = row_lse<S, false>(m, s, scratch);
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
        const Lse<S> lse = row_lse<S, true>(m, s, scratch);
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
        const Lse<S> lse = row_lse<S, true>(m, s, scratch);
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
        const Lse<S> lse = row_lse<S, true>(m, s, scratch);
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
# (No 4: rows of up to 512 * 4 = 2048 classes go to the warp-per-row kernel.)
_VPT_CHOICES = (8, 16)


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
    """The ticket counter of the cross-entropy's last-block sum on one device and stream; the last
    block of every launch resets it to 0. Made (and zeroed) eagerly, never inside a capture, where
    its zeroing would only be a node of the graph."""
    if is_capturing():
        raise RuntimeError("the cross-entropy's counter for this stream must exist before the "
                           "stream is captured: run one eager step on it first")
    with cupy.cuda.Device(device_id):
        return cupy.zeros(1, dtype=cupy.uint32)


_NULL = np.uint64(0)  # a null pointer argument (8 bytes, like a device pointer)


def cross_entropy_launch(n: int, c: int, dtype, facts: DeviceFacts) -> Launch:
    """The cross-entropy variant for (n, c) logits of ``dtype``, and its launch.

    Up to 2048 classes a warp takes a row (8 rows per block); beyond, a block of 512 threads
    takes a row, held in registers while VPT values per thread fit, then staged in shared
    memory while the row fits there (beside the 2 KiB of static scratch), then read twice.
    The grid is at most 4 blocks per multiprocessor; blocks stride over the rows.
    """
    kind = _kind(dtype)
    itemsize = np.dtype(dtype).itemsize
    shared = 0
    if c <= _WARP_ROWS_MAX_C:
        name, threads, rows_per_block = f"ce_warp_rows<{kind}>", 256, 8
    else:
        threads, rows_per_block = _BLOCK_THREADS, 1
        vpt = next((v for v in _VPT_CHOICES if v <= _max_vpt(kind) and c <= v * threads), None)
        if vpt:
            name = f"ce_block_rows<{kind}, {vpt}>"
        elif c * itemsize <= facts.shared_memory_optin - 2048:
            name, shared = f"ce_block_rows_smem<{kind}>", c * itemsize
        else:
            name = f"ce_block_rows_long<{kind}>"
    blocks = max(1, min(-(-n // rows_per_block), 4 * facts.multiprocessors))
    return Launch(name, blocks, threads, shared)


def cross_entropy_loss_and_grad(plan, grad_output=1.0):
    """(loss, dL/dlogits) for class-index targets in one kernel launch: one read of the logits
    for the row statistics, one more (from cache) for the gradient, one write of the gradient."""
    device = plan.logits.device.id
    counter = _ce_counter(device, cupy.cuda.get_current_stream().ptr)
    launch, args, loss, grad = cross_entropy_call(plan, grad_output, cupy, device_facts(device),
                                                  counter)
    if launch is not None:
        _launch(CROSS_ENTROPY_SOURCE, launch, args)
    return loss, grad


def cross_entropy_call(plan, grad_output, xp, facts: DeviceFacts, counter) -> tuple:
    """(launch, args, loss, grad): one launch of the single-pass cross-entropy for ``plan``, its
    arguments and its outputs, as arrays of ``xp`` (cupy for the GPU; numpy for the CPU harness
    in tests/simt). ``counter`` is the ticket counter, a uint32 holding 0. For an empty batch
    there is nothing to launch: launch is None and the loss 0."""
    if hasattr(grad_output, "ndim") and grad_output.ndim:
        raise ValueError("the single-pass cross-entropy takes a scalar grad_output")
    x = xp.ascontiguousarray(plan.logits)
    n, c = x.shape
    t = xp.ascontiguousarray(plan.target.astype(xp.int64, copy=False))
    weight = None if plan.weight is None else \
        xp.ascontiguousarray(plan.weight.astype(_acc_dtype(x.dtype), copy=False))
    grad = xp.empty_like(x)
    loss = xp.empty((n,) if plan.reduction == "none" else (), dtype=x.dtype)
    if n == 0:
        loss.fill(0)
        return None, (), loss, grad
    launch = cross_entropy_launch(n, c, x.dtype, facts)
    scalar = _acc_dtype(x.dtype)
    partials = xp.empty(launch.grid, dtype=scalar)
    return launch, (
        x, t, _NULL if weight is None else weight, grad, loss, partials, counter, np.int64(n),
        np.int64(c), np.int64(plan.ignore_index), scalar(plan.eps), scalar(float(grad_output)),
        np.int32(_REDUCTIONS[plan.reduction])), loss, grad


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


# dz = dy where y > 0, and the bias gradient db = the column sums of dz. A block owns 32 columns
# and a group of rows; its 8 warps take every 8th row of the group (32 consecutive columns per
# warp: coalesced), and the 8 partial sums of each column are added in a fixed order. A batch
# (an MLP's 128 rows) is one group, and the block writes db itself. A tall dz (a convolution's
# rows are its pixels: 100352 for the small CNN's first layer at batch 128) is cut into groups of
# rows, so that the grid fills the GPU rather than one multiprocessor per 32 columns; each block
# then writes its group's sums into `partials` (in the accumulation type), and column_sums adds
# the groups up, again in a fixed order: db is deterministic either way.
RELU_BACKWARD_SOURCE = _PRELUDE + r"""
// The sum over a block's 8 warps of each lane's total (a column's), added in warp order; valid
// in warp 0. Every thread of the block calls it.
template <typename S> __device__ __forceinline__ S warps_column_sum(S (&partial)[8][33], S total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    partial[warp][lane] = total;
    __syncthreads();
    S sum = 0;
    if (warp == 0)
        for (int w = 0; w < 8; ++w) sum += partial[w][lane];
    __syncthreads();
    return sum;
}

template <int KIND> __global__ void relu_backward(
        const typename Types<KIND>::raw* dy, const typename Types<KIND>::raw* y,
        typename Types<KIND>::raw* dz, typename Types<KIND>::raw* db,
        typename Types<KIND>::acc* partials, long long n, long long c, long long groups,
        long long rows_per_group) {
    typedef typename Types<KIND>::acc S;
    __shared__ S partial[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long tiles = (c + 31) / 32;
    for (long long item = blockIdx.x; item < tiles * groups; item += gridDim.x) {
        const long long tile = item % tiles, group = item / tiles, j = tile * 32 + lane;
        const long long first = group * rows_per_group;
        const long long last = first + rows_per_group < n ? first + rows_per_group : n;
        S total = 0;
        if (j < c) {
            for (long long i = first + warp; i < last; i += 8) {
                S g = load<KIND>(y, i * c + j) > 0 ? load<KIND>(dy, i * c + j) : (S)0;
                store<KIND>(dz, i * c + j, g);
                total += g;
            }
        }
        const S sum = warps_column_sum(partial, total);
        if (warp == 0 && j < c) {
            if (partials)
                partials[group * c + j] = sum;
            else if (db)
                store<KIND>(db, j, sum);
        }
    }
}

// db[j] = the sum over groups of partials[group][j], as relu_backward sums rows.
template <int KIND> __global__ void column_sums(
        const typename Types<KIND>::acc* partials, typename Types<KIND>::raw* db,
        long long groups, long long c) {
    typedef typename Types<KIND>::acc S;
    __shared__ S partial[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (long long tile = blockIdx.x; tile * 32 < c; tile += gridDim.x) {
        const long long j = tile * 32 + lane;
        S total = 0;
        if (j < c)
            for (long long g = warp; g < groups; g += 8) total += partials[g * c + j];
        const S sum = warps_column_sum(partial, total);
        if (warp == 0 && j < c)
            store<KIND>(db, j, sum);
    }
}
"""
RELU_BACKWARD_ENTRIES = ([f"relu_backward<{k}>" for k in range(4)]
                         + [f"column_sums<{k}>" for k in range(4)])

_TALL_ROWS = 4096      # from here on, dz's rows are cut into groups
_GROUP_MIN_ROWS = 128  # the fewest rows a group has (its block's 8 warps take 16 rows each)


def relu_backward_groups(n: int, c: int, facts: DeviceFacts) -> int:
    """How many groups of rows relu_backward cuts dz (n x c) into: 1 for a batch, and for a
    tall dz enough for about 4 blocks per multiprocessor over all column tiles."""
    if n < _TALL_ROWS:
        return 1
    tiles = -(-c // 32)
    return max(1, min(-(-4 * facts.multiprocessors // tiles), n // _GROUP_MIN_ROWS))


def relu_backward_launch(n: int, c: int, dtype, facts: DeviceFacts, groups: int | None = None
                         ) -> Launch:
    """A block of 8 warps per 32 columns and group of rows (the kernel's partial[8][33]
    assumes 256 threads)."""
    items = -(-c // 32) * (relu_backward_groups(n, c, facts) if groups is None else groups)
    return Launch(f"relu_backward<{_kind(dtype)}>", max(1, min(items, 8 * facts.multiprocessors)),
                  256)


def column_sums_launch(c: int, dtype, facts: DeviceFacts) -> Launch:
    return Launch(f"column_sums<{_kind(dtype)}>", max(1, min(-(-c // 32), 8 * facts.multiprocessors)),
                  256)


def relu_backward(dy, y, out=None, bias_grad=None, groups: int | None = None):
    """out = dy * (y > 0) and, if given, bias_grad = out.sum(axis=0): one launch for a batch,
    two for a tall dz (see RELU_BACKWARD_SOURCE). ``groups`` overrides relu_backward_groups's
    choice (the benchmark compares the two).

    ``out`` (allocated when None) must be C-contiguous like the kernel writes it, of y's shape
    and dtype; ``bias_grad`` of shape (C,) and y's dtype."""
    y = cupy.ascontiguousarray(y)
    dy = cupy.ascontiguousarray(dy, dtype=y.dtype)  # the kernel reads both as y's type
    if dy.shape != y.shape:
        raise ValueError(f"dy must have the shape of y, {y.shape}, got {dy.shape}")
    if out is None:
        out = cupy.empty(y.shape, dtype=y.dtype)
    _require(out, "out", y.shape, y.dtype)
    if bias_grad is not None:
        _require(bias_grad, "bias_grad", y.shape[1:], y.dtype)
    for launch, arguments in relu_backward_launches(dy, y, out, bias_grad,
                                                    device_facts(y.device.id), cupy, groups):
        _launch(RELU_BACKWARD_SOURCE, launch, arguments)
    return out


def relu_backward_launches(dy, y, out, bias_grad, facts: DeviceFacts, xp,
                           groups: int | None = None) -> list:
    """[(Launch, arguments)]: what relu_backward launches, in order; ``xp`` allocates the
    groups' partial sums (cupy on a GPU, numpy for the CPU harness in tests/simt)."""
    n, c = y.shape
    if groups is None:
        groups = relu_backward_groups(n, c, facts)
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1 or None, got {groups!r}")
    partials = None
    if bias_grad is not None and groups > 1:
        partials = xp.empty((groups, c), dtype=_acc_dtype(y.dtype))
    launches = [(relu_backward_launch(n, c, y.dtype, facts, groups),
                 relu_backward_arguments(dy, y, out, bias_grad, partials, groups))]
    if partials is not None:
        launches.append((column_sums_launch(c, y.dtype, facts),
                         column_sums_arguments(partials, bias_grad)))
    return launches


def relu_backward_arguments(dy, y, out, bias_grad, partials=None, groups: int = 1) -> tuple:
    """relu_backward's arguments; with ``partials`` ((groups, C), the accumulation type) the
    kernel writes its groups' sums there, and column_sums then writes bias_grad."""
    n, c = y.shape
    rows_per_group = max(1, -(-n // groups))
    db = _NULL if bias_grad is None or partials is not None else bias_grad
    return (dy, y, out, db, _NULL if partials is None else partials, np.int64(n), np.int64(c),
            np.int64(groups), np.int64(rows_per_group))


def column_sums_arguments(partials, bias_grad) -> tuple:
    groups, c = partials.shape
    return partials, bias_grad, np.int64(groups), np.int64(c)


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


def count_correct_launch(n: int, c: int, dtype, facts: DeviceFacts) -> Launch:
    blocks, threads = grid_stride(n, facts, per_sm=4)
    return Launch(f"count_correct<{_kind(dtype)}>", blocks, threads)


def count_correct(logits, labels, out):
    """out += number of rows whose argmax equals the label (out: a uint64 device scalar)."""
    x = cupy.ascontiguousarray(logits)
    n, c = x.shape
    _require(out, "out", (), np.uint64)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n == 0:
        return out
    if c == 0:
        raise ValueError("logits must have at least one class to take an argmax, got shape "
                         f"{x.shape}")
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    _launch(COUNT_CORRECT_SOURCE, count_correct_launch(n, c, x.dtype, device_facts(x.device.id)),
            count_correct_arguments(x, labels, out))
    return out


def count_correct_arguments(x, labels, out) -> tuple:
    n, c = x.shape
    return x, labels, out, np.int64(n), np.int64(c)


# --- Dropout --------------------------------------------------------------------------------------

# Element e = offset + i of a Philox-4x32-10 stream (dropout.counter_words is the NumPy twin):
# word e % 4 of the block of counter (e / 4, step's low and high words, 0) under key (k0, k1).
# One thread computes a whole block and keeps one word of it: four times the arithmetic of
# sharing the block, which costs nothing here (10 rounds of two products against a load and two
# stores), and keeps each element's mask a pure function of its index. The mask (0 or scale) is
# written for backward, and y = x * mask, in one launch instead of the formula's ~140.
DROPOUT = (
    "T x, uint64 step, uint64 offset, uint32 k0, uint32 k1, uint32 threshold, T scale",
    "T y, T mask",
    r"""
    const unsigned long long e = offset + (unsigned long long)i;
    unsigned int c0 = (unsigned int)(e >> 2), c1 = (unsigned int)step,
                 c2 = (unsigned int)(step >> 32), c3 = 0u, key0 = k0, key1 = k1;
    for (int r = 0; r < 10; ++r) {
        if (r) { key0 += 0x9E3779B9u; key1 += 0xBB67AE85u; }
        const unsigned long long p0 = (unsigned long long)c0 * 0xD2511F53ull;
        const unsigned long long p1 = (unsigned long long)c2 * 0xCD9E8D57ull;
        c0 = (unsigned int)(p1 >> 32) ^ c1 ^ key0;  c1 = (unsigned int)p1;
        c2 = (unsigned int)(p0 >> 32) ^ c3 ^ key1;  c3 = (unsigned int)p0;
    }
    const unsigned int which = (unsigned int)(e & 3),
        word = which == 0 ? c0 : which == 1 ? c1 : which == 2 ? c2 : c3;
    mask = word >= threshold ? scale : (T)0;
    y = x * mask;
    """,
    "gpunet_dropout")


@functools.cache
def _dropout_kernel():
    return cupy.ElementwiseKernel(*DROPOUT)


def dropout(x, step, offset: int, seed: int, threshold, scale: float):
    """(y, mask) for x on the GPU: mask = scale where the stream's word >= threshold, else 0;
    y = x * mask. ``step`` is the draw's 0-d uint64 counter on x's device (read, not advanced)."""
    y = cupy.empty(x.shape, x.dtype)
    mask = cupy.empty(x.shape, x.dtype)
    _dropout_kernel()(*dropout_operands(x, step, offset, seed, threshold, scale), y, mask)
    return y, mask


def dropout_operands(x, step, offset: int, seed: int, threshold, scale: float) -> tuple:
    """DROPOUT's inputs, in order: arrays as given, numbers as NumPy scalars of their
    parameter's type (for CuPy, and for the CPU harness in tests/simt)."""
    return (x, step, np.uint64(offset), np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32),
            np.uint32(threshold), x.dtype.type(scale))


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


def optimizer_launch(rule: str, dtype, size: int, facts: DeviceFacts) -> Launch:
    """``rule`` is "sgd" or "adam"; one grid-stride pass over ``size`` parameters."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"the fused optimizer update takes float32 or float64 parameters, got {dtype}")
    blocks, threads = grid_stride(size, facts)
    return Launch(f"{rule}<{'float' if dtype == np.float32 else 'double'}>", blocks, threads)


def optimizer_update(rule: str, buffers: tuple, hyper: dict, lr_table=None, counters=None) -> None:
    """One fused update of a whole flat parameter buffer, in place, in one launch.

    ``rule`` is "sgd" (``buffers`` = parameters, gradients, momentum buffer) or "adam"
    (parameters, gradients, exp_avg, exp_avg_sq); ``hyper`` holds the rule's numbers and
    ``steps_taken``, the steps before this one, as ``Optimizer.fused_rule`` gives them. With
    ``lr_table`` and ``counters`` (device arrays, see the kernel source) the rate and the step
    count are read on the device instead, as a captured CUDA graph needs.
    """
    p = buffers[0]
    _launch(OPTIM_SOURCE, optimizer_launch(rule, p.dtype, p.size, device_facts(p.device.id)),
            optimizer_arguments(rule, buffers, hyper, lr_table, counters))


def optimizer_arguments(rule: str, buffers: tuple, hyper: dict, lr_table=None, counters=None) -> tuple:
    """The argument tuple of the fused update's kernel, for numpy or cupy buffers."""
    p = buffers[0]
    scalar = p.dtype.type
    table = _NULL if lr_table is None else lr_table
    device_counters = _NULL if counters is None else counters
    head = (*buffers, np.int64(p.size), scalar(hyper["lr"]), table, device_counters,
            np.int64(hyper["steps_taken"]))
    if rule == "sgd":
        return head + (scalar(hyper["momentum"]), scalar(hyper["dampening"]),
                       scalar(hyper["weight_decay"]), np.bool_(hyper["nesterov"]))
    if rule == "adam":
        return head + (scalar(hyper["b1"]), scalar(hyper["b2"]), scalar(hyper["eps"]),
                       scalar(hyper["weight_decay"]), np.bool_(hyper["decoupled"]))
    raise ValueError(f"rule must be 'sgd' or 'adam', got {rule!r}")


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


def gather_batch_launch(rows: int, features: int, dtype, facts: DeviceFacts) -> Launch:
    _kind(dtype)  # one of the four float types, or a TypeError
    blocks, threads = grid_stride(rows * features, facts)
    return Launch(f"gather_batch<{_RAW_NAME[np.dtype(dtype).itemsize]}>", blocks, threads)


def finish_step_launch(dtype) -> Launch:
    return Launch(f"finish_step<{_kind(dtype)}>", 1, 1)


def gather_batch(x, y, order, counters, xb, yb, batch_size: int) -> None:
    """xb, yb = the rows of (x, y) that batch ``counters[1]`` of ``order`` names."""
    rows, features = xb.shape
    _require(x, "x", (x.shape[0], features), xb.dtype)
    _require(y, "y", (x.shape[0],), np.int64)
    _require(order, "order", (x.shape[0],), np.int64)
    _require(counters, "counters", (2,), np.int64)
    _require(xb, "xb")
    _require(yb, "yb", (rows,), np.int64)
    _launch(STEP_SOURCE, gather_batch_launch(rows, features, x.dtype, device_facts(x.device.id)),
            gather_batch_arguments(x, y, order, counters, xb, yb, batch_size))


def gather_batch_arguments(x, y, order, counters, xb, yb, batch_size: int) -> tuple:
    rows, features = xb.shape
    return x, y, order, counters, xb, yb, np.int64(rows), np.int64(features), np.int64(batch_size)


def finish_step(loss, losses, counters) -> None:
    _require(losses, "losses", dtype=np.float64)
    _require(counters, "counters", (2,), np.int64)
    _launch(STEP_SOURCE, finish_step_launch(loss.dtype), (loss, losses, counters))


# --- matrix products, eager or captured into a CUDA graph -------------------------------------------
#
# Through gpunet's own cuBLAS binding (cublas.py says why CuPy's cannot be captured), one handle
# per device for every product, eager or captured: the handle and its workspace exist before any
# capture, and the same library computes both.

_GEMM_KIND = {np.dtype(np.float32): ("s", None), np.dtype(np.float64): ("d", None),
              np.dtype(np.float16): ("ex", cublas.CONSTANTS["CUDA_R_16F"])}


def _gemm_kind(dtype):
    """("s" | "d" | "ex", cudaDataType or None), or None for a dtype cuBLAS is not asked for."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "ex", cublas.CONSTANTS["CUDA_R_16BF"]
    return _GEMM_KIND.get(dtype)


@functools.cache
def _cublas_handle(device_id: int) -> cublas.Handle:
    with cupy.cuda.Device(device_id):
        return cublas.Handle()


_cublas_workspaces: dict = {}  # (device, stream pointer) -> that stream's workspace


def cublas_on_stream(device_id: int, stream_ptr: int | None = None) -> cublas.Handle:
    """gpunet's cuBLAS handle on GPU ``device_id``, set to work on ``stream_ptr`` (default: the
    current stream) with that stream's own workspace.

    Its own handle, not CuPy's. One workspace per stream, since two streams must not share one,
    allocated on the stream's first product and kept for the life of the process: graphs that
    captured a product keep its address. A stream that will be captured gets its workspace
    beforehand (GraphStep asks for it), so that no capture allocates one.
    """
    handle = _cublas_handle(device_id)
    if stream_ptr is None:
        stream_ptr = cupy.cuda.get_current_stream().ptr
    if handle.stream != stream_ptr:
        workspace = _cublas_workspaces.get((device_id, stream_ptr))
        if workspace is None:
            if is_capturing():
                raise RuntimeError("a cuBLAS workspace for this stream must exist before the "
                                   "stream is captured: run one product on it eagerly first")
            with cupy.cuda.Device(device_id):
                workspace = cupy.empty(cublas.WORKSPACE_BYTES, dtype=cupy.uint8)
            _cublas_workspaces[device_id, stream_ptr] = workspace
        handle.set_stream(stream_ptr, workspace.data.ptr, workspace.nbytes)
    return handle


def is_capturing() -> bool:
    return cupy.cuda.get_current_stream().is_capturing()


def matmul(a, b, out=None, beta: float = 0.0):
    """a @ b, or with ``beta`` out = a @ b + beta * out, for 2-D float arrays of one dtype; also
    while a CUDA graph is being captured.

    Anything else (integers, mixed dtypes, batched operands) goes to cupy.matmul, which cannot
    be captured; under capture that is a TypeError naming what came.
    """
    kind = _gemm_kind(a.dtype) if a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype else None
    if beta and out is None:
        raise ValueError("matmul with beta needs out, the array it adds into")
    if kind is None:
        if is_capturing():
            raise TypeError("a product captured into a CUDA graph takes two 2-D arrays of one "
                            "dtype (float16, bfloat16, float32 or float64), got "
                            f"{a.dtype}{list(a.shape)} @ {b.dtype}{list(b.shape)}")
        if beta:
            return add_into(out, cupy.matmul(a, b), beta)
        return cupy.matmul(a, b, out=out)
    m, k = a.shape
    if b.shape[0] != k:
        raise ValueError(f"matmul: a is {m}x{k} but b is {b.shape[0]}x{b.shape[1]}; the inner "
                         "sizes must match")
    n = b.shape[1]
    if max(m, n, k) >= 2 ** 31:  # cuBLAS's int sizes (the _64 entry points are not bound)
        raise ValueError(f"matmul sizes must be below 2**31, got {m}x{k} @ {k}x{n}")
    if out is None:
        out = cupy.empty((m, n), dtype=a.dtype)
    elif out.shape != (m, n) or out.dtype != a.dtype:
        raise ValueError(f"out must be a {m}x{n} array of {a.dtype}, got {out.dtype}{list(out.shape)}")
    # cuBLAS writes C-order rows into memory that no operand may share: otherwise compute into
    # a fresh buffer (holding out's old values when beta adds to them), then copy in.
    if not out.flags.c_contiguous or cupy.may_share_memory(out, a) \
            or cupy.may_share_memory(out, b):
        out[...] = matmul(a, b, None) if not beta else matmul(a, b, out.copy(), beta)
        return out
    if m == 0 or n == 0:
        return out
    if k == 0:  # an empty sum: cuBLAS would be handed a leading dimension of 0
        if beta:
            out *= beta
        else:
            out.fill(0)
        return out
    a, b = (v if v.flags.c_contiguous or v.flags.f_contiguous else cupy.ascontiguousarray(v)
            for v in (a, b))
    op_b, op_a, ld_b, ld_a, ld_c = gemm_arguments(m, n, k, a.flags.c_contiguous, b.flags.c_contiguous)
    device = a.device.id
    if b.device.id != device or out.device.id != device:
        raise ValueError(f"matmul operands must be on one GPU, got cuda:{device}, "
                         f"cuda:{b.device.id} and out on cuda:{out.device.id}")
    gemm_kind, data_type = kind
    # A handle belongs to the device that was current when it was made.
    with contextlib.nullcontext() if cupy.cuda.runtime.getDevice() == device else a.device:
        handle = cublas_on_stream(device)
        handle.gemm(gemm_kind, op_b, op_a, n, m, k, 1.0, b.data.ptr, ld_b, a.data.ptr, ld_a,
                    float(beta), out.data.ptr, ld_c, data_type)
    return out


def gemm_arguments(m: int, n: int, k: int, a_is_c_order: bool, b_is_c_order: bool) -> tuple:
    """(op_b, op_a, ld_b, ld_a, ld_c) for row-major C (m x n) = A (m x k) @ B (k x n), each of
    A and B in C order or else in F order (a transposed view), C in C order.

    cuBLAS is column-major, and row-major C = A @ B is column-major C^T = B^T A^T, so cuBLAS is
    handed B first. A C-order operand read column-major is already its transpose (no flag); an
    F-order one is the matrix itself and goes with the transpose flag.
    """
    op_b, ld_b = (cublas.OP_N, n) if b_is_c_order else (cublas.OP_T, k)
    op_a, ld_a = (cublas.OP_N, k) if a_is_c_order else (cublas.OP_T, m)
    return op_b, op_a, ld_b, ld_a, n
