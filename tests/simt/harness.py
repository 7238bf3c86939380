"""Runs gpunet's CUDA kernel sources on the CPU: the test-side twin of a GPU launch.

``Module(source, entries)`` compiles ``simt.h`` (the CUDA the kernels use, for g++), the very
source string that gpunet hands to CuPy, and a table of its template instantiations into one
executable, built under AddressSanitizer and cached by the hash of everything that went into it.
``module.launch(launch, args)`` takes the ``Launch`` that gpunet's own launch configuration
computed and the argument tuple its launcher builds (NumPy arrays where the GPU gets CuPy
arrays), runs the kernel in a child process and copies every array back into place.

A launch runs in its own process because AddressSanitizer must be the first library of the
process it checks (a Python interpreter is not built with it), and because a fault, whether
ASan's report or the scheduler's (a warp that does not meet, a barrier not every thread
reaches, a deadlock), should end that launch and fail its test, not the test session.

The one change made to a kernel source on its way to g++: ``extern __shared__`` becomes
``extern``, since C++ has no storage class that is both (``__shared__`` alone is ``static``,
see simt.h). The array it declares is defined after the source, 256 KiB, and each block gets the
launch's ``shared_mem`` bytes of it, the rest poisoned for ASan.

What the harness cannot model: blocks run one after another, so memory ordering between
blocks (beyond what ``__threadfence`` and the atomics promise: here everything is ordered) and
races between blocks are not exercised; threads switch only at barriers and warp operations, so
a race between two of them is seen only as a result that depends on their order (the shuffled
mode), never as a torn or interleaved read-modify-write; nothing of timing, occupancy, register
or shared-memory limits (tests/test_kernels_cuda_compile.py checks those with ptxas), or the device's
float arithmetic: NVRTC contracts a * b + c into one FMA and CuPy compiles with -ftz=true
(subnormals flushed to zero), and the device's exp/log are within 2 ulp where the host's are
correctly rounded or nearly so, so results agree to the tests' tolerances, not bit for bit.
Launches are 1-D (as gpunet's are), and two differently named ``extern __shared__`` arrays get
a buffer each, where a GPU gives them one address (gpunet's kernels declare one). The harness is
stricter than a GPU in one place: a thread that exits while the others wait at a
``__syncthreads`` is a fault, where recent GPUs let the others go.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADERS = ("simt.h", "simt_main.h")
DYNAMIC_SHARED_BYTES = 256 * 1024  # above every GPU's opt-in limit (227 KiB on Hopper)
FLAGS = ("-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
         # Fixed addresses, so that the static __shared__ variables found by nm in the built
         # file are where the running process has them.
         "-no-pie", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-variable")
ASAN_OPTIONS = ("detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=2:"
                "detect_stack_use_after_return=0:detect_odr_violation=0")


class KernelFault(AssertionError):
    """The kernel did something a GPU would not forgive: ASan's or the scheduler's report."""


def compiler() -> str | None:
    """The C++ compiler the harness builds with ($CXX, else g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    path = Path(os.environ.get("GPUNET_SIMT_CACHE", Path(tempfile.gettempdir()) / "gpunet-simt"))
    path.mkdir(parents=True, exist_ok=True)
    return path


_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;{}]*?)\b(\w+)\s*\[\s*\]\s*;")


def translation_unit(source: str, entries: list[str], name: str) -> str:
    """The C++ file: the header, the kernel source as it is (but for ``extern __shared__``),
    then the entry table and the definition of the dynamic shared memory."""
    declarations = {m.group(2): m.group(1) for m in _EXTERN_SHARED.finditer(source)}
    body, rewritten = re.subn(r"\bextern\s+__shared__\b", "extern", source)
    assert rewritten == len(_EXTERN_SHARED.findall(source)), \
        f"{name}: an extern __shared__ declaration the harness does not understand"
    launchers = ",\n".join(
        f'    {{"{e}", [](unsigned g, unsigned b, simt::Arg* a, int n, const simt::Options& o) '
        f"{{ simt::launch_kernel(&{e}, g, b, a, n, o); }}}}" for e in entries)
    shared = "".join(f"{prefix}{array}[{DYNAMIC_SHARED_BYTES}];\n"
                     for array, prefix in declarations.items())
    regions = ", ".join(f"{{(unsigned char*){a}, sizeof({a})}}" for a in declarations) or "{nullptr, 0}"
    return (f'#include "simt.h"\n#line 1 "{name}"\n{body}\n#line 1 "{name} (simt entries)"\n'
            f'#include "simt_main.h"\n{shared}'
            f"static const simt::Entry simt_entries[] = {{\n{launchers}\n}};\n"
            f"static const simt::Region simt_dynamic_shared[] = {{{regions}}};\n"
            f"int main() {{ return simt::main(simt_entries, {len(entries)}, simt_dynamic_shared, "
            f"{len(declarations)}); }}\n")


