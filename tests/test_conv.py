"""gpunet.conv: Conv2d, MaxPool2d, AvgPool2d, Flatten and small_cnn.

Float64 gradient checks with random upstream gradients at odd sizes (stride 2, padding 1,
kernels 3 and 5, non-square inputs and kernels, batch 1), and, where torch is installed, the
forward and backward passes against torch with the same weights, in float64.
"""

import numpy as np
import pytest

import gpunet as gn
from gpunet import conv as C
from gpunet import layers as L
from gpunet.backend import to_numpy
from gpunet.gradcheck import check_layer


def distinct(rng, *shape):
    """Values well apart, so that no max-pooling window has a near tie."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1.0)


CONV_CASES = [  # (in, out, kernel, stride, padding, input shape)
    (2, 3, 3, 2, 1, (2, 2, 7, 6)),
    (3, 2, 5, 1, 2, (1, 3, 6, 9)),
    (1, 4, 5, 2, 0, (3, 1, 9, 11)),
    (2, 3, (3, 5), (2, 1), (1, 2), (2, 2, 7, 5)),
    (3, 3, 1, 1, 0, (2, 3, 4, 3)),
    (2, 2, 3, 3, 1, (1, 2, 8, 7)),  # stride = kernel: windows that do not overlap
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_gradient_check(device, on, case, bias):
    cin, cout, k, s, p, shape = case
    rng = np.random.default_rng(11)
    conv = C.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, dtype=np.float64,
                    rng=rng).to(device)
    errors = check_layer(conv, on(rng.standard_normal(shape)), rng=rng)
    assert set(errors) == {"input", "weight"} | ({"bias"} if bias else set())
    assert max(errors.values()) < 1e-7, errors


def test_conv_with_fused_relu_gradient_check(device, on):
    rng = np.random.default_rng(5)
    conv = C.Conv2d(2, 3, 3, stride=2, padding=1, activation="relu", dtype=np.float64,
                    rng=rng).to(device)
    errors = check_layer(conv, on(rng.standard_normal((1, 2, 9, 6))), rng=rng)
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("make,shape", [
    (lambda: C.MaxPool2d(2), (2, 3, 6, 5)),          # W not divisible: a column no window covers
    (lambda: C.MaxPool2d(3, stride=2), (1, 2, 7, 8)),  # overlapping windows, batch 1
    (lambda: C.MaxPool2d((2, 3), stride=(1, 2)), (2, 1, 5, 7)),
    (lambda: C.AvgPool2d(2), (2, 3, 6, 5)),
    (lambda: C.AvgPool2d(3, stride=2), (1, 2, 7, 8)),
    (lambda: C.AvgPool2d((3, 2), stride=1), (2, 2, 5, 4)),
    (lambda: C.Flatten(), (2, 3, 4, 5)),
    (lambda: C.Flatten(2), (2, 3, 4, 5)),
], ids=["max2", "max3s2", "max2x3", "avg2", "avg3s2", "avg3x2s1", "flatten", "flatten2"])
def test_pool_and_flatten_gradient_check(device, on, make, shape):
    rng = np.random.default_rng(3)
    errors = check_layer(make(), on(distinct(rng, *shape)), rng=rng)
    assert max(errors.values()) < 1e-7, errors


def test_small_network_gradient_check(device, on):
    """Every layer after a convolution sees its channels-last output: the whole chain."""
    rng = np.random.default_rng(2)
    model = L.Sequential(C.Conv2d(1, 3, 3, padding=1, activation="relu", dtype=np.float64, rng=rng),
                         C.MaxPool2d(2),
                         C.Conv2d(3, 4, 3, padding=1, dtype=np.float64, rng=rng), L.ReLU(),
                         C.AvgPool2d(2), C.Flatten(), L.Dense(4 * 2 * 3, 5, dtype=np.float64, rng=rng)
                         ).to(device)
    errors = check_layer(model, on(rng.standard_normal((2, 1, 8, 13))), rng=rng)
    assert max(errors.values()) < 1e-7, errors


# --- against torch -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    return torch


def _t(torch, a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_torch(torch, rng, case):
    cin, cout, k, s, p, shape = case
    conv = C.Conv2d(cin, cout, k, stride=s, padding=p, dtype=np.float64, rng=rng)
    ref = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p).double()
    with torch.no_grad():
        ref.weight.copy_(_t(torch, conv.weight.data))
        ref.bias.copy_(_t(torch, conv.bias.data))
    x = rng.standard_normal(shape)
    xt = _t(torch, x, grad=True)
    y, yt = conv(x), ref(xt)
    assert y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    dx = conv.backward(g)
    yt.backward(_t(torch, g))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.weight.grad, ref.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.bias.grad, ref.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,k,s,shape", [
    ("Max", 2, None, (2, 3, 6, 5)), ("Max", 3, 2, (1, 2, 7, 8)), ("Max", (2, 3), (1, 2), (2, 1, 5, 7)),
    ("Avg", 2, None, (2, 3, 6, 5)), ("Avg", 3, 2, (1, 2, 7, 8)), ("Avg", (3, 2), 1, (2, 2, 5, 4)),
])
def test_pooling_matches_torch(torch, rng, kind, k, s, shape):
    ours = getattr(C, f"{kind}Pool2d")(k, s)
    ref = getattr(torch.nn, f"{kind}Pool2d")(k, s)
    x = rng.standard_normal(shape)
    xt = _t(torch, x, grad=True)
    y, yt = ours(x), ref(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-14, atol=1e-15)
    g = rng.standard_normal(y.shape)
    yt.backward(_t(torch, g))
    np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("k,s", [(2, None), (3, 1), (3, 2)])
def test_max_pool_ties_send_the_gradient_to_the_first_maximum_as_torch(torch, rng, k, s):
    """Rounded values and a block of zeros (after a ReLU, most windows tie)."""
    x = np.round(rng.standard_normal((2, 2, 7, 8)))
    x[:, :, :4, :4] = 0
    ours, ref = C.MaxPool2d(k, s), torch.nn.MaxPool2d(k, s)
    xt = _t(torch, x, grad=True)
    y = ours(x)
    g = rng.standard_normal(y.shape)
    ref(xt).backward(_t(torch, g))
    dx, expected = ours.backward(g), xt.grad.numpy()
    np.testing.assert_array_equal(dx != 0, expected != 0)  # the same pixels get the gradient
    np.testing.assert_allclose(dx, expected, rtol=1e-14, atol=1e-15)  # sums of overlaps: rounding


def test_flatten_matches_torch_on_a_convolution_output(torch, rng):
    """A convolution's output is channels-last in memory; Flatten gives torch's (C, H, W) order."""
    conv = C.Conv2d(2, 3, 3, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 2, 5, 6))
    y = conv(x)
    assert not y.flags.c_contiguous  # NCHW shape over NHWC memory
    flat = C.Flatten()(y)
    np.testing.assert_array_equal(flat, torch.flatten(_t(torch, y), 1).numpy())
    np.testing.assert_array_equal(flat, np.ascontiguousarray(y).reshape(2, -1))


def torch_small_cnn(torch, model):
    """torch's twin of ``small_cnn`` with its weights (Dense keeps (in, out): transposed)."""
    nn = torch.nn
    ref = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10)).double()
    pairs = [(model[0], ref[0]), (model[2], ref[3]), (model[5], ref[7]), (model[6], ref[9])]
    with torch.no_grad():
        for ours, theirs in pairs:
            w = ours.weight.data if isinstance(ours, C.Conv2d) else ours.weight.data.T
            theirs.weight.copy_(_t(torch, w))
            theirs.bias.copy_(_t(torch, ours.bias.data))
    return ref, pairs


