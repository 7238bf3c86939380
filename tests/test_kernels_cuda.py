"""gpunet.kernels.cuda: every kernel against its NumPy twin in float64, on fresh random inputs.

Without a GPU the NumPy twins that share each kernel's formula are tested here, and
tests/test_kernels_cuda_compile.py compiles every kernel with NVRTC as CuPy will; the GPU tests carry
the ``cuda`` marker and skip with a reason.
"""

import numpy as np
import pytest

from gpunet import backend, functional as F, layers as L, losses, optim
from gpunet.kernels import cuda as K
from gpunet.backend import to_numpy

# --- the NumPy twins -------------------------------------------------------------------------------

def test_bias_relu_twin(rng):
    y = rng.standard_normal((5, 4))
    b = rng.standard_normal(4)
    expected = np.maximum(y + b, 0)
    y[0, 0] = np.nan
    out = F.bias_relu_(y, b)
    assert out is y and np.isnan(y[0, 0])  # NaN passes through, as in the kernel
    np.testing.assert_array_equal(y[1:], expected[1:])


def test_relu_backward_twin(rng):
    y = np.maximum(rng.standard_normal((6, 3)), 0)
    dy = rng.standard_normal((6, 3))
    db = np.empty(3)
    dz = F.relu_backward(dy, y, bias_grad=db)
    np.testing.assert_array_equal(dz, np.where(y > 0, dy, 0))
    np.testing.assert_allclose(db, dz.sum(axis=0))


def test_count_correct_twin(rng):
    logits = rng.standard_normal((50, 7))
    labels = rng.integers(0, 7, 50)
    out = F.count_correct(logits, labels)
    assert int(out) == int((logits.argmax(axis=1) == labels).sum())
    F.count_correct(logits, labels, out=out)
    assert int(out) == 2 * int((logits.argmax(axis=1) == labels).sum())


# --- on a GPU --------------------------------------------------------------------------------------

@pytest.fixture
def cp():
    return backend.get_device("cuda").xp


@pytest.fixture
def poisoned(cp):
    """Every new device allocation starts as all-ones bytes (NaN as floats), so an element a
    kernel forgets to write fails the comparison instead of passing as a stale zero."""
    pool = cp.cuda.MemoryPool()

    def malloc(size):
        memory = pool.malloc(size)
        memory.memset_async(0xFF, size)
        return memory

    cp.cuda.set_allocator(malloc)
    yield cp
    cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)


def reference_loss_and_grad(x, t, **kw):
    """numpy float64: the formula the kernels must match."""
    x64 = np.asarray(x, np.float64)
    w = kw.pop("weight", None)
    kw["weight"] = None if w is None else np.asarray(w, np.float64)
    return (F.softmax_cross_entropy(x64, t, **kw), F.softmax_cross_entropy_grad(x64, t, **kw))


def dtypes_on_gpu():
    out = [np.float32, np.float64, np.float16]
    try:
        out.append(backend.resolve_dtype("bfloat16"))
    except ValueError:
        pass
    return out


TOLERANCE = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
SHAPES = [(128, 10), (300, 1000), (64, 6000), (16, 32768), (3, 70000)]  # every kernel variant


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", dtypes_on_gpu(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("keywords", [
    {}, {"reduction": "sum"}, {"reduction": "none"},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 1},
])
def test_single_pass_cross_entropy(poisoned, rng, shape, dtype, keywords):
    cp = poisoned
    n, c = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, c, n)
    t[::7] = keywords.get("ignore_index", -100)
    kw = dict(keywords)
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2, c).astype(np.float32)
    expected_loss, expected_grad = reference_loss_and_grad(x, t, **dict(kw))
    if "weight" in kw:
        kw["weight"] = cp.asarray(kw["weight"])
    plan = F._CrossEntropyPlan(cp.asarray(x), cp.asarray(t), kw.get("weight"), kw.get("ignore_index", -100),
                               kw.get("label_smoothing", 0.0), kw.get("reduction", "mean"))
    loss, grad = K.cross_entropy_loss_and_grad(plan)
    tol = TOLERANCE[np.dtype(dtype).name]
    assert grad.dtype == dtype and loss.dtype == dtype
    np.testing.assert_allclose(to_numpy(loss).astype(np.float64), expected_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_numpy(grad).astype(np.float64), expected_grad, rtol=tol,
                               atol=tol * np.abs(expected_grad).max())


