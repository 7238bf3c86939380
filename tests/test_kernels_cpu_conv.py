"""The compiled convolution and max-pooling kernels (kernels/_cpu_conv.h) against conv.py's NumPy
path, which stays the reference.

The gradient checks of test_conv.py already run on both paths (the ``device`` fixture). These
tests add what only the kernels have: tiles of im2col and image ranges on threads, whose every
boundary is crossed here with small inputs by shrinking the tile and the work a thread needs;
the argument checks of the entry points; and the input a Conv2d keeps for its backward pass.
"""

import numpy as np
import pytest

from gpunet import conv as C
from gpunet import layers as L
from gpunet.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"the compiled CPU kernels are not loaded: "
                                       f"{cpu_kernels.DESCRIPTION}")


@pytest.fixture(params=["default", "small tiles, many threads"])
def tuning(request):
    """The kernels as shipped, then with 64-row tiles and a thread for any work at all."""
    if request.param == "default":
        yield request.param
        return
    old = cpu_kernels._lib.conv_tuning(1, 1)
    try:
        yield request.param
    finally:
        cpu_kernels._lib.conv_tuning(*old)


def run(layer, x, dy, compiled, monkeypatch, input_grad=True):
    """(y, dx, parameter gradients) of one forward and backward, on the chosen path."""
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(cpu_kernels, "_lib", None)
        for p in layer.parameters():
            p.grad_buffer().fill(0)
        y = layer(x)
        dx = layer.backward(dy, input_grad=input_grad)
        return y, dx, [p.grad.copy() for p in layer.parameters()]


CONV_CASES = [  # (in, out, kernel, stride, padding, input shape)
    (1, 8, 3, 1, 1, (5, 1, 12, 12)),       # the small CNN's first layer, smaller
    (1, 40, 3, 1, 1, (3, 1, 9, 9)),        # one channel, more outputs than a 512-bit vector holds
    (4, 5, 2, 1, 0, (2, 4, 6, 6)),         # an even kernel, no padding
    (8, 6, 3, 1, 1, (4, 8, 7, 7)),         # and its second
    (3, 5, 3, 2, 1, (3, 3, 9, 7)),
    (2, 4, 5, 1, 2, (2, 2, 11, 8)),
    (3, 2, (3, 2), (2, 1), (0, 1), (3, 3, 7, 6)),
    (4, 6, 1, 1, 0, (3, 4, 5, 5)),         # 1x1: the input is the im2col matrix
    (2, 3, 2, 3, 0, (2, 2, 8, 8)),         # stride > kernel: pixels no window reads
    (2, 2, 3, 1, 4, (1, 2, 3, 3)),         # padding wider than the image
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_kernel_matches_the_numpy_path(rng, monkeypatch, tuning, case, bias, activation,
                                            dtype):
    cin, cout, k, s, p, shape = case
    layer = C.Conv2d(cin, cout, k, s, p, bias=bias, activation=activation, dtype=dtype, rng=rng)
    x = rng.standard_normal(shape).astype(dtype)
    out = C._output_size(layer, shape[2:], layer.kernel_size, layer.stride, layer.padding)
    dy = rng.standard_normal((shape[0], cout, *out)).astype(dtype)
    y_ref, dx_ref, g_ref = run(layer, x, dy, False, monkeypatch)
    y, dx, g = run(layer, x, dy, True, monkeypatch)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, **tol)
    # The layouts the layers after it rely on: channels-last memory, NCHW shape.
    assert y.shape == y_ref.shape and y.transpose(0, 2, 3, 1).flags.c_contiguous
    assert dx.shape == x.shape


def test_conv_kernel_skips_the_input_gradient(rng, monkeypatch, tuning):
    layer = C.Conv2d(3, 4, 3, padding=1, activation="relu", rng=rng, dtype=np.float64)
    x = rng.standard_normal((3, 3, 6, 5))
    dy = rng.standard_normal((3, 4, 6, 5))
    _, none, g = run(layer, x, dy, True, monkeypatch, input_grad=False)
    _, _, g_ref = run(layer, x, dy, False, monkeypatch)
    assert none is None
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv_kernel_takes_a_plain_nchw_input(rng, monkeypatch):
    """An input in NCHW memory (a user's batch) is laid out channels-last once; the result is
    the same as for the same values in channels-last memory."""
    layer = C.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 3, 5, 6))
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal((2, 4, 5, 6))
    a = run(layer, x, dy, True, monkeypatch)
    b = run(layer, x_last, dy, True, monkeypatch)
    for got, want in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        np.testing.assert_array_equal(got, want)


