"""gpunet.kernels.cpu: the compiled CPU kernels against the NumPy formulas they replace.

Every test that takes the ``device`` fixture already runs on both CPU paths (see conftest.py);
these tests add what only the kernels have: their own argument checks, the SGD kernel (which
the optimizer takes only where numpy's OpenBLAS is unreachable), NaN handling and the switch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from gpunet import optim
from gpunet.kernels import blas, cpu as cpu_kernels
from gpunet import functional as F
from gpunet import layers as L

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"the compiled CPU kernels are not loaded: "
                                        f"{cpu_kernels.DESCRIPTION}")


def test_ci_builds_the_kernels():
    """CI sets GPUNET_REQUIRE_CPU_KERNELS=1, so a build that silently fell back fails there."""
    if os.environ.get("GPUNET_REQUIRE_CPU_KERNELS") != "1":
        pytest.skip("GPUNET_REQUIRE_CPU_KERNELS is not set (CI sets it)")
    assert cpu_kernels.available(), cpu_kernels.DESCRIPTION


def test_switching_off_by_environment():
    code = "from gpunet.kernels import cpu as c; print(c.available(), c.DESCRIPTION)"
    env = dict(os.environ, GPUNET_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("False numpy fallback (GPUNET_CPU_KERNELS=0)")


def numpy_path(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_lib", None)


# --- Dense + ReLU ----------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 256), (1, 1), (0, 5), (3, 1000)])
def test_bias_relu_is_exact(rng, dtype, shape):
    y = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype)
    want = np.maximum(y + b, 0)
    got = y.copy()
    assert cpu_kernels.bias_relu_fits(got, b)
    assert F.bias_relu_(got, b) is got
    np.testing.assert_array_equal(got, want)


@needs_kernels
def test_bias_relu_keeps_nan_like_numpy():
    y = np.array([[np.nan, -1.0, 2.0, -np.inf, np.inf]], np.float32)
    b = np.zeros(5, np.float32)
    got = F.bias_relu_(y.copy(), b)
    np.testing.assert_array_equal(got, np.maximum(y, 0))


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 256), (1, 3), (0, 4), (300, 1)])
@pytest.mark.parametrize("with_bias_grad", [True, False])
def test_relu_backward_matches_numpy(monkeypatch, rng, dtype, shape, with_bias_grad):
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    db = np.full(shape[1], np.nan, dtype) if with_bias_grad else None
    got = F.relu_backward(dy, y, bias_grad=db)
    assert got is not dy and got.dtype == dtype
    numpy_path(monkeypatch)
    db_ref = np.empty(shape[1], dtype) if with_bias_grad else None
    want = F.relu_backward(dy, y, bias_grad=db_ref)
    np.testing.assert_array_equal(got, want)
    if with_bias_grad:
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(db, db_ref, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_adds_the_bias_gradient_into_beta_times_the_old(monkeypatch, rng, dtype):
    """beta != 0 (Parameter.grad_decay): the rows are summed first, then added to beta * old."""
    dy = rng.standard_normal((64, 9)).astype(dtype)
    y = np.maximum(rng.standard_normal((64, 9)), 0).astype(dtype)
    old = rng.standard_normal(9).astype(dtype)
    db = old.copy()
    got = F.relu_backward(dy, y, bias_grad=db, beta=0.9)
    numpy_path(monkeypatch)
    db_ref = old.copy()
    np.testing.assert_array_equal(got, F.relu_backward(dy, y, bias_grad=db_ref, beta=0.9))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(db, db_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, got.sum(axis=0) + 0.9 * old, rtol=tol, atol=tol)


needs_gemm = pytest.mark.skipif(not cpu_kernels.gemm_available(np.zeros(1, np.float32)),
                                reason="no BLAS gemm reachable from the compiled kernels: "
                                       f"{cpu_kernels.DESCRIPTION}; {blas.DESCRIPTION}")


@needs_gemm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["a b", "a.T b", "a b.T", "a.T b.T"])
@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0, -2.5])
def test_gemm_adds_the_product_into_beta_times_out(rng, dtype, layout, beta):
    m, k, n = 37, 19, 23
    a = rng.standard_normal((k, m) if "a.T" in layout else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if "b.T" in layout else (k, n)).astype(dtype)
    a, b = (a.T if "a.T" in layout else a), (b.T if "b.T" in layout else b)
    old = rng.standard_normal((m, n)).astype(dtype)
    out = old.copy() if beta else np.full((m, n), np.nan, dtype)  # beta 0 ignores old values
    assert cpu_kernels.gemm(a, b, beta, out) is True
    want = a.astype(np.float64) @ b.astype(np.float64) + (beta * old if beta else 0)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


@needs_gemm
@pytest.mark.parametrize("case", ["k = 0", "strided a", "out overlaps a", "read-only out",
                                  "F-ordered out", "float16", "mixed dtypes", "list"])
def test_gemm_declines_what_blas_cannot_take_and_matmul_still_answers(rng, case):
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((3, 5)).astype(np.float32)
    out = rng.standard_normal((4, 5)).astype(np.float32)
    if case == "k = 0":
        a, b = a[:, :0].copy(), b[:0].copy()
    elif case == "strided a":
        a = rng.standard_normal((4, 6)).astype(np.float32)[:, ::2]
    elif case == "out overlaps a":
        a = rng.standard_normal((4, 4)).astype(np.float32)
        b, out = rng.standard_normal((4, 4)).astype(np.float32), a
    elif case == "read-only out":
        out.flags.writeable = False
    elif case == "F-ordered out":
        out = np.asfortranarray(out)
    elif case == "float16":
        a, b, out = a.astype(np.float16), b.astype(np.float16), out.astype(np.float16)
    elif case == "mixed dtypes":
        b = b.astype(np.float64)
    elif case == "list":
        a = a.tolist()
    before = out.copy()
    assert cpu_kernels.gemm(a, b, 0.5, out) is False
    np.testing.assert_array_equal(out, before)  # nothing written
    if case in ("read-only out", "list"):
        return
    want = np.asarray(a) @ b + 0.5 * before
    got = F.matmul(a, b, out=out, beta=0.5)  # the fallback: same formula in numpy
    np.testing.assert_allclose(got, want, rtol=1e-2 if case == "float16" else 1e-5, atol=1e-2)


@needs_gemm
def test_gemm_declines_when_no_blas_was_handed_over(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    out = np.zeros((3, 2))
    cpu_kernels._lib.set_gemm(None, None)
    try:
        assert cpu_kernels.gemm(a, b, 1.0, out) is False and not out.any()
    finally:
        cpu_kernels._lib.set_gemm(blas.gemm_address(np.float32), blas.gemm_address(np.float64))
    assert cpu_kernels.gemm(a, b, 1.0, out) is True
    np.testing.assert_allclose(out, a @ b)
    with pytest.raises(TypeError):
        cpu_kernels._lib.set_gemm("not an address", None)


@needs_gemm
def test_gemm_argument_checks():
    f32 = np.float32
    with pytest.raises(ValueError, match=r"gemm needs a \(M, K\), b \(K, N\) and out \(M, N\), "
                                         r"got a \(2, 3\), b \(4, 5\) and out \(2, 5\)"):
        cpu_kernels.gemm(np.zeros((2, 3), f32), np.zeros((4, 5), f32), 0.0, np.zeros((2, 5), f32))
    with pytest.raises(ValueError, match="b must have 2 dimensions, got 1"):
        cpu_kernels._lib.gemm(np.zeros((2, 3), f32), np.zeros(3, f32), 0.0, np.zeros((2, 1), f32))
    with pytest.raises(ValueError, match="matmul with beta needs out"):
        F.matmul(np.zeros((2, 3), f32), np.zeros((3, 1), f32), beta=0.5)


@needs_kernels
def test_relu_backward_is_zero_where_the_output_was_zero_even_for_nan_upstream():
    """As in PyTorch and the CUDA kernel: a select, not a multiply by the mask."""
    dy = np.array([[np.nan, 1.0, np.inf]], np.float64)
    y = np.array([[0.0, 2.0, 0.0]], np.float64)
    np.testing.assert_array_equal(F.relu_backward(dy, y), [[0.0, 1.0, 0.0]])


@needs_kernels
@pytest.mark.parametrize("case", ["strided y", "float16", "mixed dtypes", "bias shape",
                                  "read-only y", "1-D"])
def test_arrays_the_kernels_do_not_take_go_to_numpy(rng, case):
    y = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    if case == "strided y":
        y = rng.standard_normal((6, 8)).astype(np.float32)[:, ::2]
    elif case == "float16":
        y, b = y.astype(np.float16), b.astype(np.float16)
    elif case == "mixed dtypes":
        b = b.astype(np.float64)
    elif case == "bias shape":
        b = b[:1]
    elif case == "read-only y":
        y.flags.writeable = False
    elif case == "1-D":
        y = y[0]
    assert not cpu_kernels.bias_relu_fits(y, b)
    if case != "read-only y":
        want = y.copy()
        want += b  # in y's dtype, as the in-place operation computes it
        np.testing.assert_array_equal(F.bias_relu_(y, b), np.maximum(want, 0))


# --- the kernels' own checks: a wrong call raises, it never reads out of bounds -------------------

@needs_kernels
@pytest.mark.parametrize("call,error,message", [
    (lambda k: k.bias_relu(np.zeros((2, 3), np.float32), np.zeros(4, np.float32)),
     ValueError, "b must have shape (3,)"),
    (lambda k: k.bias_relu(np.zeros((2, 3), np.float32), np.zeros(3, np.float64)),
     TypeError, "b must have the dtype of y (float32), got float64"),
    (lambda k: k.bias_relu(np.zeros((2, 3), np.int32), np.zeros(3, np.int32)),
     TypeError, "y must be float32 or float64"),
    (lambda k: k.bias_relu(np.zeros((4, 6), np.float32)[:, ::2], np.zeros(3, np.float32)),
     TypeError, "y must be a C-contiguous, writable array"),
    (lambda k: k.bias_relu(np.zeros(3, np.float32), np.zeros(3, np.float32)),
     ValueError, "y must have 2 dimension(s), got 1"),
    (lambda k: k.bias_relu([[1.0]], np.zeros(1, np.float32)),
     TypeError, "y must be a C-contiguous, writable array, got list"),
    (lambda k: k.relu_backward(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 3)), None, 0.0),
     ValueError, "dz must have the shape of y (2, 3), got (3, 3)"),
    (lambda k: k.relu_backward(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2),
                               0.0),
     ValueError, "db must have shape (3,), got (2,)"),
    (lambda k: k.cross_entropy(np.zeros((2, 3)), np.array([0, 3]), None, np.zeros((2, 3)),
                               np.zeros(()), -100, 0.0, 1.0, 0),
     ValueError, "target has label 3 at row 1 but logits have 3 classes"),
    (lambda k: k.cross_entropy(np.zeros((2, 3)), np.array([0, 1], np.int32), None,
                               np.zeros((2, 3)), np.zeros(()), -100, 0.0, 1.0, 0),
     ValueError, "target must be int64 of shape (2,), got another dtype"),
    (lambda k: k.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), None, np.zeros((2, 3)),
                               np.zeros(()), -100, 0.0, 1.0, 5),
     ValueError, "reduction must be 0 (mean), 1 (sum) or 2 (none), got 5"),
    (lambda k: k.sgd(np.zeros(4), np.zeros(3), np.zeros(4), 0.1, 0.9, 0.0, 0.0, False, False),
     ValueError, "grad must have the length of params (4), got 3"),
    (lambda k: k.adam(np.zeros(4, np.float32), np.zeros(4), np.zeros(4), np.zeros(4), 0.1, 0.9,
                      0.999, 1e-8, 0.0, False, 0.1, 0.001),
     TypeError, "grad must have the dtype of params (float32), got float64"),
    (lambda k: k.sgd(np.zeros(4), np.zeros(4), np.zeros(4), 0.1),
     TypeError, "sgd() takes 9 arguments, got 4"),
])
def test_kernel_argument_checks(call, error, message):
    with pytest.raises(error) as caught:
        call(cpu_kernels._lib)
    assert message in str(caught.value)


@needs_kernels
def test_unvalidated_out_of_range_label_raises_and_writes_nothing():
    """The trainer skips the label check per step; the kernel still refuses a bad label."""
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="target has label 7 at row 2 but logits have 4 classes"):
        F.softmax_cross_entropy_with_grad(logits, np.array([0, 1, 7]), validate=False)


# --- cross-entropy ---------------------------------------------------------------------------------

CE_CASES = [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
    {"weight": True}, {"weight": True, "label_smoothing": 0.2, "reduction": "mean"},
    {"ignore_index": 1}, {"ignore_index": 1, "weight": True, "reduction": "sum"},
    {"ignore_index": 1, "label_smoothing": 0.3, "reduction": "none"},
]


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", CE_CASES)
@pytest.mark.parametrize("shape", [(128, 10), (5, 1), (7, 300)])
def test_cross_entropy_matches_the_numpy_path(monkeypatch, rng, dtype, kw, shape):
    n, c = shape
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, c).astype(dtype)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, c, n)
    for grad_output in (1.0, 0.37):
        plan = F._CrossEntropyPlan(x, t, kw.get("weight"), kw.get("ignore_index", -100),
                                   kw.get("label_smoothing", 0.0), kw.get("reduction", "mean"))
        assert cpu_kernels.cross_entropy_fits(plan, grad_output)
        loss, grad = plan.loss_and_grad(grad_output)
        with monkeypatch.context() as m:
            numpy_path(m)
            plan = F._CrossEntropyPlan(x, t, kw.get("weight"), kw.get("ignore_index", -100),
                                       kw.get("label_smoothing", 0.0), kw.get("reduction", "mean"))
            want_loss, want_grad = plan.loss_and_grad(grad_output)
        assert loss.dtype == want_loss.dtype == dtype and loss.shape == want_loss.shape
        assert grad.dtype == dtype and grad.shape == shape
        tol = 2e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(loss, want_loss, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol)


@needs_kernels
def test_cross_entropy_non_finite_rows_match_the_numpy_path(monkeypatch):
    x = np.array([[0.0, 1.0, np.nan], [-np.inf, -np.inf, -np.inf], [1e30, -1e30, 0.0],
                  [np.inf, 0.0, 1.0], [-np.inf, 2.0, 3.0]], np.float32)
    t = np.array([0, 1, 0, 1, 2])
    loss, grad = F.softmax_cross_entropy_with_grad(x, t, reduction="none")
    numpy_path(monkeypatch)
    with np.errstate(all="ignore"):  # numpy warns where these rows' log and divide overflow
        want_loss, want_grad = F.softmax_cross_entropy_with_grad(x, t, reduction="none")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


# --- optimizers ------------------------------------------------------------------------------------

OPTIMIZERS = [
    (optim.SGD, {}), (optim.SGD, {"momentum": 0.9}), (optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (optim.SGD, {"momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2}),
    (optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}),
    (optim.Adam, {}), (optim.Adam, {"weight_decay": 1e-2, "betas": (0.8, 0.99)}),
    (optim.AdamW, {"weight_decay": 0.1}),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_optimizer_kernels_match_the_numpy_update(monkeypatch, rng, dtype, cls, kw):
    """Including the SGD kernel, which runs where numpy's OpenBLAS cannot be reached."""
    monkeypatch.setattr(blas, "available", lambda x: False)
    grads = [rng.standard_normal(1000).astype(dtype) for _ in range(6)]
    start = rng.standard_normal(1000).astype(dtype)

    def run():
        p = L.Parameter(start.copy())
        opt = cls([p], lr=0.05, **kw)
        for g in grads:
            p.grad[...] = g
            opt.step()
        return p.data, opt

    with_kernel, opt = run()
    assert opt.uses_compiled_update
    numpy_path(monkeypatch)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(with_kernel, run()[0], rtol=tol, atol=tol)


@needs_kernels
def test_which_optimizer_update_runs(monkeypatch):
    p = [L.Parameter(np.zeros(4, np.float32))]
    assert optim.Adam(p).uses_compiled_update and optim.AdamW(p).uses_compiled_update
    assert optim.SGD(p, lr=0.1).uses_compiled_update == (not blas.available(p[0].data))

    class MySGD(optim.SGD):  # a rule of the user's own is never replaced by a kernel
        def _update(self):
            self.data -= self.lr * self.grad

    monkeypatch.setattr(blas, "available", lambda x: False)
    assert optim.SGD(p, lr=0.1).uses_compiled_update
    assert not MySGD(p, lr=0.1).uses_compiled_update
    assert not optim.SGD([L.Parameter(np.zeros(4, np.float16))], lr=0.1).uses_compiled_update
