"""train.py: the command line, its one-line errors, and a real run with checkpoints and metrics."""

import errno
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import MNIST_FILES, PROJECT
from gpunet import backend

spec = importlib.util.spec_from_file_location("train_script", PROJECT / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


def run(capsys, *argv):
    """(exit code, stdout, stderr lines) of ``python train.py *argv``, in this process."""
    try:
        code = train.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits on bad flags
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--eval-batch-size", "2.5"], "--eval-batch-size"),
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--hidden", "512,x"], "--hidden"),
    (["--hidden", "0"], "--hidden"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--device"], "--device"),
])
def test_bad_flags_give_one_line(capsys, argv, flag):
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err) == 1 and flag in err[0] and err[0].startswith("train.py: error:")


def test_cuda_without_a_gpu_is_one_line(capsys):
    if backend.cuda_problem() is None:
        pytest.skip("a GPU is usable here")
    code, out, err = run(capsys, "--device", "cuda")
    assert code == 1 and len(err) == 1
    assert err[0].startswith("train.py: error: device 'cuda' cannot be used: ")


def test_unknown_device_name(capsys):
    code, out, err = run(capsys, "--device", "tpu")
    assert code == 1 and err == ["train.py: error: device must be one of 'auto', 'cpu', 'cuda', "
                                 "'cuda:N', got 'tpu'"]


def test_offline_without_data_says_where_it_looked(capsys, tmp_path):
    code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path / "empty")
    assert code == 1 and len(err) == 1
    assert str(tmp_path / "empty") in err[0] and "--data-dir" in err[0] and "GPUNET_DATA" in err[0]
    assert "does not exist, so nothing was created or downloaded" in err[0]
    assert not (tmp_path / "empty").exists()


@pytest.fixture
def mnist_copy(mnist_dir, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, folder / name)
    return folder


def test_corrupted_data_is_one_line_and_untouched(capsys, mnist_copy):
    labels = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:-100]))  # truncated
    damaged = labels.read_bytes()
    code, out, err = run(capsys, "--device", "cpu", "--data-dir", mnist_copy)
    assert code == 1 and len(err) == 1 and "truncated" in err[0]
    assert labels.read_bytes() == damaged  # nothing was rewritten or deleted


def test_unwritable_outputs_fail_before_training(capsys, tmp_path):
    for flag in ("--save", "--metrics-json"):
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path / "no-data",
                             flag, tmp_path / "missing-folder" / "x")
        assert code == 1 and len(err) == 1 and flag in err[0] and "does not exist" in err[0]
        assert "epoch" not in out


def test_bad_checkpoints_are_one_line(capsys, tmp_path, mnist_dir):
    code, out, err = run(capsys, "--resume", tmp_path / "missing.npz")
    assert code == 1 and len(err) == 1 and "does not exist" in err[0]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    code, out, err = run(capsys, "--resume", garbage)
    assert code == 1 and len(err) == 1 and "is not a gpunet checkpoint: it is not a zip" in err[0]


def test_a_real_run_with_checkpoints_metrics_and_resume(capsys, tmp_path, mnist_dir):
    common = ["--device", "cpu", "--data-dir", mnist_dir, "--hidden", "16", "--schedule", "constant",
              "--lr", "0.05", "--no-progress"]
    ckpt, m1, m2, m_straight = (tmp_path / n for n in ("c.npz", "m1.json", "m2.json", "m.json"))

    code, out, err = run(capsys, *common, "--epochs", "1", "--save", ckpt, "--metrics-json", m1)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[1].startswith("epoch 1/1  train loss ") and lines[-1].startswith("test accuracy ")
    assert json.loads(m1.read_text())["test_accuracy"] > 0.85

    code, out, err = run(capsys, "--resume", ckpt, "--epochs", "2", "--data-dir", mnist_dir,
                         "--metrics-json", m2, "--no-progress")
    assert code == 0, err
    assert "resumed from" in out
    code, out, err = run(capsys, *common, "--epochs", "2", "--metrics-json", m_straight)
    assert code == 0, err
    resumed, straight = json.loads(m2.read_text()), json.loads(m_straight.read_text())
    assert resumed["test_loss"] == straight["test_loss"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]

    code, out, err = run(capsys, "--resume", ckpt, "--hidden", "32", "--data-dir", mnist_dir)
    assert code == 1 and len(err) == 1
    assert err[0] == (f"train.py: error: checkpoint {ckpt} holds --model mlp (--hidden 16, "
                      "--activation relu) trained on --dataset mnist, and --hidden 32 was asked; a "
                      "resumed run keeps the model and the data it was saved with: drop --hidden to "
                      "resume it, or start a new run without --resume")
    assert np.load(ckpt)["model/0.weight"].shape == (784, 16)  # the checkpoint is intact


