"""gpunet.dropout: Dropout, and the Philox-4x32-10 counter-based generator of its GPU mask."""

import numpy as np
import pytest

import gpunet as gn
from gpunet import dropout as D
from gpunet.backend import to_device, to_numpy
from gpunet.gradcheck import SameMask, check_layer


# Known-answer tests of Random123 (kat_vectors, philox4x32 with 10 rounds): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(device, counter, key, expected):
    words = D.philox4x32([to_device(np.array(c, np.uint32), device) for c in counter], key)
    assert [int(to_numpy(w)) for w in words] == list(expected)


def test_philox_is_elementwise_over_counters():
    """An array of counters gives, element by element, what each counter gives alone."""
    counters = np.array([0, 1, 2, 0xFFFFFFFF], np.uint32)
    together = D.philox4x32((counters, np.uint32(7), np.uint32(0), np.uint32(3)), (11, 12))
    for i, c in enumerate(counters):
        alone = D.philox4x32((np.uint32(c), np.uint32(7), np.uint32(0), np.uint32(3)), (11, 12))
        assert [int(w[i]) for w in together] == [int(w) for w in alone]


def test_counter_words_layout_and_streams():
    words = D.counter_words(10, seed=5, counter=np.uint64(3), xp=np)
    assert words.dtype == np.uint32 and words.shape == (10,)
    block = D.philox4x32((np.uint32(1), np.uint32(3), np.uint32(0), np.uint32(0)), (5, 0))
    np.testing.assert_array_equal(words[4:8], [int(w) for w in block])  # word i of block i // 4
    high = D.counter_words(8, seed=5 + (9 << 32), counter=np.uint64(3 + (2 << 32)), xp=np)
    expected = D.philox4x32((np.uint32(0), np.uint32(3), np.uint32(2), np.uint32(0)), (5, 9))
    np.testing.assert_array_equal(high[:4], [int(w) for w in expected])  # 64-bit seed and counter
    assert not np.array_equal(D.counter_words(10, 5, np.uint64(4), np), words)
    assert not np.array_equal(D.counter_words(10, 6, np.uint64(3), np), words)


def test_counter_words_are_uniform():
    """A fixed draw (so a fixed outcome): mean, and each of 16 bins, within 5 sigma."""
    u = D.counter_words(200_000, seed=1, counter=np.uint64(0), xp=np) / 2.0 ** 32
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    counts = np.bincount((u * 16).astype(int), minlength=16)
    expected = u.size / 16
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("counter_based", [None, True])
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(counter_based):
    d = D.Dropout(0.3, counter_based=counter_based, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).uniform(1, 2, (400, 250)).astype(np.float32)
    y = d(x)
    dropped = y == 0
    assert abs(dropped.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / x.size)
    np.testing.assert_allclose(y[~dropped], x[~dropped] / 0.7, rtol=1e-6)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    dx = d.backward(dy)
    np.testing.assert_array_equal(dx[dropped], 0)
    np.testing.assert_allclose(dx[~dropped], dy[~dropped] / 0.7, rtol=1e-6)
    assert y.dtype == dx.dtype == np.float32


def test_counter_based_mask_is_the_formula_and_advances():
    d = D.Dropout(0.25, counter_based=True, seed=123)
    x = np.ones((3, 7), np.float64)
    threshold = int(0.25 * 2 ** 32)
    for step in range(3):
        words = D.counter_words(x.size, 123, np.uint64(step), np).reshape(x.shape)
        np.testing.assert_array_equal(d(x), np.where(words >= threshold, 1 / 0.75, 0.0))
    assert int(d.counter) == 3
    d.counter[...] = 1  # rewinding replays a step's mask
    np.testing.assert_array_equal(
        d(x), np.where(D.counter_words(x.size, 123, np.uint64(1), np).reshape(x.shape) >= threshold,
                       1 / 0.75, 0.0))


def test_eval_mode_and_the_edges_of_p(rng):
    x = rng.standard_normal((4, 5))
    d = D.Dropout(0.5).eval()
    assert d(x) is x  # the identity, no copy
    assert D.Dropout(0.0)(x) is x
    d0 = D.Dropout(0.0)
    d0(x)
    dy = rng.standard_normal(x.shape)
    assert d0.backward(dy) is dy
    one = D.Dropout(1.0)
    np.testing.assert_array_equal(one(x), 0)
    np.testing.assert_array_equal(one.backward(dy), 0)
    np.testing.assert_array_equal(D.Dropout(1.0, counter_based=True)(x), 0)


def test_seeded_generator_gives_the_same_masks():
    x = np.ones((50, 40), np.float32)
    gn.manual_seed(3)
    a = [D.Dropout(0.5)(x) for _ in range(2)]
    gn.manual_seed(3)
    b = [D.Dropout(0.5)(x) for _ in range(2)]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], a[1])
    gn.manual_seed(8)  # the Philox seed is drawn from the seeded generator too
    s1 = D.Dropout(0.5).seed
    gn.manual_seed(8)
    assert D.Dropout(0.5).seed == s1


def test_gradient_check_with_a_fixed_mask(device, on):
    rng = np.random.default_rng(6)
    layer = SameMask(0.4, seed=99).to(device)
    errors = check_layer(layer, on(rng.standard_normal((5, 7))), rng=rng)
    assert errors["input"] < 1e-8


def test_in_a_network_train_and_eval(rng):
    model = gn.Sequential(gn.Dense(6, 8, rng=rng), D.Dropout(0.5, rng=rng), gn.Dense(8, 2, rng=rng))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    assert not np.array_equal(model(x), model(x))
    assert model.state_dict().keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"p": 1.5}, ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
    ({"p": -0.1}, ValueError, r"p must be a probability in \[0, 1\], got -0.1"),
    ({"p": True}, ValueError, r"p must be a probability in \[0, 1\], got True"),
    ({"seed": -1}, ValueError, r"seed must be an int in \[0, 2\*\*64\), got -1"),
    ({"seed": 2 ** 64}, ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    ({"counter_based": "yes"}, TypeError, "counter_based must be None, True or False, got 'yes'"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        D.Dropout(**{"p": 0.5, **kwargs})


def test_input_and_gradient_errors():
    with pytest.raises(TypeError, match=r"Dropout\(p=0.5\) expects a numpy or cupy array, got list"):
        D.Dropout(0.5)([1.0, 2.0])
    d = D.Dropout(0.5)
    with pytest.raises(ValueError, match=r"backward\(\) called before forward\(\)"):
        d.backward(np.zeros(3))
    d(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"Dropout.backward expects dy of shape \(2, 3\), got \(3,\)"):
        d.backward(np.zeros(3, np.float32))


@pytest.mark.cuda
def test_the_same_mask_on_the_gpu_and_the_cpu():
    """One formula on both devices: the counter-based mask on cupy equals it on numpy, and the
    default (counter-based on a GPU) draws with no host generator."""
    x = np.random.default_rng(0).standard_normal((33, 65)).astype(np.float32)
    cpu, gpu = D.Dropout(0.3, counter_based=True, seed=77), D.Dropout(0.3, seed=77)
    for _ in range(3):
        np.testing.assert_array_equal(to_numpy(gpu(to_device(x, "cuda"))), cpu(x))
    assert gn.backend.is_cuda_array(gpu.counter) and int(to_numpy(gpu.counter)) == 3
