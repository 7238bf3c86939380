"""gpunet.losses: gradient checks, the fused path against Softmax + CrossEntropy, and errors."""

import numpy as np
import pytest

from gpunet import functional as F
from gpunet import layers as L
from gpunet import losses as Lo
from gpunet.backend import to_numpy
from gpunet.gradcheck import check_loss, standard_cases

LOSS_CASES = [name for name, kind, _ in standard_cases(np.random.default_rng(0)) if kind == "loss"]


@pytest.mark.parametrize("name", LOSS_CASES)
def test_gradient_check(device, name):
    rng = np.random.default_rng(11)
    (loss, pred, target), = [a for n, _, a in standard_cases(rng, np.float64, device) if n == name]
    errors = check_loss(loss, pred, target, rng=rng)
    assert errors["input"] < 1e-7, errors


@pytest.mark.parametrize("keywords", [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.2},
    {"ignore_index": 1}, {"weight": "random", "label_smoothing": 0.1, "ignore_index": 0},
])
def test_fused_equals_softmax_then_cross_entropy(device, on, rng, keywords):
    """Softmax and CrossEntropy as separate layers give the fused loss and gradient."""
    keywords = dict(keywords)
    if keywords.get("weight") == "random":
        keywords["weight"] = on(rng.uniform(0.5, 2.0, 6))
    x = on(rng.standard_normal((8, 6)))
    t = on(rng.integers(0, 6, 8))
    fused, ce, softmax = Lo.SoftmaxCrossEntropy(**keywords), Lo.CrossEntropy(**keywords), L.Softmax()
    upstream = on(rng.standard_normal(8)) if keywords.get("reduction") == "none" else 1.3
    loss_fused = fused(x, t)
    grad_fused = fused.backward(upstream)
    loss_split = ce(softmax(x), t)
    grad_split = softmax.backward(ce.backward(upstream))
    np.testing.assert_allclose(to_numpy(loss_split), to_numpy(loss_fused), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad_split), to_numpy(grad_fused), rtol=1e-9, atol=1e-15)


def test_forward_backward_equals_forward_then_backward(device, on, rng):
    x = on(rng.standard_normal((16, 10)).astype(np.float32))
    t = on(rng.integers(0, 10, 16))
    loss = Lo.SoftmaxCrossEntropy(label_smoothing=0.1)
    value, grad = loss.forward_backward(x, t)
    np.testing.assert_allclose(to_numpy(value), to_numpy(loss.forward(x, t)), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(grad), to_numpy(loss.backward()), rtol=1e-6, atol=1e-9)
    unchecked_value, unchecked_grad = loss.forward_backward(x, t, validate=False)
    np.testing.assert_allclose(to_numpy(unchecked_value), to_numpy(value), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(unchecked_grad), to_numpy(grad), rtol=1e-6, atol=1e-9)


def test_loss_is_a_0d_array_on_the_input_device(device, on):
    value = Lo.SoftmaxCrossEntropy()(on(np.zeros((2, 3), np.float32)), on(np.array([0, 2])))
    assert value.shape == () and type(value) is type(on(np.zeros(1)))
    assert float(value) == pytest.approx(np.log(3))


def test_cross_entropy_of_a_zero_probability_is_clamped():
    """As PyTorch's BCELoss clamps its log: finite, -log of the smallest normal number."""
    ce = Lo.CrossEntropy()
    assert float(ce(np.array([[1.0, 0.0]]), np.array([1]))) == -np.log(np.finfo(np.float64).tiny)
    assert ce.backward().tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="probs must be probabilities in"):
        ce(np.array([[1.5, -0.5]]), np.array([0]))


def test_mse(device, on, rng):
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    mse = Lo.MSELoss()
    assert float(mse(on(pred), on(target))) == pytest.approx(((pred - target) ** 2).mean())
    np.testing.assert_allclose(to_numpy(mse.backward()), 2 * (pred - target) / 12)
    assert float(Lo.MSELoss()(on(np.zeros((0, 3))), on(np.zeros((0, 3))))) == 0.0  # empty batch
    with pytest.raises(ValueError, match=r"target must have pred's shape \(4, 3\), got \(3, 4\)"):
        mse(on(pred), on(target.T))


@pytest.mark.parametrize("loss", [Lo.SoftmaxCrossEntropy(), Lo.CrossEntropy(), Lo.MSELoss()])
def test_backward_before_forward(loss):
    with pytest.raises(ValueError, match=r"backward\(\) called before forward\(\)"):
        loss.backward()


