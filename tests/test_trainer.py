"""gpunet.trainer and gpunet.checkpoint: training on real MNIST, resuming, metrics, divergence."""

import json
import os

import numpy as np
import pytest

from gpunet import checkpoint, optim
from gpunet.datasets import load_mnist
from gpunet import trainer as trainer_module
from gpunet.trainer import (DeviceData, TrainConfig, Trainer, TrainingDiverged, fit,
                            pixel_statistics, prepare_mnist)


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
    pixels = mnist[0][:55000]
    assert data.mean == float(pixels.mean(dtype=np.float64)) / 255
    assert data.std == float(pixels.std(dtype=np.float64)) / 255


def test_pixel_statistics_equal_numpys_float64_mean_and_std(rng):
    """The 256-bin histogram gives the very values of NumPy's float64 passes, to the last bit."""
    for shape in [(1,), (7, 28, 28), (1000, 28, 28), (3, 5)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        assert pixel_statistics(pixels) == (float(pixels.mean(dtype=np.float64)),
                                            float(pixels.std(dtype=np.float64)))
    assert pixel_statistics(np.full((4, 4), 200, np.uint8)) == (200.0, 0.0)
    floats = rng.random((10, 3))
    assert pixel_statistics(floats) == (float(floats.mean()), float(floats.std()))


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
    # The resumed run's wall time includes the first run's, so it is never below its epochs' sum.
    assert resumed_metrics["train_seconds"] <= resumed_metrics["total_seconds"]
    assert resumed_metrics["total_seconds"] > sum(h["seconds"] for h in resumed_metrics["history"][:2])
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
                "total_seconds", "train_seconds", "failed", "failed_epochs", "config"):
        assert key in metrics
    assert metrics["failed"] is None and metrics["failed_epochs"] == []
    assert metrics["train_seconds"] <= metrics["total_seconds"]
    assert metrics["device"] == "cpu" and metrics["epochs"] == 1
    assert set(metrics["history"][0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    assert metrics["config"]["hidden"] == [32] and 0 < metrics["test_accuracy"] <= 1
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


def test_epoch_and_final_lines(small_mnist, capsys):
    fit(quick(epochs=1), small_mnist)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu")
    assert lines[1].startswith("epoch 1/1  train loss ") and "val acc" in lines[1]
    assert lines[-1].startswith("test accuracy ") and " after 1 epoch, " in lines[-1]


def test_divergence_names_epoch_and_step_and_keeps_the_checkpoint(small_mnist, tmp_path):
    path = tmp_path / "good.npz"
    fit(quick(epochs=1, save=str(path)), small_mnist, quiet=True)
    before = path.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 2, step \d+ of 71; "
                                               r"try a lower learning rate than --lr 1e\+30"):
        fit(quick(epochs=2, lr=1e30, resume=str(path), save=str(path), schedule_epochs=2),
            small_mnist, quiet=True)
    assert path.read_bytes() == before


def test_checkpoint_errors(small_mnist, tmp_path):
    path = tmp_path / "c.npz"
    fit(quick(epochs=1, save=str(path)), small_mnist, quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"c.npz holds --model mlp \(--hidden 32, "
                                                         r"--activation relu\) trained on --dataset "
                                                         r"mnist, and --hidden 16 was asked"):
        Trainer(quick(hidden=(16,), epochs=1, resume=str(path)), small_mnist, quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        Trainer(quick(resume=str(tmp_path / "missing.npz")), small_mnist, quiet=True)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(checkpoint.CheckpointError, match="is not a gpunet checkpoint: it is not a zip"):
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


def test_evaluate_runs_the_model_in_eval_mode_and_restores_training_mode(monkeypatch):
    """Dropout p=0.5 in the model: the evaluation is deterministic and equals the eval-mode
    forward, and the model is back in training mode afterwards, also when the forward raised."""
    from gpunet.dropout import Dropout
    from gpunet.layers import Dense, Sequential
    data = synthetic()
    trainer = Trainer(quick(epochs=0), data, quiet=True)
    rng = np.random.default_rng(0)
    trainer.model = model = Sequential(Dense(784, 64, activation="relu", rng=rng), Dropout(0.5, rng=rng),
                                       Dense(64, 10, rng=rng))
    first, second = (trainer.evaluate(data.x_test, data.y_test) for _ in range(2))
    assert first == second
    logits = model.eval().forward(data.x_test)
    model.train()
    assert first[1] == float((logits.argmax(axis=1) == data.y_test).mean())
    assert model.training and all(layer.training for layer in model)
    assert not np.array_equal(model.forward(data.x_test), logits)  # training mode: dropout is on

    def broken(x, **kwargs):
        raise MemoryError("out of memory in the evaluation")

    monkeypatch.setattr(model[2], "forward", broken)
    with pytest.raises(MemoryError):
        trainer.evaluate(data.x_test, data.y_test)
    assert model.training and all(layer.training for layer in model)


def synthetic(n=300, n_test=100, seed=0):
    """Random images with labels a linear rule gives: learnable, and fast to train on."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + n_test, 784)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    return DeviceData(x[:n - 50], y[:n - 50], x[n - 50:n], y[n - 50:n], x[n:], y[n:])


# --- the optimizer's rate, Nesterov, warm-up ----------------------------------------------------

def test_each_optimizer_gets_its_usual_rate_unless_lr_is_given(capsys):
    assert TrainConfig().lr == 0.1 and TrainConfig().lr_is_default
    for name in ("adam", "adamw"):
        config = TrainConfig(optimizer=name)
        assert config.lr == 1e-3 and config.lr_is_default
    given = TrainConfig(optimizer="adam", lr=0.01)
    assert given.lr == 0.01 and not given.lr_is_default
    fit(quick(optimizer="adam", lr=None, epochs=0), synthetic())
    assert "| adam lr 0.001 (the default for adam) |" in capsys.readouterr().out
    fit(quick(optimizer="adamw", lr=0.003, epochs=0), synthetic())
    assert "| adamw lr 0.003 |" in capsys.readouterr().out


def test_nesterov_reaches_the_optimizer_and_is_refused_where_it_means_nothing(capsys):
    trainer = Trainer(quick(nesterov=True, epochs=1), synthetic(), quiet=True)
    assert trainer.optimizer.nesterov and trainer.optimizer.momentum == 0.9
    assert not Trainer(quick(epochs=1), synthetic(), quiet=True).optimizer.nesterov
    plain, nesterov = (fit(quick(nesterov=flag, epochs=1), synthetic(), quiet=True)
                       for flag in (False, True))
    assert plain["history"][0]["train_loss"] != nesterov["history"][0]["train_loss"]
    with pytest.raises(ValueError, match="nesterov momentum belongs to the sgd optimizer, not adam"):
        TrainConfig(optimizer="adam", nesterov=True)
    with pytest.raises(ValueError, match="nesterov momentum needs momentum > 0"):
        TrainConfig(momentum=0.0, nesterov=True)


def test_a_warm_up_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match=r"warmup_epochs 8 is longer than the run's 6 epochs, so "
                                         r"the rate would never reach lr 0.1; give at most 6"):
        TrainConfig(warmup_epochs=8)
    with pytest.raises(ValueError, match="warmup_epochs 6 leaves nothing of the cosine schedule"):
        TrainConfig(warmup_epochs=6)
    assert TrainConfig(warmup_epochs=6, schedule="constant").warmup_epochs == 6
    assert TrainConfig(warmup_epochs=2, epochs=2, schedule_epochs=4).schedule_horizon == 4


# --- the schedule's horizon on resume -----------------------------------------------------------

def test_extending_a_run_keeps_its_schedule_unless_told(tmp_path):
    """A 2-epoch cosine run resumed with epochs=4 is refused (the rate would jump back up) and its
    checkpoint left alone; a run planned over 4 epochs and stopped after 2 resumes to exactly the
    straight 4-epoch run."""
    data = synthetic()
    path = tmp_path / "c.npz"
    fit(quick(epochs=2, save=str(path)), data, quiet=True)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"scheduled \(cosine\) over 2 epochs, and --epochs 4 "
                                         r"would restart that schedule mid-way; give "
                                         r"--schedule-epochs 4 to stretch it"):
        Trainer(quick(epochs=4, resume=str(path), save=str(path)), data, quiet=True)
    assert path.read_bytes() == before
    stretched = Trainer(quick(epochs=4, schedule_epochs=4, resume=str(path)), data, quiet=True)
    assert stretched.optimizer.lr == pytest.approx(0.05 * 0.5)  # half-way down a 4-epoch cosine

    planned = tmp_path / "planned.npz"
    fit(quick(epochs=2, schedule_epochs=4, save=str(planned)), data, quiet=True)
    resumed = Trainer(quick(epochs=4, schedule_epochs=4, resume=str(planned)), data, quiet=True)
    resumed_metrics = resumed.fit()
    straight = Trainer(quick(epochs=4), data, quiet=True)
    straight_metrics = straight.fit()
    for a, b in zip(parameters(straight), parameters(resumed)):
        np.testing.assert_array_equal(a, b)
    assert resumed_metrics["test_loss"] == straight_metrics["test_loss"]
    meta = checkpoint.load(planned, meta_only=True)["meta"]
    assert meta["schedule_epochs"] == 4 and meta["steps_per_epoch"] == 2


def test_a_changed_batch_size_resumes_at_the_epochs_place_in_the_schedule(tmp_path):
    data, path = synthetic(), tmp_path / "c.npz"
    fit(quick(epochs=1, schedule_epochs=2, batch_size=50, save=str(path)), data, quiet=True)
    resumed = Trainer(quick(epochs=2, schedule_epochs=2, batch_size=25, resume=str(path)), data,
                      quiet=True)
    assert resumed.steps_per_epoch == 10 and resumed.scheduler.last_step == 10
    assert resumed.optimizer.lr == pytest.approx(0.05 * 0.5)


def test_more_epochs_in_the_checkpoint_than_asked_is_refused(tmp_path):
    data, path = synthetic(), tmp_path / "c.npz"
    fit(quick(epochs=2, save=str(path)), data, quiet=True)
    with pytest.raises(ValueError, match="--epochs 1 is fewer than the 2 epochs checkpoint"):
        Trainer(quick(epochs=1, resume=str(path)), data, quiet=True)


# --- a run that has plainly failed --------------------------------------------------------------

def test_a_finite_divergence_is_warned_once_and_recorded(small_mnist, capsys, tmp_path):
    metrics = fit(quick(epochs=2, lr=5.0, metrics_json=str(tmp_path / "m.json")), small_mnist)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: epoch 1 looks failed: validation "
                                               "accuracy ")
    assert "is at chance (10% for 10 classes)" in err[0]
    assert err[0].endswith("try a lower learning rate than --lr 5")
    assert metrics["failed"].startswith("validation accuracy") and metrics["failed_epochs"] == [1, 2]
    assert json.loads((tmp_path / "m.json").read_text())["failed"] == metrics["failed"]
    assert metrics["test_accuracy"] < 0.2


def test_a_failed_epoch_never_replaces_a_healthy_checkpoint(small_mnist, tmp_path, capsys):
    path = tmp_path / "c.npz"
    fit(quick(epochs=1, schedule="constant", save=str(path)), small_mnist, quiet=True)
    before = path.read_bytes()
    metrics = fit(quick(epochs=2, schedule="constant", lr=5.0, resume=str(path), save=str(path)),
                  small_mnist)
    assert metrics["failed_epochs"] == [2]
    assert path.read_bytes() == before
    assert capsys.readouterr().err.endswith(f"the checkpoint {path} of epoch 1 is kept until an "
                                            "epoch looks healthy again\n")


def test_a_divergence_before_any_checkpoint_says_none_exists(small_mnist, tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(TrainingDiverged, match=r"--lr 1e\+30; no checkpoint exists yet \(--save "
                                               r"writes one after each epoch\)$"):
        fit(quick(epochs=1, lr=1e30, save=str(path)), small_mnist, quiet=True)
    assert not path.exists()
    path.write_bytes(b"someone else's file")
    with pytest.raises(TrainingDiverged, match=f"and {path} was not touched$"):
        fit(quick(epochs=1, lr=1e30, save=str(path)), small_mnist, quiet=True)
    assert path.read_bytes() == b"someone else's file"


# --- sizes, batches and dtypes ------------------------------------------------------------------

def test_a_model_past_memory_is_refused_with_what_it_needs(monkeypatch):
    monkeypatch.setattr(trainer_module, "_available_memory", lambda: 8 * 2 ** 30)
    with pytest.raises(ValueError) as info:
        Trainer(quick(hidden=(10_000_000,)), synthetic(), quiet=True)
    message = str(info.value)
    assert message.startswith("--hidden 10000000 with --batch-size 128 needs about 110.6 GiB ")
    assert "(model 784-10000000-10: 7,950,000,010 parameters" in message
    assert message.endswith("more than the 8.0 GiB this machine has available; give a smaller "
                            "--hidden, --batch-size or --eval-batch-size")


def test_a_batch_larger_than_the_data_is_one_step_an_epoch(capsys):
    data = synthetic()
    metrics = fit(quick(batch_size=10 ** 12, epochs=1), data)
    err = capsys.readouterr().err
    assert "warning: --batch-size 1000000000000 is more than the 250 training images: each " \
           "epoch is one step over all 250" in err
    assert len(metrics["history"]) == 1
    trainer = Trainer(quick(batch_size=10 ** 12), data, quiet=True)
    assert trainer.steps_per_epoch == 1 and trainer._x_batch.shape == (250, 784)


def test_emulated_low_precision_on_the_cpu_is_said_up_front(capsys):
    data = synthetic()
    Trainer(quick(dtype="float16", epochs=0), DeviceData(
        *(a.astype(np.float16) if a.dtype.kind == "f" else a for a in
          (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test))))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --dtype float16 on the CPU: NumPy has no "
                                               "float16 arithmetic of its own and emulates it")
    Trainer(quick(epochs=0), data)
    assert capsys.readouterr().err == ""


def test_the_failed_run_rule_at_its_edges():
    trainer = Trainer(quick(epochs=0), synthetic(), quiet=True)
    trainer.initial_loss = 2.0

    def verdict(acc, loss):
        return trainer._failure({"epoch": 1, "train_loss": loss, "val_loss": 1.0,
                                 "val_accuracy": acc, "seconds": 0.1})

    assert verdict(0.16, 1.0) is None and verdict(None, 3.9) is None
    assert verdict(0.15, 1.0) == "validation accuracy 15.00% is at chance (10% for 10 classes)"
    assert verdict(0.9, 4.1) == "the training loss 4.1 is 2.05 x the 2 it started from"
    assert verdict(0.1, 5.0).startswith("validation accuracy 10.00% is at chance") \
        and verdict(0.1, 5.0).endswith(" and the training loss 5 is 2.5 x the 2 it started from")
    trainer.initial_loss = 0.0  # a perfect first step: no loss yardstick, no division by it
    assert verdict(0.9, 1.0) is None
    trainer.initial_loss = None  # a resumed old checkpoint: ln 10 stands in for the start
    assert verdict(0.9, 4.0) is None and verdict(0.9, 4.7) is not None


# --- the CNN, and what a checkpoint says about its model and data ------------------------------

def images(n=250, n_test=50, seed=0):
    """28x28 images (flattened, as the trainer keeps them) whose class is where a bright square
    is: noise to an MLP of this size, a few steps' work for a CNN."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n + n_test)
    x = rng.standard_normal((n + n_test, 28, 28)).astype(np.float32) * 0.5
    for i, k in enumerate(y):
        row, col = divmod(int(k), 4)
        x[i, 2 + 9 * row:7 + 9 * row, 2 + 6 * col:7 + 6 * col] += 2.0
    x = x.reshape(len(x), 784)
    return DeviceData(x[:n - 50], y[:n - 50], x[n - 50:n], y[n - 50:n], x[n:], y[n:])


def cnn(**overrides):
    return quick(**{"model": "cnn", "hidden": None, "batch_size": 64, **overrides})


def test_a_small_cnn_trains_on_images_of_the_batch_buffer(capsys):
    from gpunet.conv import Conv2d
    trainer = Trainer(cnn(epochs=2), images())
    metrics = trainer.fit()
    assert isinstance(trainer.model[0], Conv2d) and trainer._x_batch.shape == (64, 784)
    assert metrics["test_accuracy"] > 0.5 and metrics["history"][1]["val_accuracy"] > 0.5
    assert (metrics["dataset"], metrics["model"]) == ("mnist", "cnn")
    assert metrics["config"]["model"] == "cnn" and metrics["config"]["hidden"] is None
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device cpu | dataset mnist | model cnn 1x28x28-conv32-pool-conv64-"
                            "pool-128-10 dropout 0.25 | sgd lr 0.05 | 200 train, 50 val images")
    # The CNN's input is a view of the flattened batch buffer, not a copy.
    view = trainer._model_input(trainer._x_batch)
    assert view.shape == (64, 1, 28, 28) and np.shares_memory(view, trainer._x_batch)


def test_the_mlp_says_its_dataset_and_layers(capsys):
    metrics = fit(quick(epochs=0, dataset="kmnist"), synthetic())
    assert capsys.readouterr().out.startswith("device cpu | dataset kmnist | model mlp 784-32-10 relu |")
    assert (metrics["dataset"], metrics["model"], metrics["architecture"]) == \
        ("kmnist", "mlp", "mlp 784-32-10 relu")


def test_a_resumed_cnn_equals_the_straight_run(tmp_path):
    """Dropout draws a mask each step: the checkpoint keeps the generator it draws from."""
    data = images()
    straight = Trainer(cnn(epochs=3), data, quiet=True)
    straight_metrics = straight.fit()
    path = tmp_path / "cnn.npz"
    CrashingTrainer.crash_at = 3
    with pytest.raises(KeyboardInterrupt):
        CrashingTrainer(cnn(epochs=3, save=str(path)), data, quiet=True).fit()
    meta = checkpoint.load(path, meta_only=True)["meta"]
    assert meta["config"]["model"] == "cnn" and meta["dropout_counters"] == [0]
    assert meta["model_rng"]["bit_generator"] == "PCG64"
    resumed = Trainer(cnn(epochs=3, resume=str(path)), data, quiet=True)
    assert resumed.epoch == 2
    resumed_metrics = resumed.fit()
    for a, b in zip(parameters(straight), parameters(resumed)):
        np.testing.assert_array_equal(a, b)
    assert resumed_metrics["test_loss"] == straight_metrics["test_loss"]
    assert [h["train_loss"] for h in resumed_metrics["history"]] == \
        [h["train_loss"] for h in straight_metrics["history"]]


def test_the_cnn_refuses_what_it_cannot_be():
    for kwargs, message in [
        (dict(hidden=(256,)), r"hidden and activation are settings of model 'mlp'; model 'cnn' "
                              r"\(gpunet.conv.small_cnn\) has fixed layers, got hidden=\(256,\)"),
        (dict(activation="tanh"), "has fixed layers, got activation='tanh'"),
        (dict(dtype="float16"), "dtype float16 with model 'cnn': Conv2d computes in the dtype of "
                                "its parameters and has no mixed precision"),
        (dict(dtype="bfloat16"), "the run would not be bfloat16; give dtype float32 or float64"),
    ]:
        with pytest.raises(ValueError, match=message):
            cnn(**kwargs)
    for kwargs, message in [(dict(model="resnet"), "model must be one of mlp, cnn, got 'resnet'"),
                            (dict(dataset="cifar10"), "dataset must be one of mnist, fashion-mnist, "
                                                      "kmnist, got 'cifar10'"),
                            (dict(verify_data="no"), "verify_data must be True or False")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)
    assert TrainConfig().hidden == (512,) and TrainConfig().activation == "relu"
    assert cnn().hidden is None and cnn(dtype="float64").dtype == "float64"
    with pytest.raises(ValueError, match=r"--model cnn takes 28x28 images \(784 values each\), but "
                                         r"data.x_train has 12 values per image"):
        x = np.zeros((20, 12), np.float32)
        y = np.zeros(20, np.int64)
        Trainer(cnn(), DeviceData(x, y, x, y, x, y), quiet=True)


def test_a_cnn_past_memory_is_refused_with_what_it_needs(monkeypatch):
    """About 1 MB an image of a training batch and half that of an evaluation batch (the
    second convolution's im2col matrix alone is 14 x 14 x 288 values an image)."""
    params, per_image = trainer_module._cnn_sizes(4)[:2]
    assert params == 421_642 and 10 ** 6 < per_image < 1.1 * 10 ** 6
    monkeypatch.setattr(trainer_module, "_available_memory", lambda: 64 * 2 ** 20)
    with pytest.raises(ValueError) as info:
        Trainer(cnn(batch_size=1000), images(), quiet=True)
    message = str(info.value)
    assert message.startswith("--model cnn with --batch-size 1000 needs about 2")
    assert "(model 1x28x28-conv32-pool-conv64-pool-128-10 dropout 0.25: 421,642 parameters" in message
    assert "for a batch of 200 and an evaluation batch of 50)" in message
    assert message.endswith("more than the 64 MiB this machine has available; give a smaller "
                            "--batch-size or --eval-batch-size")
    Trainer(cnn(batch_size=16), images(), quiet=True)  # a small batch fits


@pytest.mark.parametrize("saved,asked,message", [
    (quick, dict(model="cnn", hidden=None), "holds --model mlp (--hidden 32, --activation relu) "
                                            "trained on --dataset mnist, and --model cnn was asked"),
    (quick, dict(dataset="fashion-mnist"), "and --dataset fashion-mnist was asked"),
    (quick, dict(activation="sigmoid"), "and --activation sigmoid was asked"),
    (cnn, dict(), "holds --model cnn trained on --dataset mnist, and --model mlp was asked"),
])
def test_a_checkpoint_resumes_only_the_model_and_data_it_holds(tmp_path, saved, asked, message):
    """The checks come before the weights are loaded: relu and sigmoid MLPs, say, have the
    same shapes, and a cnn and an mlp nothing in common to name."""
    path = tmp_path / "c.npz"
    data = images()
    fit(saved(epochs=1, save=str(path)), data, quiet=True)
    before = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointError) as info:
        Trainer(quick(epochs=2, schedule_epochs=2, resume=str(path), save=str(path), **asked), data,
                quiet=True)
    assert str(info.value).startswith(f"checkpoint {path} ") and message in str(info.value)
    assert path.read_bytes() == before


def test_a_checkpoint_from_before_datasets_and_models_resumes_as_an_mlp_on_mnist(tmp_path):
    data, path = synthetic(), tmp_path / "old.npz"
    fit(quick(epochs=1, schedule_epochs=2, save=str(path)), data, quiet=True)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for key in ("dataset", "model", "verify_data"):
        del meta["config"][key]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    resumed = Trainer(quick(epochs=2, schedule_epochs=2, resume=str(path)), data, quiet=True)
    assert resumed.epoch == 1 and resumed.config.model == "mlp"
    with pytest.raises(checkpoint.CheckpointError, match="and --dataset kmnist was asked"):
        Trainer(quick(epochs=2, schedule_epochs=2, dataset="kmnist", resume=str(path)), data,
                quiet=True)


@pytest.mark.cuda
def test_the_cnn_on_a_gpu_runs_eagerly_and_says_so(capsys):
    trainer = Trainer(cnn(device="cuda", epochs=1), images())
    assert trainer.graph is None
    metrics = trainer.fit()
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("note: --model cnn runs its kernels eagerly on the GPU, not as a CUDA graph")
    assert metrics["test_accuracy"] > 0.3
