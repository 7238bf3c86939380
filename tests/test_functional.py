"""gpunet.functional: softmax, its derivatives and the fused cross-entropy, on every device."""

import itertools
import math
import warnings

import numpy as np
import pytest

from gpunet import functional as F
from gpunet import losses as Lo
from gpunet.backend import to_numpy
from gpunet.gradcheck import numerical_gradient, relative_error


# --- a float64 reference of PyTorch's F.cross_entropy, written the slow and obvious way ---------

def reference_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                            reduction="mean"):
    """Row by row in float64, following aten's cross_entropy_loss_label_smoothing: the weighted
    NLL term plus the smoothing term, "mean" dividing by the summed weights of kept targets."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    logp = np.array([[x[i, j] - math.log(sum(math.exp(v - max(x[i])) for v in x[i])) - max(x[i])
                      for j in range(c)] for i in range(n)])
    target = np.asarray(target)
    if target.dtype.kind == "f":
        y = target * (1 - eps) + eps / c
        losses = np.array([-sum(w[j] * y[i, j] * logp[i, j] for j in range(c)) for i in range(n)])
        denominator = n
    else:
        losses, denominator = np.zeros(n), 0.0
        for i, t in enumerate(target):
            if t == ignore_index:
                continue
            nll = -w[t] * logp[i, t]
            smooth = -sum(w[j] * logp[i, j] for j in range(c))
            losses[i] = (1 - eps) * nll + eps / c * smooth
            denominator += w[t]
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / denominator if denominator else 0.0


# --- softmax ---------------------------------------------------------------------------------------

def test_worked_example():
    s = F.softmax(np.array([1.0, 2.0]))
    np.testing.assert_allclose(s, [0.26894142, 0.73105858], atol=1e-8)
    np.testing.assert_allclose(F.softmax_jacobian(s), [[0.19661193, -0.19661193],
                                                       [-0.19661193, 0.19661193]], atol=1e-8)


def test_softmax_matches_definition(device, on, rng):
    x = rng.standard_normal((7, 11))
    expected = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(to_numpy(F.softmax(on(x))), expected, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(F.softmax(on(x), axis=0)),
                               np.exp(x) / np.exp(x).sum(axis=0, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(F.log_softmax(on(x))), np.log(expected), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(F.logsumexp(on(x))), np.log(np.exp(x).sum(axis=1)),
                               rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_is_kept(device, on, dtype):
    x = on(np.array([[1.0, 2.0, 3.0]], dtype=dtype))
    for f in (F.softmax, F.log_softmax, F.logsumexp):
        assert f(x).dtype == dtype
    assert type(F.softmax(x)) is type(x)


def test_extreme_logits_stay_finite(device, on):
    x = on(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=np.float32))
    s, log_s, lse = (to_numpy(f(x)) for f in (F.softmax, F.log_softmax, F.logsumexp))
    assert np.isfinite(s).all() and np.isfinite(log_s).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(s, [[1, 0, 0], [1 / 3] * 3, [0.5, 0.5, 0]], atol=1e-7)
    np.testing.assert_allclose(lse, [1e4, -1e4 + math.log(3), 1e4 + math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(log_s[0], [0, -2e4, -1e4], rtol=1e-6)


def test_minus_infinity_entries(device, on):
    x = on(np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]]))
    s = to_numpy(F.softmax(x))
    np.testing.assert_allclose(s[0], [0.5, 0, 0.5])
    assert np.isnan(s[1]).all()  # no defined softmax for an all -inf row, as in PyTorch
    lse = to_numpy(F.logsumexp(x))
    assert lse[0] == pytest.approx(math.log(2)) and lse[1] == -np.inf
    assert to_numpy(F.log_softmax(x))[0, 1] == -np.inf


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("path", ["log_softmax", "loss", "loss_smoothed_none", "kept_lse_grad",
                                  "fused_loss_and_grad", "fused_smoothed_none"])
def test_float32_stays_exact_for_large_logits(device, on, rng, offset, path):
    """Float32 logits around 0, 1e3 and 1e4 against float64 references of the same inputs:
    max first, (x - m) - log_sum, every error is a few float32 roundings of the result (forming
    m + log_sum first gave 3e-5 at 1e3 and 5e-4 at 1e4)."""
    x32 = (rng.standard_normal((64, 10)) * 3 + offset).astype(np.float32)
    t = rng.integers(0, 10, 64)
    ref_log_p = log_softmax64(x32)
    x, target = on(x32), on(t)
    if path == "log_softmax":
        got, expected = F.log_softmax(x), ref_log_p
    elif path == "loss":
        got, expected = F.softmax_cross_entropy(x, target), -ref_log_p[np.arange(64), t].mean()
    elif path in ("loss_smoothed_none", "fused_smoothed_none"):  # the fused one: the C kernel
        fn = F.softmax_cross_entropy if path == "loss_smoothed_none" else \
            (lambda *a, **k: F.softmax_cross_entropy_with_grad(*a, **k)[0])
        got = fn(x, target, label_smoothing=0.1, reduction="none")
        expected = -(0.9 * ref_log_p[np.arange(64), t] + 0.01 * ref_log_p.sum(axis=1))
    else:
        expected = np.exp(ref_log_p)
        expected[np.arange(64), t] -= 1
        expected /= 64
        if path == "kept_lse_grad":
            loss = Lo.SoftmaxCrossEntropy()
            loss.forward(x, target)
            got = loss.backward()
        else:
            value, got = F.softmax_cross_entropy_with_grad(x, target)
            np.testing.assert_allclose(float(value), -ref_log_p[np.arange(64), t].mean(),
                                       rtol=2e-6)
    got = to_numpy(got).astype(np.float64)
    scale = np.maximum(np.abs(expected), 1.0 if path != "kept_lse_grad" and "fused" not in path
                       else 1 / 64)
    assert np.all(np.abs(got - expected) <= 2e-6 * scale), np.abs(got - expected).max()


@pytest.mark.parametrize("case", ["nan", "near_max", "near_min", "minus_inf", "all_minus_inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_runtime_warnings_on_what_is_handled(device, on, case, dtype):
    """exp overflow in a NaN row, subtract overflow near the dtype's limit (x - max below
    -3.4e38 in float32), log(0): the results are right, so no RuntimeWarning may escape."""
    big = 0.9 * float(np.finfo(dtype).max)
    x, log_p, loss_t1 = {
        "nan": ([np.nan, 1e4, 0.0, 1.0], [np.nan] * 4, np.nan),
        "near_max": ([big, -big, 0.0], [0.0, -np.inf, -big], np.inf),  # 2 big is past the range
        "near_min": ([-big, big, 1.0], [-np.inf, 0.0, 1.0 - big], 0.0),
        "minus_inf": ([-np.inf, 2.0, 1.0], [-np.inf, -math.log1p(math.e ** -1),
                                            -1 - math.log1p(math.e ** -1)], math.log1p(math.e ** -1)),
        "all_minus_inf": ([-np.inf] * 3, [np.nan] * 3, np.nan),
    }[case]
    x, t = on(np.array([x], dtype=dtype)), on(np.array([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_log_p, lse = F.log_softmax(x), F.logsumexp(x)
        results = [F.softmax(x), F.softmax_cross_entropy(x, t)]
        for smoothing in (0.0, 0.1):
            results += [F.softmax_cross_entropy(x, t, label_smoothing=smoothing),
                        F.softmax_cross_entropy_grad(x, t, label_smoothing=smoothing),
                        *F.softmax_cross_entropy_with_grad(x, t, label_smoothing=smoothing)]
            loss = Lo.SoftmaxCrossEntropy(label_smoothing=smoothing)
            results += [loss(x, t), loss.backward()]
    np.testing.assert_allclose(to_numpy(got_log_p)[0], log_p, rtol=1e-6)
    assert float(results[1]) == pytest.approx(loss_t1, rel=1e-6, nan_ok=True)
    if case in ("nan", "all_minus_inf"):  # no defined answer: NaN everywhere, as in PyTorch
        assert all(np.isnan(to_numpy(r)).all() for r in results)
    else:
        assert np.isfinite(to_numpy(results[3])).all()  # the gradient is finite


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be a floating-point array, got dtype int64"):
        F.softmax(np.arange(3))


# --- the softmax derivative ------------------------------------------------------------------------

def test_jacobian_shapes_and_properties(device, on, rng):
    s = F.softmax(on(rng.standard_normal((4, 6))))
    jac = to_numpy(F.softmax_jacobian(s))
    assert jac.shape == (4, 6, 6)
    np.testing.assert_allclose(jac, jac.transpose(0, 2, 1))  # symmetric
    np.testing.assert_allclose(jac.sum(axis=2), 0, atol=1e-15)  # softmax sums to 1: rows sum to 0
    np.testing.assert_allclose(F.softmax_jacobian(to_numpy(s)[0]), jac[0])
    with pytest.raises(ValueError, match=r"shape \(C,\) or \(N, C\)"):
        F.softmax_jacobian(np.ones((2, 2, 2)))


def test_vjp_and_jvp_equal_the_jacobian_products(device, on, rng):
    s = F.softmax(on(rng.standard_normal((5, 7))))
    g = rng.standard_normal((5, 7))
    jac = to_numpy(F.softmax_jacobian(s))
    expected = np.einsum("ni,nij->nj", g, jac)
    np.testing.assert_allclose(to_numpy(F.softmax_vjp(s, on(g))), expected, atol=1e-15)
    np.testing.assert_allclose(to_numpy(F.softmax_jvp(s, on(g))), np.einsum("nij,nj->ni", jac, g),
                               atol=1e-15)
    with pytest.raises(ValueError, match="g must have the shape of s"):
        F.softmax_vjp(s, on(g[:, :3]))


def test_vjp_matches_central_differences(rng):
    x = rng.standard_normal((3, 5))
    g = rng.standard_normal((3, 5))
    numeric = numerical_gradient(lambda: (F.softmax(x) * g).sum(), x)
    assert relative_error(F.softmax_vjp(F.softmax(x), g), numeric) < 1e-8


def test_common_wrong_derivative_fails_the_check(rng):
    """The elementwise s*(1-s)*g keeps only the Jacobian's diagonal and fails; the VJP passes."""
    x = rng.standard_normal((4, 6))
    g = rng.standard_normal((4, 6))  # random: an all-ones g would zero the true VJP
    s = F.softmax(x)
    numeric = numerical_gradient(lambda: (F.softmax(x) * g).sum(), x)
    assert relative_error(s * (1 - s) * g, numeric) > 0.1
    assert relative_error(F.softmax_vjp(s, g), numeric) < 1e-8