# --- output paths: refused before anything runs, and nothing they name is touched ----------------

def fake_data_folder(tmp_path):
    """A folder holding files under the four MNIST names (their content is never read here)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in MNIST_FILES:
        (folder / name).write_bytes(b"MNIST stand-in " + name.encode())
    return folder


def synthetic_checkpoint(path, **overrides):
    from gpunet.trainer import DeviceData, TrainConfig, fit
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 784)).astype(np.float32)
    y = x[:, :10].argmax(axis=1).astype(np.int64)
    settings = dict(device="cpu", hidden=(8,), epochs=1, batch_size=32, progress=False,
                    save=str(path), **overrides)
    fit(TrainConfig(**settings), DeviceData(x[:80], y[:80], x[80:100], y[80:100], x[100:], y[100:]),
        quiet=True)
    return path


def snapshot(folder):
    """Every entry under ``folder``: its kind and, for a regular file, its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        out[str(p)] = (p.read_bytes() if p.is_file() and not p.is_symlink() else
                       ("link", os.readlink(p)) if p.is_symlink() else stat.S_IFMT(mode))
    return out


def output_cases(tmp_path):
    data = fake_data_folder(tmp_path)
    ckpt = synthetic_checkpoint(tmp_path / "run.npz")
    taken = tmp_path / "taken.json"
    taken.write_text('{"keep": "me"}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    (tmp_path / "folder").mkdir()
    images = data / "train-images-idx3-ubyte.gz"
    return data, [
        (["--save", taken, "--metrics-json", taken], 1,
         f"--save and --metrics-json both name {taken}; give each output its own file"),
        (["--save", images], 1, f"--save {images} is the data file train-images-idx3-ubyte of "
                                "this run; writing it would destroy it, give another path"),
        (["--metrics-json", data / "t10k-labels-idx1-ubyte.gz"], 1,
         "is the data file t10k-labels-idx1-ubyte of this run"),
        (["--resume", ckpt, "--metrics-json", ckpt], 1,
         f"--metrics-json {ckpt} is the --resume checkpoint of this run"),
        (["--save", fifo], 1, f"--save {fifo} is a fifo, not a regular file; gpunet writes only "
                              "regular files, give another path"),
        (["--metrics-json", link], 1, f"--metrics-json {link} (a symlink to {fifo}) is a fifo"),
        (["--save", tmp_path / "folder"], 1, "is a directory, not a regular file; give a file path"),
        (["--save", ""], 2, "argument --save: expected a path, got an empty string"),
        (["--metrics-json", ""], 2, "argument --metrics-json: expected a path, got an empty string"),
        (["--resume", ""], 2, "argument --resume: expected a path, got an empty string"),
        (["--data-dir", ""], 2, "argument --data-dir: expected a path, got an empty string"),
    ]


def test_outputs_that_would_lose_a_file_are_refused_before_anything_runs(capsys, tmp_path):
    data, cases = output_cases(tmp_path)
    before = snapshot(tmp_path)
    for argv, status, message in cases:
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", data, *argv)
        assert code == status and len(err) == 1 and message in err[0], (argv, err)
        assert err[0].startswith("train.py: error: ") and out == ""
        assert snapshot(tmp_path) == before  # byte for byte, and the fifo is still a fifo


def test_a_device_node_is_never_replaced(capsys, tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    for flag in ("--save", "--metrics-json"):
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path, flag, node)
        assert code == 1 and err == [f"train.py: error: {flag} {node} is a character device, not "
                                     "a regular file; gpunet writes only regular files, give "
                                     "another path"]
        assert stat.S_ISCHR(node.lstat().st_mode)


# --- checkpoints that are not what they claim -----------------------------------------------------

def test_malformed_checkpoints_fail_in_one_line_before_training(capsys, tmp_path):
    good = synthetic_checkpoint(tmp_path / "good.npz")
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    cases = []
    for key, value, message in [
        ("history", {"1": {"epoch": 1}}, "meta key 'history' must be a list of 1 epoch records"),
        ("epoch", -3, "meta key 'epoch' must be an integer >= 0, got -3"),
        ("config", {**meta["config"], "lr": -1}, "meta key 'config' holds an invalid setting: lr "
                                                 "must be a finite number > 0, got -1"),
        ("config", {**meta["config"], "hidden": "wide"}, "meta key 'config' holds an invalid setting"),
    ]:
        path = tmp_path / f"bad-{key}-{len(cases)}.npz"
        np.savez(path, **{**arrays, "meta": np.array(json.dumps({**meta, key: value}))})
        cases.append((path, message))
    nan = tmp_path / "nan.npz"
    weights = arrays["model/0.weight"].copy()
    weights[0, 0] = np.nan
    np.savez(nan, **{**arrays, "model/0.weight": weights})
    cases.append((nan, "'model/0.weight' holds 1 NaN or infinite value of 6272; the file is "
                       "damaged or was written by a run that had already diverged"))
    gz = tmp_path / "run.npz.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    cases.append((gz, "is not a gpunet checkpoint: it is a gzip file"))
    js = tmp_path / "m.json"
    js.write_text("{}")
    cases.append((js, "it is text that looks like JSON"))
    npy = tmp_path / "w.npy"
    np.save(npy, np.zeros(3))
    cases.append((npy, "it is a single NumPy array (.npy)"))
    for path, message in cases:
        before = path.read_bytes()
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path / "no-data",
                             "--resume", path, "--save", path)
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"train.py: error: checkpoint {path}") and message in err[0], err
        assert "pickle" not in err[0] and "epoch" not in out
        assert path.read_bytes() == before


