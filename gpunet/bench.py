"""Speed, side by side, in one run: ``python -m gpunet.bench [--device cpu|cuda|cuda:N]``.

One training epoch of the MNIST MLP (784-H-10, ReLU, batch 128, SGD with momentum 0.9, float32,
data already on the device) is timed for each contender:

    trainer           gpunet's Trainer.train_epoch, the loop behind train.py
    layer_api         gpunet's public layers, loss and optimizer in the loop a user writes
    textbook          the cs231n two-layer net in plain NumPy, float32 (CPU only)
    torch             PyTorch eager, same model, data and batch, on the same device
    torch_compile     torch.compile(mode="reduce-overhead") of model + loss (CUDA only)
    floor             the five matrix products of gpunet's step and nothing else
    floor_input_grad  the same plus the first layer's input gradient, the sixth product that a
                      layer-by-layer backward computes (gpunet's model.backward by default)

Every contender is warmed up once, then each runs once per round, the order rotating every round;
medians and ratios are printed as a markdown table (with each ratio also taken within every round,
whose samples are seconds apart) and every sample goes to a JSON file. The run
also times the default recipe to 98% test accuracy and, on a GPU, adds the launch-overhead floor
and a kernel benchmark of the fused cross-entropy. Benchmarks print and write numbers; nothing
here asserts on them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gpunet

from . import checkpoint
from .kernels import blas
from .backend import Device, DeviceError, get_device, manual_seed, to_device, to_numpy
from .datasets import DatasetError, load_mnist, resolve_root
from .functional import softmax_cross_entropy_with_grad
from .trainer import DeviceData, Trainer, TrainConfig, prepare_mnist

IN_FEATURES, NUM_CLASSES = 784, 10
LR, MOMENTUM = 0.05, 0.9
SEED = 0
TINY_SAMPLES = 2048
ACCURACY_ROWS = 10_000  # the training images each contender's model is scored on afterwards
CE_SHAPES = ((128, 10), (8192, 1000), (8192, 32768))
# Idle time before each timed epoch. PyTorch's OpenMP threads and NumPy's OpenBLAS threads keep
# spinning for a while after their last parallel region; on a small machine a contender started
# right after another one runs several times slower while they spin (measured: 30x for the
# first few hundred milliseconds on 2 cores). A pause lets them go to sleep first.
SETTLE_SECONDS, TINY_SETTLE_SECONDS = 0.3, 0.05

CONTENDERS = {
    "trainer": "gpunet trainer",
    "layer_api": "gpunet layer API",
    "textbook": "numpy textbook",
    "torch": "torch eager",
    "torch_compile": "torch.compile",
    "floor": "GEMM floor",
    "floor_input_grad": "GEMM floor + input grad",
}
DEFAULT_CONTENDERS = {
    "cpu": ("trainer", "layer_api", "textbook", "torch", "floor", "floor_input_grad"),
    "cuda": ("trainer", "layer_api", "torch", "torch_compile", "floor", "floor_input_grad"),
}
WHAT = {
    "trainer": "Trainer(TrainConfig(hidden=(H,), batch_size, lr=0.05, sgd, momentum=0.9, "
               "nesterov=False, schedule='constant', val_size=0)).train_epoch() + synchronize: "
               "host permutation moved to the device, take_rows into fixed buffers, fused loss "
               "forward+backward without label checks, backward without the input gradient, "
               "flat-buffer SGD update, losses kept on the device",
    "layer_api": "gpunet.mlp([784, H, 10]); SoftmaxCrossEntropy(); SGD(lr=0.05, momentum=0.9); "
                 "per batch: xb, yb = X[idx], Y[idx]; loss_fn(model(xb), yb); "
                 "model.backward(loss_fn.backward(), input_grad=False); opt.step(); "
                 "idx from xp.random.permutation (the README's loop)",
    "textbook": "cs231n two-layer net in float32 NumPy: X[idx] gather, affine-ReLU-affine, stable "
                "softmax, loss, dscores = (probs - onehot) / n, backprop to W1 through the mask "
                "da1[z1 <= 0] = 0 (no input gradient), momentum update v = mu*v - lr*dW; W += v",
    "torch": "nn.Sequential(Linear, ReLU, Linear), CrossEntropyLoss, optim.SGD(lr=0.05, "
             "momentum=0.9); per batch X[perm[s:s+bs]]; zero_grad(set_to_none=True); "
             "loss.backward(); opt.step(); torch.randperm on the device",
    "torch_compile": "as torch eager, with model + loss under torch.compile(mode='reduce-overhead',"
                     " dynamic=False); backward and optimizer step eager",
    "floor": "per contiguous batch X[s:s+bs], into preallocated outputs: x@W1, h@W2, h.T@g, "
             "g@W2.T, x.T@dh (the products of gpunet's step, which skips the input gradient)",
    "floor_input_grad": "the GEMM floor plus dh@W1.T, the first layer's input gradient: the "
                        "sixth product of a layer-by-layer backward (cs231n's affine_backward, "
                        "gpunet's model.backward with its default input_grad=True); the "
                        "two-layer textbook net skips it",
}
RATIOS = (  # (key, numerator, denominator)
    ("trainer/floor", "trainer", "floor"),
    ("trainer/floor_input_grad", "trainer", "floor_input_grad"),
    ("trainer/torch", "trainer", "torch"),
    ("trainer/torch_compile", "trainer", "torch_compile"),
    ("trainer/textbook", "trainer", "textbook"),
    ("layer_api/trainer", "layer_api", "trainer"),
)


class Unavailable(Exception):
    """A contender or measurement cannot run here; the message says why."""


@dataclass
class Workload:
    """The epoch every contender runs: the same data, model width and batch size."""

    device: Device
    data: DeviceData
    hidden: int
    batch_size: int

    @property
    def n(self) -> int:
        return len(self.data.y_train)

    @property
    def steps(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def label(self) -> str:
        return f"{IN_FEATURES}-{self.hidden}-{NUM_CLASSES}"

    def synchronize(self) -> None:
        self.device.synchronize()


@dataclass
class Contender:
    """``epoch()`` runs one timed epoch, synchronised; ``accuracy(x, y)`` scores its model."""

    key: str
    epoch: object
    accuracy: object = None
    samples: list = field(default_factory=list)
    cpu_seconds: list = field(default_factory=list)  # this process's CPU time in each sample
    warmup: float | None = None
    error: str | None = None


# --- the contenders ------------------------------------------------------------------------------

def gpunet_trainer(w: Workload) -> Contender:
    config = TrainConfig(device=str(w.device), hidden=(w.hidden,), batch_size=w.batch_size, lr=LR,
                         optimizer="sgd", momentum=MOMENTUM, nesterov=False, schedule="constant",
                         label_smoothing=0.0, val_size=0, progress=False, epochs=1, seed=SEED)
    trainer = Trainer(config, w.data)  # prints only from fit(), which is not called

    def epoch():
        trainer.train_epoch()
        trainer.device.synchronize()

    return Contender("trainer", epoch, lambda x, y: trainer.evaluate(x, y)[1])


def gpunet_layer_api(w: Workload) -> Contender:
    """What a user writes with gpunet's public API (the README's loop), without the trainer."""
    xp = w.device.xp
    manual_seed(SEED)
    model = gpunet.mlp([IN_FEATURES, w.hidden, NUM_CLASSES]).to(w.device)
    loss_fn = gpunet.SoftmaxCrossEntropy()
    opt = gpunet.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    X, Y, bs = w.data.x_train, w.data.y_train, w.batch_size

    def epoch():
        perm = xp.random.permutation(len(X))
        for s in range(0, len(X), bs):
            idx = perm[s:s + bs]
            xb, yb = X[idx], Y[idx]
            loss_fn(model(xb), yb)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        w.synchronize()

    def accuracy(x, y):
        model.eval()
        correct = sum(int((model(x[s:s + 2000]).argmax(axis=1) == y[s:s + 2000]).sum())
                      for s in range(0, len(y), 2000))
        model.train()
        return correct / len(y)

    return Contender("layer_api", epoch, accuracy)


class TextbookNet:
    """The two-layer net as cs231n's assignment writes it, in float32 NumPy, He-initialised."""

    def __init__(self, d_in: int, hidden: int, n_classes: int, *, lr: float, mu: float,
                 rng: np.random.Generator):
        def he(fan_in, fan_out):
            w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            return w.astype(np.float32)

        self.params = {"W1": he(d_in, hidden), "b1": np.zeros(hidden, np.float32),
                       "W2": he(hidden, n_classes), "b2": np.zeros(n_classes, np.float32)}
        self.velocity = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.lr, self.mu = lr, mu

    def scores(self, X):
        p = self.params
        return np.maximum(0, X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def loss(self, X, y):
        """(mean softmax loss, gradients) for one batch."""
        p, n = self.params, X.shape[0]
        z1 = X @ p["W1"] + p["b1"]
        a1 = np.maximum(0, z1)
        scores = a1 @ p["W2"] + p["b2"]
        exp_scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = exp_scores / exp_scores.sum(axis=1, keepdims=True)
        loss = -np.log(probs[range(n), y]).sum() / n

        dscores = probs
        dscores[range(n), y] -= 1
        dscores /= n
        grads = {"W2": a1.T @ dscores, "b2": dscores.sum(axis=0)}
        da1 = dscores @ p["W2"].T
        da1[z1 <= 0] = 0
        grads["W1"] = X.T @ da1
        grads["b1"] = da1.sum(axis=0)
        return loss, grads

    def step(self, X, y) -> float:
        loss, grads = self.loss(X, y)
        for k, dW in grads.items():
            v = self.mu * self.velocity[k] - self.lr * dW
            self.velocity[k] = v
            self.params[k] += v
        return loss


def numpy_textbook(w: Workload) -> Contender:
    if w.device.type != "cpu":
        raise Unavailable("the NumPy textbook runs on the CPU only")
    rng = np.random.default_rng(SEED)
    net = TextbookNet(IN_FEATURES, w.hidden, NUM_CLASSES, lr=LR, mu=MOMENTUM, rng=rng)
    X, Y, bs = w.data.x_train, w.data.y_train, w.batch_size

    def epoch():
        perm = rng.permutation(len(X))
        for s in range(0, len(X), bs):
            idx = perm[s:s + bs]
            net.step(X[idx], Y[idx])

    def accuracy(x, y):
        return float((net.scores(x).argmax(axis=1) == y).mean())

    return Contender("textbook", epoch, accuracy)


def torch_eager(w: Workload, compiled: bool = False) -> Contender:
    torch = _import_torch()
    if compiled and w.device.type != "cuda":
        raise Unavailable("torch.compile is benchmarked on CUDA only")
    from torch import nn

    dev = torch.device("cpu" if w.device.type == "cpu" else f"cuda:{w.device.index}")
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(IN_FEATURES, w.hidden), nn.ReLU(),
                          nn.Linear(w.hidden, NUM_CLASSES)).to(dev)
    for layer in (model[0], model[2]):  # He init, zero bias: gpunet's initialisation
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    X = torch.as_tensor(to_numpy(w.data.x_train)).to(dev)
    Y = torch.as_tensor(to_numpy(w.data.y_train)).to(dev)
    n, bs = len(Y), w.batch_size

    def forward(xb, yb):
        return loss_fn(model(xb), yb)

    def mark_step():
        pass

    if compiled:
        forward = torch.compile(forward, mode="reduce-overhead", dynamic=False)
        mark_step = torch.compiler.cudagraph_mark_step_begin

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(xb, yb):
        mark_step()
        loss = forward(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch():
        perm = torch.randperm(n, device=dev)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            step(X[idx], Y[idx])
        sync()

    if compiled:  # compile and record the graphs for both batch shapes outside the timing
        try:
            for size in sorted({bs, n % bs or bs}):
                for _ in range(3):
                    step(X[:size], Y[:size])
            sync()
        except Exception as exc:
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc

    def accuracy(x, y):
        with torch.no_grad():
            xt = torch.as_tensor(to_numpy(x)).to(dev)
            yt = torch.as_tensor(to_numpy(y)).to(dev)
            return float((model(xt).argmax(dim=1) == yt).float().mean())

    return Contender("torch_compile" if compiled else "torch", epoch, accuracy)


def gemm_floor(w: Workload, input_grad: bool = False) -> Contender:
    """The matrix products of one step on contiguous batches, with preallocated outputs."""
    xp, X, bs, h_dim = w.device.xp, w.data.x_train, w.batch_size, w.hidden
    rng = np.random.default_rng(SEED)

    def array(*shape, scale=1.0):
        return to_device((rng.standard_normal(shape) * scale).astype(np.float32), w.device)

    W1, W2 = array(IN_FEATURES, h_dim, scale=(2 / IN_FEATURES) ** 0.5), array(h_dim, NUM_CLASSES)
    g = array(bs, NUM_CLASSES, scale=1 / bs)  # stands in for the loss gradient
    h, logits, dh = xp.empty((bs, h_dim), np.float32), xp.empty((bs, NUM_CLASSES), np.float32), \
        xp.empty((bs, h_dim), np.float32)
    dW1, dW2, dx = xp.empty_like(W1), xp.empty_like(W2), xp.empty((bs, IN_FEATURES), np.float32)

    def epoch():
        for s in range(0, len(X), bs):
            x = X[s:s + bs]
            m = len(x)
            xp.matmul(x, W1, out=h[:m])
            xp.matmul(h[:m], W2, out=logits[:m])
            xp.matmul(h[:m].T, g[:m], out=dW2)
            xp.matmul(g[:m], W2.T, out=dh[:m])
            xp.matmul(x.T, dh[:m], out=dW1)
            if input_grad:
                xp.matmul(dh[:m], W1.T, out=dx[:m])
        w.synchronize()

    return Contender("floor_input_grad" if input_grad else "floor", epoch)


FACTORIES = {
    "trainer": gpunet_trainer,
    "layer_api": gpunet_layer_api,
    "textbook": numpy_textbook,
    "torch": torch_eager,
    "torch_compile": lambda w: torch_eager(w, compiled=True),
    "floor": gemm_floor,
    "floor_input_grad": lambda w: gemm_floor(w, input_grad=True),
}


# --- the protocol --------------------------------------------------------------------------------

def benchmark_model(w: Workload, keys, repeats: int, say, settle: float = SETTLE_SECONDS) -> dict:
    """Build the contenders, warm each up once, then time ``repeats`` rotating rounds."""
    with w.device.scope():
        contenders, unavailable = build_contenders(w, keys, say)
        order_log = time_rounds(contenders, repeats, settle, lambda line: say(f"{w.label} {line}"))
        results = summarise(w, keys, contenders, unavailable)
        launch = None
        if w.device.type == "cuda":
            launch = {key: _count_or_reason(c, w) for key, c in contenders.items()
                      if c.error is None}

    medians = {k: v.get("median") for k, v in results.items()}
    ratios = {name: medians[a] / medians[b] for name, a, b in RATIOS
              if medians.get(a) and medians.get(b)}
    within = {name: _ratios_within_rounds(results[a]["samples"], results[b]["samples"])
              for name, a, b in RATIOS if medians.get(a) and medians.get(b)}
    out = {"hidden": w.hidden, "widths": [IN_FEATURES, w.hidden, NUM_CLASSES],
           "steps_per_epoch": w.steps, "order_per_round": order_log,
           "accuracy_rows": min(ACCURACY_ROWS, w.n), "contenders": results, "ratios": ratios,
           "ratios_within_rounds": within}
    if launch is not None:
        out["device_ops_per_step"] = launch
    return out


def _ratios_within_rounds(a: list, b: list) -> dict:
    """a / b for the two samples of each round (sample i of every contender is from round i; a
    contender that fails only loses its later rounds). The samples of one round are seconds
    apart, so these ratios show how much a ratio of medians owes to the machine's drift."""
    per_round = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(per_round), "min": min(per_round),
            "max": max(per_round), "per_round": per_round}


