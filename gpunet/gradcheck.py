"""Gradient checking: analytic gradients against central differences, in float64.

The scalar checked is ``sum(g * f(x))`` with a *random* upstream gradient ``g``. An upstream of
all ones would hide bugs: softmax's vector-Jacobian product with a constant vector is zero, so a
wrong softmax backward would pass. The error reported is ``|a - n| / (|a| + |n|)`` in the 2-norm
over each input or parameter, a single number near 1e-10 for a correct float64 gradient.

Run ``python -m gpunet.gradcheck --device cpu`` to check every layer and loss and print a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from . import conv as C
from . import layers as L
from . import losses as Lo
from . import norm as N
from .dropout import Dropout
from .backend import DeviceError, get_array_module, get_device, to_device, to_numpy

TOLERANCE = 1e-6
# In float32 a step of 1e-6 drowns in rounding (float32 keeps 7 digits); 1e-3 balances rounding
# against truncation, and still only errors of about 1e-3 can be resolved.
FLOAT32_STEP, FLOAT32_TOLERANCE = 1e-3, 1e-2


def relative_error(analytic, numeric) -> float:
    """||a - n|| / (||a|| + ||n||), and 0 when both are 0."""
    a, n = to_numpy(analytic).astype(np.float64), to_numpy(numeric).astype(np.float64)
    scale = np.linalg.norm(a) + np.linalg.norm(n)
    return float(np.linalg.norm(a - n) / scale) if scale > 0 else 0.0


def numerical_gradient(f, x, eps: float = 1e-6):
    """d f / d x by central differences, perturbing ``x`` in place one element at a time."""
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient perturbs x in place and needs it C-contiguous")
    xp = get_array_module(x)
    grad = xp.zeros(x.shape, dtype=np.float64)
    flat, grad_flat = x.reshape(-1), grad.reshape(-1)  # views, so writes to flat move x
    for i in range(flat.size):
        old = flat[i].copy()
        flat[i] = old + eps
        plus = float(f())
        flat[i] = old - eps
        minus = float(f())
        flat[i] = old
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def _warn_if_low_precision(dtype) -> None:
    if np.dtype(dtype) != np.float64:
        warnings.warn(f"gradient checking in {np.dtype(dtype)}: central differences need float64 "
                      "to resolve errors near 1e-6; expect large relative errors", stacklevel=3)


def check_layer(layer: L.Module, x, *, rng: np.random.Generator | None = None,
                eps: float = 1e-6) -> dict[str, float]:
    """Relative error of ``layer``'s backward for input ``x`` and each parameter, by name."""
    _warn_if_low_precision(x.dtype)
    rng = np.random.default_rng(0) if rng is None else rng
    xp = get_array_module(x)
    layer.train()
    x = x.copy()
    y = layer.forward(x)
    g = xp.asarray(rng.standard_normal(y.shape)).astype(y.dtype)

    def objective():
        return (layer.forward(x) * g).sum()

    layer.forward(x)
    dx = layer.backward(g)
    errors = {"input": relative_error(dx, numerical_gradient(objective, x, eps))}
    for name, p in layer.named_parameters():
        analytic = p.grad.copy()
        errors[name] = relative_error(analytic, numerical_gradient(objective, p.data, eps))
    return errors


def check_loss(loss: Lo.Loss, pred, target, *, rng: np.random.Generator | None = None,
               eps: float = 1e-6) -> dict[str, float]:
    """Relative error of ``loss.backward`` with a random upstream gradient."""
    _warn_if_low_precision(pred.dtype)
    rng = np.random.default_rng(0) if rng is None else rng
    xp = get_array_module(pred)
    pred = pred.copy()
    out = loss.forward(pred, target)
    g = xp.asarray(rng.standard_normal(out.shape)).astype(out.dtype)

    def objective():
        return (loss.forward(pred, target) * g).sum()

    loss.forward(pred, target)
    analytic = loss.backward(g)
    return {"input": relative_error(analytic, numerical_gradient(objective, pred, eps))}


class SameMask(L.Module):
    """A Dropout whose counter is rewound before every forward: the same mask on every call,
    as central differences need (the mask is a function of seed and counter only)."""

    def __init__(self, p: float, seed: int):
        self.dropout = Dropout(p, counter_based=True, seed=seed)

    def forward(self, x):
        self.dropout.counter[...] = 0
        return self.dropout.forward(x)

    def backward(self, dy, input_grad: bool = True):
        return self.dropout.backward(dy, input_grad)

    def __repr__(self) -> str:
        return f"SameMask({self.dropout!r})"


