// The executable's side of one launch: read the request that tests/simt/harness.py writes on
// stdin, copy each array into a buffer of its exact size (so AddressSanitizer knows its bounds),
// run the kernel, and write the arrays back on stdout. Included after the kernel source, by the
// epilogue that lists the kernel's instantiations (simt::Entry) and defines its dynamic shared
// memory.
//
// Request, little-endian:
//   u32 magic "SIMT", u32 entry, u32 grid, u32 block, u64 shared_mem, i64 seed,
//   u32 regions, then per region u64 address, u64 bytes (static __shared__ memory to poison),
//   u32 args, then per argument:
//     u8 is_array, u8 dtype kind ('f', 'i', 'u', 'b'), u32 bytes of a scalar or of an element,
//     a scalar: its bytes; an array: u64 total bytes, u32 address modulo 16, then its bytes.
// Reply: the bytes of every array, in argument order.

#ifndef GPUNET_SIMT_MAIN_H
#define GPUNET_SIMT_MAIN_H

namespace simt {

struct Entry {
    const char* name;
    void (*launch)(unsigned grid, unsigned block, Arg* args, int nargs, const Options& options);
};

struct Region { unsigned char* start; size_t bytes; };

inline void read(void* out, size_t bytes) {
    if (bytes && std::fread(out, 1, bytes, stdin) != bytes) fault("the request ends early");
}
template <typename T> T read() { T v; read(&v, sizeof v); return v; }

struct Buffer {
    unsigned char* base = nullptr;  // what malloc gave
    unsigned char* data = nullptr;  // the array: base + the NumPy array's address modulo 16
    size_t bytes = 0;
};

inline int main(const Entry* entries, unsigned count, const Region* dynamic_shared, unsigned regions) {
    if (read<unsigned>() != 0x544d4953u) fault("not a simt request");
    const unsigned entry = read<unsigned>();
    if (entry >= count) fault("no entry %u (%u compiled)", entry, count);
    state.kernel = entries[entry].name;
    const unsigned grid = read<unsigned>(), block = read<unsigned>();
    Options options;
    options.shared_mem = read<unsigned long long>();
    options.seed = read<long long>();
    for (unsigned r = read<unsigned>(); r > 0; --r) {
        unsigned char* start = (unsigned char*)(uintptr_t)read<unsigned long long>();
        options.poison.emplace_back(start, (size_t)read<unsigned long long>());
    }
    for (unsigned r = 0; r < regions; ++r) {
        if (options.shared_mem > dynamic_shared[r].bytes)
            fault("%zu bytes of dynamic shared memory asked, %zu available", options.shared_mem,
                  dynamic_shared[r].bytes);
        options.dynamic_shared.emplace_back(dynamic_shared[r].start, dynamic_shared[r].bytes);
    }

    const unsigned nargs = read<unsigned>();
    std::vector<Arg> args(nargs);
    std::vector<Buffer> buffers(nargs);
    std::vector<unsigned long long> scalars(nargs);  // each scalar's bytes (at most 8)
    for (unsigned i = 0; i < nargs; ++i) {
        Arg& a = args[i];
        a.array = read<unsigned char>() != 0;
        a.code = (char)read<unsigned char>();
        a.size = read<unsigned>();
        if (!a.array) {
            if (a.size > 8) fault("argument %u: a scalar of %u bytes", i, a.size);
            read(&scalars[i], a.size);
            a.value = &scalars[i];
            continue;
        }
        Buffer& b = buffers[i];
        b.bytes = read<unsigned long long>();
        const unsigned offset = read<unsigned>() & 15u;
        void* base = nullptr;
        if (posix_memalign(&base, 16, offset + b.bytes)) fault("out of memory for argument %u", i);
        b.base = (unsigned char*)base;
        b.data = b.base + offset;
        read(b.data, b.bytes);
        ASAN_POISON_MEMORY_REGION(b.base, offset);  // the padding that keeps NumPy's alignment
        a.value = &b.data;
        // Where each array lives, for reading an ASan report (shown only when a launch fails).
        std::fprintf(stderr, "simt: argument %u is [%p, %p)\n", i, (void*)b.data, (void*)(b.data + b.bytes));
    }
    entries[entry].launch(grid, block, args.data(), (int)nargs, options);
    for (unsigned i = 0; i < nargs; ++i) {
        if (!args[i].array) continue;
        if (std::fwrite(buffers[i].data, 1, buffers[i].bytes, stdout) != buffers[i].bytes)
            fault("the reply could not be written");
        std::free(buffers[i].base);
    }
    return std::fflush(stdout) == 0 ? 0 : 4;
}

}  // namespace simt

#endif  // GPUNET_SIMT_MAIN_H