def test_conv_keeps_a_copy_of_its_input_unless_told_not_to(rng):
    """Backward recomputes im2col from the input, so writing into x between forward and backward
    must not change the gradient (a reference would give the gradient of the new data)."""
    layer = C.Conv2d(1, 2, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 1, 5, 5))
    dy = rng.standard_normal((2, 2, 5, 5))
    layer(x.copy())
    layer.backward(dy)
    want = layer.weight.grad.copy()
    layer.weight.grad_buffer().fill(0)
    layer.bias.grad_buffer().fill(0)
    scribbled = x.copy()
    layer(scribbled)
    scribbled[...] = 7.0
    layer.backward(dy)
    np.testing.assert_array_equal(layer.weight.grad, want)
    # copy_input=False: the caller's promise; the layer then keeps the array itself.
    layer.forward(x, copy_input=False)
    assert np.shares_memory(layer._saved("x"), x)


def test_conv_kernel_accumulates_into_existing_gradients(rng, monkeypatch):
    """grad_decay 1 (no zero_grad between backwards) adds, on both paths alike."""
    layer = C.Conv2d(2, 3, 3, stride=2, padding=1, activation="relu", rng=rng, dtype=np.float64)
    x = rng.standard_normal((3, 2, 7, 7))
    dy = rng.standard_normal((3, 3, 4, 4))
    grads = []
    for compiled in (False, True):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(cpu_kernels, "_lib", None)
            for p in layer.parameters():
                p.grad_buffer().fill(0.5)
                p.grad_decay = 1.0
            layer(x)
            layer.backward(dy)
            grads.append([p.grad.copy() for p in layer.parameters()])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


POOL_CASES = [  # (kernel, stride, input shape)
    (2, None, (5, 8, 12, 12)),
    (3, 2, (3, 4, 9, 8)),          # windows overlap: gradients add
    ((2, 3), (1, 2), (2, 3, 5, 8)),
    (2, 3, (2, 3, 8, 7)),          # pixels no window covers
    (1, None, (2, 3, 4, 4)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_kernel_matches_the_numpy_path(rng, monkeypatch, tuning, case, dtype):
    k, s, shape = case
    pool = C.MaxPool2d(k, s)
    # small integers: many ties, which must go to the first maximum on both paths
    values = rng.integers(-3, 4, size=shape).astype(dtype)
    x = np.ascontiguousarray(values.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "_lib", None)
        y_ref = pool(x)
        dy = rng.standard_normal(y_ref.shape).astype(dtype)
        dx_ref = pool.backward(dy)
    y = pool(x)
    assert pool._saved("nhwc")  # the compiled path ran
    dx = pool.backward(dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)


def test_max_pool_kernel_nan_like_numpy(monkeypatch):
    """A NaN in a window gives NaN; a NaN upstream gradient reaches its whole window, as the
    NumPy path's dy * (index == t) does."""
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    dy = np.ones((2, 1, 2, 2))
    dy[1, 0, 0, 0] = np.nan
    pool = C.MaxPool2d(2)
    results = []
    for compiled in (False, True):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(cpu_kernels, "_lib", None)
            results.append((pool(x), pool.backward(dy)))
    (y_ref, dx_ref), (y, dx) = results
    assert np.isnan(y[0, 0, 0, 0])
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_kernel_in_eval_mode_keeps_no_index(rng):
    pool = C.MaxPool2d(2).eval()
    x = np.ascontiguousarray(rng.standard_normal((2, 4, 4, 3))).transpose(0, 3, 1, 2)
    y = pool(x)
    assert y.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="eval mode"):
        pool.backward(np.ones_like(y))


# --- the entry points' own checks ----------------------------------------------------------------

lib = cpu_kernels._lib


def conv_args(n=2, h=5, w=5, c=3, o=4, dtype=np.float32):
    x = np.zeros((n, h, w, c), dtype)
    wt = np.zeros((9 * c, o), dtype)
    y = np.zeros((n, h, w, o), dtype)
    return x, wt, y


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "w": a["w"][:-1]}, ValueError, "w must have shape"),
    (lambda a: {**a, "y": np.zeros((2, 4, 5, 4), np.float32)}, ValueError, "y must have shape"),
    (lambda a: {**a, "w": a["w"].astype(np.float64)}, TypeError, "dtype of x"),
    (lambda a: {**a, "b": np.zeros(3, np.float32)}, ValueError, "b must have shape"),
    (lambda a: {**a, "x": a["x"].transpose(0, 2, 1, 3)}, TypeError, "C-contiguous"),
    (lambda a: {**a, "y": a["x"]}, ValueError, "must have shape|overlap"),
    (lambda a: {**a, "kernel": (0, 3)}, ValueError, "kernel and stride must be >= 1"),
    (lambda a: {**a, "kernel": (9, 9)}, ValueError, "does not fit"),
])
def test_conv2d_forward_refuses_bad_arguments(change, error, match):
    x, w, y = conv_args()
    a = change({"x": x, "w": w, "b": np.zeros(4, np.float32), "y": y, "kernel": (3, 3)})
    with pytest.raises(error, match=match):
        lib.conv2d_forward(a["x"], a["w"], a["b"], a["y"], False, *a["kernel"], 1, 1, 1, 1, 0,
                           None)