def standard_cases(rng: np.random.Generator, dtype=np.float64, device="cpu"):
    """Every layer and loss gpunet ships, each with a small random input on ``device``.

    Returns (name, kind, args): kind "layer" with args (layer, x), or "loss" with
    args (loss, pred, target).
    """
    n, c = 6, 5

    def on(a):
        return to_device(a, device)

    def randn(*shape):
        return on(rng.standard_normal(shape).astype(dtype))

    def away_from_zero(*shape):  # ReLU has a kink at 0 that central differences would straddle
        x = rng.standard_normal(shape)
        return on((np.sign(x) * (0.1 + np.abs(x))).astype(dtype))

    def layer(module):
        return module.to(device)

    labels = rng.integers(0, c, n)
    ignored = labels.copy()
    ignored[1] = -100
    labels, ignored = on(labels), on(ignored)
    probability_target = on(rng.dirichlet(np.ones(c), n).astype(dtype))
    weight = on(rng.uniform(0.5, 2.0, c).astype(dtype))
    probs = L.Softmax().eval().forward(0.5 * randn(n, c))  # no probability near 0

    def distinct(*shape):  # well apart, so that no max-pooling window has a near tie
        return on((rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1).astype(dtype))

    def batch_norm(module):  # a random affine part, so that its gradient is checked too
        # written on the host, where the module still is: layer() moves it afterwards (a numpy
        # array cannot take a cupy one, which refuses to be converted implicitly)
        module.weight.data[...] = rng.uniform(0.5, 1.5, module.num_features).astype(dtype)
        module.bias.data[...] = rng.standard_normal(module.num_features).astype(dtype)
        return module

    def conv(*args, **kwargs):
        return layer(C.Conv2d(*args, dtype=dtype, rng=rng, **kwargs))

    tiny_cnn = L.Sequential(C.Conv2d(1, 2, 3, padding=1, activation="relu", dtype=dtype, rng=rng),
                            C.MaxPool2d(2), C.Conv2d(2, 3, 3, stride=2, dtype=dtype, rng=rng),
                            C.Flatten(), L.Dense(3, 4, dtype=dtype, rng=rng))
    return [
        ("Dense(7, 4)", "layer", (layer(L.Dense(7, 4, dtype=dtype, rng=rng)), randn(n, 7))),
        ("Dense(7, 4, xavier)", "layer",
         (layer(L.Dense(7, 4, init="xavier", dtype=dtype, rng=rng)), randn(n, 7))),
        ("ReLU", "layer", (L.ReLU(), away_from_zero(n, c))),
        ("Sigmoid", "layer", (L.Sigmoid(), randn(n, c))),
        ("Tanh", "layer", (L.Tanh(), randn(n, c))),
        ("Softmax", "layer", (L.Softmax(), randn(n, c))),
        ("Softmax(axis=0)", "layer", (L.Softmax(axis=0), randn(n, c))),
        ("mlp 7-8-8-5 relu", "layer", (layer(L.mlp([7, 8, 8, 5], dtype=dtype, rng=rng)), randn(n, 7))),
        ("mlp 7-8-5 tanh", "layer", (layer(L.mlp([7, 8, 5], "tanh", dtype=dtype, rng=rng)), randn(n, 7))),
        ("LeakyReLU", "layer", (L.LeakyReLU(), away_from_zero(n, c))),
        ("LeakyReLU(-0.5)", "layer", (L.LeakyReLU(-0.5), away_from_zero(n, c))),
        ("GELU", "layer", (L.GELU(), 2 * randn(n, c))),
        ("GELU(tanh)", "layer", (L.GELU(approximate="tanh"), 2 * randn(n, c))),
        ("Conv2d(2, 3, 3, stride=2, padding=1)", "layer",
         (conv(2, 3, 3, stride=2, padding=1), randn(2, 2, 7, 6))),
        ("Conv2d(3, 2, 5, padding=2) batch 1", "layer", (conv(3, 2, 5, padding=2), randn(1, 3, 6, 9))),
        ("Conv2d(2, 3, (3, 5), stride=(2, 1))", "layer",
         (conv(2, 3, (3, 5), stride=(2, 1), padding=(1, 0)), randn(2, 2, 5, 8))),
        ("Conv2d(2, 2, 3, bias=False, relu)", "layer",
         (conv(2, 2, 3, bias=False, activation="relu"), randn(2, 2, 5, 4))),
        ("MaxPool2d(2)", "layer", (C.MaxPool2d(2), distinct(2, 3, 6, 5))),
        ("MaxPool2d(3, stride=2) batch 1", "layer", (C.MaxPool2d(3, 2), distinct(1, 2, 7, 8))),
        ("AvgPool2d(2)", "layer", (C.AvgPool2d(2), randn(2, 3, 5, 6))),
        ("AvgPool2d((3, 2), stride=1)", "layer", (C.AvgPool2d((3, 2), 1), randn(1, 2, 5, 4))),
        ("Flatten", "layer", (C.Flatten(), randn(2, 3, 2, 2))),
        ("BatchNorm1d(4)", "layer", (layer(batch_norm(N.BatchNorm1d(4, dtype=dtype))), randn(n, 4))),
        ("BatchNorm1d(3) (N, C, L)", "layer",
         (layer(batch_norm(N.BatchNorm1d(3, dtype=dtype))), randn(2, 3, 5))),
        ("BatchNorm2d(3) batch 1", "layer",
         (layer(batch_norm(N.BatchNorm2d(3, dtype=dtype))), randn(1, 3, 5, 4))),
        ("Dropout(0.4)", "layer", (layer(SameMask(0.4, seed=int(rng.integers(2 ** 32)))), randn(n, c))),
        ("CNN conv-pool-conv-flatten-dense", "layer", (layer(tiny_cnn), randn(2, 1, 6, 6))),
        ("SoftmaxCrossEntropy", "loss", (Lo.SoftmaxCrossEntropy(), randn(n, c), labels)),
        ("SoftmaxCrossEntropy sum", "loss",
         (Lo.SoftmaxCrossEntropy(reduction="sum"), randn(n, c), labels)),
        ("SoftmaxCrossEntropy none", "loss",
         (Lo.SoftmaxCrossEntropy(reduction="none"), randn(n, c), labels)),
        ("SoftmaxCrossEntropy weight+smooth+ignore", "loss",
         (Lo.SoftmaxCrossEntropy(weight=weight, label_smoothing=0.1), randn(n, c), ignored)),
        ("SoftmaxCrossEntropy probabilities", "loss",
         (Lo.SoftmaxCrossEntropy(label_smoothing=0.05), randn(n, c), probability_target)),
        ("CrossEntropy", "loss", (Lo.CrossEntropy(), probs, labels)),
        ("CrossEntropy weight+smooth+ignore", "loss",
         (Lo.CrossEntropy(weight=weight, label_smoothing=0.1), probs, ignored)),
        ("MSELoss", "loss", (Lo.MSELoss(), randn(n, c), randn(n, c))),
        ("MSELoss none", "loss", (Lo.MSELoss(reduction="none"), randn(n, c), randn(n, c))),
    ]


