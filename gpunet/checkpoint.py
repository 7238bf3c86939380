"""Checkpoints: one ``.npz`` file (no pickle) holding everything a run needs to continue.

Keys: ``model/<name>`` for parameters, ``optimizer/<name>`` and ``scheduler/<name>`` for their
state, and ``meta`` — a JSON string with the epoch, the shuffle generator's state, the
configuration and the history so far. Files are written atomically: a temporary file beside the
target, flushed to disk, then renamed over it, so a crash never leaves half a checkpoint under
the real name and the last good one survives. A write that is interrupted by a signal removes
its temporary file; one killed outright (kill -9) leaves it, and the next write of the same path
removes it.

Loading checks every field before anything uses it: a file that is not a checkpoint, a key that
is missing or of the wrong type, NaN weights or a step count the run cannot have reached are a
:class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_numpy

FORMAT_VERSION = 1
# meta keys every format-1 checkpoint has; "steps_per_epoch", "schedule_epochs", "initial_loss"
# and "total_seconds" came later in format 1 and are optional, so older files still load, as are
# "model_rng" and "dropout_counters", which only a model that draws random numbers has (the CNN's
# dropout: the generator of its CPU masks and the step counters of its GPU ones). The model and
# the dataset are settings in "config" (an old file holds neither: an MLP trained on MNIST).
META_KEYS = ("format", "epoch", "history", "config", "shuffle_rng")
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds")
# The largest step count a checkpoint may claim: more steps than any run can take.
MAX_STEPS = 2 ** 53


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class OutputError(OSError):
    """An output file could not be written; the message names it and says it is unchanged."""


def save(path, *, model, optimizer, scheduler=None, meta: dict) -> None:
    arrays = {f"model/{k}": to_numpy(v) for k, v in model.state_dict().items()}
    arrays.update(_prefixed("optimizer", optimizer.state_dict()))
    if scheduler is not None:
        arrays.update(_prefixed("scheduler", scheduler.state_dict()))
    arrays["meta"] = np.array(json.dumps({"format": FORMAT_VERSION, **meta}))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path, *, meta_only: bool = False) -> dict:
    """All arrays of a checkpoint, by key, with ``meta`` decoded; raises CheckpointError.

    ``meta_only=True`` reads just the ``meta`` entry (the saved configuration and history),
    leaving the parameters on disk. Every field read is checked (see :func:`check_meta` and
    :func:`check_arrays`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    what = _not_a_checkpoint(path)
    if what:
        raise CheckpointError(f"checkpoint {path} is not a gpunet checkpoint: it is {what}; "
                              "a checkpoint is the .npz file that --save writes")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f.files:
                raise CheckpointError(f"checkpoint {path} has no 'meta' entry, so it is not a "
                                      "gpunet checkpoint (a .npz file from elsewhere?)")
            for key in (["meta"] if meta_only else f.files):
                try:
                    out[key] = f[key]
                except MemoryError as exc:  # a header that declares a huge shape
                    raise CheckpointError(f"checkpoint {path}: entry {key!r} is too large to "
                                          f"load ({exc}); the file is damaged or crafted") from None
                except ValueError as exc:
                    if "pickle" not in str(exc):
                        raise
                    raise CheckpointError(
                        f"checkpoint {path}: entry {key!r} holds Python objects (pickled data), "
                        "which gpunet never writes and never loads") from None
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable gpunet checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    meta = out["meta"]
    if meta.ndim != 0 or meta.dtype.kind != "U":
        raise CheckpointError(f"checkpoint {path}: 'meta' must be a JSON string, got an array of "
                              f"dtype {meta.dtype} and shape {meta.shape}")
    try:
        out["meta"] = json.loads(str(meta))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: 'meta' is not valid JSON ({exc})") from None
    check_meta(out["meta"], path)
    if not meta_only:
        check_arrays(out, path)
    return out


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is, when its first bytes show that it is not a zip (.npz) archive."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return None
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if head.startswith(b"\x93NUMPY"):
        return "a single NumPy array (.npy)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "text that looks like JSON (a --metrics-json file?)"
    if not head:
        return "empty"
    return f"not a zip archive (it starts with {head!r})"


def check_meta(meta, path) -> None:
    """Raise CheckpointError naming ``path`` and the key for any malformed ``meta`` field."""
    def bad(key, expected, got):
        raise CheckpointError(f"checkpoint {path}: meta key {key!r} must be {expected}, "
                              f"got {_short(got)}")

    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: 'meta' must be a JSON object, got {_short(meta)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: meta lacks {', '.join(map(repr, missing))}, "
                              "so it is not a complete gpunet checkpoint")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {_short(meta['format'])}, "
                              f"this gpunet reads format {FORMAT_VERSION}")
    epoch = meta["epoch"]
    if not _is_int(epoch) or epoch < 0:
        bad("epoch", "an integer >= 0", epoch)
    history = meta["history"]
    if not isinstance(history, list):
        bad("history", f"a list of {epoch} epoch records", history)
    if len(history) != epoch:
        bad("history", f"a list of {epoch} epoch records (one per saved epoch)",
            f"{len(history)} records")
    for i, h in enumerate(history):
        key = f"history[{i}]"
        if not isinstance(h, dict) or sorted(h) != sorted(HISTORY_KEYS):
            bad(key, f"an object with keys {', '.join(HISTORY_KEYS)}", h)
        if h["epoch"] != i + 1 or not _is_int(h["epoch"]):
            bad(f"{key}.epoch", str(i + 1), h["epoch"])
        if not _is_finite(h["train_loss"]):
            bad(f"{key}.train_loss", "a finite number", h["train_loss"])
        if h["val_loss"] is not None and not _is_finite(h["val_loss"]):
            bad(f"{key}.val_loss", "a finite number or null", h["val_loss"])
        acc = h["val_accuracy"]
        if acc is not None and not (_is_finite(acc) and 0 <= acc <= 1):
            bad(f"{key}.val_accuracy", "a number from 0 to 1 or null", acc)
        if not (_is_finite(h["seconds"]) and h["seconds"] >= 0):
            bad(f"{key}.seconds", "a finite number >= 0", h["seconds"])
    if not isinstance(meta["config"], dict):
        bad("config", "an object with the run's settings", meta["config"])
    for key in ("shuffle_rng", "model_rng"):
        if key in meta and not _is_pcg64_state(meta[key]):
            bad(key, "the state of a PCG64 generator", meta[key])
    counters = meta.get("dropout_counters", [])
    if not (isinstance(counters, list) and all(_is_int(c) and 0 <= c < 2 ** 64 for c in counters)):
        bad("dropout_counters", "a list of integers from 0 to 2**64 - 1", counters)
    for key in ("dataset", "model"):  # their values are checked where the names are known
        value = meta["config"].get(key)
        if value is not None and not isinstance(value, str):
            bad(f"config.{key}", "a name (a string)", value)
    for key, low in (("steps_per_epoch", 1), ("schedule_epochs", 1)):
        if key in meta and not (_is_int(meta[key]) and low <= meta[key] < MAX_STEPS):
            bad(key, f"an integer >= {low}", meta[key])
    for key in ("initial_loss", "total_seconds"):
        if key in meta and not (_is_finite(meta[key]) and meta[key] >= 0):
            bad(key, "a finite number >= 0", meta[key])