def test_flags_that_cannot_mean_what_they_say(capsys, tmp_path):
    for argv, message in [
        (["--warmup-epochs", "8"], "warmup_epochs 8 is longer than the run's 6 epochs, so the rate "
                                   "would never reach lr 0.1; give at most 6"),
        (["--nesterov", "--optimizer", "adam"], "nesterov momentum belongs to the sgd optimizer, "
                                                 "not adam"),
        (["--nesterov", "--momentum", "0"], "nesterov momentum needs momentum > 0, got momentum 0"),
    ]:
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path, *argv)
        assert code == 1 and err == [f"train.py: error: {message}"]
    config = train.config_from_args(train.build_parser().parse_args(["--nesterov"]))
    assert config.nesterov and config.lr == 0.1
    config = train.config_from_args(train.build_parser().parse_args(["--optimizer", "adamw"]))
    assert config.lr == 1e-3 and config.lr_is_default


def test_extending_a_run_is_refused_unless_the_schedule_is_given(capsys, tmp_path):
    ckpt = synthetic_checkpoint(tmp_path / "run.npz")
    before = ckpt.read_bytes()
    code, out, err = run(capsys, "--resume", ckpt, "--epochs", "4", "--save", ckpt,
                         "--data-dir", fake_data_folder(tmp_path))
    assert code == 1 and len(err) == 1 and ckpt.read_bytes() == before
    assert f"checkpoint {ckpt} was scheduled (cosine) over 1 epoch, and --epochs 4 would restart " \
           "that schedule mid-way; give --schedule-epochs 4 to stretch it" in err[0]


# --- real runs: failed runs, signals, full disks, what the metrics say ----------------------------