def test_conv2d_forward_refuses_an_output_over_its_input():
    x = np.zeros((1, 3, 3, 4), np.float32)
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="must not overlap"):
        lib.conv2d_forward(x, w, None, x, False, 1, 1, 1, 1, 0, 0, 0, None)


def test_conv2d_backward_refuses_bad_arguments():
    x, w, y = conv_args()
    dw = np.zeros_like(w)
    with pytest.raises(ValueError, match="dy must have shape"):
        lib.conv2d_backward(x, w, y[:1], None, dw, None, 0.0, None, 3, 3, 1, 1, 1, 1, 0, None)
    with pytest.raises(ValueError, match="dx must have shape"):
        lib.conv2d_backward(x, w, y, None, dw, None, 0.0, x[:1], 3, 3, 1, 1, 1, 1, 0, None)
    with pytest.raises(ValueError, match="must not overlap"):
        lib.conv2d_backward(x, w, y, None, w, None, 0.0, None, 3, 3, 1, 1, 1, 1, 0, None)
    with pytest.raises(TypeError, match="takes 16 arguments"):
        lib.conv2d_backward(x, w, y)


def test_max_pool_entry_points_refuse_bad_arguments():
    x = np.zeros((1, 4, 4, 2), np.float32)
    y = np.zeros((1, 2, 2, 2), np.float32)
    with pytest.raises(TypeError, match="uint8"):
        lib.max_pool2d_forward(x, y, np.zeros((1, 2, 2, 2), np.int32), 2, 2, 2, 2)
    with pytest.raises(ValueError, match="y must have shape"):
        lib.max_pool2d_forward(x, np.zeros((1, 1, 2, 2), np.float32), None, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="index must have shape"):
        lib.max_pool2d_backward(y, np.zeros((1, 2, 1, 2), np.uint8), x, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="more than 256"):
        lib.max_pool2d_forward(np.zeros((1, 17, 17, 1), np.float32),
                               np.zeros((1, 1, 1, 1), np.float32), None, 17, 17, 1, 1)


# --- a ReLU convolution and the max pooling after it, fused by Sequential -----------------------

FUSED_CASES = [  # (in, out, kernel, stride, padding, pool, input shape)
    (1, 8, 3, 1, 1, 2, (5, 1, 12, 12)),    # the small CNN's first block, smaller
    (8, 6, 3, 1, 1, 2, (4, 8, 7, 7)),      # 7x7: the last row and column feed no window
    (3, 4, 3, 2, 1, 3, (3, 3, 13, 11)),
    (2, 3, 1, 1, 0, 2, (2, 2, 6, 4)),
]