def test_all_ones_upstream_gradient_proves_nothing(rng):
    """Why gradient checks use a random upstream: with g = 1 the true VJP is exactly zero."""
    s = F.softmax(rng.standard_normal((3, 4)))
    np.testing.assert_allclose(F.softmax_vjp(s, np.ones_like(s)), 0, atol=1e-15)


# --- cross-entropy ---------------------------------------------------------------------------------

KEYWORD_COMBINATIONS = list(itertools.product(
    [None, "weight"], [-100, 2], [0.0, 0.1], ["mean", "sum", "none"], ["index", "probability"]))


@pytest.mark.parametrize("weight,ignore_index,smoothing,reduction,kind", KEYWORD_COMBINATIONS)
def test_cross_entropy_matches_pytorch_semantics(device, on, rng, weight, ignore_index,
                                                 smoothing, reduction, kind):
    n, c = 9, 5
    x = rng.standard_normal((n, c)) * 3
    if kind == "index":
        target = rng.integers(0, c, n)
        target[[1, 4]] = ignore_index  # ignore_index=2 also drops any other label 2
    else:
        target = rng.dirichlet(np.ones(c), n)
    w = rng.uniform(0.2, 3.0, c) if weight else None
    kw = dict(ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    expected = reference_cross_entropy(x, target, w, **kw)
    got = F.softmax_cross_entropy(on(x), on(target), weight=None if w is None else on(w), **kw)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-12, atol=1e-14)

    upstream = rng.standard_normal(n) if reduction == "none" else 0.7
    grad = F.softmax_cross_entropy_grad(on(x), on(target), weight=None if w is None else on(w),
                                        grad_output=on(np.asarray(upstream)), **kw)
    x_probe = x.copy()
    numeric = numerical_gradient(
        lambda: (reference_cross_entropy(x_probe, target, w, **kw) * upstream).sum(), x_probe)
    assert relative_error(grad, numeric) < 1e-7


