// The CUDA that gpunet's kernels use, for the host C++ compiler (g++, C++17): enough to run the
// very kernel sources of gpunet/kernels/cuda.py on the CPU in tests, one block at a time.
//
// How a launch runs. Blocks run one after another (in blockIdx order, or shuffled). The threads
// of a block are fibers on one OS thread, switched by hand (a few instructions, no syscall), so
// a thread runs until it reaches a synchronisation point: __syncthreads, a warp shuffle, a vote,
// __syncwarp. There it waits until the scheduler completes what it waits for (a warp operation
// once all its lanes have arrived; a barrier once every thread of the block waits at it) and
// runs it again. Two orders: thread order, each thread once to its next synchronisation point,
// so that the warps move in step; or, with a seed, the warps one after another in a shuffled
// order, each running ahead as far as it can (to a barrier) before the next one starts, the
// lanes of a warp in a shuffled order, and the blocks shuffled too: a result that depends on
// the order of threads between two barriers differs. Anything else is a fault, reported on stderr
// with exit status 3: a warp operation whose mask names a lane that waits at a barrier or has
// exited, lanes of a warp that wait at different warp operations (or with different masks or
// widths) and so never meet, a barrier that exited threads never reach, a deadlock. Call sites
// are not compared: the compiler may duplicate a barrier's call, as the GPU's barrier counts
// threads, not places, so threads meet at any __syncthreads, and lanes at any operation of the
// same kind and mask.
//
// Memory. __shared__ is `static`: one copy, shared by the threads of the block running now, and
// blocks run one at a time, so it is one copy per block. The driver fills it with 0xFF bytes
// (NaN as floats) before each block, as it does the dynamic shared memory, whose bytes past the
// launch's size are poisoned for AddressSanitizer. Arrays are the driver's malloc'd copies of the
// NumPy arrays, of their exact size, so ASan sees their bounds.
//
// The driver (tests/simt/harness.py) compiles this header, the kernel source and a table of the
// kernel's template instantiations into one executable per source, and runs one launch per
// process: a fault found by ASan or by the scheduler ends that process, not the test session.

#ifndef GPUNET_SIMT_H
#define GPUNET_SIMT_H

#include <math.h>  // the C++ <math.h>: float overloads of exp, log, sqrt, pow in the global namespace

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#define ASAN_POISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif

// NVRTC has no math.h and the kernels define INFINITY themselves when it is missing: let them,
// so that their own definition is the one that runs.
#undef INFINITY

using std::exp;
using std::log;
using std::pow;
using std::sqrt;

// --- the CUDA keywords ----------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Per block, since blocks run one at a time (see above). `extern __shared__` cannot take a
// storage class in C++: the driver turns that token pair into a plain `extern`, and defines the
// array it names (see harness.py).
#define __shared__ static

// --- vector types, with CUDA's sizes and alignments --------------------------------------------------

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct __align__(8) int2 { int x, y; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(16) longlong2 { long long x, y; };
struct __align__(16) ulonglong2 { unsigned long long x, y; };
struct __align__(4) ushort2 { unsigned short x, y; };
struct __align__(8) ushort4 { unsigned short x, y, z, w; };
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 is one 16-byte vector");

inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// --- bit casts and other intrinsics ---------------------------------------------------------------

namespace simt {
template <typename To, typename From> inline To bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}
}  // namespace simt