FAST = ["--device", "cpu", "--hidden", "16", "--val-size", "55000", "--no-progress"]


def test_a_finitely_diverged_run_warns_once_and_exits_3(capsys, tmp_path, mnist_dir):
    metrics = tmp_path / "m.json"
    code, out, err = run(capsys, *FAST, "--data-dir", mnist_dir, "--epochs", "1", "--lr", "5",
                         "--metrics-json", metrics)
    assert code == train.FAILED_RUN and len(err) == 1
    assert err[0].startswith("warning: epoch 1 looks failed: validation accuracy ")
    assert "; the run looks failed (validation accuracy" in out.splitlines()[-1]
    assert json.loads(metrics.read_text())["failed_epochs"] == [1]


def test_the_evaluation_batch_changes_memory_not_results(capsys, tmp_path, mnist_dir):
    results = []
    for extra in ([], ["--eval-batch-size", "333"]):
        metrics = tmp_path / f"m{len(extra)}.json"
        code, out, err = run(capsys, "--device", "cpu", "--hidden", "16", "--val-size", "5000",
                             "--no-progress", "--data-dir", mnist_dir, "--epochs", "1",
                             "--metrics-json", metrics, *extra)
        assert code == 0, err
        results.append(json.loads(metrics.read_text()))
    assert results[1]["config"]["eval_batch_size"] == 333
    for key in ("test_accuracy", "test_loss"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-6)
    assert results[1]["history"][0]["val_loss"] == pytest.approx(results[0]["history"][0]["val_loss"],
                                                                 rel=1e-6)


def test_memory_past_the_machine_is_one_line(capsys, tmp_path, mnist_dir, monkeypatch):
    from gpunet import trainer
    monkeypatch.setattr(trainer, "_available_memory", lambda: 16 * 2 ** 30)
    code, out, err = run(capsys, *FAST, "--data-dir", mnist_dir, "--hidden", "10000000")
    assert code == 1 and len(err) == 1
    assert err[0].startswith("train.py: error: --hidden 10000000 with --batch-size 128 needs about ")
    assert err[0].endswith("more than the 16.0 GiB this machine has available; give a smaller "
                           "--hidden, --batch-size or --eval-batch-size")


def test_a_full_disk_names_the_path(capsys, tmp_path, mnist_dir, monkeypatch):
    from gpunet import checkpoint

    def no_space(f, **arrays):
        f.write(b"PK" + bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.np, "savez", no_space)
    ckpt = tmp_path / "c.npz"
    code, out, err = run(capsys, *FAST, "--data-dir", mnist_dir, "--epochs", "1", "--save", ckpt)
    assert code == 1 and err == [f"train.py: error: cannot write {ckpt}: No space left on device "
                                 f"({ckpt} was not created)"]
    assert os.listdir(tmp_path) == []


