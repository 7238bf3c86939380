"""The SIMT harness: gpunet's CUDA kernel sources, executed on the CPU in tests (see harness.py)."""

import functools
import os

import pytest

from .harness import Module, compiler

try:  # bfloat16 arrays in NumPy: ml_dtypes, which the kernels extra installs (and CI must have)
    import ml_dtypes
    BFLOAT16 = ml_dtypes.bfloat16
except ImportError:
    if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
        raise
    BFLOAT16 = None


def require_compiler() -> None:
    """Skip where there is no C++ compiler; in CI (GPUNET_REQUIRE_NVRTC=1) fail instead, since
    the kernels would otherwise land untested."""
    if compiler() is None:
        message = "the SIMT harness needs g++ (or $CXX) to run the CUDA kernels on the CPU"
        if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
            pytest.fail(message)
        pytest.skip(message)


@functools.cache
def module(source: str, entries: tuple, name: str) -> Module:
    """One built Module per source, shared by every test of the session."""
    return Module(source, list(entries), name)


def require_bfloat16() -> None:
    if BFLOAT16 is None:
        pytest.skip('ml_dtypes is not installed (pip install -e ".[kernels]"): no bfloat16 cases')
