"""gpunet.norm: BatchNorm1d and BatchNorm2d, and the Module buffers that hold running statistics."""

import numpy as np
import pytest

from gpunet import conv as C
from gpunet import layers as L
from gpunet import norm as N
from gpunet.backend import to_numpy
from gpunet.gradcheck import check_layer


def randomised(bn, rng):
    """A random affine part, so that a missing weight factor in dx cannot hide."""
    bn.weight.data[...] = rng.uniform(0.5, 1.5, bn.num_features)
    bn.bias.data[...] = rng.standard_normal(bn.num_features)
    return bn


CASES = [  # (class, features, input shape)
    (N.BatchNorm1d, 4, (6, 4)),
    (N.BatchNorm1d, 3, (2, 3, 5)),
    (N.BatchNorm1d, 3, (1, 3, 7)),  # batch 1: 7 values per channel
    (N.BatchNorm2d, 3, (2, 3, 5, 4)),
    (N.BatchNorm2d, 2, (1, 2, 3, 5)),  # batch 1, non-square
]


@pytest.mark.parametrize("cls,c,shape", CASES, ids=str)
def test_gradient_check(device, on, cls, c, shape):
    rng = np.random.default_rng(9)
    bn = randomised(cls(c, dtype=np.float64), rng).to(device)
    errors = check_layer(bn, on(3 * rng.standard_normal(shape) + 1), rng=rng)
    assert set(errors) == {"input", "weight", "bias"}
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False},
                                    {"momentum": None}])
def test_gradient_check_of_the_variants(device, on, kwargs):
    rng = np.random.default_rng(4)
    bn = N.BatchNorm2d(3, dtype=np.float64, **kwargs).to(device)
    errors = check_layer(bn, on(rng.standard_normal((2, 3, 4, 3))), rng=rng)
    assert max(errors.values()) < 1e-7, errors


def test_gradient_check_after_a_convolution(device, on):
    """BatchNorm2d on a convolution's channels-last output, inside a network (the convolution
    without bias: batch norm removes a per-channel constant, so its true gradient is 0)."""
    rng = np.random.default_rng(8)
    model = L.Sequential(C.Conv2d(2, 3, 3, padding=1, bias=False, dtype=np.float64, rng=rng),
                         randomised(N.BatchNorm2d(3, dtype=np.float64), rng), L.Tanh(),
                         C.Flatten(), L.Dense(3 * 4 * 5, 2, dtype=np.float64, rng=rng)).to(device)
    errors = check_layer(model, on(rng.standard_normal((2, 2, 4, 5))), rng=rng)
    assert max(errors.values()) < 1e-7, errors


# --- against torch -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _twin(torch, bn):
    ref = getattr(torch.nn, type(bn).__name__)(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats).double()
    if bn.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(bn.weight.data.copy()))
            ref.bias.copy_(torch.from_numpy(bn.bias.data.copy()))
    return ref


@pytest.mark.parametrize("cls,c,shape", CASES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_training_steps_and_eval_match_torch(torch, rng, cls, c, shape, momentum):
    """Each step's output and gradients, the running statistics after four steps, and the eval
    output from them."""
    bn = randomised(cls(c, momentum=momentum, dtype=np.float64), rng)
    ref = _twin(torch, bn)
    for _ in range(4):
        x = 2 * rng.standard_normal(shape) + rng.standard_normal(c).reshape((1, c) + (1,) * (len(shape) - 2))
        xt = torch.tensor(x, requires_grad=True)
        y, yt = bn(x), ref(xt)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        g = rng.standard_normal(shape)
        ref.zero_grad()
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(bn.backward(g), xt.grad.numpy(), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(bn.weight.grad, ref.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.bias.grad, ref.bias.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, ref.running_mean.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-13, atol=1e-15)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    bn.eval()
    ref.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(bn(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False}])
def test_variants_match_torch(torch, rng, kwargs):
    bn = N.BatchNorm2d(3, dtype=np.float64, **kwargs)
    ref = _twin(torch, bn)
    for mode in ("train", "eval"):
        getattr(bn, mode)()
        getattr(ref, mode)()
        x = rng.standard_normal((2, 3, 4, 5))
        np.testing.assert_allclose(bn(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                                   atol=1e-12)


def test_state_dict_names_match_torch_and_round_trip(torch, rng):
    model = L.Sequential(C.Conv2d(1, 2, 3, dtype=np.float64, rng=rng), N.BatchNorm2d(2, dtype=np.float64))
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    model(rng.standard_normal((3, 1, 5, 5)))  # moves the running statistics
    state = model.state_dict()
    assert state["1.running_mean"] is not model[1].running_mean  # a copy
    fresh = L.Sequential(C.Conv2d(1, 2, 3, dtype=np.float64, rng=rng), N.BatchNorm2d(2, dtype=np.float64))
    fresh.load_state_dict(state)
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert int(fresh[1].num_batches_tracked) == 1
    del state["1.running_var"]
    with pytest.raises(ValueError, match=r"missing \['1.running_var'\]"):
        fresh.load_state_dict(state)
    state["1.running_var"] = np.ones(3)
    with pytest.raises(ValueError, match="'1.running_var' has shape"):
        fresh.load_state_dict(state)


def test_running_statistics_survive_a_checkpoint(tmp_path, rng):
    """gpunet.checkpoint saves state_dict, buffers included, and gives 0-d entries back as
    Python scalars (num_batches_tracked), which load_state_dict takes."""
    from gpunet import checkpoint, optim

    def make():
        return L.Sequential(C.Conv2d(1, 2, 3, bias=False, rng=np.random.default_rng(0)),
                            N.BatchNorm2d(2), C.Flatten(), L.Dense(18, 3, rng=np.random.default_rng(1)))

    model = make()
    opt = optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(rng.standard_normal((4, 1, 5, 5)).astype(np.float32))
    from gpunet.trainer import TrainConfig
    meta = {"epoch": 0, "history": [], "config": TrainConfig().to_dict(),
            "shuffle_rng": np.random.default_rng(0).bit_generator.state}  # what load checks
    checkpoint.save(tmp_path / "ck.npz", model=model, optimizer=opt, meta=meta)
    fresh = make()
    checkpoint.restore(checkpoint.load(tmp_path / "ck.npz"), model=fresh,
                       optimizer=optim.SGD(fresh.parameters(), lr=0.1))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name], value, err_msg=name)
    assert int(fresh[1].num_batches_tracked) == 3 and fresh[1].running_mean.any()


