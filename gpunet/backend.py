"""The backend shim: NumPy or CuPy, chosen by device name.

This module and ``kernels/cuda.py`` are the only ones that import cupy, and they do it only when a
CUDA device is asked for, so ``import gpunet`` works on a machine with no CUDA at all. Every other
module writes its formula once and asks ``xp = get_array_module(x)`` which library to run it on.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
from dataclasses import dataclass, field

import numpy as np


_CUDA_INSTALL_HINT = (
    'install CuPy for your CUDA driver: pip install -e ".[cuda13]" (a CUDA 13 driver, R580 or '
    'newer) or pip install -e ".[cuda12]" (CUDA 12)'
)


class DeviceError(RuntimeError):
    """A CUDA device was asked for and cannot be used; the message says what to install or check."""


@dataclass(frozen=True)
class Device:
    """Where arrays live: ``Device("cpu")`` or ``Device("cuda", 0)``."""

    type: str
    index: int | None = None
    # Why "auto" chose this device; not part of the device's identity.
    reason: str = field(default="", compare=False)

    @property
    def xp(self):
        """The array module for this device: numpy or cupy."""
        return np if self.type == "cpu" else _cupy()

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"

    def describe(self) -> str:
        """A one-line description for logs, e.g. ``cuda:0 (NVIDIA H200)``."""
        if self.type == "cpu":
            text = "cpu"
        else:
            props = _cupy().cuda.runtime.getDeviceProperties(self.index)
            name = props["name"]
            text = f"{self} ({name.decode() if isinstance(name, bytes) else name})"
        return f"{text}; {self.reason}" if self.reason else text

    def synchronize(self) -> None:
        """Wait for all work queued on this device (a no-op on the CPU)."""
        if self.type == "cuda":
            with _cupy().cuda.Device(self.index):
                _cupy().cuda.get_current_stream().synchronize()

    def scope(self):
        """A context in which this GPU is current, so arrays and kernels made inside land on it."""
        if self.type == "cpu":
            return contextlib.nullcontext()
        return _cupy().cuda.Device(self.index)


CPU = Device("cpu")


def get_device(spec: str | Device = "cpu") -> Device:
    """Resolve ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` to a usable :class:`Device`.

    Asking for CUDA where it cannot run raises :class:`DeviceError` with what to install or check;
    it never falls back to the CPU. Only ``"auto"`` chooses, and its ``reason`` says why.
    """
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', got {type(spec).__name__}")
    name = spec.strip().lower()
    if name == "cpu":
        return CPU
    if name == "auto":
        problem = cuda_problem()
        if problem is None:
            return Device("cuda", 0, reason="auto: a usable GPU was found")
        # Brief: the whole diagnosis, with what to install, is what --device cuda prints.
        return Device("cpu", reason=f"auto: no usable GPU ({problem.split(';')[0]})")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"device must be 'cuda' or 'cuda:N' with N a GPU index, got {spec!r}")
        index = int(index_text)
        problem = cuda_problem()
        if problem is not None:
            raise DeviceError(f"device {spec!r} cannot be used: {problem}")
        count = _cupy().cuda.runtime.getDeviceCount()
        if index >= count:
            raise DeviceError(f"device {spec!r} asked for GPU {index}, but {count} GPU(s) are visible")
        return Device("cuda", index)
    raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', got {spec!r}")


def cuda_device_count() -> int:
    """The number of GPUs CUDA can see (DeviceError where CUDA cannot be used)."""
    return _cupy().cuda.runtime.getDeviceCount()


_cuda_problem_cache: list[str | None] = []


def cuda_problem() -> str | None:
    """Why CUDA is unusable here (CuPy, driver, GPU, or a CUDA library), or None when it works.

    Checked once per process. The answer is the message a user needs, not a traceback: what is
    wrong, then after a semicolon what to do about it.
    """
    if not _cuda_problem_cache:
        _cuda_problem_cache.append(_diagnose_cuda())
    return _cuda_problem_cache[0]


def _diagnose_cuda() -> str | None:
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; {_CUDA_INSTALL_HINT}"
    except Exception as exc:  # a broken install raises all sorts at import
        return f"CuPy failed to import ({type(exc).__name__}: {exc}); reinstall it: {_CUDA_INSTALL_HINT}"
    runtime = cupy.cuda.runtime
    try:
        driver, built_for = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception as exc:
        return f"cannot read the CUDA driver version ({exc}); check the driver with nvidia-smi"
    if driver == 0:  # what the runtime reports when it finds no libcuda at all
        return "no NVIDIA driver was found (libcuda.so.1); install one and check it with nvidia-smi"
    # CUDA's minor-version compatibility: a runtime of CUDA 13.x runs on any CUDA 13 driver, so
    # CuPy built against 13.2 works on a 13.0 driver (580). Only the major version must match.
    if driver // 1000 < built_for // 1000:
        supported = f"the NVIDIA driver supports CUDA {_cuda_version(driver)}"
        if driver // 1000 not in (12, 13):
            return f"{supported}, older than gpunet supports; update it to a CUDA 12 or 13 driver"
        return (f"{supported}, but this CuPy is built for CUDA {_cuda_version(built_for)}; install "
                f'the CuPy for your driver: pip install -e ".[cuda{driver // 1000}]", or update '
                "the driver")
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        text = str(exc)
        if "NoDevice" in text or "no CUDA-capable device" in text:
            return "no CUDA GPU is visible; check nvidia-smi and CUDA_VISIBLE_DEVICES"
        return f"the CUDA runtime failed ({text}); check the driver with nvidia-smi"
    if count == 0:
        return "no CUDA GPU is visible; check nvidia-smi and CUDA_VISIBLE_DEVICES"
    missing = missing_cuda_libraries()
    if missing:
        major = built_for // 1000
        return (f"CuPy cannot find {' and '.join(missing)}, which a GPU run needs; pip install -e "
                f'".[cuda{major}]" brings them (CuPy\'s ctk extra), or point CUDA_PATH at a CUDA '
                f"{major} toolkit that has them")
    return None


def missing_cuda_libraries() -> list[str]:
    """The parts of the CUDA toolkit that CuPy cannot find here, of the four gpunet needs:
    NVRTC (every kernel is compiled at run time), cuBLAS (the matrix products), cuRAND
    (``manual_seed`` seeds CuPy's generator) and the CUDA headers (CuPy's own kernels include
    them). Found the way CuPy 14 finds them, through ``cuda.pathfinder``."""
    import cupy
    from cuda import pathfinder

    missing = []
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception:
        missing.append("NVRTC (the CUDA runtime compiler)")
    for name, what in (("cublas", "cuBLAS"), ("curand", "cuRAND")):
        try:
            pathfinder.load_nvidia_dynamic_lib(name)
        except Exception:
            missing.append(what)
    try:
        headers = pathfinder.find_nvidia_header_directory("cudart")
    except Exception:
        headers = None
    if headers is None:
        missing.append("the CUDA headers")
    return missing


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _cupy():
    """cupy, imported on first use; raises DeviceError if CUDA is unusable."""
    problem = cuda_problem()
    if problem is not None:
        raise DeviceError(f"CUDA cannot be used: {problem}")
    import cupy

    return cupy


def get_array_module(*arrays):
    """numpy or cupy, whichever library the given arrays belong to.

    Non-arrays (Python scalars, None) are ignored. Mixing numpy and cupy arrays is a TypeError:
    move them to one device first with :func:`to_device`.
    """
    cupy = sys.modules.get("cupy")
    if cupy is None:  # no cupy array can exist before cupy is imported
        return np
    found_numpy = found_cupy = False
    for a in arrays:
        if isinstance(a, cupy.ndarray):
            found_cupy = True
        elif isinstance(a, (np.ndarray, np.generic)):
            found_numpy = True
    if found_cupy and found_numpy:
        raise TypeError("numpy and cupy arrays mixed in one call; move them to one device first "
                        "with gpunet.to_device(x, device)")
    return cupy if found_cupy else np


def is_cuda_array(x) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def device_of(x) -> Device:
    """The :class:`Device` holding array ``x``."""
    if is_cuda_array(x):
        return Device("cuda", x.device.id)
    return CPU


def to_numpy(x) -> np.ndarray:
    """A numpy array with the values of ``x`` (copied to the host if ``x`` is on a GPU)."""
    if is_cuda_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, device: str | Device):
    """``x`` as an array on ``device``; returned unchanged when it is already there."""
    device = get_device(device)
    if device.type == "cpu":
        return to_numpy(x)
    cupy = _cupy()
    if isinstance(x, cupy.ndarray) and x.device.id == device.index:
        return x
    with cupy.cuda.Device(device.index):
        return cupy.asarray(x)


def resolve_dtype(name):
    """A numpy dtype from a name; "bfloat16" comes from ml_dtypes, which CuPy 14 also uses."""
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError("dtype bfloat16 needs the ml_dtypes package (pip install ml_dtypes), "
                         "and on a GPU CuPy 14 or later") from None
    return np.dtype(ml_dtypes.bfloat16)


def add_into(out, value, beta: float):
    """out = value + beta * out, in place; beta = 0 overwrites (out's old values, NaN included,
    are ignored). What ``Parameter.grad_decay`` asks of a gradient that no kernel added in."""
    if beta:
        out *= beta
        out += value
    else:
        out[...] = value
    return out


def take_rows(x, indices, out):
    """``out[:] = x[indices]`` without a temporary: the training step's batch gather.

    numpy buffers ``take(..., out=)`` in its default mode="raise"; the indices come from a
    permutation and are always in range, so mode="clip" lets it write straight into ``out``.
    """
    if type(x) is np.ndarray:  # the method: np.take's Python wrapper costs 4x the call
        return x.take(indices, axis=0, out=out, mode="clip")
    if is_cuda_array(x):
        return sys.modules["cupy"].take(x, indices, axis=0, out=out)
    return np.take(x, indices, axis=0, out=out, mode="clip")


_rng = np.random.default_rng()


def is_real(value) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy scalar (``np.float32(0.1)``,
    ``np.int64(5)``), but not a bool. Every argument check of gpunet asks this (or
    :func:`is_integer`), so a number that came out of a NumPy computation is always accepted."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy integer scalar, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def manual_seed(seed: int) -> None:
    """Seed gpunet's generator (weight initialisation) and, if it is loaded, CuPy's."""
    global _rng
    if not is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _rng = np.random.default_rng(seed)
    cupy = sys.modules.get("cupy")
    if cupy is not None and cuda_problem() is None:
        cupy.random.seed(seed)


def default_rng() -> np.random.Generator:
    """The generator that layers draw their initial weights from (on the host, so that the same
    seed gives the same model on every device)."""
    return _rng
