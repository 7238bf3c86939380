"""gpunet.bench.contenders: the textbook contender trains the same model as gpunet."""

import numpy as np
import pytest

import gpunet
from gpunet.bench import common, contenders


def test_textbook_net_trains_like_gpunet_on_the_same_data():
    """Same weights, same batches: the cs231n net's losses and weights follow gpunet's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((320, 784)).astype(np.float32)
    y = rng.integers(0, 10, 320)
    net = contenders.TextbookNet(784, 16, 10, lr=common.LR, mu=common.MOMENTUM,
                            rng=np.random.default_rng(1))
    model = gpunet.mlp([784, 16, 10])
    p = net.params
    params = model.parameters()  # first layer's weight and bias, then the second's
    for param, name in zip(params, ("W1", "b1", "W2", "b2"), strict=True):
        param.data[...] = p[name]
    loss = gpunet.SoftmaxCrossEntropy()
    opt = gpunet.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM)
    for s in range(0, 320, 64):
        xb, yb = x[s:s + 64], y[s:s + 64]
        ours = float(loss(model(xb), yb))
        model.backward(loss.backward())
        opt.step()
        theirs = net.step(xb, yb)
        assert theirs == pytest.approx(ours, rel=1e-5)
    for param, name in zip(params, ("W1", "b1", "W2", "b2")):
        np.testing.assert_allclose(param.data, p[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_textbook_contender_keeps_float32():
    rng = np.random.default_rng(0)
    net = contenders.TextbookNet(784, 8, 10, lr=common.LR, mu=common.MOMENTUM, rng=rng)
    net.step(rng.standard_normal((32, 784)).astype(np.float32), rng.integers(0, 10, 32))
    assert {v.dtype for v in net.params.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in net.velocity.values()} == {np.dtype(np.float32)}
