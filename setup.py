"""Builds gpunet's one compiled module, the CPU kernels, where a C compiler is found.

Everything else is in pyproject.toml. The extension is optional: if it fails to build, the
install goes on and gpunet computes the same formulas in NumPy (see gpunet/kernels/cpu.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "gpunet.kernels._cpu_kernels",
    sources=["gpunet/kernels/_cpu_kernels.c"],
    depends=["gpunet/kernels/_cpu_kernels.h", "gpunet/kernels/_cpu_conv.h"],
    # -fno-math-errno: sqrt need not set errno, so the Adam loop vectorises. -fno-trapping-math:
    # no code relies on floating-point exceptions trapping, so a select between two computed
    # values (max pooling's gradient) vectorises; results are unchanged. No -ffast-math, which
    # would change NaN and rounding behaviour against the NumPy reference.
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
    optional=True,
)])