def run_all(device="cpu", dtype=np.float64, seed: int = 0) -> list[tuple[str, str, float]]:
    """(case, input or parameter, relative error) for every standard case, on ``device``."""
    device = get_device(device)
    rng = np.random.default_rng(seed)
    rows = []
    eps = 1e-6 if np.dtype(dtype) == np.float64 else FLOAT32_STEP
    with device.scope():
        for name, kind, args in standard_cases(rng, dtype, device):
            check = check_layer if kind == "layer" else check_loss
            errors = check(*args, rng=rng, eps=eps)
            rows.extend((name, which, err) for which, err in errors.items())
    return rows


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage plus a message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = _Parser(prog="python -m gpunet.gradcheck",
                     description="Check every gpunet layer and loss against central differences.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--seed", type=_seed, default=0, help="an integer >= 0 (default 0)")
    args = parser.parse_args(argv)
    try:
        device = get_device(args.device)
    except (DeviceError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _report(device, np.dtype(args.dtype), args.seed)
    except BrokenPipeError:
        # The reader went away (``| head``): that is not an error of the check. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail a second time, and exit
        # as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13


def _report(device, dtype, seed: int) -> int:
    tolerance = TOLERANCE if dtype == np.float64 else FLOAT32_TOLERANCE
    if dtype != np.float64:
        print(f"warning: checking in {dtype}: central differences cannot resolve errors near 1e-6 "
              f"in single precision; using step {FLOAT32_STEP:g} and tolerance {tolerance:g}. "
              "Use float64 (the default) for a real check.", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run_all(device, dtype, seed)
    width = max(len(name) for name, _, _ in rows)
    print(f"gradient check on {device.describe()}, {dtype}, tolerance {tolerance:g}")
    print(f"{'case':<{width}}  {'wrt':<8}  {'rel. error':>10}  ok")
    failed = 0
    for name, which, err in rows:
        ok = err < tolerance
        failed += not ok
        print(f"{name:<{width}}  {which:<8}  {err:>10.2e}  {'yes' if ok else 'NO'}")
    print(f"{len(rows) - failed} of {len(rows)} below {tolerance:g}")
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
