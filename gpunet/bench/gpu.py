"""What only a GPU run measures: the launch-overhead floor (kernels per step times the empty
launch time), the kernel table of the fused cross-entropy beside torch's and the
device-to-device copy bandwidth, and the ReLU backward of a convolution's tall gradient in
groups of rows beside the one-group launch it replaced."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter

import numpy as np

from ..backend import Device
from ..functional import softmax_cross_entropy_with_grad
from .common import _first_line, _guard, _import_torch, CE_SHAPES, Contender, Unavailable, Workload
from .report import _fmt_kernel


def empty_launch_seconds(device: Device, launches: int = 20_000, rounds: int = 5) -> dict:
    """Host time per launch of a CuPy kernel that does nothing: the cost of one kernel launch."""
    cp = device.xp
    kernel = cp.RawKernel(r'extern "C" __global__ void noop() {}', "noop")
    samples = []
    with device.scope():
        for _ in range(100):
            kernel((1,), (1,), ())
        device.synchronize()
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(launches):
                kernel((1,), (1,), ())
            device.synchronize()
            samples.append((time.perf_counter() - t0) / launches)
    return {"seconds": statistics.median(samples), "samples": samples, "launches": launches}


def count_device_ops(fn) -> dict:
    """Kernels, memcpys and memsets that ``fn()`` puts on the GPU, from the torch profiler.

    CUPTI sees every kernel in the process, CuPy's and cuBLAS's as much as PyTorch's; the counts
    come from the exported trace's event categories, which are stable across torch versions.
    """
    torch = _import_torch()
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()  # CUPTI needs torch's CUDA state, even when only CuPy launches kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    cats = Counter(str(e.get("cat", "")).lower() for e in events if e.get("ph") == "X")
    launch_calls = sum(1 for e in events
                       if str(e.get("cat", "")).lower() in ("cuda_runtime", "cuda_driver")
                       and "launch" in str(e.get("name", "")).lower())
    return {"kernels": cats["kernel"], "memcpy": cats["gpu_memcpy"], "memset": cats["gpu_memset"],
            "launch_api_calls": launch_calls}


def _count_or_reason(c: Contender, w: Workload) -> dict:
    try:
        counts = count_device_ops(c.epoch)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
    per_step = {k: v / w.steps for k, v in counts.items()}
    per_step["device_ops"] = (counts["kernels"] + counts["memcpy"] + counts["memset"]) / w.steps
    return {"per_epoch": counts, "per_step": per_step}


def cross_entropy_kernels(device: Device, say, shapes=CE_SHAPES,
                          copy_bytes: int = 1 << 30) -> dict:
    """The fused CE forward+backward beside torch's and the device copy bandwidth, in one run."""
    cp = device.xp
    out = {"shapes": [list(s) for s in shapes], "rows": []}
    try:
        torch = _import_torch()
        tdev = torch.device(f"cuda:{device.index}")
    except Unavailable as exc:
        torch, out["torch"] = None, f"unavailable: {exc}"
    try:
        bf16 = _cupy_bfloat16(cp)
    except Unavailable as exc:
        bf16, out["gpunet_bfloat16"] = None, f"unavailable: {exc}"

    with device.scope():
        out["copy_bandwidth"] = _guard(lambda: _copy_bandwidth(cp, copy_bytes))
        for n, c in shapes:
            for dtype in ("float32", "bfloat16"):
                row = {"shape": [n, c], "dtype": dtype}
                itemsize = 4 if dtype == "float32" else 2
                row["bytes"] = 2 * n * c * itemsize + n * 8  # logits read, grad written, labels
                if dtype == "bfloat16" and bf16 is None:
                    row["gpunet"] = {"error": out["gpunet_bfloat16"]}
                else:
                    row["gpunet"] = _guard(lambda: _gpunet_ce(cp, n, c, bf16 if dtype == "bfloat16"
                                                              else np.float32, row["bytes"]))
                if torch is not None:
                    row["torch"] = _guard(lambda: _torch_ce(torch, tdev, n, c, dtype, row["bytes"]))
                out["rows"].append(row)
                say(f"cross-entropy ({n}, {c}) {dtype}: gpunet {_fmt_kernel(row['gpunet'])}, "
                    f"torch {_fmt_kernel(row.get('torch'))}")
                cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            out["launches_128x10"] = _guard(lambda: _ce_launches(cp))
    return out


# The small CNN's two ReLU gradients at batch 128 (pixels x channels), and an MLP batch.
RELU_SHAPES = ((128 * 784, 32), (128 * 196, 64), (128, 512))


def relu_backward_kernels(device: Device, say, shapes=RELU_SHAPES) -> dict:
    """dz = dy * (y > 0) with the bias gradient, float32: the planned groups of rows beside
    one group (a block per 32 columns, the plan before tall gradients were cut into groups)."""
    from ..kernels import cuda as cuda_kernels  # imports cupy: this runs on a GPU only
    cp = device.xp
    out = {"rows": []}
    with device.scope():
        facts = cuda_kernels.device_facts(device.index)
        for n, c in shapes:
            y = cp.maximum(cp.random.standard_normal((n, c), dtype=cp.float32), 0)
            dy = cp.random.standard_normal((n, c), dtype=cp.float32)
            dz, db = cp.empty_like(y), cp.empty(c, cp.float32)
            nbytes = 3 * n * c * 4 + c * 4  # y and dy read, dz written, the bias gradient
            row = {"shape": [n, c], "bytes": nbytes,
                   "groups": cuda_kernels.relu_backward_groups(n, c, facts)}
            for label, groups in (("planned", None), ("one group", 1)):
                row[label] = _guard(lambda: _kernel_result(_event_times(
                    lambda: cuda_kernels.relu_backward(dy, y, out=dz, bias_grad=db, groups=groups),
                    cp.cuda.Event, lambda a, b: cp.cuda.get_elapsed_time(a, b)), nbytes))
            out["rows"].append(row)
            say(f"relu backward ({n}, {c}) in {row['groups']} groups: "
                f"{_fmt_kernel(row['planned'])}; one group {_fmt_kernel(row['one group'])}")
    return out


