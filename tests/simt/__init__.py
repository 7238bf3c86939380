"""The SIMT harness: gpunet's CUDA kernel sources, executed on the CPU in tests (see harness.py)."""

import functools
import os

import pytest

from .harness import Module, compiler


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
