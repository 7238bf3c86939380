"""The SIMT harness itself (tests/simt): that it gives kernels CUDA's semantics, and that it
catches the faults it exists to catch. The kernels here are small test kernels written for the
purpose; gpunet's own kernels are run through it in test_kernels_cuda_simt.py.
"""

import numpy as np
import pytest

from gpunet.kernels import cuda as K
from simt import BFLOAT16, module, require_bfloat16, require_compiler
from simt.harness import KernelFault

pytestmark = pytest.mark.simt


@pytest.fixture(autouse=True)
def _compiler():
    require_compiler()


def run(source, entries, kernel, block, args, shared=0, grid=1, **options):
    module(source, tuple(entries), "test kernel").launch(K.Launch(kernel, grid, block, shared), args,
                                                         **options)


# --- warp operations, with lockstep semantics -------------------------------------------------------

WARPS = r"""
__global__ void warps(const int* in, int* out) {
    __shared__ int s[64];
    const int t = threadIdx.x, v = in[t];
    int* o = out + 10 * t;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_down_sync(0xffffffffu, v, 3);
    o[2] = __shfl_up_sync(0xffffffffu, v, 2);
    o[3] = __shfl_sync(0xffffffffu, v, 7 + t);               // a source lane per lane
    o[4] = __shfl_xor_sync(0xffffffffu, v, 4, 8);            // within segments of 8 lanes
    o[5] = (int)__ballot_sync(0xffffffffu, v & 1);
    o[6] = __all_sync(0xffffffffu, v >= 0) + 2 * __any_sync(0xffffffffu, v > 90);
    o[7] = (int)(__shfl_down_sync(0xffffffffu, 0.5 * v, 16) * 2);  // an 8-byte value
    // Two half-warps, each with its own mask, at two different shuffles.
    if ((t & 31) < 16) o[8] = __shfl_xor_sync(0x0000ffffu, v, 8);
    else o[8] = __shfl_xor_sync(0xffff0000u, v, 8);
    s[t] = v;
    __syncwarp();  // the lanes' writes are seen by the warp (in any order of its lanes)
    o[9] = s[t ^ 1];
}
"""


def test_shuffles_and_votes_follow_cuda():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 100, 64).astype(np.int32)
    out = np.empty((64, 10), np.int32)
    for seed in (None, 1, 2):
        run(WARPS, ["warps"], "warps", 64, (v, out), poison=(out,), seed=seed)
        check_warps(v, out)


def check_warps(v, out):
    lane = np.arange(64) % 32
    warp = np.arange(64) // 32 * 32

    def at(src):
        return v[warp + src]

    np.testing.assert_array_equal(out[:, 0], at(lane ^ 5))
    np.testing.assert_array_equal(out[:, 1], at(np.where(lane + 3 < 32, lane + 3, lane)))
    np.testing.assert_array_equal(out[:, 2], at(np.where(lane >= 2, lane - 2, lane)))
    np.testing.assert_array_equal(out[:, 3], at((7 + np.arange(64)) % 32))
    np.testing.assert_array_equal(out[:, 4], at(lane ^ 4))
    bits = (v & 1).reshape(2, 32) << np.arange(32)
    np.testing.assert_array_equal(out[:, 5].view(np.uint32), np.repeat(bits.sum(axis=1), 32))
    any90 = np.repeat((v.reshape(2, 32) > 90).any(axis=1), 32)
    np.testing.assert_array_equal(out[:, 6], 1 + 2 * any90)
    np.testing.assert_array_equal(out[:, 7], at(np.where(lane + 16 < 32, lane + 16, lane)))
    np.testing.assert_array_equal(out[:, 8], at(lane ^ 8))
    np.testing.assert_array_equal(out[:, 9], v[np.arange(64) ^ 1])


FAULTS = r"""
__global__ void lane_exits(int* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void lanes_apart(int* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    else out[threadIdx.x] = __any_sync(0xffffffffu, 1);
}
__global__ void lane_at_barrier(int* out) {
    if (threadIdx.x == 5) __syncthreads();
    else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void barrier_skipped(int* out) {
    if (threadIdx.x == 40) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
__global__ void missing_lanes(int* out) {  // launched with 40 threads: warp 1 has 8 lanes
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void not_in_own_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1);
}
__global__ void read_past(const float* in, float* out, long long n) {
    out[threadIdx.x] = in[threadIdx.x + n - 1];  // thread 1 reads in[n]
}
__global__ void shared_past(float* out) {
    __shared__ float s[32];
    s[threadIdx.x] = 1.0f;  // launched with 33 threads
    __syncthreads();
    out[threadIdx.x] = s[0];
}
__global__ void dynamic_past(float* out) {
    extern __shared__ float d[];
    d[threadIdx.x] = 1.0f;  // launched with one float fewer than threads
    out[threadIdx.x] = d[0];
}
__global__ void typed(float* out, float scale) { out[threadIdx.x] = scale; }
"""
FAULT_ENTRIES = ["lane_exits", "lanes_apart", "lane_at_barrier", "barrier_skipped", "missing_lanes",
                 "not_in_own_mask", "read_past", "shared_past", "dynamic_past", "typed"]


