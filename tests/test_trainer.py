"""gpunet.trainer and gpunet.checkpoint: training on real MNIST, resuming, metrics, divergence."""

import json
import os

import numpy as np
import pytest

from gpunet import checkpoint, optim
from gpunet.datasets import load_mnist
from gpunet.trainer import (DeviceData, TrainConfig, Trainer, TrainingDiverged, fit,
                            prepare_mnist)


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    return load_mnist(mnist_dir, download=False)


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """10,000 training images (1,000 held out for validation) and the full test set."""
    x_train, y_train, x_test, y_test = mnist
    return prepare_mnist((x_train[:10000], y_train[:10000], x_test, y_test), val_size=1000,
                         device="cpu", dtype=np.float32)


def quick(**overrides):
    settings = dict(device="cpu", hidden=(32,), epochs=2, progress=False, lr=0.05)
    settings.update(overrides)
    return TrainConfig(**settings)


def parameters(trainer):
    return [p.data.copy() for p in trainer.model.parameters()]


def test_short_run_on_real_mnist_beats_90_percent(small_mnist):
    result = fit(quick(hidden=(64,), epochs=2, lr=0.1), small_mnist, quiet=True)
    assert result["test_accuracy"] > 0.90
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][1]["train_loss"] < result["history"][0]["train_loss"]


def test_prepare_mnist_splits_and_normalises(mnist):
    data = prepare_mnist(mnist, val_size=5000, device="cpu", dtype=np.float32)
    assert data.x_train.shape == (55000, 784) and data.x_val.shape == (5000, 784)
    assert data.x_test.shape == (10000, 784) and data.y_train.dtype == np.int64
    assert abs(float(data.x_train.mean())) < 1e-3 and abs(float(data.x_train.std()) - 1) < 1e-3
    np.testing.assert_array_equal(data.y_val, mnist[1][55000:])  # the last 5,000 are held out
    with pytest.raises(ValueError, match="val_size must leave training images"):
        prepare_mnist(mnist, val_size=60000, device="cpu", dtype=np.float32)


class CrashingTrainer(Trainer):
    """Dies (like a killed process) when asked for epoch ``crash_at``."""

    crash_at = 3

    def train_epoch(self, progress=None):
        if self.epoch + 1 == self.crash_at:
            raise KeyboardInterrupt
        return super().train_epoch(progress)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_resume_equals_uninterrupted_run_bit_for_bit(small_mnist, tmp_path, schedule):
    """4 epochs straight == the same run killed after epoch 2 and resumed from its checkpoint."""
    settings = dict(epochs=4, schedule=schedule, optimizer="adam", lr=1e-3)
    straight = Trainer(quick(**settings), small_mnist, quiet=True)
    straight_metrics = straight.fit()

    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        CrashingTrainer(quick(save=str(path), **settings), small_mnist, quiet=True).fit()
    resumed = Trainer(quick(resume=str(path), **settings), small_mnist, quiet=True)
    assert resumed.epoch == 2
    resumed_metrics = resumed.fit()
    for a, b in zip(parameters(straight), parameters(resumed)):
        np.testing.assert_array_equal(a, b)
    assert resumed_metrics["test_loss"] == straight_metrics["test_loss"]
    for field in ("train_loss", "val_loss", "val_accuracy"):
        assert [h[field] for h in resumed_metrics["history"]] == \
            [h[field] for h in straight_metrics["history"]]