inline float __int_as_float(int v) { return simt::bits<float>(v); }
inline float __uint_as_float(unsigned int v) { return simt::bits<float>(v); }
inline int __float_as_int(float v) { return simt::bits<int>(v); }
inline unsigned int __float_as_uint(float v) { return simt::bits<unsigned int>(v); }
inline double __longlong_as_double(long long v) { return simt::bits<double>(v); }
inline long long __double_as_longlong(double v) { return simt::bits<long long>(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }

// Threads switch only at synchronisation points and one OS thread runs them all, so an atomic is
// an ordinary read-modify-write here, and a fence has nothing to order (see the driver's notes
// on what this cannot model).
inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
// The value's type follows the pointer's (CUDA's overloads convert it: atomicAdd(float*, 1.0)).
template <typename T> struct same { typedef T type; };
template <typename T> using value_t = typename same<T>::type;
template <typename T> inline T atomicAdd(T* p, value_t<T> v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, value_t<T> v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicExch(T* p, value_t<T> v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicMin(T* p, value_t<T> v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicMax(T* p, value_t<T> v) { T old = *p; *p = v > old ? v : old; return old; }
template <typename T> inline T atomicAnd(T* p, value_t<T> v) { T old = *p; *p = old & v; return old; }
template <typename T> inline T atomicOr(T* p, value_t<T> v) { T old = *p; *p = old | v; return old; }
template <typename T> inline T atomicXor(T* p, value_t<T> v) { T old = *p; *p = old ^ v; return old; }
template <typename T> inline T atomicCAS(T* p, value_t<T> compare, value_t<T> v) {
    T old = *p;
    if (old == compare) *p = v;
    return old;
}
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
    unsigned int old = *p;
    *p = old >= limit ? 0 : old + 1;
    return old;
}

// --- half types for ElementwiseKernel operations -------------------------------------------------------
//
// CuPy's generated code names them float16 and bfloat16. float16 is the compiler's IEEE half;
// bfloat16 is 16 bits with float arithmetic, rounded to nearest even as CuPy's type rounds.

namespace simt {
struct bfloat16 {
    unsigned short raw;
    bfloat16() = default;
    bfloat16(float f) {  // NOLINT: implicit, like CuPy's
        unsigned int u = bits<unsigned int>(f);
        raw = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0
                                                : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    bfloat16(double d) : bfloat16((float)d) {}
    bfloat16(int i) : bfloat16((float)i) {}
    operator float() const { return bits<float>((unsigned int)raw << 16); }
};
inline bfloat16 operator+(bfloat16 a, bfloat16 b) { return (float)a + (float)b; }
inline bfloat16 operator-(bfloat16 a, bfloat16 b) { return (float)a - (float)b; }
inline bfloat16 operator*(bfloat16 a, bfloat16 b) { return (float)a * (float)b; }
inline bfloat16 operator/(bfloat16 a, bfloat16 b) { return (float)a / (float)b; }
inline bool operator<(bfloat16 a, bfloat16 b) { return (float)a < (float)b; }
inline bool operator>(bfloat16 a, bfloat16 b) { return (float)a > (float)b; }

template <typename T> constexpr bool is_float =
    std::is_floating_point_v<T> || std::is_same_v<T, _Float16> || std::is_same_v<T, bfloat16>;
}  // namespace simt
typedef _Float16 float16;
typedef simt::bfloat16 bfloat16;

// --- the execution state ------------------------------------------------------------------------------

namespace simt {

[[noreturn]] inline void fault(const char* format, ...) __attribute__((format(printf, 1, 2)));

enum class Wait { runnable, barrier, warp, done };
enum class Op { shfl, shfl_up, shfl_down, shfl_xor, all, any, ballot, syncwarp };
inline const char* op_name(Op op) {
    static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                        "__shfl_xor_sync", "__all_sync", "__any_sync",
                                        "__ballot_sync", "__syncwarp"};
    return names[(int)op];
}

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    unsigned char* stack = nullptr;
    size_t stack_size = 0;
    unsigned int tid = 0;
    Wait wait = Wait::runnable;
    Op op = Op::syncwarp;
    unsigned int mask = 0;
    int arg = 0, width = 32;                       // lane / delta / lane mask, and segment width
    unsigned long long value = 0, result = 0;      // the operand's and the result's bits
    void* fake_stack = nullptr;                    // ASan's bookkeeping across switches
};

struct State {
    uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
    dim3 block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void* scheduler_sp = nullptr;
    const void* scheduler_stack_bottom = nullptr;  // the scheduler's stack, as ASan learns it
    size_t scheduler_stack_size = 0;
    void* scheduler_fake_stack = nullptr;
    void (*body)(void*) = nullptr;  // runs the kernel with its arguments, on the current fiber
    void* body_context = nullptr;
    const char* kernel = "";
};
inline State state;

}  // namespace simt

// CUDA's built-in variables: read-only views of the running thread's coordinates.
static const uint3& threadIdx = simt::state.thread_idx;
static const uint3& blockIdx = simt::state.block_idx;
static const dim3& blockDim = simt::state.block_dim;
static const dim3& gridDim = simt::state.grid_dim;
constexpr int warpSize = 32;

// --- switching between fibers (x86-64 System V: the callee-saved registers and the stack) ------------

extern "C" void simt_switch(void** save_sp, void* load_sp);
extern "C" void simt_fiber_start();
extern "C" [[noreturn]] void simt_fiber_main(simt::Fiber* fiber);

asm(R"(
    .text
    .p2align 4
    .globl simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch

    .p2align 4
    .globl simt_fiber_start
    .type simt_fiber_start, @function
simt_fiber_start:
    movq %r12, %rdi
    call simt_fiber_main
    ud2
    .size simt_fiber_start, .-simt_fiber_start
)");

namespace simt {

inline void enter(Fiber& f) {  // scheduler -> fiber f, until f waits or ends
    state.current = &f;
    state.thread_idx = {f.tid, 0, 0};
#if SIMT_ASAN
    __sanitizer_start_switch_fiber(&state.scheduler_fake_stack, f.stack, f.stack_size);
#endif
    simt_switch(&state.scheduler_sp, f.sp);
#if SIMT_ASAN
    __sanitizer_finish_switch_fiber(state.scheduler_fake_stack, nullptr, nullptr);
#endif
    state.current = nullptr;
}

inline void leave(Fiber& f, bool for_good) {  // fiber f -> scheduler
#if SIMT_ASAN
    __sanitizer_start_switch_fiber(for_good ? nullptr : &f.fake_stack, state.scheduler_stack_bottom,
                                   state.scheduler_stack_size);
#endif
    simt_switch(&f.sp, state.scheduler_sp);
#if SIMT_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &state.scheduler_stack_bottom,
                                    &state.scheduler_stack_size);
#endif
}

inline void prepare(Fiber& f, unsigned int tid) {
    f.tid = tid;
    f.wait = Wait::runnable;
    f.fake_stack = nullptr;
    ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);  // frames left by the last block's run
    // The frame simt_switch pops: r15, r14, r13, r12 (the fiber), rbx, rbp, then the return
    // address, after which the stack pointer is 16-byte aligned as a call expects.
    uintptr_t top = ((uintptr_t)(f.stack + f.stack_size)) & ~(uintptr_t)15;
    void** frame = (void**)(top - 56);
    for (int k = 0; k < 6; ++k) frame[k] = nullptr;
    frame[3] = &f;
    frame[6] = (void*)&simt_fiber_start;
    f.sp = frame;
}

// Wait at a synchronisation point until the scheduler releases this thread.
inline void wait_here(Wait what) {
    Fiber& f = *state.current;
    f.wait = what;
    leave(f, false);
}

}  // namespace simt