@pytest.mark.cuda
@pytest.mark.parametrize("c", [10, 32768])
def test_edge_cases_on_gpu(poisoned, c):
    cp = poisoned
    x = np.zeros((4, c), np.float32)
    x[0, 0], x[1, 1] = 1e4, -1e4
    x[2, :] = -np.inf
    x[2, 3] = 0.0
    t = np.array([0, 0, 3, 1])
    for reduction in ("mean", "sum", "none"):
        loss, grad = F.softmax_cross_entropy_with_grad(cp.asarray(x), cp.asarray(t), reduction=reduction)
        ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction=reduction)
        np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(to_numpy(grad), ref_grad, atol=1e-6)
    everything_ignored = cp.full(4, -100)
    loss, grad = F.softmax_cross_entropy_with_grad(cp.asarray(x), everything_ignored)
    assert float(loss) == 0.0 and not bool(grad.any())
    loss, grad = F.softmax_cross_entropy_with_grad(cp.zeros((0, c), cp.float32), cp.zeros(0, cp.int64))
    assert float(loss) == 0.0 and grad.shape == (0, c)


@pytest.mark.cuda
def test_non_contiguous_logits(poisoned, rng):
    cp = poisoned
    wide = rng.standard_normal((64, 40)).astype(np.float32)
    x = cp.asarray(wide)[:, ::2]  # a strided view
    t = rng.integers(0, 20, 64)
    for fn in (F.softmax_cross_entropy_grad, lambda a, b: F.softmax_cross_entropy_with_grad(a, b)[1]):
        np.testing.assert_allclose(to_numpy(fn(x, cp.asarray(t))),
                                   reference_loss_and_grad(wide[:, ::2], t)[1], atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtypes_on_gpu(), ids=lambda d: np.dtype(d).name)
def test_gradient_from_kept_lse(poisoned, rng, dtype):
    cp = poisoned
    x = rng.standard_normal((33, 17)).astype(dtype)
    t = rng.integers(0, 17, 33)
    t[5] = -100
    w = rng.uniform(0.5, 2, 17)
    loss = losses.SoftmaxCrossEntropy(weight=cp.asarray(w), label_smoothing=0.2, reduction="none")
    loss.forward(cp.asarray(x), cp.asarray(t))
    upstream = rng.standard_normal(33)
    got = loss.backward(cp.asarray(upstream))
    expected = F.softmax_cross_entropy_grad(x.astype(np.float64), t, weight=w, label_smoothing=0.2,
                                            reduction="none", grad_output=upstream)
    tol = TOLERANCE[np.dtype(dtype).name]
    np.testing.assert_allclose(to_numpy(got).astype(np.float64), expected, rtol=tol,
                               atol=tol * np.abs(expected).max())


