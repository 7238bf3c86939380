"""The command line: ``python -m gpunet.bench [--device cpu|cuda|cuda:N] ...``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..backend import Device, DeviceError, get_device, to_device
from ..datasets import DatasetError, load_mnist, resolve_root
from ..trainer import DeviceData, prepare_mnist
from .common import (
    _first_line, _jsonable, CONTENDERS, DEFAULT_CONTENDERS, IN_FEATURES, LR, MOMENTUM,
    NUM_CLASSES, SEED, SETTLE_SECONDS, TINY_SAMPLES, TINY_SETTLE_SECONDS, Workload)
from .cnn import benchmark_cnn
from .gpu import gpu_extras
from .machine import machine_info, thread_info, versions
from .protocol import benchmark_model, time_to_98
from .report import format_report


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage plus a message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _device_name(text: str) -> str:
    name = text.strip().lower()
    if name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _widths(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive hidden widths separated by commas, "
                                         f"one model each, such as 256,800, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _contender_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip().replace("-", "_") for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in CONTENDERS]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(CONTENDERS)}, "
                                         f"got {text!r}")
    return keys


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m gpunet.bench",
               description="Time one MNIST training epoch of gpunet beside NumPy, PyTorch and "
                           "the GEMM floor, in one run; print a table and write every sample "
                           "as JSON.")
    add = p.add_argument
    add("--device", type=_device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add("--hidden", type=_widths, default=(256, 800),
        help="hidden widths, one 784-H-10 model each (default 256,800)")
    add("--repeats", type=_positive_int, default=None,
        help="timed rounds per contender (default 5; 1 with --tiny)")
    add("--batch-size", type=_positive_int, default=128, help="(default 128)")
    add("--data-dir", help="folder with the MNIST files (default $GPUNET_DATA, else data/)")
    add("--json", metavar="PATH", help="where to write the results (default "
                                       "bench-results/bench-<device>-<date>-<time>.json)")
    add("--skip-time-to-98", action="store_true", help="skip timing the default recipe to 98%%")
    add("--contenders", type=_contender_keys, default=None,
        help=f"comma list of a subset to run: {', '.join(CONTENDERS)}")
    add("--cnn-steps", type=_non_negative_int, default=None,
        help="training steps of the small CNN per timed sample, beside torch eager on the same "
             "network and its GEMM floors; 0 skips the CNN (default 40; 2 with --tiny)")
    add("--tiny", action="store_true",
        help=f"synthetic data of {TINY_SAMPLES} samples, 1 repeat, no time to 98%%, only the "
             "smallest kernel shape: a smoke test that needs no MNIST")
    return p


def run(argv=None, *, out=None, err=None) -> dict:
    """Run the benchmark for command-line ``argv``; print the table, write and return the JSON.

    The table goes to ``out`` (default stdout), progress lines to ``err`` (default stderr).
    """
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    started = datetime.datetime.now()
    device = get_device(args.device)
    repeats = args.repeats or (1 if args.tiny else 5)
    settle = TINY_SETTLE_SECONDS if args.tiny else SETTLE_SECONDS
    keys = args.contenders or DEFAULT_CONTENDERS[device.type]
    json_path = Path(args.json) if args.json else Path(
        "bench-results", f"bench-{str(device).replace(':', '')}-{started:%Y%m%d-%H%M%S}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.check_writable(json_path, "--json")

    def say(line):
        print(line, file=err, flush=True)

    raw, data_dir = None, None
    if args.tiny:
        data = _tiny_data(device)
    else:
        data_dir = resolve_root(args.data_dir)
        raw = load_mnist(data_dir, progress=True)
        data = _mnist_train_all(raw, device)
    say(f"device {device.describe()}; {len(data.y_train)} training images; contenders "
        f"{', '.join(keys)}; {repeats} rounds")

    result = {
        "schema": "gpunet-bench/1",
        "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "gpunet.bench",
                    *(sys.argv[1:] if argv is None else argv)],
        "machine": machine_info(device),
        "versions": versions(device),
        "threads": thread_info(),
        "settings": {"device": str(device), "data": "synthetic (--tiny)" if args.tiny else "MNIST",
                     "data_dir": None if data_dir is None else str(data_dir),
                     "n_train": len(data.y_train), "batch_size": args.batch_size,
                     "steps_per_epoch": -(-len(data.y_train) // args.batch_size),
                     "hidden": list(args.hidden), "lr": LR, "momentum": MOMENTUM,
                     "nesterov": False, "dtype": "float32", "seed": SEED, "repeats": repeats,
                     "warmup_epochs_per_contender": 1, "contenders": list(keys),
                     "settle_seconds": settle,
                     "order": "each round runs every contender once; the order rotates by one "
                              "every round; each timed epoch starts after settle_seconds idle, "
                              "so that the previous contender's spinning BLAS/OpenMP threads "
                              "have gone to sleep"},
        "results": {},
    }
    for hidden in args.hidden:
        w = Workload(device, data, hidden, args.batch_size)
        result["results"][w.label] = benchmark_model(w, keys, repeats, say, settle)
    cnn_steps = args.cnn_steps if args.cnn_steps is not None else (2 if args.tiny else 40)
    if cnn_steps:
        time.sleep(settle)
        # an epoch of train.py's split: 55,000 training images, 5,000 held out
        result["cnn"] = benchmark_cnn(device, data, cnn_steps, repeats, say, settle,
                                      steps_per_epoch=-(-55000 // 128))
    else:
        result["cnn"] = {"skipped": "--cnn-steps 0"}

    if args.tiny or args.skip_time_to_98:
        result["time_to_98"] = {"skipped": "--tiny" if args.tiny else "--skip-time-to-98"}
    else:
        try:
            time.sleep(settle)
            result["time_to_98"] = time_to_98(device, raw, data_dir, say)
        except Exception as exc:  # reported in the JSON; the epoch timings above still count
            result["time_to_98"] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}

    result["gpu"] = gpu_extras(device, result["results"], say, args.tiny) \
        if device.type == "cuda" else None
    result["seconds_total"] = (datetime.datetime.now() - started).total_seconds()
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["json_path"] = str(json_path)

    text = json.dumps(result, indent=2, default=_jsonable)
    checkpoint.atomic_write(json_path, lambda f: f.write(text.encode()))
    print(format_report(result), file=out)
    print(f"\nwrote {json_path}", file=out, flush=True)
    return result


def main(argv=None) -> int:
    try:
        run(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else 1
    except (ValueError, TypeError, OSError, DeviceError, DatasetError) as exc:
        print(f"python -m gpunet.bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m gpunet.bench: interrupted", file=sys.stderr)
        return 130
    return 0


def _mnist_train_all(raw, device: Device) -> DeviceData:
    """All 60,000 training images, float32, normalised, on the device."""
    return prepare_mnist(raw, val_size=0, device=device, dtype=np.float32)


def _tiny_data(device: Device) -> DeviceData:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((TINY_SAMPLES, IN_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, TINY_SAMPLES).astype(np.int64)
    x, y = to_device(x, device), to_device(y, device)
    return DeviceData(x, y, x[:0], y[:0], x[:256], y[:256])


if __name__ == "__main__":
    sys.exit(main())