def test_metrics_json(small_mnist, tmp_path):
    path = tmp_path / "m.json"
    fit(quick(epochs=1, metrics_json=str(path)), small_mnist, quiet=True)
    metrics = json.loads(path.read_text())
    for key in ("device", "seed", "epochs", "history", "test_accuracy", "test_loss",
                "total_seconds", "train_seconds", "config"):
        assert key in metrics
    assert metrics["device"] == "cpu" and metrics["epochs"] == 1
    assert set(metrics["history"][0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    assert metrics["config"]["hidden"] == [32] and 0 < metrics["test_accuracy"] <= 1
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


def test_epoch_and_final_lines(small_mnist, capsys):
    fit(quick(epochs=1), small_mnist)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu")
    assert lines[1].startswith("epoch 1/1  train loss ") and "val acc" in lines[1]
    assert lines[-1].startswith("test accuracy ")


def test_divergence_names_epoch_and_step_and_keeps_the_checkpoint(small_mnist, tmp_path):
    path = tmp_path / "good.npz"
    fit(quick(epochs=1, save=str(path)), small_mnist, quiet=True)
    before = path.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 2, step \d+ of 71; "
                                               r"try a lower learning rate than --lr 1e\+30"):
        fit(quick(epochs=2, lr=1e30, resume=str(path), save=str(path)), small_mnist, quiet=True)
    assert path.read_bytes() == before


def test_checkpoint_errors(small_mnist, tmp_path):
    path = tmp_path / "c.npz"
    fit(quick(epochs=1, save=str(path)), small_mnist, quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"'0.weight' has shape \(784, 32\) but the model's is \(784, 16\)"):
        Trainer(quick(hidden=(16,), resume=str(path)), small_mnist, quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        Trainer(quick(resume=str(tmp_path / "missing.npz")), small_mnist, quiet=True)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable gpunet checkpoint"):
        Trainer(quick(resume=str(bad)), small_mnist, quiet=True)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable gpunet checkpoint"):
        Trainer(quick(resume=str(truncated)), small_mnist, quiet=True)


def test_unwritable_outputs_fail_before_anything_else(tmp_path):
    # No data is given and none exists: the output paths are checked before the data is looked for.
    nowhere = str(tmp_path / "no-data")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        Trainer(quick(save=str(tmp_path / "no" / "such" / "dir.npz"), data_dir=nowhere), quiet=True)
    with pytest.raises(ValueError, match="is a directory"):
        Trainer(quick(metrics_json=str(tmp_path), data_dir=nowhere), quiet=True)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(ValueError, match="cannot be written"):
            Trainer(quick(save=str(read_only / "c.npz"), data_dir=nowhere), quiet=True)
    finally:
        read_only.chmod(0o700)


def test_config_rejects_bad_values():
    for kwargs, message in [
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(epochs=-1), "epochs must be an integer >= 0"),
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(hidden=(0,)), "hidden must be one or more positive layer widths"),
        (dict(optimizer="rmsprop"), "optimizer must be one of sgd, adam, adamw"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(momentum=1.5), "momentum must be a finite number >= 0 and < 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_other_dtypes_train_like_float32(small_mnist, dtype):
    def subset(dtype):
        return DeviceData(*(a.astype(dtype) if a.dtype.kind == "f" else a
                            for a in (small_mnist.x_train[:3000], small_mnist.y_train[:3000],
                                      small_mnist.x_val, small_mnist.y_val,
                                      small_mnist.x_test[:2000], small_mnist.y_test[:2000])))
    reference = fit(quick(epochs=2, lr=0.1), subset(np.float32), quiet=True)
    result = fit(quick(epochs=2, dtype=dtype, lr=0.1), subset(dtype), quiet=True)
    assert result["test_accuracy"] > 0.8
    assert result["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=0.01)
    assert result["history"][-1]["train_loss"] == pytest.approx(
        reference["history"][-1]["train_loss"], rel=0.02)


def test_folded_momentum_trains_like_the_two_pass_update(small_mnist, monkeypatch):
    """The eager CPU loop folds momentum into backward (SGD.fold_momentum) for the epoch only;
    the weights it reaches are those of the plain update, to float32 rounding."""
    config = quick(epochs=1, schedule="constant", label_smoothing=0.0)
    folded = Trainer(config, small_mnist, quiet=True)
    seen = []
    monkeypatch.setattr(folded.optimizer, "step",
                        lambda real=folded.optimizer.step: (seen.append(folded.optimizer.folded), real()))
    folded.train_epoch()
    if not all(seen):
        pytest.skip("momentum does not fold here (no numpy BLAS or compiled kernels)")
    assert not folded.optimizer.folded
    assert all(p.grad_decay == 0.0 for p in folded.model.parameters())
    monkeypatch.setattr(optim.SGD, "fold_momentum", lambda self: False)
    plain = Trainer(config, small_mnist, quiet=True)
    plain.train_epoch()
    for a, b in zip(parameters(folded), parameters(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_step_keeps_its_batch_buffer_without_a_copy(rng):
    """The trainer opts out of Dense's input copy (copy_input=False) for its fixed batch
    buffer, rewritten only by the next step's gather, after this step's backward."""
    x = rng.standard_normal((300, 12)).astype(np.float32)
    y = rng.integers(0, 10, 300)
    data = DeviceData(x, y, x[:10], y[:10], x[:10], y[:10])
    trainer = Trainer(quick(hidden=(8,), epochs=1, batch_size=64, val_size=0), data, quiet=True)
    trainer.train_epoch()
    kept = trainer.model[0]._saved("x")
    assert np.shares_memory(kept, trainer._x_batch) and kept.shape == (300 - 4 * 64, 12)


def test_evaluate_counts_on_the_device(small_mnist):
    trainer = Trainer(quick(epochs=0), small_mnist, quiet=True)
    loss, accuracy = trainer.evaluate(small_mnist.x_test, small_mnist.y_test)
    logits = trainer.model.eval()(small_mnist.x_test)
    assert accuracy == float((logits.argmax(axis=1) == small_mnist.y_test).mean())
    assert loss > 0