def test_sigterm_cleans_up_and_says_what_was_saved(tmp_path, mnist_dir):
    ckpt = tmp_path / "c.npz"
    proc = subprocess.Popen([sys.executable, str(PROJECT / "train.py"), *FAST, "--data-dir",
                             str(mnist_dir), "--epochs", "100", "--schedule", "constant",
                             "--save", str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/100"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == train.TERMINATED
    lines = err.splitlines()
    assert len(lines) == 1, lines
    # In an epoch, after one, or while saving one (which then leaves the previous file whole).
    match = re.fullmatch(rf"train.py: terminated \(SIGTERM\) (during epoch|after epoch|while "
                         rf"saving the checkpoint of epoch) (\d+)( of 100)?; the last good "
                         rf"checkpoint {re.escape(str(ckpt))} \(epoch (\d+)\) is kept", lines[0])
    assert match, lines[0]
    where, epoch, saved = match[1], int(match[2]), int(match[4])
    assert saved == epoch - 1 if where != "after epoch" else saved in (epoch - 1, epoch)
    assert saved >= 1
    assert json.loads(str(np.load(ckpt)["meta"]))["epoch"] == saved
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary file left behind


def test_output_into_a_closed_pipe(tmp_path, mnist_dir):
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, str(PROJECT / "train.py"), *FAST, "--data-dir",
                               str(mnist_dir), "--epochs", "1"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == train.BROKEN_PIPE
    assert proc.stderr == ("train.py: stdout was closed (broken pipe) before the first epoch; "
                           "nothing was saved (no --save was given)\n")


def test_metrics_name_the_data_folder_and_count_resumed_time(capsys, tmp_path, mnist_dir,
                                                              monkeypatch):
    monkeypatch.setenv("GPUNET_DATA", str(mnist_dir))
    ckpt, m1, m2 = tmp_path / "c.npz", tmp_path / "m1.json", tmp_path / "m2.json"
    code, out, err = run(capsys, *FAST, "--epochs", "1", "--schedule-epochs", "2", "--save", ckpt,
                         "--metrics-json", m1)
    assert code == 0, err
    assert "after 1 epoch, " in out
    first = json.loads(m1.read_text())
    assert first["config"]["data_dir"] == str(mnist_dir)
    code, out, err = run(capsys, "--resume", ckpt, "--epochs", "2", "--save", ckpt,
                         "--metrics-json", m2, "--no-progress")
    assert code == 0, err
    second = json.loads(m2.read_text())
    assert second["train_seconds"] <= second["total_seconds"]
    assert second["total_seconds"] >= first["total_seconds"]
    assert json.loads(str(np.load(ckpt)["meta"]))["epoch"] == 2  # updated in place


def test_help_names_the_nesterov_flag_and_the_exit_statuses(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "--nesterov            Nesterov momentum for SGD" in out
    assert "SGD momentum (default 0.9)" in out and "--schedule-epochs" in out
    assert "3 done but" in out and "143 SIGTERM" in out


def test_ctrl_c_says_what_the_checkpoint_holds(capsys, tmp_path, mnist_dir, monkeypatch):
    from gpunet.trainer import Trainer
    real = Trainer.train_epoch

    def interrupted_in_epoch_2(self, progress=None):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_in_epoch_2)
    ckpt = tmp_path / "c.npz"
    code, out, err = run(capsys, *FAST, "--data-dir", mnist_dir, "--epochs", "3", "--save", ckpt)
    assert code == train.INTERRUPTED
    assert err == [f"train.py: interrupted during epoch 2 of 3; the last good checkpoint {ckpt} "
                   "(epoch 1) is kept"]
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


@pytest.mark.parametrize("stdout", ["file", "pipe"])
def test_metrics_onto_dev_stdout_is_refused_and_the_log_kept(tmp_path, stdout):
    """``--metrics-json /dev/stdout > log``: replacing the log with the JSON would lose the log
    (and the link /dev/stdout must never be replaced); into a pipe it is a fifo, refused too."""
    log = tmp_path / "log"
    log.write_text("earlier lines\n")
    argv = [sys.executable, str(PROJECT / "train.py"), "--device", "cpu", "--data-dir",
            str(tmp_path / "none"), "--metrics-json", "/dev/stdout"]
    if stdout == "file":
        with open(log, "a") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True)
        expected = "--metrics-json /dev/stdout is this process's standard output; replacing it " \
                   "would lose what is written there, give another path"
    else:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        expected = "is a fifo, not a regular file"
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert expected in proc.stderr
    assert log.read_text() == "earlier lines\n" and os.path.islink("/dev/stdout")


def test_a_pipe_closed_at_the_last_line_still_gets_the_metrics(tmp_path, mnist_dir):
    """``train.py ... | head -2``: the reader leaves before the final line; the metrics are on disk."""
    metrics = tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, str(PROJECT / "train.py"), *FAST, "--data-dir",
                             str(mnist_dir), "--epochs", "1", "--metrics-json", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert lines[1].startswith("epoch 1/1 ")
    assert json.loads(metrics.read_text())["epochs"] == 1
    assert proc.returncode in (0, train.BROKEN_PIPE) and "Traceback" not in err
    if proc.returncode:
        assert err == ("train.py: stdout was closed (broken pipe) after epoch 1 of 1; nothing was "
                       "saved (no --save was given)\n")


# --- datasets and models ------------------------------------------------------------------------

def image_folder(folder, n=250, n_test=50, seed=0):
    """IDX files of 28x28 images whose class is where a bright square is, too few to be any
    published dataset (so they load only with --no-verify-data)."""
    import struct
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n + n_test).astype(np.uint8)
    x = rng.integers(0, 60, (n + n_test, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        row, col = divmod(int(k), 4)
        x[i, 2 + 9 * row:7 + 9 * row, 2 + 6 * col:7 + 6 * col] = 220
    folder.mkdir()
    for split, rows in (("train", slice(0, n)), ("t10k", slice(n, n + n_test))):
        images, labels = x[rows], y[rows]
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">II", 2049, len(labels)) + labels.tobytes()))
    return folder


