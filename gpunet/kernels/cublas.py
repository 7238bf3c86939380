"""gpunet's own cuBLAS binding: the matrix products of a training step, eager or captured.

Why not CuPy's: CuPy's binding (``cupy_backends.cuda.libs.cublas``) calls ``cublasSetStream``
before every GEMM and raises ``NotImplementedError`` while the stream is being captured into a
CUDA graph (cupy issue 6290, still open in CuPy 14.2), and it has no ``cublasSetWorkspace``, so
cuBLAS 12.2+ would put allocation nodes of its own into a captured graph. A GEMM itself neither
synchronises nor allocates once the handle has a workspace and reads alpha and beta from host
memory, which is how NVIDIA documents cuBLAS under stream capture. So gpunet calls the handful
of cuBLAS functions it needs through ctypes, on the library CuPy itself loads (found by
``cuda.pathfinder``), with a handle, stream and workspace of its own. The eager products go
through the same handle, so the handle is created, and cuBLAS has chosen its kernels, before any
capture. We chose this over GEMM kernels of our own: cuBLAS is faster on every shape we train.

This module never imports cupy: it deals in device pointers (integers). ``cuda_kernels.matmul``
turns arrays into the arguments. Every prototype below is checked against ``cublas_api.h`` on
the machine by ``tests/test_kernels_cublas.py``, with no GPU needed.
"""

from __future__ import annotations

import ctypes
import functools

# cublasStatus_t, cublasOperation_t, cudaDataType, cublasComputeType_t, cublasGemmAlgo_t,
# cublasPointerMode_t and cublasMath_t are C enums: ints in the C ABI.
_int, _ptr, _size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t

# name: (result type, argument types), exactly as cublas_api.h declares them (pointers of any
# kind are c_void_p: the caller passes addresses).
PROTOTYPES = {
    "cublasCreate_v2": (_int, (_ptr,)),
    "cublasDestroy_v2": (_int, (_ptr,)),
    "cublasSetStream_v2": (_int, (_ptr, _ptr)),
    "cublasSetWorkspace_v2": (_int, (_ptr, _ptr, _size)),
    "cublasSetPointerMode_v2": (_int, (_ptr, _int)),
    "cublasGetStatusString": (ctypes.c_char_p, (_int,)),
    "cublasSgemm_v2": (_int, (_ptr, _int, _int, _int, _int, _int, _ptr, _ptr, _int, _ptr, _int,
                              _ptr, _ptr, _int)),
    "cublasDgemm_v2": (_int, (_ptr, _int, _int, _int, _int, _int, _ptr, _ptr, _int, _ptr, _int,
                              _ptr, _ptr, _int)),
    "cublasGemmEx": (_int, (_ptr, _int, _int, _int, _int, _int, _ptr, _ptr, _int, _int, _ptr,
                            _int, _int, _ptr, _ptr, _int, _int, _int, _int)),
}

# Enumerator values used here, from cublas_api.h and library_types.h (also checked by the test).
CONSTANTS = {
    "CUBLAS_STATUS_SUCCESS": 0,
    "CUBLAS_OP_N": 0,
    "CUBLAS_OP_T": 1,
    "CUBLAS_POINTER_MODE_HOST": 0,
    "CUDA_R_32F": 0,
    "CUDA_R_64F": 1,
    "CUDA_R_16F": 2,
    "CUDA_R_16BF": 14,
    "CUBLAS_COMPUTE_32F": 68,
    "CUBLAS_GEMM_DEFAULT": -1,
}
OP_N, OP_T = CONSTANTS["CUBLAS_OP_N"], CONSTANTS["CUBLAS_OP_T"]

# The workspace cuBLAS may use per stream. NVIDIA recommends 32 MiB on Hopper; it must outlive
# every graph that captured a product, so the caller allocates it once and never frees it.
WORKSPACE_BYTES = 32 << 20


class CublasError(RuntimeError):
    """A cuBLAS call returned an error status; the message names the call and the status."""


