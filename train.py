"""Train an MLP or a small CNN on MNIST, Fashion-MNIST or KMNIST: ``python train.py`` (see
``--help``).

The training loop is gpunet.trainer.Trainer.train_epoch; this file only turns the command line
into a TrainConfig and reports errors as one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

from gpunet.datasets import DATASETS
from gpunet.trainer import (DEFAULT_EPOCHS, DEFAULT_LR, DTYPES, MLP_ACTIVATION, MLP_HIDDEN,
                            MODELS, OPTIMIZERS, SCHEDULES, TrainConfig)

# Exit statuses besides 0 (success), 1 (an error, one line on stderr) and 2 (a bad flag):
FAILED_RUN = 3        # the run finished, but its last epoch looks failed (see the warning)
INTERRUPTED = 130     # SIGINT (Ctrl-C), as a shell reports it
TERMINATED = 143      # SIGTERM
BROKEN_PIPE = 141     # stdout's reader went away, as a process killed by SIGPIPE reports it

DEFAULTS = TrainConfig.__dataclass_fields__


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage plus a message
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = _parse(int, text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a positive number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(float, text, "a number >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected positive layer widths separated by commas, such as 256 or 512,256, got {text!r}")
    return sizes


def path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _parse(kind, text, expected):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = {name: f.default for name, f in DEFAULTS.items()}
    p = Parser(prog="train.py", description="Train an MLP or a small CNN on MNIST, Fashion-MNIST "
                                            "or KMNIST with gpunet.",
               epilog=f"exit status: 0 done, 1 an error (one line on stderr), 2 a bad flag, "
                      f"{FAILED_RUN} done but the last epoch looks failed, {INTERRUPTED} Ctrl-C, "
                      f"{TERMINATED} SIGTERM, {BROKEN_PIPE} stdout closed; an interrupted run "
                      "says what its --save file holds")
    # Every default is None here so that --resume can tell the flags you gave from the ones you
    # did not: those come from the checkpoint, then from TrainConfig.
    add = p.add_argument
    add("--device", help=f"auto, cpu, cuda or cuda:N (default {d['device']})")
    add("--dataset", choices=DATASETS, help=f"(default {d['dataset']})")
    add("--model", choices=MODELS, help="mlp: Dense layers of the --hidden widths; cnn: "
                                        "gpunet.conv.small_cnn (conv 32, conv 64, dense 128, "
                                        f"dropout 0.25) (default {d['model']})")
    add("--epochs", type=non_negative_int,
        help="total epochs (default " + ", ".join(f"{n} for {m}" for m, n in DEFAULT_EPOCHS.items())
             + ")")
    add("--batch-size", type=positive_int,
        help=f"(default {d['batch_size']}; per rank with --distributed, as in PyTorch DDP)")
    add("--eval-batch-size", type=positive_int,
        help=f"images per evaluation batch (default {d['eval_batch_size']}): a smaller one takes "
             "less memory and gives the same loss and accuracy")
    rates = ", ".join(f"{rate:g} for {name}" for name, rate in DEFAULT_LR.items())
    add("--lr", type=positive_float, help=f"peak learning rate (default {rates})")
    add("--optimizer", choices=OPTIMIZERS, help=f"(default {d['optimizer']})")
    add("--momentum", type=non_negative_float, help=f"SGD momentum (default {d['momentum']})")
    add("--nesterov", action="store_true", default=None, help="Nesterov momentum for SGD")
    add("--weight-decay", type=non_negative_float, help=f"(default {d['weight_decay']})")
    add("--hidden", type=hidden_sizes, help="--model mlp: hidden layer widths, e.g. 256 or 512,256 "
                                            f"(default {','.join(map(str, MLP_HIDDEN))})")
    add("--activation", choices=("relu", "tanh", "sigmoid"),
        help=f"--model mlp: (default {MLP_ACTIVATION})")
    add("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d['schedule']})")
    add("--schedule-epochs", type=positive_int,
        help="epochs the schedule spans (default: --epochs; with --resume: the saved span)")
    add("--warmup-epochs", type=non_negative_float, help=f"linear warm-up (default {d['warmup_epochs']})")
    add("--label-smoothing", type=non_negative_float, help=f"(default {d['label_smoothing']})")
    add("--seed", type=non_negative_int, help=f"(default {d['seed']})")
    add("--data-dir", type=path, help="folder with the dataset's four files, or with a subfolder "
                                      "named after the dataset (default $GPUNET_DATA, else data/ "
                                      "for mnist and data/<dataset>/ for the others)")
    add("--no-verify-data", dest="verify_data", action="store_false", default=None,
        help="use data files that cannot be verified against the published checksums (a raw or "
             "recompressed KMNIST copy); another dataset's files are refused all the same")
    add("--val-size", type=non_negative_int, help=f"validation images held out (default {d['val_size']})")
    add("--dtype", choices=DTYPES, help=f"(default {d['dtype']})")
    add("--save", type=path, metavar="PATH", help="write a checkpoint (.npz) after every epoch")
    add("--resume", type=path, metavar="PATH", help="continue from a checkpoint up to --epochs in all")
    add("--metrics-json", type=path, metavar="PATH", help="write the run's metrics as JSON at the end")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bar (it is off anyway when stdout is not a terminal)")
    add("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
        help="on a GPU, launch each kernel eagerly instead of replaying a captured CUDA graph")
    add("--distributed", action="store_true", default=None,
        help="data-parallel over the ranks of an MPI launch (mpiexec -n N python -m mpi4py "
             "train.py --distributed): one gradient allreduce per step, rank 0 writes the files")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.resume:
        # Resuming continues the saved run: its settings, then the flags given now, which may not
        # change the model or the data it learnt.
        from gpunet import checkpoint
        from gpunet.trainer import architecture_conflict, saved_settings
        saved = saved_settings(checkpoint.load(args.resume, meta_only=True)["meta"], args.resume)
        conflict = architecture_conflict(saved, given, args.resume)
        if conflict:
            raise checkpoint.CheckpointError(conflict)
        given = {**saved, **given}
    model = given.get("model", DEFAULTS["model"].default)
    mlp_only = [f"--{k}" for k in ("hidden", "activation") if getattr(args, k) is not None]
    if model != "mlp" and mlp_only:
        raise ValueError(f"{' and '.join(mlp_only)} belong{'s' if len(mlp_only) == 1 else ''} to "
                         f"--model mlp; --model {model} is gpunet.conv.small_cnn, whose layers are "
                         f"fixed: drop {' and '.join(mlp_only)}")
    return TrainConfig(**given)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every cleanup on the way out runs: an
    interrupted checkpoint write removes its temporary file and leaves the last one in place."""