def test_mlp_settings_and_mixed_precision_with_the_cnn_are_one_line(capsys, tmp_path):
    for argv, message in [
        (["--hidden", "256"], "--hidden belongs to --model mlp; --model cnn is gpunet.conv.small_cnn, "
                              "whose layers are fixed: drop --hidden"),
        (["--hidden", "256", "--activation", "tanh"], "--hidden and --activation belong to --model "
                                                      "mlp"),
        (["--dtype", "float16"], "dtype float16 with model 'cnn': Conv2d computes in the dtype of "
                                 "its parameters and has no mixed precision"),
    ]:
        code, out, err = run(capsys, "--device", "cpu", "--data-dir", tmp_path, "--model", "cnn", *argv)
        assert code == 1 and len(err) == 1 and err[0].startswith("train.py: error: "), err
        assert message in err[0] and out == ""
    code, out, err = run(capsys, "--model", "resnet")
    assert code == 2 and len(err) == 1 and "argument --model: invalid choice: 'resnet'" in err[0]


def test_a_cnn_run_resumes_like_a_straight_one_and_keeps_its_model(capsys, tmp_path):
    data = image_folder(tmp_path / "images")
    common = ["--device", "cpu", "--model", "cnn", "--data-dir", data, "--val-size", "50",
              "--batch-size", "50", "--no-progress", "--schedule-epochs", "2"]
    ckpt, m1, m2, m = (tmp_path / name for name in ("c.npz", "m1.json", "m2.json", "m.json"))
    code, out, err = run(capsys, *common[:-2], "--epochs", "1")
    assert code == 1 and len(err) == 1 and "the published MNIST train-images-idx3-ubyte has 60000" in err[0]

    code, out, err = run(capsys, *common, "--no-verify-data", "--epochs", "1", "--save", ckpt,
                         "--metrics-json", m1)
    assert code == 0, err
    assert out.startswith("device cpu | dataset mnist | model cnn 1x28x28-conv32-pool-conv64-pool-"
                          "128-10 dropout 0.25 | sgd lr 0.1")
    first = json.loads(m1.read_text())
    assert (first["dataset"], first["model"], first["config"]["hidden"]) == ("mnist", "cnn", None)

    # The resumed run is a cnn without --model, and the permission to use unverified data is not
    # inherited: it is given again.
    code, out, err = run(capsys, "--resume", ckpt, "--epochs", "2", "--data-dir", data,
                         "--no-progress", "--metrics-json", m2)
    assert code == 1 and "the published MNIST train-images-idx3-ubyte has 60000" in err[0]
    code, out, err = run(capsys, "--resume", ckpt, "--epochs", "2", "--data-dir", data,
                         "--no-progress", "--no-verify-data", "--metrics-json", m2)
    assert code == 0, err
    code, out, err = run(capsys, *common, "--no-verify-data", "--epochs", "2", "--metrics-json", m)
    assert code == 0, err
    resumed, straight = json.loads(m2.read_text()), json.loads(m.read_text())
    assert resumed["model"] == "cnn" and resumed["test_loss"] == straight["test_loss"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]

    before = ckpt.read_bytes()
    for argv, message in [
        (["--hidden", "64"], f"checkpoint {ckpt} holds --model cnn trained on --dataset mnist, which "
                             "takes no --hidden, and --hidden 64 was asked; drop --hidden to resume it"),
        (["--model", "mlp"], f"checkpoint {ckpt} holds --model cnn trained on --dataset mnist, and "
                             "--model mlp was asked; a resumed run keeps the model and the data it "
                             "was saved with: drop --model to resume it, or start a new run"),
        (["--dataset", "fashion-mnist"], "and --dataset fashion-mnist was asked; a resumed run keeps"),
    ]:
        code, out, err = run(capsys, "--resume", ckpt, "--save", ckpt, "--epochs", "2",
                             "--data-dir", data, "--no-verify-data", *argv)
        assert code == 1 and len(err) == 1 and message in err[0], err
        assert out == "" and ckpt.read_bytes() == before


