"""Checkpoints: one ``.npz`` file (no pickle) holding everything a run needs to continue.

Keys: ``model/<name>`` for parameters, ``optimizer/<name>`` and ``scheduler/<name>`` for their
state, and ``meta`` — a JSON string with the epoch, the shuffle generator's state, the
configuration and the history so far. Files are written atomically: a temporary file beside the
target, flushed to disk, then renamed over it, so a crash never leaves half a checkpoint under
the real name and the last good one survives.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_numpy

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


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
    leaving the parameters on disk."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in (["meta"] if meta_only else f.files)}
        out["meta"] = json.loads(str(out["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable gpunet checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    if out["meta"].get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {out['meta'].get('format')}, "
                              f"this gpunet reads format {FORMAT_VERSION}")
    return out


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
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from exc


def _prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}/{k}": to_numpy(v) for k, v in state.items()}


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path, what: str) -> None:
    """Fail now, not after an hour of training, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file path")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be written: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(probe)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable")
