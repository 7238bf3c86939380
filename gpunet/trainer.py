"""Training an MLP or a small CNN on MNIST, Fashion-MNIST or KMNIST: the loop behind
``train.py``, callable from Python.

    from gpunet.trainer import TrainConfig, fit
    result = fit(TrainConfig(epochs=3, data_dir="../shared/data/mnist"))
    result = fit(TrainConfig(model="cnn", dataset="fashion-mnist", data_dir="../shared/data"))

The whole training set moves to the device once; each step gathers a batch into fixed buffers
from a seeded permutation, runs forward, the fused loss, backward and the optimizer update, and
never reads a value back to the host. Losses accumulate on the device and are read once per
epoch (and a few times a second for the progress bar, when there is one). Images stay flattened,
(N, 784), on the device; the CNN is fed a (N, 1, 28, 28) view of the same batch buffer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import checkpoint, distributed, layers, losses, optim
from .kernels import blas
from .backend import (get_array_module, get_device, manual_seed, resolve_dtype, take_rows,
                      to_device, to_numpy)
from .conv import small_cnn
from .datasets import DATASETS, IMAGE_SHAPE, dataset_files, load_dataset, resolve_root
from .dropout import Dropout
from .functional import count_correct, softmax_cross_entropy

NUM_CLASSES = 10
# mlp: layers.mlp of the hidden widths and activation; cnn: conv.small_cnn, whose layers are
# fixed (these are its arguments, named here once for the model and for the memory estimate).
MODELS = ("mlp", "cnn")
MLP_HIDDEN, MLP_ACTIVATION = (512,), "relu"
CNN_CHANNELS, CNN_HIDDEN, CNN_DROPOUT = (32, 64), 128, 0.25
# Epochs of a run that does not say: chosen on MNIST's validation split. The cnn at 6 epochs,
# at 9, and at 8 with weight decay 5e-4 reached 99.44%, 99.44% (val loss 0.1140 against
# 0.1170) and 99.38%; 9 epochs train in about 175 s on a 2-core CPU.
DEFAULT_EPOCHS = {"mlp": 6, "cnn": 9}
# The settings a checkpoint's model was built from, and learnt on: a resumed run keeps them.
ARCHITECTURE = ("dataset", "model", "hidden", "activation")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class TrainConfig:
    """Everything that defines a run. The defaults reach >= 98% MNIST test accuracy.

    ``hidden`` and ``activation`` are settings of the mlp model (None: 512 and relu); the cnn
    takes neither, and refuses them. ``epochs`` None: the model's DEFAULT_EPOCHS."""

    device: str = "auto"
    dataset: str = "mnist"  # one of datasets.DATASETS
    model: str = "mlp"
    epochs: int | None = None
    batch_size: int = 128
    lr: float | None = None  # None: the optimizer's usual rate, DEFAULT_LR (as in PyTorch)
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    hidden: tuple[int, ...] | None = None
    activation: str | None = None
    schedule: str = "cosine"
    # The epochs the schedule spans (PyTorch's T_max, in epochs); None: the whole run. A resumed
    # run keeps the saved span unless this is given (see Trainer._check_schedule).
    schedule_epochs: int | None = None
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    seed: int = 0
    data_dir: str | None = None
    # False: data files that cannot be verified against the published checksums (a raw or
    # recompressed KMNIST copy) are used anyway; another dataset's files are refused all the same.
    verify_data: bool = True
    val_size: int = 5000
    dtype: str = "float32"  # float16/bfloat16: mixed precision with float32 master weights
    save: str | None = None
    resume: str | None = None
    metrics_json: str | None = None
    progress: bool = True
    eval_batch_size: int = 2000
    cuda_graph: bool = True  # capture the training step as a CUDA graph (GPU only)
    # Data-parallel over the ranks of an MPI launch (gpunet.distributed); batch_size is then
    # per rank, as in PyTorch's DistributedDataParallel, and the global batch is size x that.
    distributed: bool = False

    def __post_init__(self):
        if isinstance(self.hidden, (list, tuple)):
            self.hidden = tuple(self.hidden)
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS.get(self.model, DEFAULT_EPOCHS["mlp"])
        if self.model == "mlp":
            self.hidden = MLP_HIDDEN if self.hidden is None else self.hidden
            self.activation = MLP_ACTIVATION if self.activation is None else self.activation
        # Whether lr came from DEFAULT_LR rather than from the caller (not a field: it is not
        # part of the run's identity, and a resumed run reads back the rate as a given one).
        self.lr_is_default = self.lr is None and self.optimizer in DEFAULT_LR
        if self.lr_is_default:
            self.lr = DEFAULT_LR[self.optimizer]
        self.validate()

    @property
    def schedule_horizon(self) -> int:
        """The epochs the learning-rate schedule spans."""
        return self.epochs if self.schedule_epochs is None else self.schedule_epochs

    def validate(self) -> None:
        """Raise ValueError naming the setting for anything out of range."""
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name, low, high=math.inf, low_open=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, bool) and math.isfinite(value) \
                and (value > low if low_open else value >= low) and value < high
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                raise ValueError(f"{name} must be a finite number {bound}"
                                 f"{'' if high == math.inf else f' and < {high}'}, got {value!r}")

        choices = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS,
                   "schedule": SCHEDULES, "dtype": DTYPES}
        if self.model == "mlp":
            choices["activation"] = tuple(layers.ACTIVATIONS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.model != "mlp":
            mlp_only = [f"{k}={getattr(self, k)!r}" for k in ("hidden", "activation")
                        if getattr(self, k) is not None]
            if mlp_only:
                raise ValueError(f"hidden and activation are settings of model 'mlp'; model "
                                 f"{self.model!r} (gpunet.conv.small_cnn) has fixed layers, got "
                                 f"{' and '.join(mlp_only)}")
            if self.dtype in ("float16", "bfloat16"):
                raise ValueError(f"dtype {self.dtype} with model {self.model!r}: Conv2d computes in "
                                 "the dtype of its parameters and has no mixed precision (no "
                                 f"compute_dtype), so the run would not be {self.dtype}; give dtype "
                                 "float32 or float64")
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
        if self.schedule_epochs is not None:
            integer("schedule_epochs", 1)
        for name in ("nesterov", "verify_data"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError(f"nesterov momentum belongs to the sgd optimizer, not {self.optimizer}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0, got momentum 0")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs:g} is longer than the run's "
                             f"{self.epochs} epochs, so the rate would never reach lr {self.lr:g}; "
                             f"give at most {self.epochs}")
        if self.warmup_epochs and self.schedule != "constant" \
                and self.warmup_epochs >= self.schedule_horizon:
            raise ValueError(f"warmup_epochs {self.warmup_epochs:g} leaves nothing of the "
                             f"{self.schedule} schedule's {self.schedule_horizon} epochs; give "
                             f"fewer warm-up epochs or more schedule_epochs")
        for name in ("save", "resume", "metrics_json", "data_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or str(value) == ""):
                raise ValueError(f"{name} must be a non-empty path or None, got {value!r}")
        if self.model == "mlp" and (not isinstance(self.hidden, tuple) or not self.hidden or any(
                isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h <= 0
                for h in self.hidden)):
            raise ValueError(f"hidden must be one or more positive layer widths, got {self.hidden!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = None if self.hidden is None else list(self.hidden)
        return d


# Settings of a checkpoint that a resumed run does not inherit: the files of that run, and the
# permission to use unverified data, which is given (or not) for each run anew.
NOT_INHERITED = ("save", "resume", "metrics_json", "verify_data")


def saved_settings(meta: dict, path) -> dict:
    """The settings a checkpoint's run was made with (``meta["config"]``), those a resumed run
    inherits, checked as a TrainConfig checks them; a CheckpointError names a bad one."""
    fields = TrainConfig.__dataclass_fields__
    saved = {k: v for k, v in meta["config"].items() if k in fields and k not in NOT_INHERITED}
    try:
        TrainConfig(**saved)
    except (ValueError, TypeError) as exc:
        raise checkpoint.CheckpointError(
            f"checkpoint {path}: meta key 'config' holds an invalid setting: {exc}") from None
    return saved


def architecture_conflict(saved: dict, asked: dict, path) -> str | None:
    """What in ``asked`` (settings by name; None: not asked) contradicts the dataset and model
    that checkpoint ``path`` holds, as one line, or None. ``saved`` is its config; one from
    before the dataset and model were settings holds an MLP trained on MNIST."""
    held = {"dataset": saved.get("dataset", "mnist"), "model": saved.get("model", "mlp")}
    if held["model"] == "mlp":
        held["hidden"] = tuple(saved.get("hidden") or MLP_HIDDEN)
        held["activation"] = saved.get("activation") or MLP_ACTIVATION
    what = f"--model {held['model']}" + (
        f" (--hidden {_flag_value(held['hidden'])}, --activation {held['activation']})"
        if held["model"] == "mlp" else "") + f" trained on --dataset {held['dataset']}"
    for key in ARCHITECTURE:
        if asked.get(key) is None:
            continue
        want = tuple(asked[key]) if key == "hidden" else asked[key]
        if key not in held:
            return (f"checkpoint {path} holds {what}, which takes no --{key}, and --{key} "
                    f"{_flag_value(want)} was asked; drop --{key} to resume it")
        if want != held[key]:
            return (f"checkpoint {path} holds {what}, and --{key} {_flag_value(want)} was asked; "
                    f"a resumed run keeps the model and the data it was saved with: drop --{key} "
                    "to resume it, or start a new run without --resume")
    return None


def _flag_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# float16 gradients of (p - y) / N underflow below 6e-8; the loss is scaled up by this much for
# the backward pass and the gradients scaled back in float32 (bfloat16 has float32's range).
FLOAT16_LOSS_SCALE = 1024.0
# A run has plainly failed after an epoch whose validation accuracy is at most CHANCE_FACTOR x
# chance, or whose training loss is over LOSS_FACTOR x the loss of its first step (about
# ln 10 = 2.3 for a fresh model). A working MNIST run is past 80% and below its start after one.
CHANCE_FACTOR = 1.5
LOSS_FACTOR = 2.0


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


def pixel_statistics(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 ``pixels``, as ``pixels.mean(dtype=np.float64)``
    and ``.std(dtype=np.float64)`` give them, from a 256-bin histogram: milliseconds and 2 KB,
    where converting 43 million pixels to float64 takes 345 MB of temporaries."""
    if pixels.dtype != np.uint8:
        x = np.asarray(pixels, dtype=np.float64)
        return float(x.mean()), float(x.std())
    counts = np.bincount(pixels.reshape(-1), minlength=256)
    n = int(counts.sum())
    if n == 0:
        return math.nan, math.nan
    values = np.arange(256)
    # Integer sums are exact (below 2**63 for any array that fits in memory), so the mean is the
    # correctly rounded quotient, which is what NumPy's float64 sum of integers gives as well.
    mean = int(counts @ values) / n
    variance = float(counts @ (values - mean) ** 2) / n
    return mean, math.sqrt(variance)


def prepare_mnist(raw, *, val_size: int, device, dtype) -> DeviceData:
    """Split off the last ``val_size`` training images for validation, normalise with the
    training split's statistics, and move everything to ``device`` once."""
    x_train, y_train, x_test, y_test = raw
    if val_size >= len(x_train):
        raise ValueError(f"val_size must leave training images, got {val_size} of {len(x_train)}")
    cut = len(x_train) - val_size
    mean, std = pixel_statistics(x_train[:cut])
    mean, std = mean / 255, std / 255

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
                 quiet: bool = False, comm: distributed.Communicator | None = None):
        self.comm = comm if comm is not None else distributed.init(config.distributed)
        self._notes = []  # lines for after fit()'s first line
        # Every rank trains; rank 0 alone speaks and writes files.
        self.config, self.quiet = config, quiet or not self.comm.is_root
        if self.comm.size > 1:
            distributed.check_same_everywhere(self.comm, config.to_dict(), "flags")
        self.device = self._rank_device(get_device(config.device))
        if self.comm.local_size > 1 and self.device.type == "cpu":
            self._share_cores()
        # The data and the products run in `dtype`; parameters (the optimizer's master copies)
        # stay float32 under mixed precision.
        self.dtype = resolve_dtype(config.dtype)
        self.param_dtype = np.float64 if self.dtype == np.float64 else np.float32
        self.loss_scale = FLOAT16_LOSS_SCALE if self.dtype == np.float16 else 1.0
        # Everything the run would write is checked before anything is read or computed.
        self.data_dir = resolve_root(config.data_dir, dataset=config.dataset) if data is None else None
        data_files = dataset_files(config.dataset, config.data_dir) if data is None else {}
        if self.comm.is_root:  # the one rank that writes
            checkpoint.check_outputs(
                {"--save": config.save, "--metrics-json": config.metrics_json},
                {**{f"the data file {name}": path for name, path in data_files.items()},
                 "the --resume checkpoint": config.resume},
                # Updating the checkpoint a run resumed from is the usual way to continue a run:
                # the file is read whole before the first save, and every save replaces it
                # atomically.
                updatable=(("--save", "the --resume checkpoint"),))
        # Rank 0 reads the checkpoint and sends it to the others: one file, one truth.
        resumed = checkpoint.load(config.resume) if config.resume and self.comm.is_root else None
        if self.comm.size > 1 and config.resume:
            resumed = self.comm.broadcast_object(resumed)
        if resumed is not None:  # what can be checked before the data is read
            self._check_resume(resumed["meta"], config.resume)
        if self.device.type == "cpu" and self.dtype != self.param_dtype:
            self._warn(f"--dtype {config.dtype} on the CPU: NumPy has no {config.dtype} "
                       "arithmetic of its own and emulates it, so training runs far slower than "
                       "in float32 (about 275 x for float16: minutes per epoch, not seconds); "
                       "mixed precision pays off on a GPU, use float32 here")
        if data is None:
            raw = load_dataset(config.dataset, config.data_dir, progress=not quiet,
                               verify=config.verify_data)
            data = prepare_mnist(raw, val_size=config.val_size, device=self.device, dtype=self.dtype)
        self.data = data
        _check_labels(data)
        self.n_train = len(data.y_train)
        # A step takes one global batch of the epoch's permutation (batch_size rows per rank);
        # each rank takes its shard of it. batch_sizes are this rank's rows per step.
        self.global_batch = config.batch_size * self.comm.size
        self.global_batch_sizes = np.diff(np.r_[0:self.n_train:self.global_batch, self.n_train])
        self._shards = [distributed.shard(int(g), self.comm) for g in self.global_batch_sizes]
        self.batch_sizes = np.array([hi - lo for lo, hi in self._shards], dtype=np.int64)
        self.steps_per_epoch = len(self.global_batch_sizes)
        in_features = int(np.prod(data.x_train.shape[1:]))
        # The CNN sees each flattened row as the (1, 28, 28) image it was (see _model_input).
        self.image_shape = (1, *IMAGE_SHAPE) if config.model == "cnn" else None
        if self.image_shape and in_features != math.prod(self.image_shape):
            raise ValueError(f"--model {config.model} takes {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} images "
                             f"({math.prod(self.image_shape)} values each), but data.x_train has "
                             f"{in_features} values per image")
        batch_rows = min(config.batch_size, self.n_train)
        if config.batch_size > self.n_train:
            self._warn(f"--batch-size {config.batch_size} is more than the {self.n_train} "
                       f"training images: each epoch is one step over all {self.n_train}")
        self._check_memory(in_features, batch_rows)

        manual_seed(config.seed)
        # The CNN draws its weights and (on the CPU) its dropout masks from a generator of its
        # own, whose state the checkpoint keeps: a resumed run draws the masks a straight one
        # would. The MLP draws nothing after its weights, from gpunet's seeded generator.
        self.model_rng = np.random.default_rng([config.seed, 1]) if config.model == "cnn" else None
        try:
            with self.device.scope():
                self.model = self._build_model(in_features).to(self.device)
                self.loss_fn = losses.SoftmaxCrossEntropy(label_smoothing=config.label_smoothing)
                self.optimizer = make_optimizer(config, self.model.parameters())
                xp = get_array_module(data.x_train)
                self._x_batch = xp.empty((batch_rows, in_features), dtype=self.dtype)
                self._y_batch = xp.empty((batch_rows,), dtype=np.int64)
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError (a MemoryError too)
            need = self._memory_text(in_features, batch_rows)
            raise ValueError(f"out of memory building the model: {need}") from None
        # Under --distributed each rank draws its rows' part of the one dropout mask of the
        # global batch (place_dropout sets the layers' row_offset step by step), counter-based on
        # the CPU too: the masks, like the gradients, are those of one process at the global
        # batch, however many ranks share it, and not one identical mask per rank.
        self._sharded_dropouts = self._dropout_layers() if config.distributed else []
        for layer in self._sharded_dropouts:
            layer.counter_based = True
        self.scheduler = make_scheduler(config, self.optimizer, self.steps_per_epoch)
        self.shuffle_rng = np.random.default_rng(config.seed)
        self.epoch, self.history = 0, []
        self.initial_loss = None      # the first step's loss: the yardstick of a failed run
        self.previous_seconds = 0.0   # wall time of the runs this one resumes
        self.failed, self.failed_epochs = None, []
        # What the file at config.save holds: (epoch, healthy), or None while it holds nothing
        # of this run (it may not exist, or be an unrelated file this run has not touched yet).
        self.saved, self.saving, self.in_epoch = None, False, False
        if resumed is not None:
            self._restore(resumed)
        if self.comm.size > 1:  # every rank starts from rank 0's parameters and state
            with self.device.scope():
                self.comm.broadcast_(self.optimizer.data)
                for buffer in self.optimizer.state.values():
                    self.comm.broadcast_(buffer)
        self.graph = None
        if self.device.type == "cuda" and config.cuda_graph and self.optimizer.fused_device_update:
            if config.model == "mlp":
                from .graph import GraphStep
                self.graph = GraphStep(self)
            else:
                # A captured graph writes into the addresses it was captured with, but Conv2d
                # reuses workspaces that the epoch's last, smaller batch reallocates (their old
                # memory back in the pool): the replays would write into memory in other use.
                self._notes.append(f"note: --model {config.model} runs its kernels eagerly on the "
                                   "GPU, not as a CUDA graph (the convolutions' workspaces change "
                                   "size with the epoch's last batch, which a captured graph "
                                   "cannot follow)")

    def _build_model(self, in_features: int):
        config = self.config
        if config.model == "cnn":
            return small_cnn(1, NUM_CLASSES, IMAGE_SHAPE[0], channels=CNN_CHANNELS,
                             hidden=CNN_HIDDEN, dropout=CNN_DROPOUT, dtype=self.param_dtype,
                             rng=self.model_rng)
        mixed = self.dtype != self.param_dtype
        return layers.mlp([in_features, *config.hidden, NUM_CLASSES], config.activation,
                          dtype=self.param_dtype, compute_dtype=self.dtype if mixed else None)

    def _model_input(self, x):
        """What the model takes for rows ``x`` of the flattened images: x itself, or for the CNN
        a (N, 1, 28, 28) view of it (rows of a C-ordered array reshape without a copy)."""
        return x if self.image_shape is None else x.reshape(len(x), *self.image_shape)

    def _dropout_layers(self) -> list:
        return [layer for layer in getattr(self.model, "layers", ()) if isinstance(layer, Dropout)]

    def _share_cores(self) -> None:
        """Ranks that share a machine share its cores: one BLAS thread pool per rank, each of
        cores / ranks threads, unless the launch set OPENBLAS_NUM_THREADS or OMP_NUM_THREADS
        (as torchrun sets OMP_NUM_THREADS=1 for the same reason)."""
        if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // self.comm.local_size)
        if blas.set_threads(threads):
            self._notes.append(f"note: {self.comm.local_size} ranks share this machine's {cores} "
                               f"cores: {threads} BLAS thread(s) each (OPENBLAS_NUM_THREADS sets "
                               "another count)")

    def _rank_device(self, device):
        """The device of this rank: on a GPU machine with several ranks, the GPU of its local
        rank (chosen before any NCCL communicator is made)."""
        if self.comm.size == 1 or device.type != "cuda":
            return device
        if self.config.device not in ("cuda", "auto"):
            raise ValueError(f"--device {self.config.device} with --distributed would put every "
                             "rank on one GPU; give --device cuda, and each rank takes the GPU "
                             "of its local rank")
        from .backend import cuda_device_count
        return get_device(f"cuda:{self.comm.local_rank % cuda_device_count()}")

    def _restore(self, resumed: dict) -> None:
        path, meta = self.config.resume, resumed["meta"]
        epoch = meta["epoch"]
        missing = [k for k in ("optimizer/lr", "optimizer/step", "scheduler/last_step")
                   if k not in resumed]
        if missing:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} lacks {', '.join(map(repr, missing))}, so it cannot continue a "
                "run (was it written by checkpoint.save without an optimizer or a scheduler?)")
        most = epoch * meta.get("steps_per_epoch", self.n_train)  # a batch holds >= 1 image
        for key in ("optimizer/step", "scheduler/last_step"):
            if key in resumed and int(resumed[key]) > most:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path}: {key!r} is {int(resumed[key])}, more steps than "
                    f"{epoch} epochs of {self.n_train} images can take")
        checkpoint.restore(resumed, model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, path=path)
        # Checkpoints are written at epoch ends, where the schedule's position is exact in this
        # run's steps, also when --batch-size (and so the steps per epoch) changed.
        self.scheduler.load_state_dict({"last_step": epoch * self.steps_per_epoch})
        if self.model_rng is not None and "model_rng" not in meta:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} lacks meta key 'model_rng', so its --model {self.config.model} "
                "cannot continue with the random draws (dropout masks) of the run it was saved from")
        for key, generator in (("shuffle_rng", self.shuffle_rng), ("model_rng", self.model_rng)):
            if generator is None:
                continue
            try:
                generator.bit_generator.state = meta[key]
            except (ValueError, TypeError, KeyError) as exc:
                raise checkpoint.CheckpointError(
                    f"checkpoint {path}: meta key {key!r} is not a usable PCG64 state ({exc})"
                ) from None
        dropouts = self._dropout_layers()
        counters = meta.get("dropout_counters", [0] * len(dropouts))
        if len(counters) != len(dropouts):
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: meta key 'dropout_counters' must hold one counter for each "
                f"of the model's {len(dropouts)} Dropout layers, got {len(counters)}")
        for layer, count in zip(dropouts, counters):  # the GPU's counter-based masks
            layer.counter = to_device(np.array(count, dtype=np.uint64), self.device)
        self.epoch, self.history = epoch, list(meta["history"])
        self.initial_loss = meta.get("initial_loss")
        self.previous_seconds = meta.get("total_seconds", sum(h["seconds"] for h in self.history))
        if self.config.save and checkpoint.same_file(self.config.save, path):
            last = self.history[-1] if self.history else None
            self.saved = (epoch, last is None or self._failure(last) is None)

    def _check_resume(self, meta: dict, path) -> None:
        conflict = architecture_conflict(saved_settings(meta, path),
                                         {k: getattr(self.config, k) for k in ARCHITECTURE}, path)
        if conflict:
            raise checkpoint.CheckpointError(conflict)
        epoch = meta["epoch"]
        if epoch > self.config.epochs:
            raise ValueError(f"--epochs {self.config.epochs} is fewer than the {epoch} epochs "
                             f"checkpoint {path} already holds; give --epochs {epoch} or more")
        self._check_schedule(meta, path)

    def _check_schedule(self, meta: dict, path) -> None:
        """A resumed run keeps the horizon of its schedule, unless schedule_epochs says otherwise:
        stretching a cosine run from 2 to 4 epochs would send the rate from 0 back up mid-way,
        which no straight 4-epoch run does. PyTorch keeps T_max in the scheduler's state_dict for
        the same reason."""
        if self.config.schedule == "constant":
            return
        saved_config = meta["config"]
        saved = meta.get("schedule_epochs", saved_config.get("schedule_epochs")
                         or saved_config.get("epochs"))
        if saved != self.config.schedule_horizon and self.config.schedule_epochs is None:
            raise ValueError(
                f"checkpoint {path} was scheduled ({self.config.schedule}) over "
                f"{_plural(saved, 'epoch')}, and "
                f"--epochs {self.config.epochs} would restart that schedule mid-way; give "
                f"--schedule-epochs {self.config.epochs} to stretch it over the longer run (the "
                f"rate goes back up), or --schedule-epochs {saved} to keep it (after epoch "
                f"{saved} the rate stays at its final value)")

    def _check_memory(self, in_features: int, batch_rows: int) -> None:
        """Refuse sizes past the machine's memory with the amount they would take, before
        allocating: on Linux a too-large model may be granted and then killed half-way."""
        need, _ = self._memory_need(in_features, batch_rows)
        available = _available_memory() if self.device.type == "cpu" else None
        if available is not None and need > available:
            advice = ("--hidden, --batch-size or --eval-batch-size" if self.config.model == "mlp"
                      else "--batch-size or --eval-batch-size")
            raise ValueError(f"{self._memory_text(in_features, batch_rows)}, more than the "
                             f"{_gib(available)} this machine has available; give a smaller "
                             f"{advice}")

    def _eval_rows(self) -> int:
        return min(self.config.eval_batch_size, max(len(self.data.y_val), len(self.data.y_test), 1))

    def _memory_need(self, in_features: int, batch_rows: int) -> tuple[int, int]:
        """(bytes the run needs beyond the data, parameter count)."""
        c = self.config
        states = {"sgd": int(c.momentum > 0), "adam": 2, "adamw": 2}[c.optimizer]
        item, param_item = np.dtype(self.dtype).itemsize, np.dtype(self.param_dtype).itemsize
        if c.model == "cnn":
            params, train_bytes, eval_bytes = _cnn_sizes(item)
            # parameters, gradients and optimizer state; per image of a training batch what
            # forward keeps and backward makes, and of an evaluation batch the eval workspaces
            need = params * param_item * (2 + states)
            return need + batch_rows * train_bytes + self._eval_rows() * eval_bytes, params
        widths = [in_features, *c.hidden, NUM_CLASSES]
        params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        # parameters, gradients and optimizer state, plus the weights' low-precision copies
        need = params * (param_item * (2 + states) + (item if item != param_item else 0))
        # a batch: its inputs, and per layer the output, what backward keeps and the gradient
        need += batch_rows * (in_features + 3 * sum(widths[1:])) * item
        need += self._eval_rows() * 2 * max(widths[1:]) * item
        return need, params

    def _memory_text(self, in_features: int, batch_rows: int) -> str:
        need, params = self._memory_need(in_features, batch_rows)
        c = self.config
        parts = (f"{params:,} parameters, with their gradients and {c.optimizer} state, and the "
                 f"layers' outputs for a batch of {batch_rows} and an evaluation batch of "
                 f"{self._eval_rows()}")
        if c.model == "cnn":
            return (f"--model cnn with --batch-size {c.batch_size} needs about {_gib(need)} "
                    f"(model {self._describe_model()}: {parts})")
        widths = "-".join(map(str, [in_features, *c.hidden, NUM_CLASSES]))
        return (f"--hidden {','.join(map(str, c.hidden))} with --batch-size {c.batch_size} needs "
                f"about {_gib(need)} (model {widths}: {parts})")

    # --- the training step: everything between two batches ------------------------------------

    def train_epoch(self, progress=None):
        """One pass over the training split; returns the mean training loss (over all ranks)."""
        order = self.local_order(self.shuffle_rng.permutation(self.n_train))
        meter = LossMeter(get_array_module(self.data.x_train), self.batch_sizes)
        self.model.train()
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            try:
                if self.graph is not None:
                    self.graph.run_epoch(order, meter, progress)
                else:
                    self._steps(to_device(order, self.device), meter, progress)
            finally:
                self.place_dropout(None)  # a forward after training draws from row 0 again
        self._check_finite(meter)
        if self.initial_loss is None and meter.steps:
            self.initial_loss = float(to_numpy(meter.losses[:1])[0])
        if self.comm.size == 1:
            return meter.mean()
        total = np.array([meter.mean() * meter.rows(), meter.rows()])
        self.comm.allreduce_sum_(total)
        return total[0] / max(total[1], 1)

    def local_order(self, order: np.ndarray) -> np.ndarray:
        """This rank's rows of the epoch's permutation, step after step: its shard of every
        global batch (the whole permutation on one rank)."""
        if self.comm.size == 1:
            return order
        starts = np.r_[0, np.cumsum(self.global_batch_sizes)[:-1]]
        return np.concatenate([order[s + lo:s + hi] for s, (lo, hi) in zip(starts, self._shards)])

    def _steps(self, order, meter, progress) -> None:
        """The eager loop: a batch gather into fixed buffers, forward, loss, backward, update."""
        data = self.data
        # Momentum SGD on the CPU: backward adds the gradients straight into the momentum buffer
        # (see SGD.fold_momentum); nothing here reads gradients unless the loss is scaled, or
        # averaged over ranks (an average of buffers would be scaled with them).
        folded = (self.loss_scale == 1.0 and self.comm.size == 1
                  and isinstance(self.optimizer, optim.SGD) and self.optimizer.fold_momentum())
        try:
            start = 0
            for step, rows in enumerate(self.batch_sizes):
                self.place_dropout(int(self.global_batch_sizes[step]))
                idx = order[start:start + rows]
                start += rows
                x, y = self._x_batch[:rows], self._y_batch[:rows]
                take_rows(data.x_train, idx, out=x)
                take_rows(data.y_train, idx, out=y)

                loss = self.forward_backward(x, y)
                self.average_gradients(rows, self.global_batch_sizes[step])
                self.optimizer.step()
                self.scheduler.step()

                meter.add(loss, step)
                self._tick(progress, meter, int(self.global_batch_sizes[step]))
        finally:
            if folded:
                self.optimizer.unfold_momentum()

    def place_dropout(self, global_rows: int | None) -> None:
        """Under --distributed, point each Dropout at this rank's first row of a global batch of
        ``global_rows`` (None: back to 0, outside training). A captured CUDA graph keeps the
        offset it was captured with, which is that of every full global batch."""
        if not self._sharded_dropouts:  # the common case: nothing to do in the step
            return
        first = 0 if global_rows is None else distributed.shard(global_rows, self.comm)[0]
        for layer in self._sharded_dropouts:
            layer.row_offset = first

    def average_gradients(self, rows: int, global_rows: int) -> None:
        """Make every rank's gradient the gradient of the mean loss over the global batch: one
        allreduce of the flat gradient buffer. A rank's gradient is of its own mean, so where
        the shards are unequal (an epoch's last batch) each is weighted by its rows first."""
        if self.comm.size == 1:
            return
        grad = self.optimizer.grad
        if rows * self.comm.size != global_rows:
            grad *= rows * self.comm.size / global_rows
        self.comm.allreduce_mean_(grad)

    def forward_backward(self, x, y):
        """Forward, the fused loss and backward for one batch: fills every parameter's gradient
        (unscaled) and returns the loss. The eager loop and the CUDA graph step share it."""
        # x is a fixed batch buffer (this trainer's or the CUDA graph's), which the next step's
        # gather rewrites only after this backward: the model may keep it without a copy.
        logits = self.model.forward(self._model_input(x), copy_input=False)
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
            raise TrainingDiverged(
                f"training diverged: the loss became non-finite at epoch {self.epoch + 1}, step "
                f"{bad_step + 1} of {self.steps_per_epoch}; try a lower learning rate than "
                f"--lr {self.config.lr:g}; {self.checkpoint_note()}")

    def evaluate(self, x, y) -> tuple[float, float]:
        """(mean loss, accuracy) of the model on (x, y), read from the device once; with several
        ranks each scores its shard of the rows and the sums are added up."""
        n = len(y)
        if self.comm.size > 1:
            lo, hi = distributed.shard(n, self.comm)
            x, y = x[lo:hi], y[lo:hi]
        xp = get_array_module(x)
        loss_sum = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.uint64)
        # Eval mode: Dropout off, BatchNorm on its running statistics. The mode the model was in
        # comes back however this ends, so that a failed evaluation cannot leave the next
        # epoch training without dropout.
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(y), self.config.eval_batch_size):
                stop = start + self.config.eval_batch_size
                logits = self.model.forward(self._model_input(x[start:stop]))
                loss_sum += softmax_cross_entropy(logits, y[start:stop], reduction="sum")
                count_correct(logits, y[start:stop], out=correct)
        finally:
            self.model.train(was_training)
        if self.comm.size > 1:
            sums = np.array([float(loss_sum), float(correct)])
            self.comm.allreduce_sum_(sums)
            loss_sum, correct = sums
        n = max(n, 1)
        return float(loss_sum) / n, int(correct) / n

    def fit(self) -> dict:
        """Train for the configured epochs, then report on the test set; returns the metrics."""
        config = self.config
        self._start_time = start_time = time.perf_counter()
        rate = f"{config.optimizer} lr {config.lr:g}"
        if config.lr_is_default:
            rate += f" (the default for {config.optimizer})"
        if config.nesterov:
            rate += f", nesterov momentum {config.momentum:g}"
        ranks = "" if self.comm.size == 1 else (
            f" | {self.comm.size} ranks, batch {config.batch_size} per rank = {self.global_batch}")
        self._say(f"device {self.device.describe()} | dataset {config.dataset} | model "
                  f"{config.model} {self._describe_model()} | {rate} | "
                  f"{self.n_train} train, {len(self.data.y_val)} val images{ranks}")
        for note in self._notes:
            self._say(note)
        if self.epoch:
            self._say(f"resumed from {config.resume} after epoch {self.epoch}")
        while self.epoch < config.epochs:
            t0 = time.perf_counter()
            self.in_epoch = True  # for the message of a run interrupted now
            with self.device.scope(), _progress(self, config.progress and not self.quiet) as bar:
                train_loss = float(self.train_epoch(bar))
            val_loss, val_acc = self.evaluate(self.data.x_val, self.data.y_val) \
                if len(self.data.y_val) else (None, None)
            self.device.synchronize()
            self.epoch += 1
            self.in_epoch = False
            stats = EpochStats(self.epoch, train_loss, val_loss, val_acc, time.perf_counter() - t0)
            self.history.append(dataclasses.asdict(stats))
            self._say(_epoch_line(stats, config.epochs))
            self._judge(self.history[-1])
        test_loss, test_acc = self.evaluate(self.data.x_test, self.data.y_test)
        elapsed = time.perf_counter() - start_time
        settings = config.to_dict()
        if self.data_dir is not None:  # where the data came from, also via GPUNET_DATA
            settings["data_dir"] = str(self.data_dir)
        metrics = {
            "dataset": config.dataset, "model": config.model,
            "architecture": f"{config.model} {self._describe_model()}",
            "device": str(self.device), "seed": config.seed, "epochs": self.epoch,
            "history": self.history, "test_accuracy": test_acc, "test_loss": test_loss,
            # Both count the resumed runs too, so train_seconds <= total_seconds always.
            "total_seconds": self.previous_seconds + elapsed,
            "train_seconds": sum(h["seconds"] for h in self.history),
            # The last epoch's verdict (null: it looks healthy), and every epoch that looked failed.
            "failed": self.failed, "failed_epochs": self.failed_epochs,
            "config": settings,
        }
        if config.metrics_json and self.comm.is_root:  # before the last line, which a closed stdout would stop
            checkpoint.atomic_write(config.metrics_json,
                                    lambda f: f.write(json.dumps(metrics, indent=2).encode()))
        failed = f"; the run looks failed ({self.failed})" if self.failed else ""
        self._say(f"test accuracy {test_acc:.2%} (test loss {test_loss:.4f}) after "
                  f"{_plural(self.epoch, 'epoch')}, {elapsed:.1f}s{failed}")
        return metrics

    def _judge(self, stats: dict) -> None:
        """After an epoch: warn (once per failing stretch) when the run has plainly failed, and
        save the checkpoint, except that a failed epoch never replaces a healthy one.

        A finite run is never stopped for this: under a warm-up or a decaying schedule a bad
        epoch can still recover, and the user asked for the epochs. The verdict is recorded in
        the metrics, and train.py exits with status 3 when the last epoch still looks failed."""
        was_failed, self.failed = self.failed, self._failure(stats)
        keep = self.failed is not None and self.saved is not None and self.saved[1]
        if self.failed:
            self.failed_epochs.append(self.epoch)
        if self.failed and not was_failed:
            kept = (f"; the checkpoint {self.config.save} of epoch {self.saved[0]} is kept until "
                    "an epoch looks healthy again") if keep else ""
            self._warn(f"epoch {self.epoch} looks failed: {self.failed}; try a lower learning "
                       f"rate than --lr {self.config.lr:g}{kept}")
        if self.config.save and not keep:
            if self.comm.is_root:  # every rank holds the same model: rank 0 writes it
                self.saving = True  # for the message of a run interrupted now
                self.save(self.config.save)
                self.saving = False
            self.saved = (self.epoch, self.failed is None)

    def _failure(self, stats: dict) -> str | None:
        """Why an epoch shows a plainly failed run, or None: validation accuracy at chance, or a
        training loss far above the loss the run started from."""
        reasons = []
        acc = stats["val_accuracy"]
        if acc is not None and acc <= CHANCE_FACTOR / NUM_CLASSES:
            reasons.append(f"validation accuracy {acc:.2%} is at chance "
                           f"({1 / NUM_CLASSES:.0%} for {NUM_CLASSES} classes)")
        start = self.initial_loss if self.initial_loss is not None else math.log(NUM_CLASSES)
        if start > 0 and stats["train_loss"] > LOSS_FACTOR * start:
            reasons.append(f"the training loss {stats['train_loss']:.4g} is "
                           f"{stats['train_loss'] / start:.3g} x the {start:.4g} it started from")
        return " and ".join(reasons) or None

    def save(self, path) -> None:
        meta = {"epoch": self.epoch, "history": self.history, "config": self.config.to_dict(),
                "shuffle_rng": self.shuffle_rng.bit_generator.state,
                "steps_per_epoch": self.steps_per_epoch,
                "schedule_epochs": self.config.schedule_horizon,
                "total_seconds": self.previous_seconds + time.perf_counter()
                - getattr(self, "_start_time", time.perf_counter())}
        if self.initial_loss is not None:
            meta["initial_loss"] = self.initial_loss
        if self.model_rng is not None:
            meta["model_rng"] = self.model_rng.bit_generator.state
            meta["dropout_counters"] = [int(to_numpy(d.counter)) for d in self._dropout_layers()]
        checkpoint.save(path, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, meta=meta)

    def checkpoint_note(self) -> str:
        """What the --save file holds now, for the message of a run that stops early."""
        path = self.config.save
        if not path:
            return "nothing was saved (no --save was given)"
        if self.saved is None:
            untouched = f", and {path} was not touched" if os.path.lexists(path) else ""
            return f"no checkpoint exists yet (--save writes one after each epoch){untouched}"
        if not self.saved[1]:
            return f"the last checkpoint {path} (epoch {self.saved[0]}, which looked failed) is kept"
        return f"the last good checkpoint {path} (epoch {self.saved[0]}) is kept"

    def _describe_model(self) -> str:
        """The layer sizes: ``784-512-10 relu``, or the CNN's
        ``1x28x28-conv32-pool-conv64-pool-128-10 dropout 0.25``."""
        if self.config.model == "cnn":
            (c1, c2), image = CNN_CHANNELS, "x".join(map(str, (1, *IMAGE_SHAPE)))
            return (f"{image}-conv{c1}-pool-conv{c2}-pool-{CNN_HIDDEN}-{NUM_CLASSES} "
                    f"dropout {CNN_DROPOUT:g}")
        widths = [self.model[0].in_features, *self.config.hidden, NUM_CLASSES]
        return f"{'-'.join(map(str, widths))} {self.config.activation}"

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def _warn(self, line: str) -> None:
        if not self.quiet:
            print(f"warning: {line}", file=sys.stderr, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _cnn_sizes(item: int) -> tuple[int, int, int]:
    """(parameters, bytes per image of a training batch, bytes per image of an evaluation batch)
    of conv.small_cnn on 1x28x28 images with values of ``item`` bytes: a generous count, every
    array a step makes taken as alive at once."""
    (c1, c2), h = CNN_CHANNELS, IMAGE_SHAPE[0]
    p1, p2 = (h // 2) ** 2, (h // 4) ** 2  # pixels after the first and the second pooling
    params = (9 * c1 + c1) + (9 * c1 * c2 + c2) + (p2 * c2 + 1) * CNN_HIDDEN \
        + (CNN_HIDDEN + 1) * NUM_CLASSES
    # each convolution: padded input, im2col matrix (9 values per input value), output
    conv1 = (h + 2) ** 2 + h * h * 9 + h * h * c1
    conv2 = (h // 2 + 2) ** 2 * c1 + p1 * 9 * c1 + p1 * c2
    pools = p1 * c1 + p2 * c2                      # their outputs (the max indices: bytes below)
    dense = 2 * p2 * c2 + 4 * CNN_HIDDEN + NUM_CLASSES  # flattened copy, kept input, outputs, mask
    forward = conv1 + conv2 + pools + dense
    # backward: the gradient of each array above, the im2col one of the second convolution too
    backward = forward - ((h + 2) ** 2 + h * h * 9)  # the first layer makes no input gradient
    index_bytes = 3 * (p1 * c1 + p2 * c2) + h * h * c1 + p1 * c2  # max indices, scratch, masks
    train = (forward + backward) * item + index_bytes
    # eval mode keeps workspaces of its own (padded inputs and im2col matrices) and the outputs
    evaluation = forward * item + index_bytes
    return params, train, evaluation


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
                         nesterov=config.nesterov,
                         weight_decay=config.weight_decay)
    cls = optim.Adam if config.optimizer == "adam" else optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    """A per-step schedule spanning ``config.schedule_horizon`` epochs (``config.epochs`` unless
    ``schedule_epochs`` is given), after ``warmup_epochs`` of linear warm-up."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(1, config.schedule_horizon * steps_per_epoch - warmup)
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

    def rows(self) -> int:
        """The rows of the steps taken so far."""
        return int(self.sizes[:self.steps].sum())

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
        # The first loss shown is half a second's running mean, not the first step's alone,
        # which a short epoch would otherwise show until its end.
        self._last = time.perf_counter()
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
