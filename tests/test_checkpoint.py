"""gpunet.checkpoint: validation of every field on load, and writes that never lose a file."""

import errno
import gzip
import io
import json
import os
import signal
import stat
import zipfile

import numpy as np
import pytest

from gpunet import checkpoint
from gpunet.checkpoint import CheckpointError, OutputError
from gpunet.trainer import DeviceData, TrainConfig, Trainer, fit


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 784)).astype(np.float32)
    y = x[:, :10].argmax(axis=1).astype(np.int64)
    return DeviceData(x[:80], y[:80], x[80:100], y[80:100], x[100:], y[100:])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The bytes of a real 2-epoch checkpoint."""
    path = tmp_path_factory.mktemp("good") / "c.npz"
    fit(TrainConfig(device="cpu", hidden=(8,), epochs=2, batch_size=32, progress=False,
                    save=str(path)), tiny_data(), quiet=True)
    return path.read_bytes()


def entries(data: bytes) -> dict:
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}


def write(path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def with_meta(good: bytes, change) -> dict:
    arrays = entries(good)
    meta = json.loads(str(arrays["meta"]))
    change(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def test_a_good_checkpoint_loads_and_its_counts_agree(good, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(good)
    loaded = checkpoint.load(path)
    meta = loaded["meta"]
    assert meta["epoch"] == 2 and meta["steps_per_epoch"] == 3 and meta["schedule_epochs"] == 2
    assert int(loaded["optimizer/step"]) == int(loaded["scheduler/last_step"]) == 6
    assert meta["initial_loss"] > 0 and meta["total_seconds"] >= sum(h["seconds"] for h in meta["history"])


def _set(key, value):
    def change(meta):
        target, *path = key.split(".")
        if not path:
            meta[target] = value
            return
        obj = meta[target]
        for part in path[:-1]:
            obj = obj[int(part)] if part.isdigit() else obj[part]
        last = path[-1]
        obj[int(last) if last.isdigit() else last] = value
    return change


def _drop(key):
    return lambda meta: meta.pop(key)


@pytest.mark.parametrize("change,message", [
    (_set("epoch", -3), "meta key 'epoch' must be an integer >= 0, got -3"),
    (_set("epoch", "2"), "meta key 'epoch' must be an integer >= 0, got \"2\""),
    (_set("epoch", True), "meta key 'epoch' must be an integer >= 0, got true"),
    (_set("epoch", 5), "meta key 'history' must be a list of 5 epoch records (one per saved "
                       "epoch), got \"2 records\""),
    (_set("history", {"1": {}}), "meta key 'history' must be a list of 2 epoch records, got {"),
    (_set("history.0", [1, 2]), "meta key 'history[0]' must be an object with keys epoch, "
                                "train_loss, val_loss, val_accuracy, seconds, got [1, 2]"),
    (_set("history.1.train_loss", "low"), "meta key 'history[1].train_loss' must be a finite number"),
    (_set("history.1.val_accuracy", 7), "meta key 'history[1].val_accuracy' must be a number from 0 "
                                        "to 1 or null, got 7"),
    (_set("history.0.epoch", 3), "meta key 'history[0].epoch' must be 1, got 3"),
    (_set("config", [1]), "meta key 'config' must be an object with the run's settings, got [1]"),
    (_set("shuffle_rng", "seed 0"), "meta key 'shuffle_rng' must be the state of a PCG64 generator"),
    (_set("shuffle_rng.state.inc", -1), "meta key 'shuffle_rng' must be the state of a PCG64"),
    (_set("steps_per_epoch", 0), "meta key 'steps_per_epoch' must be an integer >= 1, got 0"),
    (_set("schedule_epochs", 2.5), "meta key 'schedule_epochs' must be an integer >= 1, got 2.5"),
    (_set("initial_loss", None), "meta key 'initial_loss' must be a finite number >= 0, got null"),
    (_set("format", 2), "has format 2, this gpunet reads format 1"),
    (_set("model_rng", {"bit_generator": "MT19937"}), "meta key 'model_rng' must be the state of a "
                                                      "PCG64 generator"),
    (_set("dropout_counters", [-1]), "meta key 'dropout_counters' must be a list of integers from 0 "
                                     "to 2**64 - 1, got [-1]"),
    (_set("dropout_counters", 3), "meta key 'dropout_counters' must be a list of integers"),
    (_set("config.model", 3), "meta key 'config.model' must be a name (a string), got 3"),
    (_set("config.dataset", ["mnist"]), "meta key 'config.dataset' must be a name (a string)"),
    (_drop("history"), "meta lacks 'history', so it is not a complete gpunet checkpoint"),
    (_drop("config"), "meta lacks 'config', so it is not a complete gpunet checkpoint"),
    (_drop("shuffle_rng"), "meta lacks 'shuffle_rng'"),
    (_drop("epoch"), "meta lacks 'epoch'"),
    (_drop("format"), "meta lacks 'format'"),
])
def test_every_malformed_meta_field_is_named(good, tmp_path, change, message):
    path = tmp_path / "bad.npz"
    write(path, with_meta(good, change))
    for meta_only in (True, False):
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path, meta_only=meta_only)
        assert str(info.value).startswith(f"checkpoint {path}")
        assert message in str(info.value)


def test_meta_that_is_not_an_object(good, tmp_path):
    path = tmp_path / "bad.npz"
    for meta, message in [("[1, 2]", "'meta' must be a JSON object, got [1, 2]"),
                          ("{not json", "'meta' is not valid JSON"),
                          (np.zeros(3), "'meta' must be a JSON string, got an array of dtype float64")]:
        arrays = entries(good)
        arrays["meta"] = np.array(meta)
        write(path, arrays)
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}".replace("[", r"\[")
                           .replace("]", r"\]")):
            checkpoint.load(path)
    arrays = entries(good)
    del arrays["meta"]
    write(path, arrays)
    with pytest.raises(CheckpointError, match="has no 'meta' entry, so it is not a gpunet checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize("key,value,message", [
    ("model/0.weight", "nan", "'model/0.weight' holds 1 NaN or infinite value of 6272; the file is "
                              "damaged or was written by a run that had already diverged"),
    ("optimizer/momentum_buffer", "inf", "'optimizer/momentum_buffer' holds 1 NaN or infinite value"),
    ("scheduler/last_step", np.array(1e15), "'scheduler/last_step' must be 6 (epoch 2 x 3 steps per "
                                            "epoch), got 1000000000000000.0"),
    ("scheduler/last_step", np.array(10 ** 15), "'scheduler/last_step' must be 6 (epoch 2 x 3"),
    ("optimizer/step", np.array(-1), "'optimizer/step' must be 6"),
    ("optimizer/lr", np.array(-0.5), "'optimizer/lr' must be >= 0, got -0.5"),
    ("model/0.bias", np.array(["a", "b"]), "'model/0.bias' has dtype <U1, expected numbers"),
    ("extra/thing", np.zeros(2), "unexpected entry 'extra/thing'"),
])
def test_crafted_arrays_are_refused_naming_the_key(good, tmp_path, key, value, message):
    arrays = entries(good)
    if isinstance(value, str):
        arrays[key] = arrays[key].copy()
        arrays[key].flat[3] = float(value)
    else:
        arrays[key] = value
    path = tmp_path / "bad.npz"
    write(path, arrays)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value).startswith(f"checkpoint {path}: ") and message in str(info.value)


def test_pickled_entries_are_refused_without_suggesting_pickle(good, tmp_path):
    arrays = entries(good)
    arrays["model/0.weight"] = np.array([{"a": 1}], dtype=object)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value) == (f"checkpoint {path}: entry 'model/0.weight' holds Python objects "
                               "(pickled data), which gpunet never writes and never loads")
    assert "allow_pickle" not in str(info.value)


def test_an_entry_that_declares_a_huge_shape_is_named(good, tmp_path):
    from numpy.lib import format as npy_format
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                               "shape": (2 ** 50,)})  # 4 PiB
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, header.getvalue() + bytes(64) if name == "model/0.weight.npy"
                         else src.read(name))
    with pytest.raises(CheckpointError, match=r"checkpoint .*huge.npz: entry 'model/0.weight' is "
                                              r"too large to load \(.*\); the file is damaged "
                                              r"or crafted"):
        checkpoint.load(path)


@pytest.mark.parametrize("name,content,what", [
    ("c.npz.gz", None, "a gzip file"),
    ("m.json", b'{"test_accuracy": 0.98}', "text that looks like JSON (a --metrics-json file?)"),
    ("w.npy", "npy", "a single NumPy array (.npy)"),
    ("empty.npz", b"", "empty"),
    ("text.npz", b"hello world", "not a zip archive (it starts with b'hello wo')"),
])
def test_files_that_are_not_checkpoints_say_what_they_are(good, tmp_path, name, content, what):
    path = tmp_path / name
    if content is None:
        path.write_bytes(gzip.compress(good))
    elif content == "npy":
        np.save(path, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value) == (f"checkpoint {path} is not a gpunet checkpoint: it is {what}; "
                               "a checkpoint is the .npz file that --save writes")
    assert "pickle" not in str(info.value)


def test_a_checkpoint_that_is_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a regular file"):
        checkpoint.load(tmp_path)


def test_the_trainer_refuses_a_step_count_past_what_the_epochs_allow(good, tmp_path):
    """Without steps_per_epoch (older checkpoints) the bound is one image a step."""
    def old_style(meta):
        meta.pop("steps_per_epoch")
    arrays = with_meta(good, old_style)
    arrays["scheduler/last_step"] = np.array(10 ** 9)
    path = tmp_path / "old.npz"
    write(path, arrays)
    with pytest.raises(CheckpointError, match=r"'scheduler/last_step' is 1000000000, more steps than "
                                              r"2 epochs of 80 images can take"):
        Trainer(TrainConfig(device="cpu", hidden=(8,), epochs=2, batch_size=32, progress=False,
                            resume=str(path)), tiny_data(), quiet=True)


@pytest.mark.parametrize("key", ["scheduler/last_step", "optimizer/step", "optimizer/lr"])
def test_a_checkpoint_without_the_run_state_is_refused(good, tmp_path, key):
    arrays = entries(good)
    del arrays[key]
    path = tmp_path / "bad.npz"
    write(path, arrays)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} lacks '{key}', so it cannot "
                                              "continue a run"):
        Trainer(TrainConfig(device="cpu", hidden=(8,), epochs=2, batch_size=32, progress=False,
                            resume=str(path)), tiny_data(), quiet=True)


def test_a_checkpoint_from_before_the_optional_keys_still_resumes(good, tmp_path):
    """Format-1 files written before steps_per_epoch, schedule_epochs, initial_loss and
    total_seconds existed load, and resume where they stopped."""
    def older(meta):
        for key in ("steps_per_epoch", "schedule_epochs", "initial_loss", "total_seconds"):
            meta.pop(key)
        meta["config"].pop("schedule_epochs")
    path = tmp_path / "old.npz"
    write(path, with_meta(good, older))
    trainer = Trainer(TrainConfig(device="cpu", hidden=(8,), epochs=3, batch_size=32,
                                  schedule="constant", progress=False, resume=str(path)),
                      tiny_data(), quiet=True)
    assert trainer.epoch == 2 and trainer.scheduler.last_step == 6 and trainer.initial_loss is None
    metrics = trainer.fit()
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["train_seconds"] <= metrics["total_seconds"]


@pytest.mark.parametrize("change,message", [
    (_set("config.model", "resnet"), "meta key 'config' holds an invalid setting: model must be one "
                                     "of mlp, cnn, got 'resnet'"),
    (_set("config.dataset", "cifar10"), "meta key 'config' holds an invalid setting: dataset must be "
                                        "one of mnist, fashion-mnist, kmnist, got 'cifar10'"),
    (_set("config.hidden", None), "meta key 'config' holds an invalid setting: hidden must be one or "
                                  "more positive layer widths"),
])
def test_the_trainer_checks_the_saved_model_and_dataset(good, tmp_path, change, message):
    """Their names are known to the trainer, which checks them before building anything."""
    path = tmp_path / "bad.npz"
    arrays = with_meta(good, change)
    if "hidden" in message:  # an mlp without widths: only the saved settings can say so
        meta = json.loads(str(arrays["meta"]))
        meta["config"]["hidden"] = []
        arrays["meta"] = np.array(json.dumps(meta))
    write(path, arrays)
    with pytest.raises(CheckpointError) as info:
        Trainer(TrainConfig(device="cpu", hidden=(8,), epochs=2, batch_size=32, progress=False,
                            resume=str(path)), tiny_data(), quiet=True)
    assert str(info.value).startswith(f"checkpoint {path}: ") and message in str(info.value)


def test_a_cnn_checkpoint_without_its_dropout_state_is_refused(tmp_path):
    path = tmp_path / "cnn.npz"
    data = tiny_data()
    config = dict(device="cpu", model="cnn", epochs=2, schedule_epochs=2, batch_size=40,
                  progress=False)
    fit(TrainConfig(**{**config, "epochs": 1}, save=str(path)), data, quiet=True)
    good = path.read_bytes()
    for change, message in [(_drop("model_rng"), "lacks meta key 'model_rng', so its --model cnn "
                                                 "cannot continue with the random draws"),
                            (_set("dropout_counters", [0, 0]), "meta key 'dropout_counters' must "
                                                               "hold one counter for each of the "
                                                               "model's 1 Dropout layers, got 2")]:
        write(path, with_meta(good, change))
        with pytest.raises(CheckpointError, match=message):
            Trainer(TrainConfig(**config, resume=str(path)), data, quiet=True)


def test_batch_norm_buffers_go_into_a_checkpoint_and_come_back(tmp_path):
    """The running statistics (register_buffer) are saved as model/ entries beside the
    parameters, num_batches_tracked as an integer, and restore the eval-mode model exactly."""
    from gpunet import optim
    from gpunet.conv import Conv2d, Flatten
    from gpunet.layers import Dense, ReLU, Sequential
    from gpunet.norm import BatchNorm2d

    def model(seed):
        rng = np.random.default_rng(seed)
        return Sequential(Conv2d(1, 4, 3, padding=1, rng=rng), BatchNorm2d(4), ReLU(), Flatten(),
                          Dense(4 * 6 * 6, 3, rng=rng))

    rng = np.random.default_rng(1)
    trained = model(0)
    opt = optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    x = rng.standard_normal((8, 1, 6, 6)).astype(np.float32)
    for _ in range(3):
        y = trained.forward(x)
        trained.backward(rng.standard_normal(y.shape).astype(np.float32), input_grad=False)
        opt.step()
    path = tmp_path / "bn.npz"
    meta = {"epoch": 1, "history": [{"epoch": 1, "train_loss": 1.0, "val_loss": None,
                                     "val_accuracy": None, "seconds": 0.1}],
            "config": {}, "shuffle_rng": np.random.default_rng(0).bit_generator.state}
    checkpoint.save(path, model=trained, optimizer=opt, meta=meta)
    loaded = checkpoint.load(path)
    assert loaded["model/1.num_batches_tracked"] == 3
    assert loaded["model/1.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(loaded["model/1.running_var"], trained[1].running_var)
    assert not np.allclose(trained[1].running_mean, 0)  # three batches moved them

    fresh = model(2)
    checkpoint.restore(loaded, model=fresh, optimizer=optim.SGD(fresh.parameters(), lr=0.1,
                                                                momentum=0.9), path=path)
    for (name, a), (_, b) in zip(trained.named_buffers(), fresh.named_buffers()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert int(fresh[1].num_batches_tracked) == 3
    np.testing.assert_array_equal(trained.eval().forward(x), fresh.eval().forward(x))


# --- atomic writes ------------------------------------------------------------------------------

def test_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.json"
    target.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    checkpoint.atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"old")
    path.chmod(0o600)
    checkpoint.atomic_write(path, lambda f: f.write(b"new"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"new"


def test_a_full_disk_names_the_path_and_changes_nothing(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"the last good checkpoint")

    def fills_the_disk(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as info:
        checkpoint.atomic_write(path, fills_the_disk)
    assert str(info.value) == f"cannot write {path}: No space left on device ({path} is unchanged)"
    assert path.read_bytes() == b"the last good checkpoint"
    assert os.listdir(tmp_path) == ["c.npz"]
    with pytest.raises(OutputError, match=r"\(.*new.npz was not created\)"):
        checkpoint.atomic_write(tmp_path / "new.npz", fills_the_disk)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_a_signal_during_a_write_removes_the_temporary(tmp_path):
    """SIGTERM as train.py handles it: an exception raised where the write is."""
    class Terminated(KeyboardInterrupt):
        pass

    def handler(signum, frame):
        raise Terminated

    path = tmp_path / "c.npz"
    path.write_bytes(b"epoch 1")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        def killed_half_way(f):
            f.write(b"half of epoch 2")
            os.kill(os.getpid(), signal.SIGTERM)
            f.write(b"never")
        with pytest.raises(Terminated):
            checkpoint.atomic_write(path, killed_half_way)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert path.read_bytes() == b"epoch 1" and os.listdir(tmp_path) == ["c.npz"]


def test_the_next_write_removes_what_a_killed_one_left(tmp_path):
    path = tmp_path / "c.npz"
    stale = [tmp_path / ".c.npz.k2j4_x9q.tmp", tmp_path / ".c.npz.abcdefgh.probe"]
    others = [tmp_path / ".c.npz.mine.tmp", tmp_path / ".d.npz.abcdefgh.tmp",
              tmp_path / "c.npz.abcdefgh.tmp"]
    for p in stale + others:
        p.write_bytes(b"x" * 100)
    checkpoint.atomic_write(path, lambda f: f.write(b"new"))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    assert path.read_bytes() == b"new"


# --- output paths -------------------------------------------------------------------------------

def test_an_output_naming_an_input_is_refused_before_its_folder_is_probed(tmp_path, monkeypatch):
    """The writability probe leaves a file in the folder for a moment: an output that names the
    data file is refused before it, so that the data folder sees nothing."""
    data = tmp_path / "train-images-idx3-ubyte.gz"
    data.write_bytes(b"data")

    def probe(path, what):
        raise AssertionError(f"{what} was probed")

    monkeypatch.setattr(checkpoint, "check_writable", probe)
    with pytest.raises(ValueError, match="is the data file of this run"):
        checkpoint.check_outputs({"--save": data}, {"the data file": data})


def test_check_outputs(tmp_path):
    data = tmp_path / "train-images-idx3-ubyte.gz"
    data.write_bytes(b"data")
    ckpt = tmp_path / "c.npz"
    ckpt.write_bytes(b"ckpt")
    hard = tmp_path / "hard-link"
    os.link(data, hard)
    inputs = {"the data file train-images-idx3-ubyte": data, "the --resume checkpoint": ckpt}
    updatable = (("--save", "the --resume checkpoint"),)

    def refused(outputs, message):
        with pytest.raises(ValueError) as info:
            checkpoint.check_outputs(outputs, inputs, updatable)
        assert message in str(info.value)

    refused({"--save": ""}, "--save is an empty path; give a file path")
    refused({"--save": tmp_path / "x", "--metrics-json": tmp_path / "x"},
            f"--save and --metrics-json both name {tmp_path / 'x'}; give each output its own file")
    refused({"--save": data}, f"--save {data} is the data file train-images-idx3-ubyte of this run")
    refused({"--metrics-json": hard}, "is the data file train-images-idx3-ubyte of this run")
    refused({"--metrics-json": ckpt}, f"--metrics-json {ckpt} is the --resume checkpoint of this run")
    refused({"--save": tmp_path}, f"--save {tmp_path} is a directory, not a regular file; give a file path")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused({"--save": fifo}, f"--save {fifo} is a fifo, not a regular file; gpunet writes only "
                              "regular files, give another path")
    link = tmp_path / "to-fifo"
    link.symlink_to(fifo)
    refused({"--metrics-json": link}, f"--metrics-json {link} (a symlink to {fifo}) is a fifo")
    checkpoint.check_outputs({"--save": ckpt, "--metrics-json": tmp_path / "m.json"}, inputs, updatable)
    assert data.read_bytes() == b"data" and ckpt.read_bytes() == b"ckpt" and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_device_node_is_refused_and_left_alone(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    with pytest.raises(ValueError, match=f"--save {node} is a character device, not a regular file"):
        checkpoint.check_outputs({"--save": node})
    assert stat.S_ISCHR(node.lstat().st_mode)


def test_zip_entries_of_a_checkpoint_are_only_arrays(good):
    # What save writes: every entry a .npy inside the zip, nothing pickled.
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
