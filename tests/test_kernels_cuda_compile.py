"""Every CUDA kernel of gpunet, compiled by NVRTC exactly as CuPy 14 compiles it at run time.

No GPU is needed: only CuPy and NVRTC (``pip install -e ".[kernels]"``). The options are CuPy's
own, assembled by its own functions, so a kernel that compiles here is one that CuPy will build:

- ``cupy._core.core.assemble_cupy_compiler_options``: CuPy's include paths (its headers, CCCL,
  the CUDA headers found by cuda.pathfinder) and ``--std=c++17`` unless one is given;
- ``-ftz=true``, which ``cupy.cuda.compiler._compile_with_cache_cuda`` adds (checked below);
- ``cupy.cuda.compiler._compile_using_nvrtc_no_warning``, which adds the architecture and
  ``--device-as-default-execution-space`` (and ``--pch``), registers the name expressions and
  runs NVRTC through ``_NVRTCProgram``. The one thing a GPU would answer, the architecture, is
  fixed to what CuPy picks on an H100/H200: ``-arch=sm_90``, compiled to a cubin.

ElementwiseKernels are compiled from the source CuPy's own generator writes for them
(``cupy._core._kernel._get_elementwise_kernel_code``), for every dtype gpunet calls them with.
Each compile also reports ptxas's resource use, which is checked against the launch
configuration that ``gpunet.kernels.cuda`` computes for the same kernel. Without CuPy these tests skip,
unless ``GPUNET_REQUIRE_NVRTC=1`` (as in CI) turns that into a failure.
"""

import inspect
import io
import os
import re

import numpy as np
import pytest

from gpunet.kernels import cuda as K

pytestmark = pytest.mark.nvrtc

ARCH = "90"  # Hopper: the H100 and H200 this project is lent


def _cupy_compiler():
    try:
        import cupy
        from cupy._core import core, _kernel, _carray
        from cupy.cuda import compiler
        compiler._get_nvrtc_version()
    except Exception as exc:
        if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
            raise
        pytest.skip(f'CuPy with NVRTC is not installed (pip install -e ".[kernels]"): {exc}')
    return cupy, core, _kernel, _carray, compiler


@pytest.fixture(scope="module")
def nvrtc():
    """compile(source, name_expressions) -> ptxas's log, compiled the way CuPy compiles."""
    cupy, core, _, _, compiler = _cupy_compiler()
    real = compiler._get_arch_for_options_for_nvrtc
    # CuPy's choice for compute capability 9.0 (it asks the GPU, which CI does not have).
    compiler._get_arch_for_options_for_nvrtc = lambda arch=None: (f"-arch=sm_{ARCH}", "cubin")

    def compile(source, name_expressions=None, options=K.COMPILE_OPTIONS):
        options = core.assemble_cupy_compiler_options(tuple(options)) + ("-ftz=true",)
        log = io.StringIO()
        try:
            compiler._compile_using_nvrtc_no_warning(
                source, options + ("--ptxas-options=-v",), ARCH, "kern.cu", name_expressions,
                log, True, False, None)
        except compiler.CompileException as exc:
            pytest.fail(f"NVRTC rejects {name_expressions or 'the kernel'}:\n{exc.get_message()}")
        return log.getvalue()

    yield compile
    compiler._get_arch_for_options_for_nvrtc = real


def test_options_are_still_cupys():
    """The one option copied from CuPy rather than asked of it: -ftz=true, added by
    _compile_with_cache_cuda. If CuPy stops adding it, this test says so."""
    _, _, _, _, compiler = _cupy_compiler()
    assert "options += ('-ftz=true',)" in inspect.getsource(compiler._compile_with_cache_cuda)
    assert "--device-as-default-execution-space" in inspect.getsource(
        compiler._compile_using_nvrtc_no_warning)


# --- resource use, from ptxas's report ---------------------------------------------------------------