def test_a_model_flag_against_an_mlp_checkpoint_is_one_line(capsys, tmp_path):
    ckpt = synthetic_checkpoint(tmp_path / "run.npz")
    code, out, err = run(capsys, "--resume", ckpt, "--model", "cnn", "--data-dir",
                         fake_data_folder(tmp_path))
    assert code == 1 and err == [f"train.py: error: checkpoint {ckpt} holds --model mlp (--hidden 8, "
                                 "--activation relu) trained on --dataset mnist, and --model cnn was "
                                 "asked; a resumed run keeps the model and the data it was saved "
                                 "with: drop --model to resume it, or start a new run without --resume"]


def test_fashion_mnist_from_the_shared_data_folder(capsys, tmp_path, fashion_dir, mnist_dir):
    metrics = tmp_path / "m.json"
    code, out, err = run(capsys, *FAST, "--dataset", "fashion-mnist", "--data-dir", fashion_dir.parent,
                         "--epochs", "1", "--metrics-json", metrics)
    assert code == 0, err
    assert out.startswith("device cpu | dataset fashion-mnist | model mlp 784-16-10 relu |")
    result = json.loads(metrics.read_text())
    assert result["dataset"] == "fashion-mnist" and result["config"]["data_dir"] == str(fashion_dir)
    assert result["test_accuracy"] > 0.6
    for argv, held in [(["--dataset", "fashion-mnist", "--data-dir", mnist_dir], "MNIST"),
                       (["--dataset", "kmnist", "--data-dir", fashion_dir], "Fashion-MNIST"),
                       (["--data-dir", fashion_dir, "--no-verify-data"], "Fashion-MNIST")]:
        code, out, err = run(capsys, *FAST, "--epochs", "1", *argv)
        assert code == 1 and len(err) == 1, err
        assert f"train-images-idx3-ubyte.gz: this is {held}'s train-images-idx3-ubyte (its " \
               "checksum is the published one)" in err[0]


def test_kmnist_that_cannot_be_verified_is_one_line(capsys, tmp_path, monkeypatch):
    from gpunet import datasets
    data = image_folder(tmp_path / "kmnist")
    for name in datasets.FILES:  # the published sizes, as if these were full-size files
        with gzip.open(data / f"{name}.gz") as f:
            monkeypatch.setitem(datasets.SIZES, name, len(f.read()))
    code, out, err = run(capsys, *FAST, "--dataset", "kmnist", "--data-dir", data, "--epochs", "1",
                         "--val-size", "50")
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"train.py: error: {data / 'train-images-idx3-ubyte.gz'}: the MD5 of "
                             "this .gz file is ")
    assert "a raw or recompressed copy cannot be verified" in err[0]
    assert err[0].endswith("load it unverified with verify=False (train.py: --no-verify-data).")
    code, out, err = run(capsys, *FAST, "--dataset", "kmnist", "--data-dir", data, "--epochs", "1",
                         "--val-size", "50", "--no-verify-data")
    assert code in (0, train.FAILED_RUN) and out.startswith("device cpu | dataset kmnist |"), err