@pytest.mark.cuda
def test_labels_are_rejected_before_any_kernel(cp, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the labels were checked")

    for name in ("cross_entropy_loss_and_grad", "cross_entropy_grad"):
        monkeypatch.setattr(K, name, forbidden)
    x, t = cp.zeros((3, 10), cp.float32), cp.asarray([1, 10, 2])
    for reduction in ("mean", "sum", "none"):
        with pytest.raises(ValueError, match="target has label 10 at index 1"):
            F.softmax_cross_entropy_with_grad(x, t, reduction=reduction)
        with pytest.raises(ValueError, match="target has label 10"):
            F.softmax_cross_entropy_grad(x, t, reduction=reduction)


@pytest.mark.cuda
def test_one_launch_for_a_small_batch(cp, rng, monkeypatch):
    launches = []
    compiled = K._compiled

    def counting(source, name):
        kernel = compiled(source, name)

        def launch(*args, **kwargs):
            launches.append(name)
            return kernel(*args, **kwargs)
        return launch

    monkeypatch.setattr(K, "_compiled", counting)
    x = cp.asarray(rng.standard_normal((128, 10)).astype(np.float32))
    t = cp.asarray(rng.integers(0, 10, 128))
    F.softmax_cross_entropy_with_grad(x, t, validate=False)
    assert launches == ["ce_warp_rows<0>"]


@pytest.mark.cuda
def test_dense_relu_kernels(poisoned, rng):
    cp = poisoned
    y = rng.standard_normal((128, 256)).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    dy = rng.standard_normal((128, 256)).astype(np.float32)
    got = F.bias_relu_(cp.asarray(y), cp.asarray(b))
    np.testing.assert_allclose(to_numpy(got), np.maximum(y + b, 0), rtol=1e-6)
    bias_grad = cp.empty(256, cp.float32)
    dz = F.relu_backward(cp.asarray(dy), got, bias_grad=bias_grad)
    expected = np.where(np.maximum(y + b, 0) > 0, dy, 0)
    np.testing.assert_allclose(to_numpy(dz), expected)
    np.testing.assert_allclose(to_numpy(bias_grad), expected.sum(axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_relu_backward_of_a_convolution_in_groups_of_rows(poisoned, rng, dtype):
    """The small CNN's first layer at batch 128: 100352 rows of 32 channels, cut into groups of
    rows (two launches), and with beta (Parameter.grad_decay) on top."""
    cp = poisoned
    n, c = 100352, 32
    assert K.relu_backward_groups(n, c, K.device_facts(0)) > 1
    y = np.maximum(rng.standard_normal((n, c)), 0).astype(dtype)
    dy = rng.standard_normal((n, c)).astype(dtype)
    bias_grad = cp.empty(c, dtype)
    dz = F.relu_backward(cp.asarray(dy), cp.asarray(y), bias_grad=bias_grad)
    expected = np.where(y > 0, dy, 0).astype(np.float64)
    np.testing.assert_array_equal(to_numpy(dz).astype(np.float64), expected)
    tol = {np.float32: 1e-5, np.float64: 1e-12, np.float16: 2e-3}[dtype]
    scale = np.abs(expected).sum(axis=0).max()
    np.testing.assert_allclose(to_numpy(bias_grad).astype(np.float64), expected.sum(axis=0),
                               rtol=tol, atol=tol * scale)
    before = to_numpy(bias_grad).astype(np.float64)
    F.relu_backward(cp.asarray(dy), cp.asarray(y), bias_grad=bias_grad, beta=0.5)
    np.testing.assert_allclose(to_numpy(bias_grad).astype(np.float64),
                               expected.sum(axis=0) + 0.5 * before, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
def test_count_correct_kernel(cp, rng):
    logits = rng.standard_normal((1000, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 1000)
    got = F.count_correct(cp.asarray(logits), cp.asarray(labels))
    assert int(got) == int((logits.argmax(axis=1) == labels).sum())


@pytest.mark.cuda
@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.1),
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.2),
    lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
def test_fused_optimizer_update_matches_numpy(cp, rng, make):
    cpu = L.mlp([20, 16, 5], rng=np.random.default_rng(0))
    gpu = L.mlp([20, 16, 5], rng=np.random.default_rng(0)).to("cuda")
    opt_cpu, opt_gpu = make(cpu.parameters()), make(gpu.parameters())
    for _ in range(4):
        g = rng.standard_normal(opt_cpu.grad.shape).astype(np.float32)
        opt_cpu.grad[...] = g
        opt_gpu.grad[...] = cp.asarray(g)
        opt_cpu.step()
        opt_gpu.step()
    np.testing.assert_allclose(to_numpy(opt_gpu.data), opt_cpu.data, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_training_step_on_gpu_equals_cpu(cp, rng, dtype):
    compute = None if dtype == "float32" else np.float16
    x = rng.standard_normal((128, 784)).astype(dtype)
    t = rng.integers(0, 10, 128)
    results = []
    for device in ("cpu", "cuda"):
        model = L.mlp([784, 64, 10], rng=np.random.default_rng(1), compute_dtype=compute).to(device)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = losses.SoftmaxCrossEntropy()
        for _ in range(3):
            loss, grad = loss_fn.forward_backward(model(backend.to_device(x, device)),
                                                  backend.to_device(t, device))
            model.backward(grad, input_grad=False)
            opt.step()
        results.append((float(loss), to_numpy(opt.data)))
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert results[1][0] == pytest.approx(results[0][0], rel=tol)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtypes_on_gpu()[2:], ids=lambda d: np.dtype(d).name)
def test_half_conversions_on_gpu_round_as_numpy(cp, dtype):
    """The prelude's device conversions (PTX cvt for float16), held to the numpy casts that
    tests/test_simt.py holds its host twins to: so the GPU and the CPU harness agree."""
    from test_simt import CONVERSIONS, assert_same_bits, rounding_sample

    kind = K._kind(dtype)
    every = np.arange(65536, dtype=np.uint16)
    as_float = cp.full(65536, cp.nan, cp.float32)
    K._launch(CONVERSIONS, K.Launch(f"to_float<{kind}>", 8, 256), (cp.asarray(every), as_float, np.int64(65536)))
    assert_same_bits(to_numpy(as_float), every.view(dtype).astype(np.float32))
    sample = rounding_sample(dtype)
    rounded = cp.full(sample.size, 0xFFFF, cp.uint16)
    K._launch(CONVERSIONS, K.Launch(f"from_float<{kind}>", 8, 256),
              (cp.asarray(sample), rounded, np.int64(sample.size)))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = sample.astype(dtype)
    assert_same_bits(to_numpy(rounded).view(dtype), expected)


# --- matrix products through gpunet's cuBLAS handle ---------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtypes_on_gpu(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m,n,k", [(128, 256, 784), (5, 3, 1), (0, 4, 3), (3, 0, 4), (3, 4, 0)])
def test_matmul_layouts_and_sizes(poisoned, rng, dtype, m, n, k):
    cp = poisoned
    a64, b64 = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    tol = TOLERANCE[np.dtype(dtype).name] * max(1, k) ** 0.5
    for a_host, b_host in ((a64, b64), (np.asfortranarray(a64), b64), (a64, np.asfortranarray(b64))):
        a, b = cp.asarray(a_host.astype(dtype)), cp.asarray(b_host.astype(dtype))
        expected = a_host.astype(dtype).astype(np.float64) @ b_host.astype(dtype).astype(np.float64)
        got = K.matmul(a, b)
        assert got.shape == (m, n) and got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_allclose(to_numpy(got).astype(np.float64), expected, rtol=tol, atol=tol)
        out = cp.asarray(rng.standard_normal((m, n)).astype(dtype))
        before = to_numpy(out).astype(np.float64)
        K.matmul(a, b, out=out, beta=0.5)  # out = a @ b + 0.5 out
        np.testing.assert_allclose(to_numpy(out).astype(np.float64), expected + 0.5 * before,
                                   rtol=tol, atol=tol)


@pytest.mark.cuda
def test_matmul_checks_what_cublas_would_not(cp):
    a, b = cp.ones((3, 4), cp.float32), cp.ones((4, 5), cp.float32)
    with pytest.raises(ValueError, match="out must be a 3x5 array of float32"):
        K.matmul(a, b, out=cp.empty((5, 3), cp.float32))
    with pytest.raises(ValueError, match="out must be a 3x5 array of float32"):
        K.matmul(a, b, out=cp.empty((3, 5), cp.float64))
    with pytest.raises(ValueError, match="inner sizes must match"):
        K.matmul(a, cp.ones((3, 5), cp.float32))
    strided = cp.zeros((3, 10), cp.float32)[:, ::2]
    K.matmul(a, b, out=strided)  # computed, then copied into the strided view
    assert bool((strided == 4).all())
    ints = K.matmul(cp.ones((2, 2), cp.int32), cp.ones((2, 2), cp.int32))  # eager: CuPy's matmul
    assert ints.dtype == cp.int32 and int(ints[0, 0]) == 2


@pytest.mark.cuda
def test_matmul_is_captured_into_a_graph(cp, rng):
    """The whole point of the binding: a product inside stream capture, replayed."""
    a = cp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    b = cp.asarray(rng.standard_normal((32, 16)).astype(np.float32))
    out = cp.empty((64, 16), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        K.matmul(a, b, out=out)  # eager first: the handle exists before capture
        stream.begin_capture()
        K.matmul(a, b, out=out)
        with pytest.raises(TypeError, match="captured into a CUDA graph takes two 2-D arrays"):
            K.matmul(cp.ones((2, 2), cp.int32), cp.ones((2, 2), cp.int32))
        graph = stream.end_capture()
        a[...] = cp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
        out.fill(cp.nan)
        graph.launch(stream=stream)
        # A second replay fails if cuBLAS put an allocation of its own into the graph (it does
        # when its workspace is not set: see cublas.Handle.set_stream).
        graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(to_numpy(out), to_numpy(a) @ to_numpy(b), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_relu_backward_checks_its_buffers(cp, rng):
    y = cp.asarray(np.maximum(rng.standard_normal((6, 40)), 0).astype(np.float32))
    dy = rng.standard_normal((6, 40))
    f_order = cp.asfortranarray(y)
    got = F.relu_backward(cp.asarray(dy), f_order)  # float64 upstream, F-order y: both handled
    assert got.flags.c_contiguous
    np.testing.assert_allclose(to_numpy(got), np.where(to_numpy(y) > 0, dy, 0).astype(np.float32))
    with pytest.raises(ValueError, match="out must have .*C-contiguous"):
        K.relu_backward(cp.asarray(dy, cp.float32), y, out=cp.empty((40, 6), cp.float32).T)
    with pytest.raises(ValueError, match="bias_grad must have shape"):
        K.relu_backward(cp.asarray(dy, cp.float32), y, bias_grad=cp.empty(6, cp.float32))