def test_small_cnn_matches_torch(torch, rng):
    model = C.small_cnn(dropout=0, dtype=np.float64, rng=rng)
    ref, pairs = torch_small_cnn(torch, model)
    x = rng.random((3, 1, 28, 28))
    xt = _t(torch, x, grad=True)
    y, yt = model(x), ref(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-11, atol=1e-12)
    g = rng.standard_normal(y.shape)
    dx = model.backward(g)
    yt.backward(_t(torch, g))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for ours, theirs in pairs:
        w = ours.weight.grad if isinstance(ours, C.Conv2d) else ours.weight.grad.T
        np.testing.assert_allclose(w, theirs.weight.grad.numpy(), rtol=1e-10, atol=1e-11)
        np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), rtol=1e-10, atol=1e-11)


# --- initialisation, API, errors -----------------------------------------------------------------

def test_conv_shapes_and_pytorch_initialisation(rng):
    conv = C.Conv2d(16, 32, 5, rng=rng)
    assert conv.weight.shape == (32, 16, 5, 5) and conv.bias.shape == (32,)
    assert conv.weight.dtype == np.float32
    bound = 1 / np.sqrt(16 * 25)  # kaiming_uniform(a=sqrt(5)) and the bias rule of torch
    assert 0.99 * bound < np.abs(conv.weight.data).max() <= bound  # 12800 draws reach the edge
    assert 0 < np.abs(conv.bias.data).max() <= bound
    # uniform on ±bound has standard deviation bound / sqrt(3)
    assert abs(conv.weight.data.std() - bound / np.sqrt(3)) < 0.02 * bound
    assert [n for n, _ in C.Conv2d(1, 2, 3, bias=False).named_parameters()] == ["weight"]


