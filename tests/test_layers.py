"""gpunet.layers: float64 gradient checks with random upstream gradients, and the Module API."""

import numpy as np
import pytest

from gpunet import layers as L
from gpunet.backend import to_numpy
from gpunet.gradcheck import check_layer, standard_cases


LAYER_CASES = [case for case in standard_cases(np.random.default_rng(0)) if case[1] == "layer"]


@pytest.mark.parametrize("name", [name for name, _, _ in LAYER_CASES])
def test_gradient_check(device, name):
    rng = np.random.default_rng(7)
    (layer, x), = [args for n, _, args in standard_cases(rng, np.float64, device) if n == name]
    errors = check_layer(layer, x, rng=rng)
    assert errors and max(errors.values()) < 1e-7, errors


def test_dense_shapes_and_init(rng):
    d = L.Dense(784, 256, rng=rng)
    assert d.weight.shape == (784, 256) and d.bias.shape == (256,)
    assert d.weight.dtype == np.float32
    assert abs(d.weight.data.std() - np.sqrt(2 / 784)) < 0.002  # He
    assert not d.bias.data.any()
    x = L.Dense(400, 100, init="xavier", rng=rng).weight.data
    assert np.abs(x).max() <= np.sqrt(6 / 500)
    assert [n for n, _ in L.mlp([4, 3, 2]).named_parameters()] == \
        ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [n for n, _ in L.mlp([4, 3, 2], "tanh").named_parameters()] == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_dense_computes_affine_map(device, on, rng):
    d = L.Dense(5, 3, dtype=np.float64, rng=rng).to(device)
    x = rng.standard_normal((4, 5))
    w, b = to_numpy(d.weight.data), to_numpy(d.bias.data)
    np.testing.assert_allclose(to_numpy(d(on(x))), x @ w + b)


def test_same_seed_same_model_on_every_device():
    a = L.mlp([6, 5, 2], rng=np.random.default_rng(3))
    b = L.mlp([6, 5, 2], rng=np.random.default_rng(3))
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)


def test_first_layer_skips_input_gradient(rng):
    model = L.mlp([5, 4, 3], dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 5))
    dy = rng.standard_normal((2, 3))
    model(x)
    dx = model.backward(dy)
    grads = [p.grad.copy() for p in model.parameters()]
    model(x)
    assert model.backward(dy, input_grad=False) is None
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_array_equal(g, p.grad)
    assert dx.shape == (2, 5)


def test_backward_overwrites_gradients(rng):
    d = L.Dense(3, 2, dtype=np.float64, rng=rng)
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    d(x)
    d.backward(dy)
    first = d.weight.grad.copy()
    d.backward(dy)
    np.testing.assert_array_equal(d.weight.grad, first)
    d.zero_grad()
    assert not d.weight.grad.any()


@pytest.mark.parametrize("activation", [None, "relu"])
def test_grad_decay_adds_the_gradient_to_the_kept_part(device, on, rng, activation):
    """grad = dL/dp + grad_decay * old grad, for weight and bias; the gradient itself is the
    one the float64 check above verifies (decay 0, which ignores even NaN old values)."""
    d = L.Dense(5, 4, activation=activation, dtype=np.float64, rng=rng).to(device)
    x, dy = on(rng.standard_normal((6, 5))), on(rng.standard_normal((6, 4)))
    for p in d.parameters():
        p.grad[...] = np.nan
    d(x)
    d.backward(dy)
    fresh = [to_numpy(p.grad).copy() for p in d.parameters()]
    assert all(np.isfinite(f).all() for f in fresh)
    old = [rng.standard_normal(p.shape) for p in d.parameters()]
    for p, o in zip(d.parameters(), old):
        p.grad[...] = on(o)
        p.grad_decay = 0.7
    d(x)
    d.backward(dy)
    for p, f, o in zip(d.parameters(), fresh, old):
        np.testing.assert_allclose(to_numpy(p.grad), f + 0.7 * o, rtol=1e-13, atol=1e-13)


