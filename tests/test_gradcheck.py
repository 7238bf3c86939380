"""gpunet.gradcheck: the checker itself, and its command line."""

import subprocess
import sys

import numpy as np
import pytest

from gpunet import gradcheck, layers as L


def test_numerical_gradient_of_a_known_function(rng):
    x = rng.standard_normal(5)
    np.testing.assert_allclose(gradcheck.numerical_gradient(lambda: (x ** 3).sum(), x), 3 * x ** 2,
                               rtol=1e-8, atol=1e-9)


def test_a_wrong_backward_is_caught(rng):
    class WrongSoftmax(L.Softmax):
        def backward(self, dy, input_grad=True):
            s = self._saved("s")
            return s * (1 - s) * dy  # the diagonal of the Jacobian only

    x = rng.standard_normal((4, 5))
    assert gradcheck.check_layer(WrongSoftmax(), x, rng=rng)["input"] > 0.1
    assert gradcheck.check_layer(L.Softmax(), x, rng=rng)["input"] < 1e-8


def test_relative_error():
    assert gradcheck.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert gradcheck.relative_error(np.ones(3), -np.ones(3)) == 1.0


def test_float32_check_warns(rng):
    with pytest.warns(UserWarning, match="gradient checking in float32"):
        gradcheck.check_layer(L.Tanh(), rng.standard_normal((2, 3)).astype(np.float32), eps=1e-3)


def test_cli_checks_everything_below_tolerance():
    out = subprocess.run([sys.executable, "-m", "gpunet.gradcheck", "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].startswith(f"{len(lines) - 3} of {len(lines) - 3} below 1e-06")
    for name in ("Dense", "ReLU", "Sigmoid", "Tanh", "Softmax", "SoftmaxCrossEntropy",
                 "CrossEntropy", "MSELoss"):
        assert any(line.startswith(name) for line in lines)


def test_cli_warns_for_float32_and_rejects_bad_device():
    out = subprocess.run([sys.executable, "-m", "gpunet.gradcheck", "--dtype", "float32"],
                         capture_output=True, text=True)
    assert "warning: checking in float32" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "gpunet.gradcheck", "--device", "tpu"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("python -m gpunet.gradcheck: error: device must be")


def test_standard_cases_write_no_device_array_into_a_host_module(monkeypatch):
    """On a GPU, a numpy parameter assigned a cupy array raises TypeError (CuPy 14's
    ndarray.__array__ refuses implicit conversion): every value written into a module must be
    written before layer() moves it, on the host. Here what to_device returns is tagged, and
    the parameters' arrays refuse a tagged value as cupy would."""
    class Moved(np.ndarray):
        pass

    class Host(np.ndarray):
        def __setitem__(self, key, value):
            if isinstance(value, Moved):
                raise TypeError("a moved (device) array written into a host array")
            super().__setitem__(key, value)

    real_to_device, real_init = gradcheck.to_device, L.Parameter.__init__
    monkeypatch.setattr(gradcheck, "to_device",
                        lambda a, device: np.asarray(real_to_device(a, device)).view(Moved))
    monkeypatch.setattr(L.Parameter, "__init__", lambda self, data: real_init(
        self, data.view(Host) if type(data) is np.ndarray else data))
    cases = gradcheck.standard_cases(np.random.default_rng(0), np.float64, "cpu")
    assert any(name.startswith("BatchNorm") for name, _, _ in cases)


@pytest.mark.cuda
def test_cli_on_the_gpu():
    out = subprocess.run([sys.executable, "-m", "gpunet.gradcheck", "--device", "cuda"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_rejects_a_negative_seed_in_one_line():
    out = subprocess.run([sys.executable, "-m", "gpunet.gradcheck", "--seed", "-1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("python -m gpunet.gradcheck: error: argument --seed: expected an "
                          "integer >= 0, got '-1'\n")


def test_cli_into_a_closed_pipe_is_quiet():
    """``python -m gpunet.gradcheck | head -1``, with the reader gone before anything is written."""
    import os
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run([sys.executable, "-m", "gpunet.gradcheck"], stdout=write,
                             stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert out.stderr == "" and out.returncode == 141