def test_same_seed_same_model():
    gn.manual_seed(4)
    a = C.small_cnn()
    gn.manual_seed(4)
    b = C.small_cnn()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_small_cnn_layout_and_names():
    model = C.small_cnn(rng=np.random.default_rng(0))
    assert [type(m).__name__ for m in model] == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d",
                                                "Flatten", "Dense", "Dropout", "Dense"]
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias", "7.weight", "7.bias"]
    assert sum(p.data.size for p in model.parameters()) == 421642  # torch's count for this net
    y = model.eval()(np.zeros((2, 1, 28, 28), np.float32))
    assert y.shape == (2, 10) and y.dtype == np.float32
    assert len(C.small_cnn(dropout=0, rng=np.random.default_rng(0))) == 7
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 4"):
        C.small_cnn(image_size=30)


def test_conv_grad_decay_accumulates(rng):
    """Two half batches with grad_decay = 1 give the gradient of the whole batch."""
    conv = C.Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=rng)
    x, g = rng.standard_normal((4, 2, 5, 6)), rng.standard_normal((4, 3, 5, 6))
    conv(x)
    conv.backward(g)
    whole = [p.grad.copy() for p in conv.parameters()]
    conv.zero_grad()
    for p in conv.parameters():
        p.grad_decay = 1.0
    for half in (slice(0, 2), slice(2, 4)):
        conv(x[half])
        conv.backward(g[half])
    for p, w in zip(conv.parameters(), whole):
        np.testing.assert_allclose(p.grad, w, rtol=1e-12, atol=1e-13)


def test_an_eval_forward_does_not_disturb_a_pending_backward(rng):
    """The training forward's reused im2col buffer is not the eval forward's."""
    conv = C.Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=rng)
    x, g = rng.standard_normal((2, 2, 5, 6)), rng.standard_normal((2, 3, 5, 6))
    conv(x)
    conv.backward(g)
    expected = conv.weight.grad.copy()
    conv(x)
    conv.eval()(rng.standard_normal((2, 2, 5, 6)))
    conv.train().backward(g)
    np.testing.assert_array_equal(conv.weight.grad, expected)


def test_workspace_follows_the_batch_shape(rng):
    conv = C.Conv2d(1, 2, 3, padding=1, dtype=np.float64, rng=rng)
    for n in (3, 1, 3):
        x = rng.standard_normal((n, 1, 4, 4))
        ref = C.Conv2d(1, 2, 3, padding=1, dtype=np.float64, rng=np.random.default_rng(0))
        ref.weight.data[...], ref.bias.data[...] = conv.weight.data, conv.bias.data
        np.testing.assert_array_equal(conv(x), ref(x))