extern "C" [[noreturn]] void simt_fiber_main(simt::Fiber* fiber) {
#if SIMT_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &simt::state.scheduler_stack_bottom,
                                    &simt::state.scheduler_stack_size);
#endif
    simt::state.body(simt::state.body_context);
    fiber->wait = simt::Wait::done;
    simt::leave(*fiber, true);
    __builtin_unreachable();
}

// --- barriers and warp operations -------------------------------------------------------------------

inline void __syncthreads() { simt::wait_here(simt::Wait::barrier); }

namespace simt {
template <typename T> T warp_op(Op op, unsigned int mask, T value, int arg, int width) {
    static_assert(sizeof(T) <= 8, "warp operations move at most 8 bytes");
    Fiber& f = *state.current;
    f.op = op;
    f.mask = mask;
    f.arg = arg;
    f.width = width;
    f.value = 0;
    std::memcpy(&f.value, &value, sizeof(T));
    wait_here(Wait::warp);
    T out;
    std::memcpy(&out, &f.result, sizeof(T));
    return out;
}
}  // namespace simt

template <typename T> T __shfl_sync(unsigned m, T v, int lane, int width = 32) {
    return simt::warp_op(simt::Op::shfl, m, v, lane, width);
}
template <typename T> T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) {
    return simt::warp_op(simt::Op::shfl_up, m, v, (int)d, width);
}
template <typename T> T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) {
    return simt::warp_op(simt::Op::shfl_down, m, v, (int)d, width);
}
template <typename T> T __shfl_xor_sync(unsigned m, T v, int lanes, int width = 32) {
    return simt::warp_op(simt::Op::shfl_xor, m, v, lanes, width);
}
inline int __all_sync(unsigned m, int p) {
    return (int)simt::warp_op(simt::Op::all, m, (unsigned)(p != 0), 0, 32);
}
inline int __any_sync(unsigned m, int p) {
    return (int)simt::warp_op(simt::Op::any, m, (unsigned)(p != 0), 0, 32);
}
inline unsigned __ballot_sync(unsigned m, int p) {
    return simt::warp_op(simt::Op::ballot, m, (unsigned)(p != 0), 0, 32);
}
inline void __syncwarp(unsigned m = 0xffffffffu) {
    simt::warp_op(simt::Op::syncwarp, m, 0u, 0, 32);
}