def resources(log: str) -> dict:
    """{"registers", "spill_stores", "spill_loads", "stack", "smem"} of the one entry compiled."""
    found = {
        "registers": re.search(r"Used (\d+) registers", log),
        "stack": re.search(r"(\d+) bytes stack frame", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
    }
    assert all(found.values()) and log.count("Compiling entry function") == 1, log
    out = {k: int(v.group(1)) for k, v in found.items()}
    smem = re.search(r"(\d+) bytes smem", log)
    out["smem"] = int(smem.group(1)) if smem else 0
    return out


REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


def check_fits(entry: str, used: dict, launches: list, facts=K.HOPPER) -> None:
    """Every launch the Python side plans for ``entry`` fits the kernel's resources."""
    assert launches, f"no launch configuration uses {entry}"
    for launch in launches:
        assert used["registers"] * launch.block <= REGISTERS_PER_SM, (
            f"{entry}: {used['registers']} registers x {launch.block} threads exceed the "
            f"{REGISTERS_PER_SM} of a multiprocessor")
        assert used["smem"] + launch.shared_mem <= facts.shared_memory_optin, (
            f"{entry}: {used['smem']} B static + {launch.shared_mem} B dynamic shared memory exceed "
            f"the {facts.shared_memory_optin} B a block may have")
    assert used["registers"] <= MAX_REGISTERS_PER_THREAD


# --- the launch configurations ask only for kernels that exist ----------------------------------------

DTYPES = [np.float32, np.float64, np.float16]
try:
    import ml_dtypes
    DTYPES.append(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 is optional; its kernels are still compiled by name below
    pass

# Sizes that cross every threshold between variants (and the long-row limit of shared memory).
CLASS_COUNTS = [1, 10, 31, 32, 33, 2047, 2048, 2049, 4096, 4097, 8192, 8193, 30000, 58111, 58112,
                70000, 116223, 116224, 500000]


def cross_entropy_launches() -> dict:
    """Every launch cross_entropy_launch plans over the sizes above, by kernel."""
    by_entry = {}
    for dtype in DTYPES:
        for c in CLASS_COUNTS:
            for n in (1, 7, 128, 100000):
                launch = K.cross_entropy_launch(n, c, dtype, K.HOPPER)
                by_entry.setdefault(launch.kernel, []).append(launch)
    return by_entry


def test_every_planned_cross_entropy_kernel_is_an_entry():
    planned = cross_entropy_launches()
    assert set(planned) <= set(K.CROSS_ENTROPY_ENTRIES)
    if len(DTYPES) == 4:  # and every entry is reachable
        assert set(planned) == set(K.CROSS_ENTROPY_ENTRIES)


def other_launches() -> dict:
    by_entry = {}
    for dtype in DTYPES:
        for n, c in ((1, 1), (128, 256), (128, 10), (60000, 784), (7, 100000), (100352, 32)):
            for launch in (K.relu_backward_launch(n, c, dtype, K.HOPPER),
                           K.column_sums_launch(c, dtype, K.HOPPER),
                           K.count_correct_launch(n, c, dtype, K.HOPPER),
                           K.gather_batch_launch(n, c, dtype, K.HOPPER),
                           K.finish_step_launch(dtype)):
                by_entry.setdefault(launch.kernel, []).append(launch)
    for dtype in (np.float32, np.float64):
        for size in (1, 203530, 10 ** 8):
            for rule in ("sgd", "adam"):
                launch = K.optimizer_launch(rule, dtype, size, K.HOPPER)
                by_entry.setdefault(launch.kernel, []).append(launch)
    return by_entry


RAW_MODULES = {
    "cross_entropy": (K.CROSS_ENTROPY_SOURCE, K.CROSS_ENTROPY_ENTRIES),
    "relu_backward": (K.RELU_BACKWARD_SOURCE, K.RELU_BACKWARD_ENTRIES),
    "count_correct": (K.COUNT_CORRECT_SOURCE, K.COUNT_CORRECT_ENTRIES),
    "optim": (K.OPTIM_SOURCE, K.OPTIM_ENTRIES),
    "step": (K.STEP_SOURCE, K.STEP_ENTRIES),
}


def test_every_planned_kernel_is_an_entry():
    entries = {e for _, names in RAW_MODULES.values() for e in names}
    planned = set(other_launches()) | set(cross_entropy_launches())
    assert planned <= entries
    if len(DTYPES) == 4:
        assert planned == entries


# --- every RawModule instantiation --------------------------------------------------------------------

ALL_ENTRIES = [(module, entry) for module, (_, entries) in RAW_MODULES.items() for entry in entries]


@pytest.mark.parametrize("module,entry", ALL_ENTRIES, ids=[e for _, e in ALL_ENTRIES])
def test_raw_kernel_compiles_as_cupy_compiles_it(nvrtc, module, entry):
    source, _ = RAW_MODULES[module]
    used = resources(nvrtc(source, [entry]))
    launches = {**cross_entropy_launches(), **other_launches()}.get(entry, [])
    if len(DTYPES) == 4 or "<3" not in entry:
        check_fits(entry, used, launches)
    # The one-read design of the cross-entropy assumes the row stays in registers: a spill
    # would turn it into memory traffic (float64 is for reference, not speed).
    if module == "cross_entropy" and "<1" not in entry:
        assert used["spill_stores"] == 0 and used["spill_loads"] == 0, f"{entry} spills: {used}"


def test_a_compile_error_names_the_kernel(nvrtc):
    with pytest.raises(pytest.fail.Exception, match=r"NVRTC rejects \['broken<0>'\].*"):
        nvrtc("template <int K> __global__ void broken() { undefined_name; }", ["broken<0>"])


# --- every ElementwiseKernel, as CuPy generates it, for every dtype it is called with -----------------

def elementwise_source(definition, dtypes: dict, ndim: int = 2, scalars=()) -> str:
    """The CUDA source CuPy writes for ElementwiseKernel(*definition) called with arrays of
    ``dtypes`` (by parameter name), broadcast to ``ndim`` dimensions, as its __call__ does; the
    inputs named in ``scalars`` are passed as NumPy scalars (by value, their type the
    parameter's)."""
    cupy, core, _kernel, _carray, _ = _cupy_compiler()
    from cupy._core import _scalar
    kernel = cupy.ElementwiseKernel(*definition)
    in_types, out_types, type_map = kernel._decide_params_type(
        tuple(None if p.name in scalars else np.dtype(dtypes[p.name]) for p in kernel.in_params),
        tuple(np.dtype(dtypes[p.name]) for p in kernel.out_params))
    ndarray, indexer, scalar = 1, 2, 3  # _ArgKind's values (cupy/_core/_kernel.pxd)
    params = kernel.in_params + kernel.out_params
    infos = tuple(_kernel._ArgInfo(scalar, _scalar.CScalar, d, 0, True, True) if p.name in scalars
                  else _kernel._ArgInfo(ndarray, cupy.ndarray, d, ndim, False, True)
                  for p, d in zip(params, in_types + out_types))
    infos += (_kernel._ArgInfo(indexer, _carray.Indexer, None, ndim, True, True),)
    code = _kernel._get_elementwise_kernel_code(infos, type_map, kernel.params, kernel.operation,
                                                kernel.name, kernel.preamble)
    # compile_with_cache prepends CuPy's headers to an ElementwiseKernel's source.
    return "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + code


# The inputs kernels.cuda.dropout passes as NumPy scalars, as dropout_operands builds them.
DROPOUT_SCALARS = tuple(
    p.split()[1] for p, v in zip(K.DROPOUT[0].split(","), K.dropout_operands(
        np.zeros(1, np.float32), np.zeros((), np.uint64), 0, 0, 0, 1.0)) if isinstance(v, np.generic))


def elementwise_cases():
    for dtype in DTYPES:
        acc = np.float64 if dtype == np.float64 else np.float32
        name = np.dtype(dtype).name
        yield (f"cross_entropy_grad-{name}", K.CROSS_ENTROPY_GRAD,
               dict(x=dtype, m=acc, log_sum=acc, t=np.int64, alpha=acc, beta=acc, gamma=acc, smooth=acc,
                    c=np.int64, dx=dtype), ())
        yield f"bias_relu-{name}", K.BIAS_RELU, dict(b=dtype, y=dtype), ()
        yield (f"dropout-{name}", K.DROPOUT,
               dict(x=dtype, step=np.uint64, offset=np.uint64, k0=np.uint32, k1=np.uint32,
                    threshold=np.uint32, scale=dtype, y=dtype, mask=dtype),
               DROPOUT_SCALARS)


ELEMENTWISE = list(elementwise_cases())


@pytest.mark.parametrize("definition,dtypes,scalars", [c[1:] for c in ELEMENTWISE],
                         ids=[c[0] for c in ELEMENTWISE])
def test_elementwise_kernel_compiles_as_cupy_compiles_it(nvrtc, definition, dtypes, scalars):
    used = resources(nvrtc(elementwise_source(definition, dtypes, scalars=scalars), options=()))
    assert used["spill_stores"] == 0
    # CuPy launches elementwise kernels with at most 128 threads (its block_size default) per block.
    assert used["registers"] * 128 <= REGISTERS_PER_SM


def test_bfloat16_is_covered():
    """bfloat16 needs ml_dtypes, which the kernels extra installs: CI must compile it too."""
    if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
        assert len(DTYPES) == 4, "ml_dtypes is missing, so the bfloat16 kernels were not compiled"
    elif len(DTYPES) < 4:
        pytest.skip("ml_dtypes is not installed")