def build_contenders(w: Workload, keys, say) -> tuple[dict, dict]:
    """({key: Contender}, {key: why it is unavailable})."""
    contenders, unavailable = {}, {}
    for key in keys:
        try:
            contenders[key] = FACTORIES[key](w)
        except Unavailable as exc:
            unavailable[key] = str(exc)
        except Exception as exc:  # a broken contender is reported, not fatal
            unavailable[key] = f"setup failed: {type(exc).__name__}: {_first_line(exc)}"
        if key in unavailable:
            say(f"{w.label}: {CONTENDERS[key]} unavailable: {unavailable[key]}")
    return contenders, unavailable


def time_rounds(contenders: dict, repeats: int, settle: float, say) -> list:
    """One warm-up epoch each, then ``repeats`` rounds, the order rotated by one every round.

    A contender that raises is dropped from later rounds, with the error kept. Returns the
    order of every round.
    """
    def timed(c: Contender):
        """(wall seconds, this process's CPU seconds) of one epoch, or (None, None) if it fails."""
        time.sleep(settle)
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            c.epoch()
            return time.perf_counter() - t0, time.process_time() - cpu0
        except Exception as exc:
            c.error = f"{type(exc).__name__}: {_first_line(exc)}"
            say(f"{CONTENDERS[c.key]} failed: {c.error}")
            return None, None

    for c in contenders.values():
        c.warmup, _ = timed(c)
        if c.warmup is not None:
            say(f"warm-up   {CONTENDERS[c.key]:<24} {c.warmup:8.3f} s")
    order_log = []
    for r in range(repeats):
        keys = [k for k, c in contenders.items() if c.error is None]
        shift = r % max(len(keys), 1)
        order = keys[shift:] + keys[:shift]
        order_log.append(order)
        for key in order:
            seconds, cpu = timed(contenders[key])
            if seconds is not None:
                contenders[key].samples.append(seconds)
                contenders[key].cpu_seconds.append(cpu)
                say(f"round {r + 1}/{repeats} {CONTENDERS[key]:<24} {seconds:8.3f} s")
    return order_log