def fused_pair(rng, case, dtype):
    cin, cout, k, s, p, pool, shape = case
    conv = C.Conv2d(cin, cout, k, s, p, activation="relu", dtype=dtype, rng=rng)
    return L.Sequential(conv, C.MaxPool2d(pool)), rng.standard_normal(shape).astype(dtype)


def one_by_one(model, x, dy, input_grad=True):
    """The layers called one at a time: never fused."""
    for p in model.parameters():
        p.grad_buffer().fill(0)
    y = model[1](model[0](x))
    dx = model[0].backward(model[1].backward(dy), input_grad=input_grad)
    return y, dx, [p.grad.copy() for p in model.parameters()]


def through_sequential(model, x, dy, input_grad=True):
    for p in model.parameters():
        p.grad_buffer().fill(0)
    y = model(x)
    dx = model.backward(dy, input_grad=input_grad)
    return y, dx, [p.grad.copy() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_conv_and_pooling_match_the_layers_one_by_one(rng, monkeypatch, tuning, case,
                                                             dtype):
    model, x = fused_pair(rng, case, dtype)
    dy = rng.standard_normal(model[1](model[0](x)).shape).astype(dtype)
    want = one_by_one(model, x, dy)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "_lib", None)
        reference = one_by_one(model, x, dy)  # the NumPy path
    got = through_sequential(model, x, dy)
    assert model._fused == {0}
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    for result in (want, reference):
        np.testing.assert_allclose(got[0], result[0], **tol)
        np.testing.assert_allclose(got[1], result[1], **tol)
        for a, b in zip(got[2], result[2]):
            np.testing.assert_allclose(a, b, **tol)


def test_after_a_fused_forward_each_layer_still_backs_up_on_its_own(rng):
    """pool.backward then conv.backward, called by hand after Sequential's fused forward, give
    the unfused gradients (the conv makes its output again for the ReLU mask)."""
    model, x = fused_pair(rng, FUSED_CASES[1], np.float64)
    dy = rng.standard_normal(model(x).shape)
    want = one_by_one(model, x, dy)
    for p in model.parameters():
        p.grad_buffer().fill(0)
    y = model(x)
    assert model._fused == {0}
    dx = model[0].backward(model[1].backward(dy))
    np.testing.assert_allclose(y, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip([p.grad for p in model.parameters()], want[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fused_first_block_skips_the_input_gradient(rng):
    model, x = fused_pair(rng, FUSED_CASES[0], np.float64)
    dy = rng.standard_normal(model(x).shape)
    want = one_by_one(model, x, dy, input_grad=False)
    got = through_sequential(model, x, dy, input_grad=False)
    assert got[1] is None and want[1] is None
    for a, b in zip(got[2], want[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fused_eval_forward_matches(rng):
    model, x = fused_pair(rng, FUSED_CASES[2], np.float64)
    model.eval()
    want = model[1](model[0](x))
    got = model(x)
    assert model._fused == {0}
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv,pool,why", [
    (dict(activation=None), C.MaxPool2d(2), "no ReLU"),
    (dict(activation="relu"), C.MaxPool2d(3, 2), "overlapping windows"),
    (dict(activation="relu"), C.MaxPool2d((2, 1)), "a window that is not square"),
    (dict(activation="relu"), C.AvgPool2d(2), "not a max pooling"),
])
def test_only_what_the_kernel_computes_is_fused(rng, conv, pool, why):
    model = L.Sequential(C.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64, **conv), pool)
    x = rng.standard_normal((2, 2, 6, 6))
    model(x)
    assert model._fused == set(), why


def test_no_fusion_on_the_numpy_path_or_across_modes(rng, monkeypatch):
    model, x = fused_pair(rng, FUSED_CASES[0], np.float64)
    model[1].eval()  # one layer in eval mode, the other training
    model(x)
    assert model._fused == set()
    model.train()
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "_lib", None)
        model(x)
        assert model._fused == set()


def test_fused_backward_after_an_unfused_forward_is_refused(rng):
    model, x = fused_pair(rng, FUSED_CASES[0], np.float64)
    y = model[1](model[0](x))
    with pytest.raises(ValueError, match="unfused forward"):
        model[0].backward_max_pool(np.ones(y.shape), model[1])