def _terminate(signum, frame):
    raise Terminated


def _where(trainer) -> str:
    """When the run stopped and what its --save file holds, for a run cut short."""
    if trainer is None:
        return "before training started; nothing was written"
    if trainer.saving:
        at = f"while saving the checkpoint of epoch {trainer.epoch}"
    elif trainer.in_epoch:
        at = f"during epoch {trainer.epoch + 1} of {trainer.config.epochs}"
    elif trainer.epoch == 0:
        at = "before the first epoch"
    else:
        at = f"after epoch {trainer.epoch} of {trainer.config.epochs}"
    return f"{at}; {trainer.checkpoint_note()}"


def _end(comm, code: int) -> int:
    """The exit status; in a run of several ranks, this rank's error ends them all (the others
    would wait in their next allreduce for ever)."""
    if comm is not None and comm.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort tears the launch down at once; the launcher forwards a rank's output a
        # moment after it is written, so give the one line the time to get out first.
        time.sleep(0.5)
        comm.abort(code)
    return code


def main(argv=None) -> int:
    from gpunet import distributed
    from gpunet.backend import DeviceError
    from gpunet.checkpoint import CheckpointError
    from gpunet.datasets import DatasetError
    from gpunet.trainer import Trainer, TrainingDiverged

    args = build_parser().parse_args(argv)
    trainer = comm = None
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        config = config_from_args(args)
        comm = distributed.init(config.distributed)
        trainer = Trainer(config, comm=comm)
        metrics = trainer.fit()
    except BrokenPipeError:
        # stdout's reader went away (``| head``). Stop as a SIGPIPE would, saying on stderr what
        # was saved, and point stdout at /dev/null so the interpreter's last flush cannot fail.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # stdout is no file descriptor (a test's capture): nothing will flush it
        try:
            print(f"train.py: stdout was closed (broken pipe) {_where(trainer)}", file=sys.stderr)
        except OSError:
            pass  # stderr went with it (2>&1 | head)
        return BROKEN_PIPE
    except (ValueError, TypeError, OSError, MemoryError, DatasetError, DeviceError,
            CheckpointError, TrainingDiverged, distributed.DistributedError) as exc:
        rank = f"rank {comm.rank}: " if comm is not None and comm.size > 1 else ""
        print(f"train.py: error: {rank}{exc or type(exc).__name__}", file=sys.stderr)
        return _end(comm, 1)
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"train.py: {how} {_where(trainer)}", file=sys.stderr)
        return _end(comm, TERMINATED if isinstance(exc, Terminated) else INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return FAILED_RUN if metrics["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