def test_cross_entropy_against_torch(rng):
    torch = pytest.importorskip("torch")
    n, c = 12, 6
    x = rng.standard_normal((n, c))
    target = rng.integers(0, c, n)
    target[3] = -100
    w = rng.uniform(0.5, 2, c)
    for smoothing, reduction in itertools.product([0.0, 0.2], ["mean", "sum", "none"]):
        xt = torch.tensor(x, requires_grad=True)
        out = torch.nn.functional.cross_entropy(xt, torch.tensor(target), weight=torch.tensor(w),
                                                label_smoothing=smoothing, reduction=reduction)
        upstream = rng.standard_normal(out.shape)
        out.backward(torch.tensor(upstream))
        kw = dict(weight=w, label_smoothing=smoothing, reduction=reduction)
        np.testing.assert_allclose(F.softmax_cross_entropy(x, target, **kw), out.detach().numpy(),
                                   rtol=1e-12)
        np.testing.assert_allclose(F.softmax_cross_entropy_grad(x, target, grad_output=upstream, **kw),
                                   xt.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_plain_gradient_is_p_minus_onehot_over_n(device, on, rng):
    x = rng.standard_normal((6, 4))
    t = rng.integers(0, 4, 6)
    expected = (F.softmax(x) - np.eye(4)[t]) / 6
    np.testing.assert_allclose(to_numpy(F.softmax_cross_entropy_grad(on(x), on(t))), expected,
                               atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_gives_zero_not_nan(device, on, reduction):
    x = on(np.random.default_rng(0).standard_normal((3, 4)))
    t = on(np.full(3, -100))
    loss = to_numpy(F.softmax_cross_entropy(x, t, reduction=reduction))
    grad = to_numpy(F.softmax_cross_entropy_grad(x, t, reduction=reduction))
    np.testing.assert_array_equal(loss, 0)
    np.testing.assert_array_equal(grad, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, on, reduction):
    x, t = on(np.zeros((0, 5))), on(np.zeros(0, dtype=np.int64))
    loss = to_numpy(F.softmax_cross_entropy(x, t, reduction=reduction))
    assert loss.shape == ((0,) if reduction == "none" else ())
    np.testing.assert_array_equal(loss, 0)
    assert F.softmax_cross_entropy_grad(x, t, reduction=reduction).shape == (0, 5)


def test_extreme_logits_in_cross_entropy(device, on):
    x = on(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype=np.float32))
    t = on(np.array([1, 1]))
    loss = float(F.softmax_cross_entropy(x, t))
    assert loss == pytest.approx(1e4)  # row 0 is 2e4 off, row 1 is right
    grad = to_numpy(F.softmax_cross_entropy_grad(x, t))
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, [[0.5, -0.5, 0], [0, 0, 0]], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_accumulates_in_float32(device, on, rng, dtype):
    x = rng.standard_normal((64, 10)) * 4
    t = rng.integers(0, 10, 64)
    expected = reference_cross_entropy(x.astype(dtype), t)
    got = F.softmax_cross_entropy(on(x.astype(dtype)), on(t))
    assert got.dtype == dtype
    assert float(got) == pytest.approx(expected, rel=2e-3 if dtype == np.float16 else 1e-6)


# --- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label", [10, 12, -1, -101])
def test_out_of_range_labels_are_rejected(device, on, label, reduction):
    x = on(np.zeros((3, 10), dtype=np.float32))
    t = on(np.array([0, label, 1]))
    with pytest.raises(ValueError, match=f"target has label {label} at index 1 but logits have 10"):
        F.softmax_cross_entropy(x, t, reduction=reduction)
    with pytest.raises(ValueError, match=f"target has label {label}"):
        F.softmax_cross_entropy_grad(x, t, reduction=reduction)


BAD_ARGUMENTS = [
    (dict(target=np.array([0.0, 1.0])), TypeError, "class indices must be integers"),
    (dict(target=np.array([True, False])), TypeError, "got bool"),
    (dict(target=np.array([0, 1, 1])), ValueError, "target has batch size 3 but logits have 2"),
    (dict(target=np.array([[0, 1]])), ValueError, r"target must be 1-D \(N,\)"),
    (dict(logits=np.zeros((2, 3, 1))), ValueError, r"logits must be 2-D \(N, C\)"),
    (dict(logits=np.zeros((2, 3), dtype=np.int32)), TypeError, "logits must be a floating-point"),
    (dict(weight=np.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(weight=np.array([1.0, -1.0, 1.0])), ValueError, "non-negative"),
    (dict(weight=np.array([1, 1, 1])), TypeError, "weight must be a floating-point array"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be a float in \[0, 1\), got 1.0"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(reduction="average"), ValueError, "reduction must be one of"),
    (dict(target=np.array([[0.5, 0.6, 0.0], [1.0, 0.0, 0.0]])), ValueError,
     "rows must sum to 1, but row 0 sums to 1.1"),
    (dict(target=np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]])), ValueError, "non-negative"),
]