def check_arrays(checkpoint: dict, path) -> None:
    """Every parameter and optimizer array is floating point and finite; every scalar of the
    optimizer and the scheduler is a finite number, step counts integers that fit the epoch."""
    meta = checkpoint["meta"]
    if not any(k.startswith("model/") for k in checkpoint):
        raise CheckpointError(f"checkpoint {path} holds no model/ parameters")
    most_steps = meta["epoch"] * meta.get("steps_per_epoch", MAX_STEPS // max(meta["epoch"], 1))
    for key, value in checkpoint.items():
        if key == "meta":
            continue
        if key.split("/")[0] not in ("model", "optimizer", "scheduler"):
            raise CheckpointError(f"checkpoint {path}: unexpected entry {key!r}")
        if value.dtype.kind not in "fiub":
            raise CheckpointError(f"checkpoint {path}: {key!r} has dtype {value.dtype}, "
                                  "expected numbers")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise CheckpointError(
                f"checkpoint {path}: {key!r} holds {bad} NaN or infinite value"
                f"{'s' if bad != 1 else ''} of {value.size}; the file is damaged or was written "
                "by a run that had already diverged")
        if key in ("optimizer/step", "scheduler/last_step"):
            if value.ndim != 0 or value.dtype.kind not in "iu" or not 0 <= int(value) <= most_steps:
                expected = (f"{most_steps} (epoch {meta['epoch']} x {meta['steps_per_epoch']} "
                            "steps per epoch)" if "steps_per_epoch" in meta
                            else "an integer step count >= 0")
                raise CheckpointError(f"checkpoint {path}: {key!r} must be {expected}, got "
                                      f"{_short(value.tolist())}")
        elif key.split("/")[0] in ("optimizer", "scheduler") and value.ndim == 0 and value < 0:
            raise CheckpointError(f"checkpoint {path}: {key!r} must be >= 0, got {value.item()}")


def _is_pcg64_state(rng) -> bool:
    return (isinstance(rng, dict) and rng.get("bit_generator") == "PCG64"
            and isinstance(rng.get("state"), dict)
            and all(_is_int(rng["state"].get(k)) and rng["state"][k] >= 0 for k in ("state", "inc"))
            and _is_int(rng.get("has_uint32")) and _is_int(rng.get("uinteger")))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def section(checkpoint: dict, prefix: str) -> dict:
    """The entries under ``prefix/``, without the prefix; 0-d arrays become Python scalars."""
    start = prefix + "/"
    return {k[len(start):]: (v.item() if v.ndim == 0 else v)
            for k, v in checkpoint.items() if k.startswith(start)}


def restore(checkpoint: dict, *, model, optimizer, scheduler=None, path="checkpoint") -> None:
    """Load model, optimizer and scheduler state; shape mismatches name the tensor."""
    try:
        model.load_state_dict(section(checkpoint, "model"))
        optimizer.load_state_dict(section(checkpoint, "optimizer"))
        if scheduler is not None:
            scheduler.load_state_dict(section(checkpoint, "scheduler"))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc


def _prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}/{k}": to_numpy(v) for k, v in state.items()}


