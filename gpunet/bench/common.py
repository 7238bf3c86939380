"""What every part of the benchmark shares: the workload, a contender's record, the contenders'
names and descriptions, and the small helpers that keep one failed measurement from ending a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import Device
from ..trainer import DeviceData


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
