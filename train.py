"""Train an MLP on MNIST: ``python train.py`` (see ``--help``).

The training loop is gpunet.trainer.Trainer.train_epoch; this file only turns the command line
into a TrainConfig and reports errors as one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys

from gpunet.trainer import DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig, fit

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


def _parse(kind, text, expected):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = {name: f.default for name, f in DEFAULTS.items()}
    p = Parser(prog="train.py", description="Train an MLP on MNIST with gpunet.")
    # Every default is None here so that --resume can tell the flags you gave from the ones you
    # did not: those come from the checkpoint, then from TrainConfig.
    add = p.add_argument
    add("--device", help=f"auto, cpu, cuda or cuda:N (default {d['device']})")
    add("--epochs", type=non_negative_int, help=f"total epochs (default {d['epochs']})")
    add("--batch-size", type=positive_int, help=f"(default {d['batch_size']})")
    add("--lr", type=positive_float, help=f"peak learning rate (default {d['lr']})")
    add("--optimizer", choices=OPTIMIZERS, help=f"(default {d['optimizer']})")
    add("--momentum", type=non_negative_float, help=f"SGD momentum, Nesterov (default {d['momentum']})")
    add("--weight-decay", type=non_negative_float, help=f"(default {d['weight_decay']})")
    add("--hidden", type=hidden_sizes, help="hidden layer widths, e.g. 256 or 512,256 "
                                            f"(default {','.join(map(str, d['hidden']))})")
    add("--activation", choices=("relu", "tanh", "sigmoid"), help=f"(default {d['activation']})")
    add("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d['schedule']})")
    add("--warmup-epochs", type=non_negative_float, help=f"linear warm-up (default {d['warmup_epochs']})")
    add("--label-smoothing", type=non_negative_float, help=f"(default {d['label_smoothing']})")
    add("--seed", type=non_negative_int, help=f"(default {d['seed']})")
    add("--data-dir", help="folder with the MNIST files (default $GPUNET_DATA, else data/)")
    add("--val-size", type=non_negative_int, help=f"validation images held out (default {d['val_size']})")
    add("--dtype", choices=DTYPES, help=f"(default {d['dtype']})")
    add("--save", metavar="PATH", help="write a checkpoint (.npz) after every epoch")
    add("--resume", metavar="PATH", help="continue from a checkpoint up to --epochs in all")
    add("--metrics-json", metavar="PATH", help="write the run's metrics as JSON at the end")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bar (it is off anyway when stdout is not a terminal)")
    add("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
        help="on a GPU, launch each kernel eagerly instead of replaying a captured CUDA graph")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.resume:
        # Resuming continues the saved run: its settings, then the flags given now.
        from gpunet import checkpoint
        saved = checkpoint.load(args.resume, meta_only=True)["meta"]["config"]
        saved = {k: v for k, v in saved.items() if k in DEFAULTS and k not in ("save", "resume",
                                                                               "metrics_json")}
        given = {**saved, **given}
    return TrainConfig(**given)


def main(argv=None) -> int:
    from gpunet.backend import DeviceError
    from gpunet.checkpoint import CheckpointError
    from gpunet.datasets import DatasetError
    from gpunet.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        fit(config_from_args(args))
    except (ValueError, TypeError, OSError, DatasetError, DeviceError, CheckpointError,
            TrainingDiverged) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = f"; the last checkpoint is {args.save}" if args.save else ""
        print(f"train.py: interrupted{saved}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