def summarise(w: Workload, keys, contenders: dict, unavailable: dict) -> dict:
    """Per contender: what it does, its samples, median, min and its model's train accuracy."""
    rows = min(ACCURACY_ROWS, w.n)
    x_eval, y_eval = w.data.x_train[:rows], w.data.y_train[:rows]
    results = {}
    for key in keys:
        entry = {"name": CONTENDERS[key], "what": WHAT[key]}
        if key in unavailable:
            results[key] = {**entry, "status": f"unavailable: {unavailable[key]}", "samples": []}
            continue
        c = contenders[key]
        entry.update({"status": "ok" if c.error is None else f"failed: {c.error}",
                      "warmup_seconds": c.warmup, "samples": c.samples,
                      # CPU time over wall time well below the thread count flags a sample
                      # slowed by other work on the machine
                      "cpu_seconds": c.cpu_seconds,
                      "median": statistics.median(c.samples) if c.samples else None,
                      "min": min(c.samples) if c.samples else None,
                      "epochs_trained": (c.warmup is not None) + len(c.samples)})
        if c.accuracy is not None and c.error is None:
            try:
                entry["train_accuracy"] = float(c.accuracy(x_eval, y_eval))
            except Exception as exc:
                entry["train_accuracy_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        results[key] = entry
    return results


# --- time to 98% ---------------------------------------------------------------------------------

def time_to_98(device: Device, raw, data_dir, say) -> dict:
    """Train with the default recipe, timing only train_epoch, until test accuracy >= 98%."""
    config = TrainConfig(device=str(device), data_dir=str(data_dir), progress=False)
    data = prepare_mnist(raw, val_size=config.val_size, device=device, dtype=np.dtype(config.dtype))
    trainer = Trainer(config, data)  # prints only from fit()
    epochs, elapsed, reached = [], 0.0, None
    while trainer.epoch < config.epochs:
        with trainer.device.scope():
            t0 = time.perf_counter()
            trainer.train_epoch()
            trainer.device.synchronize()
            seconds = time.perf_counter() - t0
            _, acc = trainer.evaluate(data.x_test, data.y_test)
        trainer.epoch += 1
        elapsed += seconds
        epochs.append({"epoch": trainer.epoch, "seconds": seconds, "cumulative_seconds": elapsed,
                       "test_accuracy": acc})
        say(f"time to 98%: epoch {trainer.epoch}/{config.epochs} {seconds:.2f} s, "
            f"test accuracy {acc:.2%}")
        if acc >= 0.98:
            reached = elapsed
            break
    return {
        "config": config.to_dict(),
        "seconds_to_98": reached,
        "reached": reached is not None,
        "epochs_to_98": trainer.epoch if reached is not None else None,
        "best_test_accuracy": max(e["test_accuracy"] for e in epochs) if epochs else None,
        "epochs": epochs,
        "note": "The test set is read here only to time the default recipe, which was tuned on "
                "the validation split; seconds count train_epoch plus synchronisation only, "
                "not evaluation.",
    }


# --- GPU extras: launch overhead and the cross-entropy kernel ------------------------------------

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
    else:
        out["cross_entropy"] = _guard(lambda: cross_entropy_kernels(device, say))
    return out


# --- the machine ---------------------------------------------------------------------------------

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
    root = Path(__file__).resolve().parents[1]
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
    out = {"env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                  "MKL_NUM_THREADS")}}
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


# --- the report ----------------------------------------------------------------------------------

def format_report(result: dict) -> str:
    s = result["settings"]
    models = result["results"]
    lines = [f"## One training epoch, {s['data']} ({s['n_train']} images, batch {s['batch_size']}, "
             f"{s['steps_per_epoch']} steps), device {s['device']}, median of {s['repeats']} "
             f"rounds after 1 warm-up", "", _machine_line(result), ""]
    for label, m in models.items():
        floor = m["contenders"].get("floor", {}).get("median")
        lines += [f"### {label}", "",
                  "| contender | median s/epoch | min s | µs/step | × GEMM floor | train acc |",
                  "|---|---:|---:|---:|---:|---:|"]
        for entry in m["contenders"].values():
            med = entry.get("median")
            if med is None:
                lines.append(f"| {entry['name']} | {entry['status']} | | | | |")
                continue
            acc = entry.get("train_accuracy")
            cells = [entry["name"], f"{med:.3f}", f"{entry['min']:.3f}",
                     f"{med / m['steps_per_epoch'] * 1e6:.0f}",
                     f"{med / floor:.2f}" if floor else "–",
                     "–" if acc is None else f"{acc:.2%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Ratios (median / median)", "",
              "| ratio | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, a, b in RATIOS:
        cells = [models[label]["ratios"].get(key) for label in models]
        if any(c is not None for c in cells):
            lines.append(f"| {CONTENDERS[a]} / {CONTENDERS[b]} | "
                         + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines += ["", "### Ratios within each round (median over rounds, and min–max)", "",
              "| ratio | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for key, a, b in RATIOS:
        cells = [models[label].get("ratios_within_rounds", {}).get(key) for label in models]
        if any(c is not None for c in cells):
            lines.append(f"| {CONTENDERS[a]} / {CONTENDERS[b]} | " + " | ".join(
                "–" if c is None else f"{c['median']:.2f} ({c['min']:.2f}–{c['max']:.2f})"
                for c in cells) + " |")
    rows = next(iter(models.values()))["accuracy_rows"]
    lines += ["", f"train acc: accuracy on the first {rows} training images after the epochs "
              "each contender ran, a check that all of them train (the GEMM floors train "
              "nothing)."]

    t98 = result.get("time_to_98")
    if t98 and "epochs" in t98:
        c = t98["config"]
        lines += ["", f"### Time to 98% test accuracy, default recipe (784-"
                      f"{'-'.join(map(str, c['hidden']))}-10, {c['optimizer']} lr {c['lr']} "
                      f"{c['schedule']}, momentum {c['momentum']}, batch {c['batch_size']}, "
                      f"{c['epochs']} epochs max)", ""]
        if t98["reached"]:
            lines.append(f"98% reached after {t98['epochs_to_98']} epochs: "
                         f"**{t98['seconds_to_98']:.1f} s** of training")
        else:
            lines.append(f"98% not reached in {len(t98['epochs'])} epochs; best test accuracy "
                         f"{t98['best_test_accuracy']:.2%}")
        lines += ["", "| epoch | train s | cumulative s | test acc |", "|---:|---:|---:|---:|"]
        lines += [f"| {e['epoch']} | {e['seconds']:.2f} | {e['cumulative_seconds']:.2f} | "
                  f"{e['test_accuracy']:.2%} |" for e in t98["epochs"]]
    elif t98:
        lines += ["", f"Time to 98%: {t98.get('skipped') or t98.get('error')}"]

    gpu = result.get("gpu")
    if gpu:
        lines += _format_gpu(gpu)
    return "\n".join(lines)


def _machine_line(result: dict) -> str:
    m, v, t = result["machine"], result["versions"], result["threads"]
    blas = t.get("numpy_blas")
    blas = f"{blas.get('name')} {blas.get('version')}" if isinstance(blas, dict) else "BLAS ?"
    torch = f"torch {v['torch']} ({t['torch_num_threads']} threads)" \
        if "torch_num_threads" in t else "no torch"
    load = m.get("load_average_at_start")
    load = f"; load average {load[0]:.2f} at start" if load else ""
    return (f"{m.get('cpu_model') or m.get('processor') or m['machine']}, {m['cpu_count']} CPUs; "
            f"python {v['python']}, numpy {v['numpy']} ({blas}), {torch}{load}")


def _format_gpu(gpu: dict) -> list:
    lines = ["", "### Launch overhead (GPU)", ""]
    launch = gpu.get("empty_launch", {})
    if "seconds" in launch:
        lines.append(f"empty kernel launch (CuPy RawKernel, host side): "
                     f"{launch['seconds'] * 1e6:.2f} µs")
    else:
        lines.append(f"empty kernel launch: {launch.get('error')}")
    rows = [(label, CONTENDERS[k], v) for label, d in gpu.get("launch_floor", {}).items()
            for k, v in d.items()]
    if rows:
        lines += ["", "| model | contender | kernels/step | device ops/step | launch floor s/epoch "
                      "| median s/epoch | median / floor |", "|---|---|---:|---:|---:|---:|---:|"]
        for label, name, v in rows:
            ratio = v["median_over_launch_floor"]
            lines.append(f"| {label} | {name} | {v['kernels_per_step']:.1f} | "
                         f"{v['device_ops_per_step']:.1f} | {v['launch_floor_seconds']:.4f} | "
                         f"{v['median_seconds'] or 0:.4f} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}'} |")
    ce = gpu.get("cross_entropy", {})
    if "rows" in ce:
        bw = ce.get("copy_bandwidth", {})
        lines += ["", "### Fused cross-entropy forward+backward (GPU)", "",
                  "device-to-device copy: " + (f"{bw['gb_per_s']:.0f} GB/s (read + write of "
                                               f"{bw['bytes'] / 2 ** 31:g} GiB)"
                                               if "gb_per_s" in bw else str(bw.get("error"))), "",
                  "| shape | dtype | gpunet µs | gpunet GB/s | torch F.cross_entropy µs "
                  "| torch GB/s |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in ce["rows"]:
            g, t = r.get("gpunet", {}), r.get("torch", {})
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | "
                         f"{_cell(g, 'seconds', 1e6)} | {_cell(g, 'gb_per_s')} | "
                         f"{_cell(t, 'seconds', 1e6)} | {_cell(t, 'gb_per_s')} |")
        launches = ce.get("launches_128x10", {})
        if "per_call" in launches:
            p = launches["per_call"]
            lines.append(f"\nfused CE at (128, 10): {p['kernels']:.1f} kernels, "
                         f"{p['memcpy'] + p['memset']:.1f} memcpy/memset per call")
        lines.append("GB/s counts the logits read once, the gradient written once and the labels, "
                     "for both; torch also writes its log-softmax.")
    elif ce:
        lines.append(f"\ncross-entropy benchmark: {ce.get('error')}")
    return lines


def _cell(d, key, scale=1.0):
    if not d or key not in d:
        return (d or {}).get("error", "–")[:40] if d else "–"
    return f"{d[key] * scale:.1f}"


def _fmt_kernel(d) -> str:
    if not d:
        return "–"
    return f"{d['seconds'] * 1e6:.1f} µs" if "seconds" in d else d.get("error", "?")


# --- the command line ----------------------------------------------------------------------------

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


# --- helpers -------------------------------------------------------------------------------------

def _mnist_train_all(raw, device: Device) -> DeviceData:
    """All 60,000 training images, float32, normalised, on the device."""
    return prepare_mnist(raw, val_size=0, device=device, dtype=np.float32)


def _tiny_data(device: Device) -> DeviceData:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((TINY_SAMPLES, IN_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, TINY_SAMPLES).astype(np.int64)
    x, y = to_device(x, device), to_device(y, device)
    return DeviceData(x, y, x[:0], y[:0], x[:256], y[:256])


_torch_cache: list = []


def _import_torch():
    """torch, imported on first use; raises Unavailable when it is not installed."""
    if not _torch_cache:
        try:
            import torch
            _torch_cache.append(torch)
        except Exception as exc:  # ImportError, or a broken install
            _torch_cache.append(Unavailable(f"PyTorch cannot be imported ({type(exc).__name__}: "
                                            f"{_first_line(exc)})"))
    if isinstance(_torch_cache[0], Unavailable):
        raise _torch_cache[0]
    return _torch_cache[0]


def _guard(fn) -> dict:
    """fn()'s result, or {"error": ...}: one failed measurement must not end the run."""
    try:
        value = fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
    return value if isinstance(value, dict) else {"value": value}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


if __name__ == "__main__":
    sys.exit(main())