@pytest.mark.parametrize("x,error,match", [
    (np.zeros((2, 3, 8, 8), np.float32), ValueError, r"expects input of shape \(N, 2, H, W\), got \(2, 3, 8, 8\)"),
    (np.zeros((2, 8, 8), np.float32), ValueError, r"expects input of shape \(N, 2, H, W\), got \(2, 8, 8\)"),
    (np.zeros((2, 2, 8, 8), np.float64), TypeError, "computes in float32 but got float64 input"),
    (np.zeros((2, 2, 8, 8), np.int64), TypeError, "expects a floating-point input, got dtype int64"),
    (np.zeros((2, 2, 2, 8), np.float32), ValueError, "input of height x width 2x8 .* smaller than the kernel 3x3"),
    ([[1.0]], TypeError, "expects a numpy or cupy array, got list"),
])
def test_conv_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        C.Conv2d(2, 4, 3)(x)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"in_channels": 0}, ValueError, "in_channels must be a positive int, got 0"),
    ({"out_channels": 2.0}, ValueError, "out_channels must be a positive int, got 2.0"),
    ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1, got 0"),
    ({"kernel_size": (3, 3, 3)}, TypeError, r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
    ({"stride": 1.5}, TypeError, "stride must be an int or a pair of ints, got 1.5"),
    ({"padding": -1}, ValueError, "padding must be >= 0, got -1"),
    ({"activation": "tanh"}, ValueError, "activation must be None or 'relu', got 'tanh'"),
    ({"dtype": np.int32}, TypeError, "dtype must be a floating-point dtype, got int32"),
])
def test_conv_argument_errors(kwargs, error, match):
    args = {"in_channels": 1, "out_channels": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        C.Conv2d(**args)


def test_pool_and_flatten_errors(rng):
    with pytest.raises(ValueError, match=r"MaxPool2d\(kernel_size=3, stride=3\): input of height x width 2x5"):
        C.MaxPool2d(3)(np.zeros((1, 1, 2, 5)))
    with pytest.raises(ValueError, match=r"AvgPool2d\(kernel_size=2, stride=2\) expects input of shape "
                                         r"\(N, C, H, W\), got \(4, 4\)"):
        C.AvgPool2d(2)(np.zeros((4, 4)))
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
        C.MaxPool2d("2")
    with pytest.raises(ValueError, match="cannot flatten dimensions 3..-1 of an input of shape"):
        C.Flatten(3)(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="start_dim must be an int, got 1.0"):
        C.Flatten(1.0)


@pytest.mark.parametrize("make,shape", [
    (lambda: C.Conv2d(1, 2, 3, dtype=np.float64), (2, 1, 5, 5)),
    (lambda: C.MaxPool2d(2), (2, 1, 4, 4)),
    (lambda: C.AvgPool2d(2), (2, 1, 4, 4)),
    (lambda: C.Flatten(), (2, 1, 4, 4)),
])
def test_backward_needs_a_training_forward_and_a_matching_dy(make, shape):
    layer = make()
    with pytest.raises(ValueError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.zeros((2, 2, 3, 3)))
    layer.eval()(np.zeros(shape))
    with pytest.raises(ValueError, match=r"in eval mode: call \.train\(\) first"):
        layer.backward(np.zeros((2, 2, 3, 3)))
    layer.train()(np.zeros(shape))
    with pytest.raises(ValueError, match="backward expects dy"):
        layer.backward(np.zeros((2, 5, 7, 7)))


def test_reprs():
    assert repr(C.Conv2d(1, 32, 3, padding=1)) == "Conv2d(1, 32, kernel_size=3, stride=1, padding=1)"
    assert repr(C.Conv2d(1, 2, (3, 5), 2, bias=False, activation="relu")) == \
        "Conv2d(1, 2, kernel_size=(3, 5), stride=2, bias=False, activation='relu')"
    assert repr(C.MaxPool2d(2)) == "MaxPool2d(kernel_size=2, stride=2)"
    assert repr(C.AvgPool2d(3, 1)) == "AvgPool2d(kernel_size=3, stride=1)"


def test_conv_moves_with_the_model(device, on, rng):
    conv = C.Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 2, 5, 4))
    expected = conv(x)
    conv.to(device)
    np.testing.assert_allclose(to_numpy(conv(on(x))), expected, rtol=1e-13, atol=1e-13)
    conv.to("cpu", dtype=np.float32)
    assert conv(x.astype(np.float32)).dtype == np.float32


def test_max_pool_over_more_than_256_offsets(rng):
    """Window offsets are counted in uint8 up to 256 of them, beyond that in int32."""
    x = distinct(rng, 2, 1, 18, 16)
    pool = C.MaxPool2d((17, 16), stride=1)  # 272 offsets, two windows down the height
    y = pool(x)
    np.testing.assert_array_equal(y[:, 0, :, 0],
                                  [[x[n, 0, i:i + 17].max() for i in range(2)] for n in range(2)])
    dx = pool.backward(np.ones_like(y))
    for n in range(2):
        for i in range(2):
            r, c = np.unravel_index(np.argmax(x[n, 0, i:i + 17]), (17, 16))
            assert dx[n, 0, i + r, c] >= 1
    assert dx.sum() == 4