def test_buffers_are_listed_moved_and_cast(device, on, rng):
    model = L.Sequential(L.Dense(3, 4, rng=rng), N.BatchNorm1d(4))
    assert [n for n, _ in model.named_buffers()] == ["1.running_mean", "1.running_var",
                                                      "1.num_batches_tracked"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model.to(device, dtype=np.float64)
    bn = model[1]
    assert bn.running_mean.dtype == np.float64 and bn.num_batches_tracked.dtype == np.int64
    model(on(rng.standard_normal((5, 3))))
    assert int(to_numpy(bn.num_batches_tracked)) == 1
    assert type(bn.running_var) is type(bn.weight.data)  # on the device of the parameters


def test_eval_mode_uses_the_running_statistics(rng):
    bn = N.BatchNorm1d(2, dtype=np.float64)
    bn.running_mean[...] = [1.0, -2.0]
    bn.running_var[...] = [4.0, 0.25]
    bn.eval()
    x = rng.standard_normal((3, 2))
    np.testing.assert_allclose(bn(x), (x - [1.0, -2.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-5))
    assert int(bn.num_batches_tracked) == 0  # eval moves nothing
    np.testing.assert_array_equal(bn.running_mean, [1.0, -2.0])


def test_errors(rng):
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\) expects input of shape \(N, 3\) or "
                                         r"\(N, 3, L\), got \(4, 2\)"):
        N.BatchNorm1d(3)(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) expects input of shape \(N, 3, H, W\), "
                                         r"got \(4, 3\)"):
        N.BatchNorm2d(3)(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="expects more than 1 value per channel when training, "
                                         r"got input of shape \(1, 3\)"):
        N.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    N.BatchNorm1d(3).eval()(np.zeros((1, 3), np.float32))  # eval takes a single sample
    with pytest.raises(TypeError, match="expects a floating-point input, got dtype int64"):
        N.BatchNorm1d(3)(np.zeros((4, 3), np.int64))
    for kwargs, match in [({"num_features": 0}, "num_features must be a positive int, got 0"),
                          ({"eps": 0}, "eps must be a number > 0, got 0"),
                          ({"momentum": 1.5}, r"momentum must be in \[0, 1\] or None, got 1.5")]:
        with pytest.raises(ValueError, match=match):
            N.BatchNorm2d(**{"num_features": 2, **kwargs})
    bn = N.BatchNorm2d(2)
    bn(np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"backward expects dy of shape \(2, 2, 3, 3\), got \(2, 2\)"):
        bn.backward(np.zeros((2, 2), np.float32))
    fresh = N.BatchNorm2d(2).eval()
    fresh(np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="in eval mode"):
        fresh.backward(np.zeros((2, 2, 3, 3), np.float32))


def test_repr():
    assert repr(N.BatchNorm2d(8)) == "BatchNorm2d(8)"
    assert repr(N.BatchNorm1d(4, momentum=None, affine=False)) == \
        "BatchNorm1d(4, momentum=None, affine=False)"