def test_grad_decay_one_accumulates_micro_batches(device, on, rng):
    """Two half batches with grad_decay = 1 give the gradient of the whole batch (summed loss)."""
    model = L.mlp([5, 4, 3], dtype=np.float64, rng=rng).to(device)
    x, dy = on(rng.standard_normal((8, 5))), on(rng.standard_normal((8, 3)))
    model(x)
    model.backward(dy)
    whole = [to_numpy(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    for p in model.parameters():
        p.grad_decay = 1.0
    for half in (slice(0, 4), slice(4, 8)):
        model(x[half])
        model.backward(dy[half])
    for p, w in zip(model.parameters(), whole):
        np.testing.assert_allclose(to_numpy(p.grad), w, rtol=1e-12, atol=1e-13)


def test_grad_decay_under_mixed_precision(rng):
    d = L.Dense(5, 4, activation="relu", compute_dtype=np.float16, rng=rng)
    x, dy = rng.standard_normal((6, 5)).astype(np.float16), rng.standard_normal((6, 4))
    d(x)
    d.backward(dy.astype(np.float16))
    fresh = [p.grad.copy() for p in d.parameters()]
    for p in d.parameters():
        p.grad[...] = 2.0
        p.grad_decay = 0.5
    d(x)
    d.backward(dy.astype(np.float16))
    for p, f in zip(d.parameters(), fresh):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad, f + 1.0, rtol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.9", None, True])
def test_grad_decay_must_be_a_finite_number(value):
    p = L.Parameter(np.zeros(3))
    with pytest.raises(ValueError, match="grad_decay must be a finite number, got"):
        p.grad_decay = value
    assert p.grad_decay == 0.0


def test_wrong_feature_size_and_dtype():
    d = L.Dense(784, 10)
    with pytest.raises(ValueError, match=r"Dense\(784, 10\) expects input of shape \(N, 784\), got \(2, 100\)"):
        d(np.zeros((2, 100), np.float32))
    with pytest.raises(TypeError, match="computes in float32 but got float64 input"):
        d(np.zeros((2, 784)))
    with pytest.raises(TypeError, match="computes in float32 but got uint8 input"):
        d(np.zeros((2, 784), np.uint8))
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        L.Dense(0, 3)
    with pytest.raises(ValueError, match="init must be 'he' or 'xavier'"):
        L.Dense(3, 3, init="lecun")


@pytest.mark.parametrize("make", [lambda: L.Dense(3, 2), L.ReLU, L.Sigmoid, L.Tanh, L.Softmax,
                                  lambda: L.mlp([3, 4, 2])])
def test_backward_before_forward(make):
    with pytest.raises(ValueError, match=r"backward\(\) called before forward\(\)"):
        make().backward(np.zeros((1, 2), np.float32))


def test_eval_mode_keeps_nothing(rng):
    model = L.mlp([3, 4, 2]).eval()
    model(rng.standard_normal((2, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="eval mode"):
        model.backward(np.zeros((2, 2), np.float32))
    assert model.train().training and model[0].training


def test_upstream_gradient_shape_is_checked(rng):
    relu = L.ReLU()
    relu(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match=r"ReLU.backward expects dy of shape \(2, 3\), got \(3, 2\)"):
        relu.backward(np.zeros((3, 2)))


def test_state_dict_round_trip_and_mismatch(rng):
    a, b = L.mlp([4, 6, 3], rng=rng), L.mlp([4, 6, 3], rng=rng)
    state = a.state_dict()
    b.load_state_dict(state)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.data, q.data)
    state["0.weight"][...] = 0  # a copy: the model is untouched
    assert a[0].weight.data.any()
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 5\) but the model's is \(4, 6\)"):
        b.load_state_dict(L.mlp([4, 5, 3]).state_dict())
    with pytest.raises(ValueError, match=r"missing \['1.bias'\]"):
        b.load_state_dict({k: v for k, v in state.items() if k != "1.bias"})


def test_to_dtype_and_device(device, rng):
    model = L.mlp([3, 4, 2], rng=rng).to(device, dtype=np.float64)
    assert all(p.data.dtype == np.float64 and p.grad.dtype == np.float64 for p in model.parameters())
    assert all(type(p.data) is type(device.xp.zeros(1)) for p in model.parameters())


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="got function at position 1"):
        L.Sequential(L.ReLU(), lambda x: x)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-7), (np.float64, 1e-15)])
def test_sigmoid_keeps_relative_accuracy_far_below_zero(device, on, dtype, tol):
    """sigmoid(-10) = 4.5398e-5 (the tanh form gave 4.5389e-5 in float32) and sigmoid(-20) =
    2.06e-9 (it gave 0): every output within a rounding or two of the float64 value."""
    x = np.r_[-10.0, -20.0, np.linspace(-80, 80, 161), -700.0 if dtype == np.float64 else -87.0]
    expected = 1 / (1 + np.exp(-x))
    y = to_numpy(L.Sigmoid()(on(x.astype(dtype)))).astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=2 * tol, atol=0)
    special = to_numpy(L.Sigmoid()(on(np.array([np.nan, np.inf, -np.inf], dtype))))
    assert np.isnan(special[0]) and special[1:].tolist() == [1, 0]