def test_bad_keywords_fail_at_construction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        Lo.SoftmaxCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be a float in"):
        Lo.CrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        Lo.MSELoss("mean_squared")


def test_loss_checks_labels_in_every_mode(rng):
    x = rng.standard_normal((2, 3))
    for reduction in F.REDUCTIONS:
        with pytest.raises(ValueError, match="target has label 3 at index 0"):
            Lo.SoftmaxCrossEntropy(reduction=reduction).forward_backward(x, np.array([3, 0]))


def test_numpy_scalars_are_accepted_and_give_the_same_loss(rng):
    """label_smoothing=np.float32(0.1) is 0.1 (as float32), ignore_index=np.int64(-1) is -1."""
    x, t = rng.standard_normal((6, 4)), np.array([0, 3, -1, 2, 1, 1])
    smoothing = np.float32(0.1)
    expected = Lo.SoftmaxCrossEntropy(label_smoothing=float(smoothing), ignore_index=-1)(x, t)
    for loss in (Lo.SoftmaxCrossEntropy(label_smoothing=smoothing, ignore_index=np.int64(-1)),
                 Lo.SoftmaxCrossEntropy(label_smoothing=np.float64(smoothing), ignore_index=-1)):
        assert float(loss(x, t)) == float(expected)
    assert float(F.softmax_cross_entropy(x, t, label_smoothing=smoothing,
                                         ignore_index=np.int64(-1))) == float(expected)
    for bad in (True, np.bool_(False), "0.1"):
        with pytest.raises(ValueError, match=f"label_smoothing must be a float in .0, 1., got {bad!r}"):
            Lo.SoftmaxCrossEntropy(label_smoothing=bad)
    with pytest.raises(TypeError, match="ignore_index must be an int, got True"):
        F.softmax_cross_entropy(x, t, ignore_index=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_then_cross_entropy_stays_finite_where_a_probability_underflows(device, on, smoothing):
    """exp(-200) is 0 in float32: the split path used to give 0/0 = NaN gradients (and an
    infinite loss with smoothing); clamped as PyTorch's BCELoss clamps its log, it is finite
    and equals the fused gradient up to what the underflow lost (eps/C at the 0 entry)."""
    x = on(np.array([[0.0, -200.0, 1.0, 2.0], [3.0, 0.0, -150.0, 1.0]], np.float32))
    t = on(np.array([3, 0]))
    fused, ce, softmax = (Lo.SoftmaxCrossEntropy(label_smoothing=smoothing),
                          Lo.CrossEntropy(label_smoothing=smoothing), L.Softmax())
    loss_split = to_numpy(ce(softmax(x), t))
    grad_split = to_numpy(softmax.backward(ce.backward()))
    loss_fused, grad_fused = to_numpy(fused(x, t)), to_numpy(fused.backward())
    assert np.isfinite(loss_split) and np.isfinite(grad_split).all()
    if smoothing == 0:
        np.testing.assert_allclose(loss_split, loss_fused, rtol=1e-6)
        np.testing.assert_allclose(grad_split, grad_fused, rtol=1e-5, atol=1e-7)
    else:  # the clamped log is -87 where the logit said -200: the smoothing term is smaller
        assert loss_split < loss_fused
        # the 0 entry gets 0 where the fused gradient is -(eps/C)/N, and the others move by
        # p_j (eps/C)/N at most
        np.testing.assert_allclose(grad_split, grad_fused, atol=1.01 * smoothing / 4 / 2)


def test_cross_entropy_refuses_what_is_no_probability(device, on):
    """Logits given to CrossEntropy gave a negative loss with no complaint."""
    for bad, shown in (([[2.5, 0.3, -1.0]], "from -1 to 2.5"), ([[1.5, 0.0, 0.0]], "from 0 to 1.5")):
        with pytest.raises(ValueError, match=rf"probs must be probabilities in \[0, 1\] \(the output "
                                             rf"of a softmax\), got values {shown}; for raw scores "
                                             r"\(logits\) use SoftmaxCrossEntropy"):
            Lo.CrossEntropy()(on(np.array(bad, np.float32)), on(np.array([0])))
    exact = on(np.array([[1.0, 0.0, 0.0]], np.float32))  # a one-hot is a probability
    assert float(Lo.CrossEntropy()(exact, on(np.array([0])))) == 0.0