def _static_shared(executable: Path) -> list[tuple[int, int]]:
    """(address, bytes) of the kernels' ``__shared__`` variables: the function-local statics of
    functions in the global namespace, which C++ names ``_ZZ<length><name>...E<variable>`` (a
    function in a namespace, the header's or the C++ library's, has ``_ZZN`` or ``_ZZS``)."""
    listing = subprocess.run(["nm", "-S", "--defined-only", str(executable)], check=True,
                             capture_output=True, text=True).stdout
    regions = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "bBdDuV" and re.match(r"_ZZ\d", parts[3]):
            regions.append((int(parts[0], 16), int(parts[1], 16)))
    return regions


class Module:
    """One kernel source with the instantiations ``entries`` (as CuPy's name_expressions name
    them), built on first use."""

    def __init__(self, source: str, entries: list[str], name: str = "kernel"):
        self.source, self.entries, self.name = source, list(entries), name

    @functools.cached_property
    def executable(self) -> Path:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("the SIMT harness needs a C++ compiler (g++, or $CXX)")
        unit = translation_unit(self.source, self.entries, self.name)
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join(
            [unit, version, *FLAGS, *((HERE / h).read_text() for h in HEADERS)]).encode()).hexdigest()
        target = cache_dir() / f"{key[:24]}"
        if not target.exists():
            scratch = Path(tempfile.mkdtemp(dir=cache_dir()))
            (scratch / "kernel.cpp").write_text(unit)
            built = subprocess.run([cxx, *FLAGS, "-I", str(HERE), "kernel.cpp", "-o", "kernel"],
                                   cwd=scratch, capture_output=True, text=True)
            if built.returncode:
                raise RuntimeError(f"g++ rejects {self.name}:\n{built.stderr[-6000:]}")
            os.replace(scratch / "kernel", target)  # atomic: concurrent sessions share the cache
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    @functools.cached_property
    def static_shared(self) -> list[tuple[int, int]]:
        return _static_shared(self.executable)

    def launch(self, launch, args: tuple, *, poison=(), seed: int | None = None) -> None:
        """Run ``launch`` (a ``gpunet.kernels.cuda.Launch``) on ``args``; the arrays among them are
        updated in place, as device arrays would be.

        ``poison``: arrays filled with all-ones bytes (NaN as floats) first, so that an element
        the kernel does not write fails the comparison. ``seed``: between two barriers, run the
        warps one after another in an order shuffled by it, each running ahead to the next
        barrier, with the lanes of each warp and the blocks shuffled too (without a seed,
        threads and blocks go in index order and the warps move in step).
        """
        if launch.kernel not in self.entries:
            raise ValueError(f"{launch.kernel} is not an entry of {self.name}: {self.entries}")
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        for p in poison:
            if not any(p is a for a in arrays):
                raise ValueError("a poisoned array must be one of the kernel's arguments")
            _bytes(p).fill(0xFF)
        for i, a in enumerate(arrays):
            if any(np.shares_memory(a, b) for b in arrays[i + 1:]):
                raise ValueError("two arguments share memory; the harness copies each array, "
                                 "so it cannot keep them aliased")
        request = [struct.pack("<IIIIQq", 0x544D4953, self.entries.index(launch.kernel),
                               launch.grid, launch.block, launch.shared_mem,
                               -1 if seed is None else seed)]
        request.append(struct.pack("<I", len(self.static_shared)))
        request += [struct.pack("<QQ", address, size) for address, size in self.static_shared]
        request.append(struct.pack("<I", len(args)))
        for i, a in enumerate(args):
            request.append(_encode(i, a))
        ran = subprocess.run([str(self.executable)], input=b"".join(request), capture_output=True,
                             timeout=300, env={**os.environ, "ASAN_OPTIONS": ASAN_OPTIONS})
        if ran.returncode:
            raise KernelFault(f"{launch} failed (exit status {ran.returncode}):\n"
                              f"{ran.stderr.decode(errors='replace')[-8000:]}")
        reply, offset = ran.stdout, 0
        for a in arrays:
            _bytes(a)[:] = np.frombuffer(reply, np.uint8, a.nbytes, offset)
            offset += a.nbytes
        assert offset == len(reply), "the reply has more bytes than the arrays"


def _bytes(a: np.ndarray) -> np.ndarray:
    """A contiguous array's bytes, as a writable view (0-d arrays too)."""
    return a.reshape(-1).view(np.uint8)


def _kind(dtype: np.dtype) -> str:
    if dtype.name == "bfloat16":  # ml_dtypes' kind is "V"; to the kernels it is a float
        return "f"
    if dtype.kind not in "fiub":
        raise TypeError(f"the harness passes float, int, uint and bool values, got {dtype}")
    return dtype.kind


