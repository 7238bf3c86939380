"""The SIMT harness: gpunet's CUDA kernel sources, executed on the CPU in tests (see harness.py)."""

import functools
import os
import platform
import shutil

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
    message = None
    if platform.machine() not in ("x86_64", "AMD64"):
        message = f"the SIMT harness switches threads with x86-64 code; this is {platform.machine()}"
    elif compiler() is None or shutil.which("nm") is None:
        message = "the SIMT harness needs g++ (or $CXX) and nm to run the CUDA kernels on the CPU"
    if message:
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