@functools.cache
def library() -> ctypes.CDLL:
    """libcublas, the copy CuPy loads, with every function of PROTOTYPES typed."""
    from cuda.pathfinder import load_nvidia_dynamic_lib  # a dependency of CuPy 14

    lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
    for name, (result, arguments) in PROTOTYPES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


def check(status: int, call: str) -> None:
    if status != CONSTANTS["CUBLAS_STATUS_SUCCESS"]:
        text = library().cublasGetStatusString(status)
        raise CublasError(f"{call} failed with status {status} "
                          f"({text.decode() if text else 'unknown status'})")


class Handle:
    """One cuBLAS handle on the current device, and the stream and workspace it works on.

    Pointer mode stays host: alpha and beta are read from host memory when a product is queued,
    which is what capture needs (the values are baked into the graph).
    """

    def __init__(self):
        lib = library()
        handle = ctypes.c_void_p()
        check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        self.ptr = handle.value
        check(lib.cublasSetPointerMode_v2(self.ptr, CONSTANTS["CUBLAS_POINTER_MODE_HOST"]),
              "cublasSetPointerMode_v2")
        self.stream = None
        # alpha and beta live here, in host memory that outlives the call.
        self._scalars = {"f": (ctypes.c_float * 2)(), "d": (ctypes.c_double * 2)()}

    def set_stream(self, stream_ptr: int, workspace_ptr: int, workspace_bytes: int) -> None:
        """Work on ``stream_ptr`` with ``workspace_ptr`` (that stream's own workspace, which the
        caller keeps alive). cublasSetStream resets the workspace to cuBLAS's own pool, which
        would put allocations into a captured graph, so the workspace is set again after it."""
        lib = library()
        check(lib.cublasSetStream_v2(self.ptr, stream_ptr), "cublasSetStream_v2")
        check(lib.cublasSetWorkspace_v2(self.ptr, workspace_ptr, workspace_bytes),
              "cublasSetWorkspace_v2")
        self.stream = stream_ptr

    def gemm(self, kind: str, op_a: int, op_b: int, m: int, n: int, k: int, alpha: float,
             a_ptr: int, lda: int, b_ptr: int, ldb: int, beta: float, c_ptr: int, ldc: int,
             data_type: int | None = None) -> None:
        """Column-major C = alpha op(A) op(B) + beta C, as cuBLAS defines it.

        ``kind`` is "s" (float32), "d" (float64) or "ex" (GemmEx with ``data_type`` for A, B and
        C, float32 compute and scalars: float16 and bfloat16).
        """
        lib = library()
        if kind == "d":
            scalars = self._scalars["d"]
        else:
            scalars = self._scalars["f"]
        scalars[0], scalars[1] = alpha, beta
        alpha_ptr = ctypes.addressof(scalars)
        beta_ptr = alpha_ptr + ctypes.sizeof(scalars) // 2
        if kind == "s":
            status = lib.cublasSgemm_v2(self.ptr, op_a, op_b, m, n, k, alpha_ptr, a_ptr, lda,
                                        b_ptr, ldb, beta_ptr, c_ptr, ldc)
            call = "cublasSgemm_v2"
        elif kind == "d":
            status = lib.cublasDgemm_v2(self.ptr, op_a, op_b, m, n, k, alpha_ptr, a_ptr, lda,
                                        b_ptr, ldb, beta_ptr, c_ptr, ldc)
            call = "cublasDgemm_v2"
        else:
            status = lib.cublasGemmEx(self.ptr, op_a, op_b, m, n, k, alpha_ptr, a_ptr, data_type,
                                      lda, b_ptr, data_type, ldb, beta_ptr, c_ptr, data_type, ldc,
                                      CONSTANTS["CUBLAS_COMPUTE_32F"],
                                      CONSTANTS["CUBLAS_GEMM_DEFAULT"])
            call = "cublasGemmEx"
        check(status, call)
