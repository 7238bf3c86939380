"""gpunet.optim: PyTorch's update rules, in place on flat buffers, and the schedules."""

import math
import tracemalloc

import numpy as np
import pytest

from gpunet.kernels import blas, cpu as cpu_kernels
from gpunet import layers as L
from gpunet import optim
from gpunet.backend import to_numpy


def reference_trajectory(kind, p0, grads, lr, **kw):
    """The update rules written out plainly, allocating freely, in float64."""
    p, state = p0.astype(np.float64).copy(), {}
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if kind == "sgd":
            m, damp, wd = kw.get("momentum", 0), kw.get("dampening", 0), kw.get("weight_decay", 0)
            d = g + wd * p
            if m:
                state["buf"] = d.copy() if t == 1 else m * state["buf"] + (1 - damp) * d
                d = d + m * state["buf"] if kw.get("nesterov") else state["buf"]
            p = p - lr * d
        else:
            (b1, b2), eps, wd = kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw.get("weight_decay", 0)
            if kind == "adamw":
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
            state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
            state["v"] = b2 * state.get("v", 0) + (1 - b2) * g * g
            m_hat, v_hat = state["m"] / (1 - b1 ** t), state["v"] / (1 - b2 ** t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


CONFIGS = [
    ("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}),
    ("adam", {}), ("adam", {"weight_decay": 1e-2, "betas": (0.8, 0.99)}),
    ("adamw", {"weight_decay": 0.1}),
]


def make(kind, params, lr, kw):
    cls = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[kind]
    return cls(params, lr=lr, **kw)


@pytest.mark.parametrize("kind,kw", CONFIGS)
def test_matches_the_update_rule(device, on, rng, kind, kw):
    model = L.mlp([4, 3, 2], dtype=np.float64, rng=rng).to(device)
    start = [to_numpy(p.data).copy() for p in model.parameters()]
    grads = [[rng.standard_normal(p.shape) for p in model.parameters()] for _ in range(5)]
    opt = make(kind, model.parameters(), 0.05, kw)
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad[...] = on(g)
        opt.step()
    for i, p in enumerate(model.parameters()):
        expected = reference_trajectory(kind, start[i], [g[i] for g in grads], 0.05, **kw)
        np.testing.assert_allclose(to_numpy(p.data), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,kw", [c for c in CONFIGS if c[0] == "sgd"])
def test_sgd_blas_and_numpy_fallback_agree(monkeypatch, rng, dtype, kind, kw):
    """On the CPU, SGD's passes are BLAS axpy/axpby; the numpy fallback is the same rule."""
    if not blas._FUNCTIONS:
        pytest.skip(f"numpy's BLAS is not usable here: {blas.DESCRIPTION}")
    grads = [rng.standard_normal(50).astype(dtype) for _ in range(6)]
    start = rng.standard_normal(50).astype(dtype)

    def run():
        p = L.Parameter(start.copy())
        opt = make(kind, [p], 0.05, kw)
        for g in grads:
            p.grad[...] = g
            opt.step()
        return p.data

    with_blas = run()
    monkeypatch.setattr(blas, "_FUNCTIONS", {})
    monkeypatch.setattr(cpu_kernels, "_lib", None)  # else the SGD kernel takes over from BLAS
    np.testing.assert_allclose(with_blas, run(), rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-6 if dtype == np.float32 else 1e-14)


needs_fold = pytest.mark.skipif(
    not (blas.available(np.zeros(1)) and cpu_kernels.gemm_available(np.zeros(1))),
    reason=f"momentum folds only with numpy's BLAS and the compiled kernels: {blas.DESCRIPTION}; "
           f"{cpu_kernels.DESCRIPTION}")


def train_steps(model, opt, batches, fold_after=None):
    for i, (x, dy) in enumerate(batches):
        if i == fold_after:
            assert opt.fold_momentum()
        model(x)
        model.backward(dy, input_grad=False)
        opt.step()


@needs_fold
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_after", [0, 2])
def test_folded_momentum_follows_the_same_trajectory(rng, dtype, fold_after):
    """Backward adding into the momentum buffer, then p -= lr * buf: the rule of SGD, folded
    from the first step or from a later one (the buffer carries over)."""
    batches = [(rng.standard_normal((16, 6)).astype(dtype), rng.standard_normal((16, 3)).astype(dtype))
               for _ in range(6)]
    runs = []
    for fold in (None, fold_after):
        model = L.mlp([6, 5, 3], dtype=dtype, rng=np.random.default_rng(5))
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_steps(model, opt, batches, fold)
        assert opt.folded == (fold is not None)
        runs.append(([p.data.copy() for p in model.parameters()],
                     opt.state["momentum_buffer"].copy()))
    (plain, plain_buf), (folded, folded_buf) = runs
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for a, b in zip(plain, folded):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    np.testing.assert_allclose(folded_buf, plain_buf, rtol=tol, atol=tol)


@needs_fold
def test_unfold_gives_the_gradients_back(rng):
    model = L.mlp([4, 3, 2], dtype=np.float64, rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert opt.fold_momentum() and opt.fold_momentum()  # a second call is a no-op
    buf = opt.state["momentum_buffer"]
    for p in model.parameters():
        assert np.shares_memory(p.grad, buf) and p.grad_decay == 0.9
    opt.unfold_momentum()
    assert not opt.folded and opt.grad is not buf
    for p in model.parameters():
        assert np.shares_memory(p.grad, opt.grad) and p.grad_decay == 0.0
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    model(x)
    model.backward(dy)  # plain gradients again: the step below is the two-pass rule
    assert not buf.any() and opt.grad.any()


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "nesterov": True},
                                {"momentum": 0.9, "dampening": 0.1},
                                {"momentum": 0.9, "weight_decay": 1e-4}])
def test_only_the_plain_momentum_rule_folds(rng, kw):
    model = L.mlp([4, 3, 2], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1, **kw)
    assert opt.fold_momentum() is False and not opt.folded
    assert all(p.grad_decay == 0.0 and np.shares_memory(p.grad, opt.grad)
               for p in model.parameters())


def test_no_fold_without_the_compiled_kernels(monkeypatch, rng):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    opt = optim.SGD(L.mlp([4, 3, 2], rng=rng).parameters(), lr=0.1, momentum=0.9)
    assert opt.fold_momentum() is False


@pytest.mark.parametrize("kind,kw", CONFIGS)
def test_matches_torch(rng, kind, kw):
    torch = pytest.importorskip("torch")
    p0 = rng.standard_normal((5, 3))
    grads = [rng.standard_normal((5, 3)) for _ in range(4)]
    tp = torch.nn.Parameter(torch.tensor(p0))
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]([tp], lr=0.05, **kw)
    dense = L.Dense(5, 3, bias=False, dtype=np.float64)
    dense.weight.data[...] = p0
    opt = make(kind, dense.parameters(), 0.05, kw)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()
        dense.weight.grad[...] = g
        opt.step()
    np.testing.assert_allclose(dense.weight.data, tp.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_parameters_become_views_of_one_flat_buffer(rng):
    model = L.mlp([4, 3, 2], rng=rng)
    before = [p.data.copy() for p in model.parameters()]
    opt = optim.SGD(model.parameters(), lr=0.1)
    assert opt.data.shape == (4 * 3 + 3 + 3 * 2 + 2,)
    for p, b in zip(model.parameters(), before):
        assert np.shares_memory(p.data, opt.data) and np.shares_memory(p.grad, opt.grad)
        np.testing.assert_array_equal(p.data, b)


@pytest.mark.parametrize("kind,kw", CONFIGS)
def test_step_allocates_no_parameter_sized_arrays(rng, kind, kw):
    model = L.mlp([256, 256, 10], rng=rng)
    opt = make(kind, model.parameters(), 0.01, kw)
    for p in model.parameters():
        p.grad[...] = 1.0
    opt.step()
    opt.step()  # the first step may set up state; later ones must not allocate
    tracemalloc.start()
    opt.step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < opt.data.nbytes / 10, f"step allocated {peak} bytes"


@needs_fold
def test_folded_backward_and_step_allocate_no_parameter_sized_arrays(rng):
    model = L.mlp([256, 256, 10], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    assert opt.fold_momentum()
    x, dy = rng.standard_normal((4, 256)).astype(np.float32), rng.standard_normal((4, 10)).astype(np.float32)
    for _ in range(2):
        model(x)
        model.backward(dy, input_grad=False)
        opt.step()
    tracemalloc.start()
    model(x)
    model.backward(dy, input_grad=False)
    opt.step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < opt.data.nbytes / 10, f"backward and step allocated {peak} bytes"


# --- PyTorch habits on parameters that live in a flat buffer -------------------------------------

def batch(rng, sizes=(4, 10, 3), n=5):
    x = rng.standard_normal((n, sizes[0]))
    dy = rng.standard_normal((n, sizes[-1]))
    return x, dy


@pytest.mark.parametrize("habit", ["rebind", "rebind-in-place-result", "none-then-backward"])
def test_assigned_gradients_reach_the_optimizer_on_every_step(rng, habit):
    """Clipping by rebinding (p.grad = p.grad * 0.25) and set_to_none before backward, three
    steps in a row: the trajectory is the one computed by hand from fresh gradients."""
    model = L.mlp([4, 10, 3], dtype=np.float64, rng=np.random.default_rng(0))
    twin = L.mlp([4, 10, 3], dtype=np.float64, rng=np.random.default_rng(0))  # no optimizer
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bufs = [np.zeros(p.shape) for p in twin.parameters()]
    factor = 1.0 if habit == "none-then-backward" else 0.25
    for step in range(3):
        x, dy = batch(rng)
        if habit == "none-then-backward":
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        model(x)
        model.backward(dy, input_grad=False)
        for p in model.parameters():
            if habit == "rebind":
                p.grad = p.grad * 0.25
            elif habit == "rebind-in-place-result":
                g = p.grad
                g *= 0.25
                p.grad = g  # the same array: nothing to copy
        opt.step()
        twin(x)
        twin.backward(dy, input_grad=False)
        for q, buf in zip(twin.parameters(), bufs):
            buf[...] = factor * q.grad if step == 0 else 0.9 * buf + factor * q.grad
            q.data -= 0.1 * buf
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-12, atol=1e-14)
        assert np.shares_memory(p.data, opt.data) and np.shares_memory(p.grad, opt.grad)


def test_assigned_data_is_what_the_optimizer_updates(rng):
    model = L.mlp([4, 3], dtype=np.float64, rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.5)
    w = rng.standard_normal((4, 3))
    model[0].weight.data = w
    assert model[0].weight.data is not w and np.shares_memory(model[0].weight.data, opt.data)
    model[0].weight.grad = np.ones((4, 3))
    opt.step()
    np.testing.assert_allclose(model[0].weight.data, w - 0.5, rtol=1e-15)


@pytest.mark.parametrize("value,error,message", [
    (np.zeros((3, 4)), ValueError, r"parameter '0.weight'.grad must have shape \(4, 3\), got \(3, 4\)"),
    (np.zeros((4, 3), np.float32), TypeError, "'0.weight'.grad must have dtype float64, got float32"),
    ([[0.0] * 3] * 4, TypeError, "'0.weight'.grad must be an array of shape .4, 3. and dtype float64 or None, got list"),
    (2.0, TypeError, "got float"),
])
def test_assigning_a_mismatched_gradient_names_the_parameter(rng, value, error, message):
    model = L.mlp([4, 3], dtype=np.float64, rng=rng)
    optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.grad.copy()
    with pytest.raises(error, match=message):
        model[0].weight.grad = value
    np.testing.assert_array_equal(model[0].weight.grad, before)
    with pytest.raises(ValueError, match=r"'0.bias'.data must have shape \(3,\), got \(4,\)"):
        model[0].bias.data = np.zeros(4)


def test_a_step_with_a_gradient_set_to_none_names_the_parameter(rng):
    """PyTorch skips a parameter whose .grad is None; one pass over a flat buffer cannot."""
    model = L.mlp([4, 10, 3], rng=rng)
    opt = optim.Adam(model.parameters())
    x, dy = (a.astype(np.float32) for a in batch(rng))
    model(x)
    model.backward(dy, input_grad=False)
    model[1].bias.grad = None
    before = opt.data.copy()
    with pytest.raises(RuntimeError, match=r"Adam.step\(\): parameter '1.bias' has no gradient"):
        opt.step()
    np.testing.assert_array_equal(opt.data, before)
    assert opt.step_count == 0
    model(x)
    model.backward(dy, input_grad=False)  # writes it again
    opt.step()
    assert opt.step_count == 1 and not np.array_equal(opt.data, before)


def test_module_zero_grad_set_to_none(rng):
    model = L.mlp([4, 3], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1)
    opt.grad[...] = 1.0
    model.zero_grad(set_to_none=True)
    assert model[0].weight.grad is None and not opt.grad.any()
    model.zero_grad()
    assert model[0].weight.grad is not None and not model[0].weight.grad.any()


def test_grad_none_then_accumulating_backward_is_a_fresh_gradient(rng):
    """With grad_decay 1 (accumulation) a gradient of None accumulates from zero, as in PyTorch."""
    model = L.mlp([4, 3], dtype=np.float64, rng=rng)
    optim.SGD(model.parameters(), lr=0.1)
    x, dy = batch(rng, (4, 3))
    model(x)
    model.backward(dy, input_grad=False)
    fresh = [p.grad.copy() for p in model.parameters()]
    for p in model.parameters():
        p.grad_decay = 1.0
        p.grad = None
    model(x)
    model.backward(dy, input_grad=False)
    for p, f in zip(model.parameters(), fresh):
        np.testing.assert_allclose(p.grad, f, rtol=1e-15)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_model_to_after_the_optimizer_moves_its_buffers_and_state(rng, kind):
    """model.to(dtype=float64) after a step: the next step updates the moved parameters, with
    the state carried over (momentum 0.9 * g1 + g2 for SGD)."""
    model = L.mlp([4, 3], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd" else \
        optim.Adam(model.parameters(), lr=0.1)
    g1, g2 = rng.standard_normal(opt.data.size), rng.standard_normal(opt.data.size)
    p0 = opt.data.astype(np.float64)
    opt.grad[...] = g1
    opt.step()
    model.to(dtype=np.float64)
    assert model[0].weight.dtype == np.float64 and not np.shares_memory(model[0].weight.data, opt.data)
    for p, g in zip(model.parameters(), optim.parameter_views(g2, model.parameters())):
        p.grad = g
    opt.step()
    assert opt.data.dtype == np.float64 and np.shares_memory(model[0].weight.data, opt.data)
    kw = {"momentum": 0.9} if kind == "sgd" else {}
    expected = reference_trajectory(kind, p0, [g1.astype(np.float32), g2], 0.1, **kw)
    np.testing.assert_allclose(opt.data, expected, rtol=2e-6, atol=2e-6)
    x, dy = batch(rng, (4, 3))
    model(x)
    model.backward(dy, input_grad=False)
    assert np.shares_memory(model[0].weight.grad, opt.grad)  # backward writes where step reads


def test_moving_part_of_the_model_fails_at_step_saying_so(rng):
    model = L.mlp([4, 5, 3], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1)
    model[1].to(dtype=np.float64)
    with pytest.raises(ValueError, match=r"SGD.step\(\): the parameters were moved .model.to"
                                         r".*one device and dtype.*float32.*float64 on cpu for "
                                         r"parameter '1.weight'"):
        opt.step()


@pytest.mark.cuda
def test_model_to_cuda_after_the_optimizer(rng):
    """Built on the CPU, moved to the GPU, stepped there: the buffers followed the model."""
    from gpunet.backend import get_device, is_cuda_array

    xp = get_device("cuda").xp
    model = L.mlp([4, 3], rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.to("cuda")
    x, dy = (xp.asarray(a.astype(np.float32)) for a in batch(rng, (4, 3)))
    model(x)
    model.backward(dy, input_grad=False)
    expected = np.concatenate([to_numpy(p.data - 0.1 * p.grad).ravel() for p in model.parameters()])
    opt.step()  # the first momentum step: buf = g, p -= lr * g
    assert is_cuda_array(opt.data) and is_cuda_array(opt.state["momentum_buffer"])
    np.testing.assert_allclose(to_numpy(opt.data), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match=r"'0.weight'.grad must be on cuda:\d+, got an array on cpu"):
        model[0].weight.grad = np.zeros((4, 3), np.float32)


def test_two_optimizers_over_the_same_parameters_share_them(rng):
    model = L.mlp([4, 3], dtype=np.float64, rng=rng)
    sgd = optim.SGD(model.parameters(), lr=0.1)
    adam = optim.Adam(model.parameters(), lr=0.01)
    assert sgd.data is adam.data and sgd.grad is adam.grad
    start, g = sgd.data.copy(), rng.standard_normal(sgd.data.size)
    sgd.grad[...] = g
    sgd.step()
    adam.step()
    expected = reference_trajectory("adam", start - 0.1 * g, [g], 0.01)
    np.testing.assert_allclose(model[0].weight.data.ravel(), expected[:12], rtol=1e-12)
    np.testing.assert_allclose(adam.data, expected, rtol=1e-12)


def test_a_deep_copy_of_the_model_trains_on_its_own(rng):
    """copy.deepcopy(model) (an EMA or best-so-far snapshot) after the optimizer: the copy's
    parameters are arrays of their own, and an optimizer built over them updates them."""
    import copy

    model = L.mlp([4, 3], dtype=np.float64, rng=rng)
    opt = optim.SGD(model.parameters(), lr=0.1)
    snapshot = copy.deepcopy(model)
    snap_opt = optim.SGD(snapshot.parameters(), lr=0.5)
    assert not np.shares_memory(snap_opt.data, opt.data)
    for p in snapshot.parameters():
        assert np.shares_memory(p.data, snap_opt.data) and np.shares_memory(p.grad, snap_opt.grad)
    before, original = snap_opt.data.copy(), opt.data.copy()
    for p in snapshot.parameters():
        p.grad = np.ones(p.shape)
    snap_opt.step()
    np.testing.assert_allclose(snap_opt.data, before - 0.5, rtol=1e-15)
    np.testing.assert_array_equal(opt.data, original)  # the model itself is untouched
    opt.step()  # and its optimizer still works


def test_an_overlapping_second_optimizer_makes_the_first_fail_naming_it(rng):
    model = L.mlp([4, 5, 3], rng=rng)
    first = optim.SGD(model.parameters(), lr=0.1)
    second = optim.Adam(model[1].parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match=r"SGD.step\(\): parameter '1.weight' and 1 more now "
                                           r"live in the buffers of another Adam"):
        first.step()
    second.step()  # the newest optimizer works
    assert np.shares_memory(model[1].weight.data, second.data)


@needs_fold
def test_shared_buffers_do_not_fold(rng):
    model = L.mlp([4, 3], rng=rng)
    first = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert first.fold_momentum() is False  # folding would hide the gradients from the other


def test_state_dict_resumes_exactly(rng):
    def run(split):
        model = L.mlp([4, 3, 2], dtype=np.float64, rng=np.random.default_rng(0))
        opt = optim.Adam(model.parameters(), lr=0.01)
        grads = np.random.default_rng(1).standard_normal((6, opt.data.size))
        for i, g in enumerate(grads):
            if i == split:
                state = opt.state_dict()
                opt = optim.Adam(model.parameters(), lr=0.5)
                opt.load_state_dict(state)
            opt.grad[...] = g
            opt.step()
        return opt.data.copy()
    np.testing.assert_array_equal(run(split=None), run(split=3))


def test_state_dict_mismatch(rng):
    a = optim.SGD(L.mlp([4, 3]).parameters(), lr=0.1, momentum=0.9)
    b = optim.SGD(L.mlp([4, 5]).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"'momentum_buffer' has shape \(15,\) but the parameters need \(25,\)"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        optim.Adam(L.mlp([4, 3]).parameters()).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(lr=-1), "lr must be"),
    (dict(lr=0.1, momentum=-0.5), "momentum must be a finite number >= 0"),
    (dict(lr=0.1, nesterov=True), "nesterov momentum needs momentum > 0"),
    (dict(lr=0.1, weight_decay=float("inf")), "weight_decay must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.SGD(L.mlp([2, 2]).parameters(), **kwargs)


def test_numpy_scalars_are_accepted_everywhere(rng):
    """Numbers that come out of NumPy (np.float32, np.int64) are numbers; bool still is not."""
    model = L.mlp([np.int64(3), np.int64(2)], rng=rng)
    opt = optim.SGD(model.parameters(), lr=np.float32(0.5), momentum=np.float32(0.9),
                    weight_decay=np.float64(0.0))
    assert (opt.lr, opt.momentum) == (0.5, float(np.float32(0.9)))
    adam = optim.Adam(L.mlp([3, 2]).parameters(), lr=np.float32(0.001),
                      betas=(np.float32(0.5), np.float64(0.9)), eps=np.float32(1e-6))
    assert adam.betas == (0.5, 0.9)
    step = optim.StepLR(opt, step_size=np.int64(5), gamma=np.float32(0.5), warmup_steps=np.int64(3))
    assert type(step.step_size) is int and type(step.warmup_steps) is int
    lrs = [step.get_last_lr()] + [(step.step(), step.get_last_lr())[1] for _ in range(9)]
    # warm-up 1/3, 2/3, 1 of 0.5; then 0.5 for steps 3..7 and 0.25 from step 8 (5 after warm-up)
    np.testing.assert_allclose(lrs, [0.5 / 3, 1 / 3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])
    cosine = optim.CosineAnnealingLR(opt, T_max=np.int64(4), eta_min=np.float32(0.0))
    assert cosine.T_max == 4
    model[0].weight.grad_decay = np.float32(0.5)
    assert model[0].weight.grad_decay == 0.5
    for make_it in (lambda: optim.StepLR(opt, step_size=True),
                    lambda: optim.StepLR(opt, step_size=np.float64(5)),
                    lambda: optim.ConstantLR(opt, warmup_steps=np.bool_(True)),
                    lambda: optim.SGD(model.parameters(), lr=True)):
        with pytest.raises(ValueError, match="must be"):
            make_it()


def test_bad_parameter_lists():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"Parameter objects \(model.parameters\(\)\), got ndarray"):
        optim.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="betas must be two numbers"):
        optim.Adam(L.mlp([2, 2]).parameters(), betas=(0.9, 1.0))


def test_schedules():
    def lrs(make_schedule, steps):
        opt = optim.SGD(L.mlp([2, 2]).parameters(), lr=1.0)
        sched = make_schedule(opt)
        out = [opt.lr]
        for _ in range(steps):
            sched.step()
            out.append(opt.lr)
        return out

    assert lrs(lambda o: optim.StepLR(o, step_size=2, gamma=0.5), 5) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    cosine = lrs(lambda o: optim.CosineAnnealingLR(o, T_max=4, eta_min=0.1), 6)
    np.testing.assert_allclose(cosine, [0.1 + 0.9 * (1 + math.cos(math.pi * min(i, 4) / 4)) / 2
                                        for i in range(7)])
    assert lrs(lambda o: optim.ConstantLR(o, warmup_steps=4), 5) == [0.25, 0.5, 0.75, 1, 1, 1]
    warm_cosine = lrs(lambda o: optim.CosineAnnealingLR(o, T_max=2, warmup_steps=2), 4)
    np.testing.assert_allclose(warm_cosine, [0.5, 1, 1, 0.5, 0], atol=1e-15)


def test_schedule_resumes_from_state_dict():
    opt = optim.SGD(L.mlp([2, 2]).parameters(), lr=1.0)
    sched = optim.CosineAnnealingLR(opt, T_max=10, warmup_steps=2)
    for _ in range(5):
        sched.step()
    other_opt = optim.SGD(L.mlp([2, 2]).parameters(), lr=1.0)
    other = optim.CosineAnnealingLR(other_opt, T_max=10, warmup_steps=2)
    other.load_state_dict(sched.state_dict())
    assert other_opt.lr == opt.lr
    with pytest.raises(ValueError, match="T_max must be a positive int"):
        optim.CosineAnnealingLR(opt, T_max=0)


def test_only_the_library_rules_claim_a_fused_device_update():
    """A captured CUDA graph replays the fused kernel: an optimizer whose rule is its own must
    not claim one (the trainer then trains it eagerly)."""
    from gpunet.layers import Parameter

    class MyAdam(optim.Adam):
        def _update(self):
            self.data -= self.lr * self.grad

    p = [Parameter(np.zeros(3, np.float32))]
    assert optim.SGD(p, lr=0.1).fused_device_update and optim.AdamW(p).fused_device_update
    assert not MyAdam(p).fused_device_update
