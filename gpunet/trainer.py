"""Training an MLP on MNIST: the loop behind ``train.py``, callable from Python.

    from gpunet.trainer import TrainConfig, fit
    result = fit(TrainConfig(epochs=3, data_dir="../shared/data/mnist"))

The whole training set moves to the device once; each step gathers a batch into fixed buffers
from a seeded permutation, runs forward, the fused loss, backward and the optimizer update, and
never reads a value back to the host. Losses accumulate on the device and are read once per
epoch (and a few times a second for the progress bar, when there is one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import checkpoint, layers, losses, optim
from .backend import (get_array_module, get_device, manual_seed, resolve_dtype, take_rows,
                      to_device, to_numpy)
from .datasets import load_mnist
from .functional import count_correct, softmax_cross_entropy

NUM_CLASSES = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class TrainConfig:
    """Everything that defines a run. The defaults reach >= 98% MNIST test accuracy."""

    device: str = "auto"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    hidden: tuple[int, ...] = (512,)
    activation: str = "relu"
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    seed: int = 0
    data_dir: str | None = None
    val_size: int = 5000
    dtype: str = "float32"  # float16/bfloat16: mixed precision with float32 master weights
    save: str | None = None
    resume: str | None = None
    metrics_json: str | None = None
    progress: bool = True
    eval_batch_size: int = 2000
    cuda_graph: bool = True  # capture the training step as a CUDA graph (GPU only)

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the setting for anything out of range."""
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name, low, high=math.inf, low_open=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and (value > low if low_open else value >= low) \
                and value < high
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                raise ValueError(f"{name} must be a finite number {bound}"
                                 f"{'' if high == math.inf else f' and < {high}'}, got {value!r}")

        integer("epochs", 0)
        integer("batch_size", 1)
        integer("eval_batch_size", 1)
        integer("seed", 0)
        integer("val_size", 0)
        number("lr", 0, low_open=True)
        number("momentum", 0, 1)
        number("weight_decay", 0)
        number("warmup_epochs", 0)
        number("label_smoothing", 0, 1)
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, (int, np.integer))
                                  or h <= 0 for h in self.hidden):
            raise ValueError(f"hidden must be one or more positive layer widths, got {self.hidden!r}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "dtype": DTYPES,
                   "activation": tuple(layers.ACTIVATIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# float16 gradients of (p - y) / N underflow below 6e-8; the loss is scaled up by this much for
# the backward pass and the gradients scaled back in float32 (bfloat16 has float32's range).
FLOAT16_LOSS_SCALE = 1024.0


# --- data ----------------------------------------------------------------------------------------

@dataclass
class DeviceData:
    """MNIST on the device: flattened, normalised images and int64 labels for each split."""

    x_train: object
    y_train: object
    x_val: object
    y_val: object
    x_test: object
    y_test: object
    mean: float = 0.0
    std: float = 1.0


def prepare_mnist(raw, *, val_size: int, device, dtype) -> DeviceData:
    """Split off the last ``val_size`` training images for validation, normalise with the
    training split's statistics, and move everything to ``device`` once."""
    x_train, y_train, x_test, y_test = raw
    if val_size >= len(x_train):
        raise ValueError(f"val_size must leave training images, got {val_size} of {len(x_train)}")
    cut = len(x_train) - val_size
    train_pixels = x_train[:cut]
    mean = float(train_pixels.mean(dtype=np.float64)) / 255
    std = float(train_pixels.std(dtype=np.float64)) / 255

    def images(x):
        x = x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(dtype)
        x *= 1 / (255 * std)
        x -= mean / std
        return to_device(x, device)

    def labels(y):
        return to_device(y.astype(np.int64), device)

    return DeviceData(images(x_train[:cut]), labels(y_train[:cut]), images(x_train[cut:]),
                      labels(y_train[cut:]), images(x_test), labels(y_test), mean, std)


# --- the run -------------------------------------------------------------------------------------

@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


class Trainer:
    """Holds a run's model, optimizer, schedule and shuffle generator; ``fit`` runs it."""

    def __init__(self, config: TrainConfig, data: DeviceData | None = None, *,
                 quiet: bool = False):
        self.config, self.quiet = config, quiet
        self.device = get_device(config.device)
        # The data and the products run in `dtype`; parameters (the optimizer's master copies)
        # stay float32 under mixed precision.
        self.dtype = resolve_dtype(config.dtype)
        self.param_dtype = np.float64 if self.dtype == np.float64 else np.float32
        self.loss_scale = FLOAT16_LOSS_SCALE if self.dtype == np.float16 else 1.0
        for path, what in ((config.save, "--save"), (config.metrics_json, "--metrics-json")):
            if path:
                checkpoint.check_writable(path, what)
        resumed = checkpoint.load(config.resume) if config.resume else None
        if data is None:
            data = prepare_mnist(load_mnist(config.data_dir, progress=not quiet),
                                 val_size=config.val_size, device=self.device, dtype=self.dtype)
        self.data = data
        _check_labels(data)
        self.n_train = len(data.y_train)
        self.batch_sizes = np.diff(np.r_[0:self.n_train:config.batch_size, self.n_train])
        self.steps_per_epoch = len(self.batch_sizes)

        manual_seed(config.seed)
        in_features = int(np.prod(data.x_train.shape[1:]))
        with self.device.scope():
            mixed = self.dtype != self.param_dtype
            self.model = layers.mlp([in_features, *config.hidden, NUM_CLASSES], config.activation,
                                    dtype=self.param_dtype,
                                    compute_dtype=self.dtype if mixed else None).to(self.device)
            self.loss_fn = losses.SoftmaxCrossEntropy(label_smoothing=config.label_smoothing)
            self.optimizer = make_optimizer(config, self.model.parameters())
        self.scheduler = make_scheduler(config, self.optimizer, self.steps_per_epoch)
        self.shuffle_rng = np.random.default_rng(config.seed)
        self.epoch, self.history = 0, []
        if resumed is not None:
            self._restore(resumed)
        xp = get_array_module(data.x_train)
        with self.device.scope():
            self._x_batch = xp.empty((config.batch_size, in_features), dtype=self.dtype)
            self._y_batch = xp.empty((config.batch_size,), dtype=np.int64)
        self.graph = None
        if self.device.type == "cuda" and config.cuda_graph and self.optimizer.fused_device_update:
            from .graph import GraphStep
            self.graph = GraphStep(self)

    def _restore(self, resumed: dict) -> None:
        checkpoint.restore(resumed, model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, path=self.config.resume)
        meta = resumed["meta"]
        self.epoch = int(meta["epoch"])
        self.history = list(meta["history"])
        self.shuffle_rng.bit_generator.state = meta["shuffle_rng"]

    # --- the training step: everything between two batches ------------------------------------

    def train_epoch(self, progress=None):
        """One pass over the training split; returns the mean training loss."""
        order = self.shuffle_rng.permutation(self.n_train)
        meter = LossMeter(get_array_module(self.data.x_train), self.batch_sizes)
        self.model.train()
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            if self.graph is not None:
                self.graph.run_epoch(order, meter, progress)
            else:
                self._steps(to_device(order, self.device), meter, progress)
        self._check_finite(meter)
        return meter.mean()

    def _steps(self, order, meter, progress) -> None:
        """The eager loop: a batch gather into fixed buffers, forward, loss, backward, update."""
        data, bs = self.data, self.config.batch_size
        # Momentum SGD on the CPU: backward adds the gradients straight into the momentum buffer
        # (see SGD.fold_momentum); nothing here reads gradients unless the loss is scaled.
        folded = (self.loss_scale == 1.0 and isinstance(self.optimizer, optim.SGD)
                  and self.optimizer.fold_momentum())
        try:
            for step, start in enumerate(range(0, self.n_train, bs)):
                idx = order[start:start + bs]
                x, y = self._x_batch[:len(idx)], self._y_batch[:len(idx)]
                take_rows(data.x_train, idx, out=x)
                take_rows(data.y_train, idx, out=y)

                loss = self.forward_backward(x, y)
                self.optimizer.step()
                self.scheduler.step()

                meter.add(loss, step)
                self._tick(progress, meter, len(idx))
        finally:
            if folded:
                self.optimizer.unfold_momentum()

    def forward_backward(self, x, y):
        """Forward, the fused loss and backward for one batch: fills every parameter's gradient
        (unscaled) and returns the loss. The eager loop and the CUDA graph step share it."""
        # x is a fixed batch buffer (this trainer's or the CUDA graph's), which the next step's
        # gather rewrites only after this backward: the model may keep it without a copy.
        logits = self.model.forward(x, copy_input=False)
        # The labels were checked once, in __init__; checking them again here would cost a
        # device synchronisation per step on a GPU.
        loss, grad = self.loss_fn.forward_backward(logits, y, grad_output=self.loss_scale,
                                                   validate=False)
        self.model.backward(grad, input_grad=False)
        if self.loss_scale != 1.0:
            self.optimizer.grad *= 1.0 / self.loss_scale
        return loss

    def _tick(self, progress, meter: "LossMeter", rows: int) -> None:
        """Advance the progress bar; at most twice a second, read the loss (a device sync)."""
        if progress is None:
            return
        progress.update(rows)
        if progress.ready_for_postfix():
            self._check_finite(meter)
            progress.set_postfix_str(f"loss {meter.mean():.4f}", refresh=False)

    def _check_finite(self, meter: "LossMeter") -> None:
        bad_step = meter.first_bad_step()
        if bad_step is not None:
            saved = f"; the last good checkpoint {self.config.save} is kept" if self.config.save else ""
            raise TrainingDiverged(
                f"training diverged: the loss became non-finite at epoch {self.epoch + 1}, step "
                f"{bad_step + 1} of {self.steps_per_epoch}; try a lower learning rate than "
                f"--lr {self.config.lr:g}{saved}")

    def evaluate(self, x, y) -> tuple[float, float]:
        """(mean loss, accuracy) of the model on (x, y), read from the device once."""
        xp = get_array_module(x)
        self.model.eval()
        loss_sum = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.uint64)
        for start in range(0, len(y), self.config.eval_batch_size):
            xb, yb = x[start:start + self.config.eval_batch_size], y[start:start + self.config.eval_batch_size]
            logits = self.model.forward(xb)
            loss_sum += softmax_cross_entropy(logits, yb, reduction="sum")
            count_correct(logits, yb, out=correct)
        self.model.train()
        n = max(len(y), 1)
        return float(loss_sum) / n, int(correct) / n

    def fit(self) -> dict:
        """Train for the configured epochs, then report on the test set; returns the metrics."""
        config, start_time = self.config, time.perf_counter()
        self._say(f"device {self.device.describe()} | model {'-'.join(map(str, self._widths()))} "
                  f"{config.activation} | {config.optimizer} lr {config.lr:g} | "
                  f"{self.n_train} train, {len(self.data.y_val)} val images")
        if self.epoch:
            self._say(f"resumed from {config.resume} after epoch {self.epoch}")
        while self.epoch < config.epochs:
            t0 = time.perf_counter()
            with self.device.scope(), _progress(self, config.progress) as bar:
                train_loss = float(self.train_epoch(bar))
            val_loss, val_acc = self.evaluate(self.data.x_val, self.data.y_val) \
                if len(self.data.y_val) else (None, None)
            self.device.synchronize()
            self.epoch += 1
            stats = EpochStats(self.epoch, train_loss, val_loss, val_acc, time.perf_counter() - t0)
            self.history.append(dataclasses.asdict(stats))
            self._say(_epoch_line(stats, config.epochs))
            if config.save:
                self.save(config.save)
        test_loss, test_acc = self.evaluate(self.data.x_test, self.data.y_test)
        total = time.perf_counter() - start_time
        self._say(f"test accuracy {test_acc:.2%} (test loss {test_loss:.4f}) after "
                  f"{self.epoch} epochs, {total:.1f}s")
        metrics = {
            "device": str(self.device), "seed": config.seed, "epochs": self.epoch,
            "history": self.history, "test_accuracy": test_acc, "test_loss": test_loss,
            "total_seconds": total,
            "train_seconds": sum(h["seconds"] for h in self.history),
            "config": config.to_dict(),
        }
        if config.metrics_json:
            checkpoint.atomic_write(config.metrics_json,
                                    lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        return metrics

    def save(self, path) -> None:
        meta = {"epoch": self.epoch, "history": self.history, "config": self.config.to_dict(),
                "shuffle_rng": self.shuffle_rng.bit_generator.state}
        checkpoint.save(path, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, meta=meta)

    def _widths(self):
        return [self.model[0].in_features, *self.config.hidden, NUM_CLASSES]

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def _check_labels(data: DeviceData) -> None:
    for name in ("y_train", "y_val", "y_test"):
        y = getattr(data, name)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
            raise ValueError(f"data.{name} holds labels outside 0..{NUM_CLASSES - 1} "
                             f"(from {int(y.min())} to {int(y.max())})")


def fit(config: TrainConfig, data: DeviceData | None = None, *, quiet: bool = False) -> dict:
    """Build a :class:`Trainer` for ``config`` and run it; returns the metrics dict."""
    return Trainer(config, data, quiet=quiet).fit()


def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0,
                         weight_decay=config.weight_decay)
    cls = optim.Adam if config.optimizer == "adam" else optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    """A per-step schedule spanning ``config.epochs``, after ``warmup_epochs`` of linear warm-up."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(1, config.epochs * steps_per_epoch - warmup)
    if config.schedule == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=total, warmup_steps=warmup)
    if config.schedule == "step":  # x0.1 at one third and two thirds of the run
        return optim.StepLR(optimizer, step_size=max(1, math.ceil(total / 3)), gamma=0.1,
                            warmup_steps=warmup)
    return optim.ConstantLR(optimizer, warmup_steps=warmup)


class LossMeter:
    """Keeps each step's loss in a device array, so that a step never reads back to the host;
    the epoch's mean and the first non-finite step are computed when asked."""

    def __init__(self, xp, batch_sizes: np.ndarray):
        self.xp, self.sizes = xp, batch_sizes
        self.losses = xp.zeros(len(batch_sizes), dtype=np.float64)
        self.steps = 0

    def add(self, loss, step: int) -> None:
        self.losses[step] = loss
        self.steps = step + 1

    def mean(self) -> float:
        done = to_numpy(self.losses[:self.steps])
        return float(done @ self.sizes[:self.steps]) / max(int(self.sizes[:self.steps].sum()), 1)

    def first_bad_step(self) -> int | None:
        bad = np.flatnonzero(~np.isfinite(to_numpy(self.losses[:self.steps])))
        return int(bad[0]) if bad.size else None


class _progress:
    """A tqdm bar per epoch (off when stdout is no terminal, or when asked), whose loss postfix
    is refreshed at most twice a second: each refresh reads the loss from the device."""

    def __init__(self, trainer: Trainer, enabled: bool):
        self.trainer, self.enabled = trainer, enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        t = self.trainer
        self.bar = tqdm(total=t.n_train, desc=f"epoch {t.epoch + 1}/{t.config.epochs}",
                        unit="img", unit_scale=True, leave=False, disable=None, mininterval=0.5,
                        file=sys.stdout)
        if self.bar.disable:
            return None
        self.bar.ready_for_postfix = self._ready
        self._last = 0.0
        return self.bar

    def _ready(self) -> bool:
        now = time.perf_counter()
        if now - self._last >= 0.5:
            self._last = now
            return True
        return False

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _epoch_line(s: EpochStats, epochs: int) -> str:
    val = "" if s.val_loss is None else f"  val loss {s.val_loss:.4f}  val acc {s.val_accuracy:.2%}"
    return f"epoch {s.epoch}/{epochs}  train loss {s.train_loss:.4f}{val}  {s.seconds:.2f}s"
