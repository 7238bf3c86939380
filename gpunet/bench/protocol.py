"""How contenders are timed: a warm-up epoch each, then rounds whose order rotates, summaries,
ratios of medians and ratios within rounds; and the default recipe's time to 98%."""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..backend import Device
from ..trainer import prepare_mnist, TrainConfig, Trainer
from .common import (
    _first_line, ACCURACY_ROWS, Contender, CONTENDERS, IN_FEATURES, NUM_CLASSES, RATIOS,
    SETTLE_SECONDS, Unavailable, WHAT, Workload)
from .contenders import FACTORIES
from .gpu import _count_or_reason


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


def time_rounds(contenders: dict, repeats: int, settle: float, say, names=CONTENDERS) -> list:
    """One warm-up epoch each, then ``repeats`` rounds, the order rotated by one every round.

    A contender that raises is dropped from later rounds, with the error kept. Returns the
    order of every round. ``names``: what the progress lines call each contender.
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
            say(f"{names[c.key]} failed: {c.error}")
            return None, None

    for c in contenders.values():
        c.warmup, _ = timed(c)
        if c.warmup is not None:
            say(f"warm-up   {names[c.key]:<24} {c.warmup:8.3f} s")
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
                say(f"round {r + 1}/{repeats} {names[key]:<24} {seconds:8.3f} s")
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