def _gpunet_ce(cp, n, c, dtype, nbytes) -> dict:
    logits = cp.random.standard_normal((n, c), dtype=cp.float32).astype(dtype)
    target = cp.random.randint(0, c, size=n).astype(cp.int64)
    samples = _event_times(lambda: softmax_cross_entropy_with_grad(logits, target, validate=False),
                           cp.cuda.Event, lambda a, b: cp.cuda.get_elapsed_time(a, b))
    return _kernel_result(samples, nbytes)


def _torch_ce(torch, tdev, n, c, dtype, nbytes) -> dict:
    import torch.nn.functional as F

    x = torch.randn(n, c, device=tdev, dtype=getattr(torch, dtype)).requires_grad_()
    t = torch.randint(0, c, (n,), device=tdev)
    samples = _event_times(lambda: torch.autograd.grad(F.cross_entropy(x, t), x),
                           lambda: torch.cuda.Event(enable_timing=True),
                           lambda a, b: a.elapsed_time(b))
    return _kernel_result(samples, nbytes)


def _copy_bandwidth(cp, nbytes: int) -> dict:
    a = cp.ones(nbytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    samples = _event_times(lambda: b.data.copy_from_device_async(a.data, a.nbytes), cp.cuda.Event,
                           lambda x, y: cp.cuda.get_elapsed_time(x, y))
    result = _kernel_result(samples, 2 * a.nbytes)
    result["bytes"] = 2 * a.nbytes
    return result


def _ce_launches(cp) -> dict:
    logits = cp.random.standard_normal((128, 10), dtype=cp.float32)
    target = cp.random.randint(0, 10, size=128).astype(cp.int64)
    calls = 100

    def run():
        for _ in range(calls):
            softmax_cross_entropy_with_grad(logits, target, validate=False)
        cp.cuda.get_current_stream().synchronize()

    run()
    counts = count_device_ops(run)
    return {"calls": calls, "per_call": {k: v / calls for k, v in counts.items()}}


def _event_times(fn, make_event, elapsed_ms, samples: int = 7, target_s: float = 0.02) -> list:
    """Seconds per call of ``fn``, timed on the device with events, ``samples`` times."""
    start, end = make_event(), make_event()
    for _ in range(3):
        fn()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(elapsed_ms(start, end) / 1e3, 1e-6)
    inner = max(1, min(1000, int(target_s / one)))
    out = []
    for _ in range(samples):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(elapsed_ms(start, end) / 1e3 / inner)
    return out


def _kernel_result(samples, nbytes) -> dict:
    median = statistics.median(samples)
    return {"seconds": median, "gb_per_s": nbytes / median / 1e9, "samples": samples}


def _cupy_bfloat16(cp):
    major = int(cp.__version__.split(".")[0])
    if major < 14:
        raise Unavailable(f"CuPy {cp.__version__} has no bfloat16; it needs CuPy >= 14 "
                          "with ml_dtypes")
    try:
        import ml_dtypes
    except ImportError as exc:
        raise Unavailable("CuPy's bfloat16 needs the ml_dtypes package, which is not "
                          "installed") from exc
    dtype = np.dtype(ml_dtypes.bfloat16)
    try:
        (cp.zeros(4, dtype=cp.float32).astype(dtype) + 1).sum()
    except Exception as exc:
        raise Unavailable(f"CuPy {cp.__version__} cannot compute in bfloat16: "
                          f"{_first_line(exc)}") from exc
    return dtype


def gpu_extras(device: Device, models: dict, say, tiny: bool = False) -> dict:
    out = {"device": _guard(device.describe)}
    out["empty_launch"] = _guard(lambda: empty_launch_seconds(device))
    launch_s = out["empty_launch"].get("seconds")
    floors = {}
    for label, model in models.items():
        for key, counts in model.get("device_ops_per_step", {}).items():
            if "per_step" in counts and launch_s:
                ops = counts["per_step"]["device_ops"]
                floor = ops * launch_s * model["steps_per_epoch"]
                median = model["contenders"][key].get("median")
                floors.setdefault(label, {})[key] = {
                    "device_ops_per_step": ops, "kernels_per_step": counts["per_step"]["kernels"],
                    "launch_floor_seconds": floor,
                    "median_seconds": median,
                    "median_over_launch_floor": median / floor if median and floor else None}
    out["launch_floor"] = floors
    if tiny:  # a smoke test of the code path, not a measurement
        out["cross_entropy"] = _guard(lambda: cross_entropy_kernels(device, say, CE_SHAPES[:1],
                                                                    copy_bytes=1 << 24))
        out["relu_backward"] = _guard(lambda: relu_backward_kernels(device, say, ((4096, 32),)))
    else:
        out["cross_entropy"] = _guard(lambda: cross_entropy_kernels(device, say))
        out["relu_backward"] = _guard(lambda: relu_backward_kernels(device, say))
    return out