@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_backward_sees_the_input_of_its_forward(device, on, rng, activation):
    """A caller who reuses the input array between forward and backward gets the gradient of
    the data that went forward (the layer kept a copy), as PyTorch's version counter ensures."""
    dense = L.Dense(5, 3, activation=activation, dtype=np.float64, rng=rng).to(device)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    buffer = on(x.copy())
    y = to_numpy(dense(buffer))
    buffer[...] = on(rng.standard_normal((4, 5)))  # the next batch, written into the same array
    dense.backward(on(dy), input_grad=False)
    dz = dy * (y > 0) if activation else dy
    np.testing.assert_allclose(to_numpy(dense.weight.grad), x.T @ dz, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(dense.bias.grad), dz.sum(axis=0), rtol=1e-12)


def test_copy_input_false_keeps_a_reference_by_contract(rng):
    """copy_input=False (the trainer's fixed batch buffer) keeps x itself: no copy, and the
    caller's promise not to write into it before backward."""
    dense = L.Dense(5, 3, dtype=np.float64, rng=rng)
    x = rng.standard_normal((4, 5))
    dense.forward(x, copy_input=False)
    assert dense._saved("x") is x
    dense.forward(x)
    assert dense._saved("x") is not x and not np.shares_memory(dense._saved("x"), x)
    dense.eval().forward(x)  # eval mode keeps nothing, so copies nothing


def test_sequential_copies_only_what_a_caller_holds(rng):
    """In mlp the first layer's input is the caller's array (copied); every later layer's is the
    fresh output of the layer before (kept as it is). After an in-place ReLU or a module of
    the user's own, whose output may be anyone's array, the next Dense copies again."""
    model = L.mlp([5, 4, 4, 3], activation="tanh", dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 5))
    model(x)
    assert not np.shares_memory(model[0]._saved("x"), x)
    assert model[2]._saved("x") is model[1]._saved("y") and model[4]._saved("x") is model[3]._saved("y")
    model.forward(x, copy_input=False)
    assert model[0]._saved("x") is x

    class Passthrough(L.Module):
        def forward(self, x):
            return x

        def backward(self, dy, input_grad=True):
            return dy

    pass_x = L.Sequential(Passthrough(), L.Dense(5, 3, dtype=np.float64, rng=rng))
    pass_x(x)
    assert not np.shares_memory(pass_x[1]._saved("x"), x)
    inplace = L.Sequential(L.Dense(5, 4, dtype=np.float64, rng=rng), L.ReLU(inplace=True),
                           L.Dense(4, 3, dtype=np.float64, rng=rng))
    h = inplace(x)
    assert h.shape == (2, 3) and inplace[2]._saved("x") is not inplace[1]._saved("y")


# --- LeakyReLU and GELU ---------------------------------------------------------------------------

def test_erf_to_float64_rounding():
    import math
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.0, 1.0, -1.0, 1 - 1e-12, 5.99, 6.01, 40.0]])
    expected = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(L.erf(x), expected, rtol=2e-15, atol=1e-300)
    assert L.erf(x.astype(np.float32)).dtype == np.float32
    assert np.isnan(L.erf(np.array([np.nan])))[0] and list(L.erf(np.array([-np.inf, np.inf]))) == [-1, 1]


@pytest.mark.parametrize("make,name", [(lambda: L.LeakyReLU(), "LeakyReLU"),
                                       (lambda: L.LeakyReLU(0.2), "LeakyReLU"),
                                       (lambda: L.GELU(), "GELU"),
                                       (lambda: L.GELU(approximate="tanh"), "GELU")])
def test_activations_match_torch(rng, make, name):
    torch = pytest.importorskip("torch")
    ours = make()
    kwargs = {"negative_slope": ours.negative_slope} if name == "LeakyReLU" else \
        {"approximate": ours.approximate}
    ref = getattr(torch.nn, name)(**kwargs)
    x = 4 * rng.standard_normal((7, 9))
    x[0, :3] = 0.0  # the derivative at 0 is torch's too
    xt = torch.tensor(x, requires_grad=True)
    y, yt = ours(x), ref(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-14, atol=1e-15)
    g = rng.standard_normal(x.shape)
    yt.backward(torch.from_numpy(g))
    # GELU's Φ(x) + x φ(x) cancels for x < -2, where torch's erf and ours differ in the last bits
    np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-13, atol=1e-13)


def test_activation_arguments_and_reprs():
    with pytest.raises(ValueError, match="negative_slope must be a finite number, got 'x'"):
        L.LeakyReLU("x")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        L.GELU("erf")
    assert repr(L.LeakyReLU()) == "LeakyReLU(negative_slope=0.01)"
    assert repr(L.GELU()) == "GELU()" and repr(L.GELU("tanh")) == "GELU(approximate='tanh')"
    assert L.GELU()(np.ones(3, np.float32)).dtype == np.float32