@pytest.mark.parametrize("change,error,message", BAD_ARGUMENTS)
def test_bad_arguments(change, error, message):
    args = dict(logits=np.zeros((2, 3)), target=np.array([0, 1]), weight=None, label_smoothing=0.0,
                reduction="mean")
    args.update(change)
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(error, match=message):
        F.softmax_cross_entropy(logits, target, **args)
    with pytest.raises(error, match=message):
        F.softmax_cross_entropy_grad(logits, target, **args)


def test_grad_output_shape_is_checked():
    x, t = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(ValueError, match="grad_output must be a scalar for reduction='mean'"):
        F.softmax_cross_entropy_grad(x, t, grad_output=np.ones(2))
    with pytest.raises(ValueError, match=r"grad_output must be a scalar or of shape \(2,\)"):
        F.softmax_cross_entropy_grad(x, t, reduction="none", grad_output=np.ones(3))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 256), (1, 5), (0, 3), (300, 1)])
def test_column_sums_is_the_sum_over_rows(rng, dtype, shape):
    """The bias gradient: a gemv with ones on the CPU for float32/64, numpy's sum otherwise."""
    x = rng.standard_normal(shape).astype(dtype)
    out = np.full(shape[1], np.nan, dtype)
    assert F.column_sums(x, out) is out
    tol = {np.float16: 1e-1, np.float32: 1e-4, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out, x.astype(np.float64).sum(axis=0), rtol=tol, atol=tol)


def test_relu_backward_is_a_select_on_every_path(device, on):
    """0 where the ReLU was off, whatever came from upstream (NaN, inf): the NumPy fallback,
    the compiled kernel and the CUDA kernel alike, as PyTorch's threshold_backward."""
    dy = on(np.array([[np.nan, 1.0, np.inf, -np.inf]]))
    y = on(np.array([[0.0, 2.0, 0.0, 3.0]]))
    np.testing.assert_array_equal(to_numpy(F.relu_backward(dy, y)), [[0.0, 1.0, 0.0, -np.inf]])