def _encode(i: int, a) -> bytes:
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError(f"argument {i}: the kernels index raw memory, so arrays must be "
                             "C-contiguous")
        data = _bytes(a).tobytes()
        return struct.pack("<BBIQI", 1, ord(_kind(a.dtype)), a.dtype.itemsize, a.nbytes,
                           a.ctypes.data % 16) + data
    if isinstance(a, np.generic):
        return struct.pack("<BBI", 0, ord(_kind(a.dtype)), a.dtype.itemsize) + a.tobytes()
    # CuPy would guess a C type for a Python number; the launchers pass NumPy scalars instead.
    raise TypeError(f"argument {i}: a NumPy array or scalar, got {type(a).__name__}")


# --- ElementwiseKernels ------------------------------------------------------------------------------
#
# CuPy writes the loop of an ElementwiseKernel itself (CArray, CIndexer: CuPy's code, not
# gpunet's). Here the operation, gpunet's part, is wrapped in a plain grid-stride loop over a 2-D
# output with broadcast (stride 0) operands, declared the way CuPy's generated code declares
# them: ``const T& x = ...`` for inputs and ``T& y = ...`` for outputs.

ELEMENTWISE_TYPES = {"float32": "float", "float64": "double", "float16": "float16",
                     "bfloat16": "bfloat16", "int64": "long long", "int32": "int",
                     "uint64": "unsigned long long", "uint32": "unsigned int", "bool": "bool"}


def _params(spec: str) -> list[tuple[str, str]]:
    return [tuple(p.split()) for p in spec.split(",")]


def _is_concrete(type_name: str) -> bool:
    """A parameter type that names a dtype (CuPy's ``uint32 k``) rather than a type letter
    (``T x``, resolved from the arguments' dtypes at the call): as in CuPy's ParameterInfo, one
    character is a type letter and anything longer a dtype's name."""
    if len(type_name) == 1:
        return False
    if type_name not in ELEMENTWISE_TYPES:
        raise TypeError(f"the harness has no C type for an ElementwiseKernel parameter of type "
                        f"{type_name!r}; add it to ELEMENTWISE_TYPES")
    return True


def _c_type(type_name: str) -> str:
    return ELEMENTWISE_TYPES[type_name] if _is_concrete(type_name) else type_name


def _letters(definition) -> list[str]:
    return list(dict.fromkeys(t for t, _ in _params(definition[0]) + _params(definition[1])
                              if not _is_concrete(t)))


def parameter_names(definition) -> list[str]:
    """The names of an ElementwiseKernel's inputs, then its outputs."""
    return [n for _, n in _params(definition[0]) + _params(definition[1])]


def elementwise_source(definition) -> str:
    """A __global__ template over the type letters of ``definition`` (CuPy's ElementwiseKernel
    arguments: in_params, out_params, operation, name). The loop index is ``i``, as in CuPy's
    generated loop: the element's position in C order of the (broadcast) output."""
    in_params, out_params, operation, name = definition
    ins, outs = _params(in_params), _params(out_params)
    arguments = [f"{'const ' if k < len(ins) else ''}{_c_type(t)}* _raw_{n}, long long _{n}_r, "
                 f"long long _{n}_c" for k, (t, n) in enumerate(ins + outs)]
    views = [f"const {_c_type(t)}& {n} = _raw_{n}[_r * _{n}_r + _c * _{n}_c];" for t, n in ins]
    views += [f"{_c_type(t)}& {n} = _raw_{n}[_r * _{n}_r + _c * _{n}_c];" for t, n in outs]
    return (f"template <{', '.join('typename ' + t for t in _letters(definition))}>\n"
            f"__global__ void {name}({', '.join(arguments)}, long long _rows, long long _cols) {{\n"
            "    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < _rows * _cols;\n"
            "         i += (long long)gridDim.x * blockDim.x) {\n"
            "        const long long _r = i / _cols, _c = i - _r * _cols;\n"
            f"        {' '.join(views)}\n"
            f"        {operation}\n"
            "    }\n}\n")


def elementwise_entry(definition, dtypes: dict) -> str:
    """The instantiation for ``dtypes`` (a dtype per type letter)."""
    return f"{definition[3]}<{', '.join(ELEMENTWISE_TYPES[np.dtype(dtypes[t]).name] for t in _letters(definition))}>"


def elementwise_arguments(definition, operands: dict, shape: tuple[int, int]) -> tuple:
    """The wrapper's arguments: each operand (by parameter name) with its strides in elements
    for ``shape``, broadcast as NumPy broadcasts (size-1 and missing axes get stride 0)."""
    rows, cols = shape
    args = []
    for n in parameter_names(definition):
        a = operands[n]
        view = np.broadcast_to(a, shape)
        r, c = (s // a.itemsize for s in view.strides)
        args += [a, np.int64(r), np.int64(c)]
    return (*args, np.int64(rows), np.int64(cols))