// --- the scheduler ----------------------------------------------------------------------------------

namespace simt {

inline void fault(const char* format, ...) {
    std::fprintf(stderr, "simt: %s, block %u: ", state.kernel, state.block_idx.x);
    va_list args;
    va_start(args, format);
    std::vfprintf(stderr, format, args);
    va_end(args);
    std::fputc('\n', stderr);
    std::fflush(stderr);
    std::_Exit(3);
}

inline const char* wait_name(const Fiber& f) {
    switch (f.wait) {
        case Wait::barrier: return "waits at a __syncthreads";
        case Wait::done: return "has exited";
        case Wait::warp: return op_name(f.op);
        default: return "runs";
    }
}

// Complete the warp operations of the warp whose first thread is `base` that all their lanes
// have arrived at; false if none could be. A lane that waits for lanes at another warp
// operation is noted in `stuck`: a fault only once nothing else can move.
inline bool resolve_warp(unsigned base, const Fiber*& stuck) {
    std::vector<Fiber>& all = state.fibers;
    const unsigned n = (unsigned)all.size();
    bool progress = false;
    const unsigned lanes = std::min(32u, n - base);
    for (unsigned lane = 0; lane < lanes; ++lane) {
        Fiber& f = all[base + lane];
        if (f.wait != Wait::warp) continue;
        if (!((f.mask >> lane) & 1u))
            fault("thread %u calls %s with mask 0x%08x, which leaves out its own lane %u",
                  f.tid, op_name(f.op), f.mask, lane);
        if (f.width <= 0 || f.width > 32 || (f.width & (f.width - 1)))
            fault("thread %u calls %s with width %d (a power of two up to 32)", f.tid, op_name(f.op), f.width);
        bool complete = true;
        for (unsigned other = 0; other < 32; ++other) {
            if (!((f.mask >> other) & 1u)) continue;
            if (other >= lanes)
                fault("thread %u calls %s with mask 0x%08x, but lane %u of its warp does not "
                      "exist (%u threads in the block)", f.tid, op_name(f.op), f.mask, other, n);
            const Fiber& g = all[base + other];
            if (g.wait == Wait::warp && g.op == f.op && g.mask == f.mask && g.width == f.width)
                continue;
            if (g.wait == Wait::done || g.wait == Wait::barrier)
                fault("thread %u waits in %s (mask 0x%08x) for lane %u, which %s",
                      f.tid, op_name(f.op), f.mask, other, wait_name(g));
            complete = false;  // waits at another warp operation, which may complete first
            if (!stuck) stuck = &f;
        }
        if (!complete) continue;
        // Every lane of the mask is here: compute each one's result from the operands.
        unsigned ballot = 0;
        for (unsigned other = 0; other < 32; ++other)
            if ((f.mask >> other) & 1u) ballot |= (all[base + other].value != 0) << other;
        for (unsigned other = 0; other < 32; ++other) {
            if (!((f.mask >> other) & 1u)) continue;
            Fiber& g = all[base + other];
            const unsigned w = (unsigned)g.width, first = other & ~(w - 1), end = first + w;
            long long source = other;
            switch (g.op) {
                case Op::shfl: source = first + ((unsigned)g.arg & (w - 1)); break;
                case Op::shfl_up: source = (long long)other - g.arg < (long long)first ? other : other - g.arg; break;
                case Op::shfl_down: source = other + (unsigned)g.arg >= end ? other : other + g.arg; break;
                case Op::shfl_xor: source = (other ^ (unsigned)g.arg) >= end ? other : (other ^ (unsigned)g.arg); break;
                default: break;
            }
            if (g.op <= Op::shfl_xor) {
                if (!((f.mask >> source) & 1u))
                    fault("thread %u reads lane %lld in %s, which is not in the mask 0x%08x",
                          g.tid, source, op_name(g.op), f.mask);
                g.result = all[base + source].value;
            } else if (g.op == Op::all) {
                g.result = ballot == f.mask;
            } else if (g.op == Op::any) {
                g.result = ballot != 0;
            } else {
                g.result = ballot;
            }
        }
        for (unsigned other = 0; other < 32; ++other)
            if ((f.mask >> other) & 1u) all[base + other].wait = Wait::runnable;
        progress = true;
    }
    return progress;
}

// Complete every warp operation whose lanes have all arrived; false if none could be.
inline bool resolve_warps() {
    bool progress = false;
    const Fiber* stuck = nullptr;
    for (unsigned base = 0; base < state.fibers.size(); base += 32) progress |= resolve_warp(base, stuck);
    if (!progress && stuck)
        fault("thread %u waits in %s (mask 0x%08x) for lanes that wait at a different warp "
              "operation or with another mask: the lanes of a warp do not meet", stuck->tid,
              op_name(stuck->op), stuck->mask);
    return progress;
}

// Release a barrier that every thread of the block waits at; false if none waits.
inline bool resolve_barrier() {
    std::vector<Fiber>& all = state.fibers;
    const Fiber* waiting = nullptr;
    for (const Fiber& f : all)
        if (f.wait == Wait::barrier) { waiting = &f; break; }
    if (!waiting) return false;
    for (const Fiber& f : all) {
        if (f.wait == Wait::done)
            fault("thread %u has exited while thread %u waits at __syncthreads: a barrier must be "
                  "reached by every thread of the block", f.tid, waiting->tid);
    }
    for (Fiber& f : all) f.wait = Wait::runnable;
    return true;
}

struct Options {
    long long seed = -1;  // -1: threads and blocks in index order; else shuffled by this seed (below)
    std::vector<std::pair<unsigned char*, size_t>> poison;  // filled with 0xFF before each block
    std::vector<std::pair<unsigned char*, size_t>> dynamic_shared;  // (buffer, its capacity)
    size_t shared_mem = 0;
};

inline void run_block(const Options& options, std::mt19937_64& rng) {
    for (auto& region : options.poison) std::memset(region.first, 0xFF, region.second);
    for (auto& region : options.dynamic_shared) {
        ASAN_POISON_MEMORY_REGION(region.first, region.second);
        ASAN_UNPOISON_MEMORY_REGION(region.first, options.shared_mem);
        std::memset(region.first, 0xFF, options.shared_mem);
    }
    const unsigned n = (unsigned)state.fibers.size(), warps = (n + 31) / 32;
    for (unsigned t = 0; t < n; ++t) prepare(state.fibers[t], t);
    std::vector<unsigned> order, warp_order(warps);
    for (;;) {
        if (options.seed < 0) {
            // In thread order, each thread once to its next synchronisation point: the warps
            // move in step with each other.
            for (unsigned t = 0; t < n; ++t)
                if (state.fibers[t].wait == Wait::runnable) enter(state.fibers[t]);
        } else {
            // Shuffled: the warps one after another in a random order, each as far as it can go
            // (to a barrier) before the next starts, so that a warp runs ahead of the others;
            // within a warp, the lanes in a random order between two warp operations.
            for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
            std::shuffle(warp_order.begin(), warp_order.end(), rng);
            for (unsigned w : warp_order) {
                const Fiber* stuck = nullptr;
                do {
                    order.clear();
                    for (unsigned t = 32 * w; t < std::min(n, 32 * w + 32); ++t)
                        if (state.fibers[t].wait == Wait::runnable) order.push_back(t);
                    std::shuffle(order.begin(), order.end(), rng);
                    for (unsigned t : order) enter(state.fibers[t]);
                } while (!order.empty() && resolve_warp(32 * w, stuck));
            }
        }
        bool finished = true;
        for (const Fiber& f : state.fibers) finished = finished && f.wait == Wait::done;
        if (finished) return;
        if (!resolve_warps() && !resolve_barrier())
            fault("deadlock: every thread waits and nothing can complete");
    }
}

constexpr size_t STACK_BYTES = 128 * 1024;

// Runs `body` (the kernel, with its arguments bound) for every thread of every block.
inline void launch(unsigned grid, unsigned block, void (*body)(void*), void* context,
                   const Options& options) {
    if (block == 0 || block > 1024) fault("a block of %u threads (1 to 1024)", block);
    if (grid == 0) fault("a grid of 0 blocks");
    state.grid_dim = {grid, 1, 1};
    state.block_dim = {block, 1, 1};
    state.body = body;
    state.body_context = context;
    state.fibers.assign(block, Fiber{});
    for (Fiber& f : state.fibers) {
        f.stack_size = STACK_BYTES;
        f.stack = (unsigned char*)std::malloc(STACK_BYTES);
        if (!f.stack) fault("out of memory for %u fiber stacks", block);
    }
    std::vector<unsigned> blocks(grid);
    for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
    std::mt19937_64 rng(options.seed >= 0 ? (unsigned long long)options.seed : 0);
    if (options.seed >= 0) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (unsigned b : blocks) {
        state.block_idx = {b, 0, 0};
        run_block(options, rng);
    }
    for (Fiber& f : state.fibers) std::free(f.stack);
    state.fibers.clear();
}

// --- kernel arguments, as cudaLaunchKernel takes them: one pointer to each value ----------------------

// What the driver says of each argument: a scalar of `size` bytes, or an array whose elements
// are `size` bytes; `code` is numpy's dtype kind ('f', 'i', 'u', 'b').
struct Arg {
    bool array;
    char code;
    unsigned size;
    void* value;  // the scalar's bytes, or where the array's pointer is kept
};

template <typename T> constexpr char code_of() {
    if constexpr (std::is_same_v<T, bool>) return 'b';
    else if constexpr (is_float<T>) return 'f';
    else if constexpr (std::is_signed_v<T>) return 'i';
    else return 'u';
}

// The kernel would misread an argument of another size or kind, silently on a GPU: refuse it.
template <typename A> void check_arg(int i, const Arg& arg) {
    if constexpr (std::is_pointer_v<A>) {
        using E = std::remove_cv_t<std::remove_pointer_t<A>>;
        if (!arg.array) {
            unsigned long long v = 0;
            if (arg.size == 8 && arg.code == 'u') std::memcpy(&v, arg.value, 8);
            if (arg.size != 8 || arg.code != 'u' || v != 0)
                fault("argument %d is a pointer; got a %c%u scalar that is not a null pointer",
                      i, arg.code, arg.size * 8);
            return;
        }
        // float16/bfloat16 arrays travel as their raw 16 bits (unsigned short) in gpunet's kernels
        const bool raw_half = std::is_same_v<E, unsigned short> && arg.code == 'f' && arg.size == 2;
        if (sizeof(E) != arg.size || (code_of<E>() != arg.code && !raw_half))
            fault("argument %d points to %c%zu elements; got an array of %c%u", i, code_of<E>(),
                  sizeof(E) * 8, arg.code, arg.size * 8);
    } else {
        if (arg.array || sizeof(A) != arg.size || code_of<A>() != arg.code)
            fault("argument %d is a %c%zu scalar; got %s of %c%u", i, code_of<A>(), sizeof(A) * 8,
                  arg.array ? "an array" : "a scalar", arg.code, arg.size * 8);
    }
}

template <typename... A, size_t... I> void check_args(const Arg* args, std::index_sequence<I...>) {
    (check_arg<A>((int)I, args[I]), ...);
}

template <typename... A> struct Bound {
    void (*kernel)(A...);
    Arg* args;
    template <size_t... I> void call(std::index_sequence<I...>) {
        kernel(*static_cast<A*>(args[I].value)...);
    }
    static void run(void* self) { static_cast<Bound*>(self)->call(std::index_sequence_for<A...>{}); }
};

template <typename... A>
void launch_kernel(void (*kernel)(A...), unsigned grid, unsigned block, Arg* args, int nargs,
                   const Options& options) {
    if (nargs != (int)sizeof...(A)) fault("the kernel takes %zu arguments; got %d", sizeof...(A), nargs);
    check_args<A...>(args, std::index_sequence_for<A...>{});
    Bound<A...> bound{kernel, args};
    launch(grid, block, &Bound<A...>::run, &bound, options);
}

}  // namespace simt

#endif  // GPUNET_SIMT_H