# --- writing files -------------------------------------------------------------------------------

def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    A symlink is written through: the file it points to is replaced and the link kept. Any
    failure (a full disk, a signal) removes the temporary file and leaves ``path`` as it was;
    an OSError comes back as :class:`OutputError` naming ``path``."""
    target = Path(os.path.realpath(path))
    remove_stale_temporaries(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        # mkstemp makes 0600: keep the mode of the file being replaced, else the usual one.
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        unchanged = "is unchanged" if os.path.lexists(path) else "was not created"
        raise OutputError(f"cannot write {path}: {exc.strerror or exc} ({path} {unchanged})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what an earlier, killed write of ``target`` left beside it (``.<name>.XXXXXXXX.tmp``,
    mkstemp's pattern); returns the files removed."""
    removed = []
    for suffix in (".tmp", ".probe"):
        for stale in target.parent.glob(f".{_glob_escape(target.name)}.{'?' * 8}{suffix}"):
            try:
                stale.unlink()
                removed.append(stale)
            except OSError:
                pass  # someone else's file, or already gone: not ours to insist on
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_outputs(outputs: dict, inputs: dict | None = None, updatable: tuple = ()) -> None:
    """Refuse, before any work, output paths that would lose a file or be ignored.

    ``outputs`` maps a flag (``"--save"``) to its path or None; ``inputs`` maps a description
    (``"the data file"``, ``"--resume"``) to a path the run reads. An output may not be empty,
    name a non-regular file (a directory, device, fifo or socket, also through a symlink), name
    the same file as another output, or name an input, except the pairs in ``updatable``
    (``("--save", "--resume")``: a run that updates its own checkpoint). Raises ValueError."""
    inputs = inputs or {}
    seen = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if str(path) == "":
            raise ValueError(f"{flag} is an empty path; give a file path")
        # Which file it is comes first: the writability check below leaves a probe file in the
        # folder for a moment, which a data folder should not see for an output refused anyway.
        key = _identity(path)
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} both name {path}; give each output its own file")
        seen[key] = flag
        for what, source in inputs.items():
            if source is not None and (flag, what) not in updatable and _identity(source) == key:
                raise ValueError(f"{flag} {path} is {what} of this run; writing it would destroy "
                                 "it, give another path")
        check_writable(path, flag)


def same_file(a, b) -> bool:
    """Whether two paths name one file (through symlinks and hard links too)."""
    return _identity(a) == _identity(b)


def _identity(path) -> tuple:
    """(device, inode) of an existing file (so hard links and symlinks match), else its real path."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", real)


def check_writable(path, what: str) -> None:
    """Fail now, not after an hour of training, if ``path`` cannot be written as a regular file."""
    path = Path(path)
    target = Path(os.path.realpath(path))  # through a symlink, the file that will be replaced
    via = f" (a symlink to {target})" if path.is_symlink() else ""
    try:
        st = os.stat(path)  # follows every link, /proc's too (/dev/stdout -> a pipe, a tty)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = _file_kind(st.st_mode)
        advice = "give a file path" if kind == "a directory" else \
            "gpunet writes only regular files, give another path"
        raise ValueError(f"{what} {path}{via} is {kind}, not a regular file; {advice}")
    if st is not None:
        for fd, name in ((0, "standard input"), (1, "standard output"), (2, "standard error")):
            try:
                if os.path.samestat(st, os.fstat(fd)):
                    raise ValueError(f"{what} {path} is this process's {name}; replacing it "
                                     "would lose what is written there, give another path")
            except OSError:
                pass  # that descriptor is closed
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".probe")
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be written: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(probe)
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a fifo"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"
