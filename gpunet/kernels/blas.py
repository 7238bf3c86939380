"""The three BLAS calls numpy does not expose, from the OpenBLAS numpy itself loaded.

An optimizer step is a few passes over the flat parameter buffer. numpy has no fused
multiply-add over arrays, so ``buf = momentum * buf + g; p -= lr * buf`` costs four passes and
a scratch buffer. BLAS has exactly the operations needed:

    axpy:   y = alpha * x + y
    axpby:  y = alpha * x + beta * y
    gemm:   C = A @ B + beta * C        (numpy's matmul always has beta = 0)

With the first two the momentum update costs two passes and no scratch; with gemm (called from
the compiled kernels, see ``gemm_address``) a layer's backward adds its weight gradient straight
into the momentum buffer (``Parameter.grad_decay``) and the update is one pass. Calling them
through ``ctypes`` from the OpenBLAS that numpy's wheel ships uses the same library and thread
pool as ``np.matmul`` (a second BLAS, such as SciPy's, would bring a second pool of spinning
threads).

Only the ILP64 builds with suffixed names (``scipy_cblas_saxpy64_``, numpy >= 2.0 wheels, and
``cblas_saxpy64_``, numpy 1.22-1.26 wheels) are used: their integer width is certain. Anywhere
else (Accelerate, MKL, a distribution's numpy) the functions below compute the same thing with
numpy operations. ``GPUNET_BLAS=numpy`` forces that fallback.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

# (symbol prefix, symbol suffix) of the ILP64 CBLAS builds numpy's wheels ship.
_ILP64_NAMES = (("scipy_cblas_", "64_"), ("cblas_", "64_"))
_C_TYPES = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}


def _numpy_blas_libraries() -> list[str]:
    """The OpenBLAS files bundled with numpy (Linux and Windows wheels, then macOS wheels)."""
    root = os.path.dirname(np.__file__)
    found = []
    for folder in (root + ".libs", os.path.join(root, ".dylibs")):
        found += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    return found


def _load():
    """{(kind, dtype): ctypes function} from numpy's OpenBLAS, and a description; or ({}, why)."""
    if os.environ.get("GPUNET_BLAS", "").lower() == "numpy":
        return {}, "numpy fallback (GPUNET_BLAS=numpy)"
    i64, p = ctypes.c_int64, ctypes.c_void_p  # gemm is called from C only: see gemm_address
    for path in _numpy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: this returns the same handle
        except OSError:
            continue
        for prefix, suffix in _ILP64_NAMES:
            functions = {}
            for dtype, (letter, scalar) in _C_TYPES.items():
                names = {kind: f"{prefix}{letter}{kind}{suffix}"
                         for kind in ("axpy", "axpby", "gemm")}
                found = {kind: getattr(lib, name, None) for kind, name in names.items()}
                if None in found.values():
                    break
                found["axpy"].argtypes = [i64, scalar, p, i64, p, i64]
                found["axpby"].argtypes = [i64, scalar, p, i64, scalar, p, i64]
                for kind, f in found.items():
                    f.restype = None
                    functions[kind, dtype] = f
            else:
                return functions, f"{os.path.basename(path)} ({prefix}*{suffix})"
    return {}, "numpy fallback (numpy's BLAS exports no ILP64 axpy, axpby and gemm)"


_FUNCTIONS, DESCRIPTION = _load()


def _thread_setter():
    """numpy's OpenBLAS ``set_num_threads``, or None."""
    for path in _numpy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                return setter
    return None


def thread_addresses() -> tuple[int, int] | None:
    """The addresses of numpy's OpenBLAS ``set_num_threads`` and ``get_num_threads``, for the
    compiled conv kernels, which run their own threads with BLAS on one thread each meanwhile;
    None where either is missing."""
    for path in _numpy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            pair = [getattr(lib, f"{prefix}_{kind}_num_threads{suffix}", None)
                    for kind in ("set", "get")]
            if None not in pair:
                return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in pair)
    return None


def set_threads(n: int) -> bool:
    """Let numpy's OpenBLAS use ``n`` threads from now on; False where it cannot be told.

    For processes that share a machine (the ranks of a data-parallel run): OpenBLAS starts a
    thread per core in every process, and ranks x cores spinning threads on the same cores run
    many times slower (34 s against 0.95 s an epoch, measured with 2 ranks on 2 cores)."""
    setter = _thread_setter()
    if setter is None:
        return False
    setter(max(1, int(n)))
    return True


def _blas_function(kind: str, x, y):
    """The BLAS routine for contiguous host arrays x and y of one float dtype, else None."""
    if not _FUNCTIONS or type(x) is not np.ndarray or type(y) is not np.ndarray:
        return None
    if x.dtype != y.dtype or x.shape != y.shape or not y.flags.writeable \
            or not (x.flags.c_contiguous and y.flags.c_contiguous):
        return None
    if np.may_share_memory(x, y) and x.ctypes.data != y.ctypes.data:
        return None  # overlapping but not the same array: leave it to numpy, which buffers
    return _FUNCTIONS.get((kind, x.dtype))


def available(x) -> bool:
    """Whether axpy/axpby on arrays like ``x`` run in BLAS (not the numpy fallback)."""
    return (_FUNCTIONS.get(("axpy", getattr(x, "dtype", None))) is not None
            and type(x) is np.ndarray)


def _address(a) -> int:
    """The data pointer of a contiguous array; the buffer protocol is 3x cheaper than .ctypes."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):  # read-only or empty
        return a.ctypes.data


def axpy(alpha: float, x, y):
    """y += alpha * x, in place, in one pass; returns y."""
    f = _blas_function("axpy", x, y)
    if f is None:
        y += alpha * x
    elif y.size:
        f(y.size, alpha, _address(x), 1, _address(y), 1)
    return y


def axpby(alpha: float, x, beta: float, y):
    """y = alpha * x + beta * y, in place, in one pass; returns y."""
    f = _blas_function("axpby", x, y)
    if f is None:
        product = alpha * x  # first: x may overlap y
        y *= beta
        y += product
    elif y.size:
        f(y.size, alpha, _address(x), 1, beta, _address(y), 1)
    return y


def bound_axpy(x, y):
    """``step(alpha)``: y += alpha * x for these two arrays, with the checks and pointers of
    :func:`axpy` worked out once: for buffers that live as long as the caller, such as an
    optimizer's (about 3 us a call saved)."""
    f = _blas_function("axpy", x, y)
    if f is None or not y.size:
        return lambda alpha: axpy(alpha, x, y)
    n, px, py = y.size, _address(x), _address(y)

    def step(alpha, _keep=(x, y)):  # _keep: the arrays stay alive as long as their pointers
        f(n, alpha, px, 1, py, 1)
    return step


def gemm_address(dtype) -> int | None:
    """The address of the ILP64 CBLAS gemm for ``dtype`` (float32, float64), or None. The
    compiled kernels call it directly (``cpu_kernels.gemm``): a ctypes call per product would
    cost more than the pass it saves."""
    f = _FUNCTIONS.get(("gemm", np.dtype(dtype)))
    return None if f is None else ctypes.cast(f, ctypes.c_void_p).value