@pytest.mark.parametrize("kernel,block,shared,message", [
    ("lane_exits", 32, 0, "for lane 3, which has exited"),
    ("lanes_apart", 32, 0, "the lanes of a warp do not meet"),
    ("lane_at_barrier", 32, 0, "for lane 5, which waits at a __syncthreads"),
    ("barrier_skipped", 64, 0, "thread 40 has exited while thread 0 waits at __syncthreads"),
    ("missing_lanes", 40, 0, "lane 8 of its warp does not exist"),
    ("not_in_own_mask", 32, 0, "leaves out its own lane 16"),
    ("shared_past", 33, 0, "global-buffer-overflow"),
    ("dynamic_past", 32, 31 * 4, "use-after-poison"),
])
def test_faults_are_caught(kernel, block, shared, message):
    out = np.zeros(64, np.float32 if "past" in kernel else np.int32)
    with pytest.raises(KernelFault, match=message):
        run(FAULTS, FAULT_ENTRIES, kernel, block, (out,), shared=shared)


def test_a_read_past_an_array_is_caught():
    x, out = np.ones(10, np.float32), np.zeros(2, np.float32)
    run(FAULTS, FAULT_ENTRIES, "read_past", 1, (x, out, np.int64(10)))  # in bounds: in[9]
    assert out[0] == 1
    with pytest.raises(KernelFault, match="heap-buffer-overflow"):
        run(FAULTS, FAULT_ENTRIES, "read_past", 2, (x, out, np.int64(10)))


def test_arguments_of_the_wrong_type_are_refused():
    out = np.zeros(4, np.float32)
    run(FAULTS, FAULT_ENTRIES, "typed", 4, (out, np.float32(2.5)))
    assert (out == 2.5).all()
    with pytest.raises(KernelFault, match="argument 1 is a f32 scalar; got a scalar of f64"):
        run(FAULTS, FAULT_ENTRIES, "typed", 4, (out, np.float64(2.5)))
    with pytest.raises(KernelFault, match="argument 0 points to f32 elements; got an array of f64"):
        run(FAULTS, FAULT_ENTRIES, "typed", 4, (out.astype(np.float64), np.float32(2.5)))
    with pytest.raises(TypeError, match="a NumPy array or scalar, got float"):
        run(FAULTS, FAULT_ENTRIES, "typed", 4, (out, 2.5))


# --- shared memory: one copy per block, uninitialised, and the order of threads --------------------

SHARED = r"""
// Each block sums its slice of `in` through shared memory; `stale` is what a block finds in
// shared memory before writing it (poison, not the last block's values).
__global__ void block_sums(const float* in, float* sums, float* stale) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t == 0) stale[blockIdx.x] = s[63];
    __syncthreads();
    s[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int half = 32; half > 0; half >>= 1) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) sums[blockIdx.x] = s[0];
}
// The same exchange, with and without the barrier between the write and the read.
template <bool BARRIER> __global__ void neighbours(const float* in, float* out) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = in[t];
    if (BARRIER) __syncthreads();
    out[t] = t > 0 ? s[t - 1] : in[0];
}
"""
SHARED_ENTRIES = ("block_sums", "neighbours<true>", "neighbours<false>")


def test_shared_memory_is_per_block_and_starts_poisoned():
    x = np.arange(5 * 64, dtype=np.float32)
    sums, stale = np.empty(5, np.float32), np.zeros(5, np.float32)
    for seed in (None, 1, 2):
        module(SHARED, SHARED_ENTRIES, "test kernel").launch(
            K.Launch("block_sums", 5, 64), (x, sums, stale), poison=(sums,), seed=seed)
        np.testing.assert_array_equal(sums, x.reshape(5, 64).sum(axis=1))
        assert np.isnan(stale).all()


