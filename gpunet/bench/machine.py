"""The machine and the versions a result was measured with, recorded in every JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

import gpunet

from ..backend import Device
from ..kernels import blas
from .common import _first_line, _guard, _import_torch, Unavailable


def machine_info(device: Device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_model": _lscpu_model()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):  # other work on the machine makes every sample slower
        info["load_average_at_start"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = _guard(device.describe)
    return info


def _lscpu_model() -> str | None:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        if line.strip().lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def versions(device: Device) -> dict:
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "gpunet": gpunet.__version__,
           "gpunet_git": _git_state(), "gpunet_blas": blas.DESCRIPTION, "torch": None, "cupy": None}
    try:
        out["torch"] = _import_torch().__version__
    except Unavailable as exc:
        out["torch"] = f"unavailable: {exc}"
    if device.type == "cuda":
        cp = device.xp
        out["cupy"] = cp.__version__
        out["cuda_runtime"] = _guard(lambda: cp.cuda.runtime.runtimeGetVersion())
        out["cuda_driver"] = _guard(lambda: cp.cuda.runtime.driverGetVersion())
    else:  # read from the installed metadata: CuPy itself is only imported for a GPU run
        for dist in ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x"):
            try:
                out["cupy"] = f"{importlib.metadata.version(dist)} ({dist}, not imported)"
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


def _git_state() -> dict | None:
    """The commit of the gpunet checkout being measured, and its uncommitted files, if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout
        return {"commit": git("rev-parse", "HEAD").strip(),
                "modified": [line.strip() for line in
                             git("status", "--porcelain", "--untracked-files=no").splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return None


def thread_info() -> dict:
    # OPENBLAS_THREAD_TIMEOUT: how long OpenBLAS's idle workers spin (gpunet sets 20 when it is
    # imported before numpy; see gpunet/__init__.py)
    out = {"env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "MKL_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")}}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        out["numpy_blas"] = deps.get("blas")
    except Exception as exc:  # older numpy has no mode="dicts"
        out["numpy_blas"] = f"unavailable: {_first_line(exc)}"
    try:
        from threadpoolctl import threadpool_info
        out["threadpools"] = threadpool_info()
    except ImportError:
        out["threadpools"] = "threadpoolctl is not installed"
    try:
        torch = _import_torch()
        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
        out["torch_parallel_info"] = torch.__config__.parallel_info()
    except Unavailable:
        pass
    return out
