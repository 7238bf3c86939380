"""train.py: the command line, its one-line errors, and a real run with checkpoints and metrics."""

import gzip
import importlib.util
import json
import shutil

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
    assert code == 1 and len(err) == 1 and "not a readable gpunet checkpoint" in err[0]


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
    assert "'0.weight' has shape (784, 16) but the model's is (784, 32)" in err[0]
    assert np.load(ckpt)["model/0.weight"].shape == (784, 16)  # the checkpoint is intact
