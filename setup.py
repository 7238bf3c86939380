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
    # would change NaN and rounding behaviour against the NumPy reference; -ffp-contract=off
    # keeps a * b + c two roundings where a clone for AVX2 or AVX-512 could fuse them (see
    # _cpu_kernels.c). -fno-tree-loop-distribute-patterns: a copy of 3 floats stays 3 moves
    # rather than a call to memcpy (im2col of a one-channel image, 300,000 of them per batch).
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
    optional=True,
)])