def test_the_shuffled_order_finds_a_missing_barrier():
    x = np.arange(64, dtype=np.float32)
    expected = np.concatenate([[0], x[:-1]])
    m = module(SHARED, SHARED_ENTRIES, "test kernel")
    out = np.empty(64, np.float32)
    for seed in (None, 1, 2, 3):
        m.launch(K.Launch("neighbours<true>", 1, 64), (x, out), poison=(out,), seed=seed)
        np.testing.assert_array_equal(out, expected)
    # In thread order each thread's neighbour has written before it reads: the fault hides...
    m.launch(K.Launch("neighbours<false>", 1, 64), (x, out), poison=(out,))
    np.testing.assert_array_equal(out, expected)
    # ...and shows in any shuffled order.
    for seed in (1, 2, 3):
        m.launch(K.Launch("neighbours<false>", 1, 64), (x, out), poison=(out,), seed=seed)
        assert not np.array_equal(out, expected)


# --- the prelude's host conversions, against numpy's casts --------------------------------------------

CONVERSIONS = K._PRELUDE + r"""
template <int KIND> __global__ void to_float(const unsigned short* h, float* f, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        f[i] = load<KIND>(h, i);
}
template <int KIND> __global__ void from_float(const float* f, unsigned short* h, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        store<KIND>(h, i, f[i]);
}
"""
CONVERSION_ENTRIES = ("to_float<2>", "to_float<3>", "from_float<2>", "from_float<3>")


def assert_same_bits(got, expected):
    """Equal bit for bit, except that any NaN matches any NaN (payloads are not compared)."""
    nan = np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    bits = np.dtype(f"uint{8 * got.itemsize}")
    np.testing.assert_array_equal(got.view(bits)[~nan], expected.view(bits)[~nan])


def rounding_sample(dtype) -> np.ndarray:
    """float32 values at and around every rounding boundary of ``dtype`` (each finite value,
    the midpoint to the next one and one float ulp either side of it, up to the midpoint past
    the largest, where rounding overflows to inf), and a million random bit patterns."""
    inf_bits = int(np.array(np.inf, dtype).view(np.uint16))
    values = np.arange(inf_bits, dtype=np.uint16).view(dtype).astype(np.float64)
    above = np.append(values[1:], 2 * values[-1] - values[-2])  # one step past the largest
    mid = ((values + above) / 2).astype(np.float32)  # exact: one bit more than dtype has
    near = [values.astype(np.float32), mid, np.nextafter(mid, np.float32(0)),
            np.nextafter(mid, np.float32(np.inf)), np.float32([np.inf, np.nan])]
    random = np.random.default_rng(0).integers(0, 2 ** 32, 2 ** 20, dtype=np.uint64)
    sample = np.concatenate(near + [random.astype(np.uint32).view(np.float32)])
    return np.concatenate([sample, -sample])


@pytest.mark.parametrize("kind,dtype", [(2, np.float16), (3, "bfloat16")], ids=["float16", "bfloat16"])
def test_host_conversions_round_as_numpy(kind, dtype):
    """The prelude's host paths (no __CUDA_ARCH__): every 16-bit value to float, and floats
    round to nearest even, subnormals and overflow included. On the GPU float16 goes through
    PTX cvt, whose IEEE rounding is the same; bfloat16 is the same bit arithmetic there."""
    if dtype == "bfloat16":
        require_bfloat16()
        dtype = BFLOAT16
    m = module(CONVERSIONS, CONVERSION_ENTRIES, "conversions")
    every = np.arange(65536, dtype=np.uint16)
    as_float = np.empty(65536, np.float32)
    m.launch(K.Launch(f"to_float<{kind}>", 8, 256), (every, as_float, np.int64(65536)), poison=(as_float,))
    assert_same_bits(as_float, every.view(dtype).astype(np.float32))

    sample = rounding_sample(dtype)
    rounded = np.empty(sample.size, np.uint16)
    m.launch(K.Launch(f"from_float<{kind}>", 8, 256), (sample, rounded, np.int64(sample.size)),
             poison=(rounded,))
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are in the sample on purpose
        expected = sample.astype(dtype)
    assert_same_bits(rounded.view(dtype), expected)


# The header's own half types, which CuPy's ElementwiseKernel code names float16 and bfloat16.
HALF_TYPES = r"""
template <typename T> __global__ void round_to(const float* f, T* h, float* back, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        h[i] = (T)f[i];
        back[i] = (float)h[i];
    }
}
"""


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_elementwise_half_types_round_as_numpy(name):
    if name == "bfloat16":
        require_bfloat16()
    dtype = np.float16 if name == "float16" else BFLOAT16
    sample = rounding_sample(dtype)
    rounded, back = np.empty(sample.size, dtype), np.empty(sample.size, np.float32)
    module(HALF_TYPES, ("round_to<float16>", "round_to<bfloat16>"), "half types").launch(
        K.Launch(f"round_to<{name}>", 8, 256), (sample, rounded, back, np.int64(sample.size)),
        poison=(rounded, back))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = sample.astype(dtype)
    assert_same_bits(rounded, expected)
    assert_same_bits(back, expected.astype(np.float32))
