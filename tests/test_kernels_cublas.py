"""gpunet.kernels.cublas, the ctypes binding, checked as far as a machine without a GPU allows.

- the library CuPy loads (through cuda.pathfinder) loads here, and has every symbol we call;
- every prototype matches its declaration in the ``cublas_api.h`` found beside that library:
  the number of arguments and each one's C kind (pointer, int, size_t, 64-bit int), and the
  result type;
- every enumerator value we pass matches the headers;
- the row-major to column-major mapping of ``gpunet.kernels.cuda.matmul`` computes A @ B, checked by
  running cuBLAS's own definition of GEMM on NumPy buffers.

The GPU runs of the same products are in tests/test_kernels_cuda.py (marked cuda).
"""

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import pytest

from gpunet.kernels import cublas, cuda as K


def _pathfinder():
    try:
        from cuda import pathfinder
        library = pathfinder.load_nvidia_dynamic_lib("cublas")
        headers = pathfinder.find_nvidia_header_directory("cublas")
    except Exception as exc:
        if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
            raise
        pytest.skip(f'cuBLAS is not installed (pip install -e ".[kernels]"): {exc}')
    if headers is None:
        pytest.skip("cuBLAS is installed without its headers")
    return library, Path(headers)


@pytest.fixture(scope="module")
def header_dir():
    return _pathfinder()[1]


@pytest.mark.nvrtc
def test_the_library_loads_with_every_symbol():
    _pathfinder()
    lib = cublas.library()
    for name, (result, arguments) in cublas.PROTOTYPES.items():
        function = getattr(lib, name)  # AttributeError if the symbol is missing
        assert function.restype is result and tuple(function.argtypes) == arguments


def declarations(header: Path) -> dict:
    """{name: (result type, [argument types])} of every CUBLASWINAPI function in a header."""
    text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    found = {}
    for result, name, args in re.findall(
            r"^[ \t]*(?:CUBLASAPI[ \t]+)?([A-Za-z_][\w \t*]*?)[ \t]+CUBLASWINAPI[ \t]+(\w+)\s*"
            r"\(([^)]*)\)\s*;", text, flags=re.M):
        params = [" ".join(a.split()) for a in args.split(",") if a.strip() and a.strip() != "void"]
        found.setdefault(name, (" ".join(result.split()), params))  # the first: the C one
    return found


ENUMS = {"cublasOperation_t", "cudaDataType", "cudaDataType_t", "cublasComputeType_t",
         "cublasGemmAlgo_t", "cublasPointerMode_t", "cublasMath_t", "cublasStatus_t"}
HANDLES = {"cublasHandle_t", "cudaStream_t"}


def c_kind(declaration: str):
    """The ctypes type a C parameter or result declaration is passed as."""
    if "*" in declaration:
        return ctypes.c_char_p if declaration.replace("const", "").split() == ["char*"] \
            else ctypes.c_void_p
    words = [w for w in declaration.replace("const", " ").split()]
    type_name = words[0]
    if type_name in HANDLES:
        return ctypes.c_void_p
    if type_name in ENUMS or type_name == "int":
        return ctypes.c_int
    return {"size_t": ctypes.c_size_t, "int64_t": ctypes.c_int64}[type_name]


@pytest.mark.nvrtc
def test_prototypes_match_the_header(header_dir):
    declared = declarations(header_dir / "cublas_api.h")
    for name, (result, arguments) in cublas.PROTOTYPES.items():
        assert name in declared, f"{name} is not declared in cublas_api.h"
        c_result, c_params = declared[name]
        assert len(c_params) == len(arguments), f"{name}: {c_params}"
        assert c_kind(c_result) is result, f"{name} returns {c_result}"
        for i, (param, ours) in enumerate(zip(c_params, arguments)):
            assert c_kind(param) is ours, f"{name} argument {i} is {param!r}, bound as {ours}"


def enumerators(*headers: Path) -> dict:
    values = {}
    for header in headers:
        for name, value in re.findall(r"\b([A-Z][A-Z0-9_]+)\s*=\s*(-?\d+)\s*[,}]", header.read_text()):
            values.setdefault(name, int(value))
    return values


@pytest.mark.nvrtc
def test_enumerators_match_the_headers(header_dir):
    candidates = [header_dir / "cublas_api.h", header_dir / "library_types.h"]
    try:  # library_types.h may live with the runtime's headers instead
        from cuda import pathfinder
        runtime = pathfinder.find_nvidia_header_directory("cudart")
        if runtime:
            candidates.append(Path(runtime) / "library_types.h")
    except Exception:
        pass
    values = enumerators(*[h for h in candidates if h.exists()])
    for name, ours in cublas.CONSTANTS.items():
        assert values.get(name) == ours, f"{name} is {values.get(name)} in the headers, {ours} here"


def test_the_parser_reads_a_declaration(tmp_path):
    header = tmp_path / "h.h"
    header.write_text("/* c */ CUBLASAPI cublasStatus_t CUBLASWINAPI cublasX(cublasHandle_t h, "
                      "const float* alpha, // host\n int64_t n, size_t bytes);\n"
                      "const char* CUBLASWINAPI cublasName(cublasStatus_t s);")
    found = declarations(header)
    assert found["cublasX"][1] == ["cublasHandle_t h", "const float* alpha", "int64_t n", "size_t bytes"]
    assert [c_kind(p) for p in found["cublasX"][1]] == [ctypes.c_void_p, ctypes.c_void_p,
                                                        ctypes.c_int64, ctypes.c_size_t]
    assert c_kind(found["cublasName"][0]) is ctypes.c_char_p


# --- the argument mapping, run through cuBLAS's definition of GEMM ----------------------------------

def column_major_gemm(op_a, op_b, m, n, k, a, lda, b, ldb, c, ldc):
    """C = op(A) op(B) (alpha 1, beta 0) on flat buffers read column-major, as cuBLAS defines it."""
    def matrix(buf, rows, cols, ld, op):  # op(X) is rows x cols
        stored = (rows, cols) if op == cublas.OP_N else (cols, rows)
        assert ld >= max(1, stored[0]), "leading dimension too small"
        x = np.lib.stride_tricks.as_strided(buf, shape=stored, strides=(buf.itemsize, ld * buf.itemsize))
        return x if op == cublas.OP_N else x.T
    product = matrix(a, m, k, lda, op_a) @ matrix(b, k, n, ldb, op_b)
    out = np.lib.stride_tricks.as_strided(c, shape=(m, n), strides=(c.itemsize, ldc * c.itemsize))
    out[...] = product


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 3, 4), (128, 10, 256), (3, 7, 1), (1, 9, 6)])
@pytest.mark.parametrize("a_order", ["C", "F"])
@pytest.mark.parametrize("b_order", ["C", "F"])
def test_row_major_product_through_column_major_gemm(rng, m, n, k, a_order, b_order):
    a = np.asarray(rng.standard_normal((m, k)), order=a_order)
    b = np.asarray(rng.standard_normal((k, n)), order=b_order)
    op_b, op_a, ld_b, ld_a, ld_c = K.gemm_arguments(m, n, k, a.flags.c_contiguous, b.flags.c_contiguous)
    c = np.full(m * n, np.nan)
    # What matmul hands cuBLAS: B first, (n, m, k), the buffers as they lie in memory.
    flat = lambda x: x.ravel(order="K")  # noqa: E731
    column_major_gemm(op_b, op_a, n, m, k, flat(b), ld_b, flat(a), ld_a, c, ld_c)
    np.testing.assert_allclose(c.reshape(m, n), a @ b, rtol=1e-12)
