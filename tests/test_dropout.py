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


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 5, 1001])
def test_counter_words_from_an_offset_are_the_rest_of_the_stream(offset):
    whole = D.counter_words(offset + 23, seed=9, counter=np.uint64(4), xp=np)
    np.testing.assert_array_equal(D.counter_words(23, 9, np.uint64(4), np, offset), whole[offset:])


def test_counter_words_end_at_the_last_word_of_a_stream():
    last = D.counter_words(6, 9, np.uint64(4), np, 2 ** 34 - 6)
    block = D.philox4x32((np.uint32(2 ** 32 - 1), np.uint32(4), np.uint32(0), np.uint32(0)), (9, 0))
    np.testing.assert_array_equal(last[2:], [int(w) for w in block])
    with pytest.raises(ValueError, match=r"a Philox stream has 2\*\*34 words; asked for 7 from word"):
        D.counter_words(7, 9, np.uint64(4), np, 2 ** 34 - 6)


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


@pytest.mark.parametrize("shape,bounds", [((10, 7), (0, 3, 7, 10)), ((5, 3, 4, 2), (0, 2, 5)),
                                          ((9,), (0, 4, 9))])
def test_shards_with_row_offsets_draw_the_whole_batch_mask(device, on, shape, bounds):
    """Ranks that each take rows lo:hi of a global batch and set row_offset = lo draw, between
    them, the mask one layer draws for the whole batch: the same step, disjoint words."""
    x = on(np.random.default_rng(3).uniform(1, 2, shape).astype(np.float32))
    whole = to_numpy(D.Dropout(0.4, counter_based=True, seed=31)(x))
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        rank = D.Dropout(0.4, counter_based=True, seed=31)
        rank.row_offset = lo
        parts.append(to_numpy(rank(x[lo:hi])))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_row_offset_errors():
    d = D.Dropout(0.5, counter_based=True)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"row_offset must be an int >= 0, got {bad!r}"):
            d.row_offset = bad
    d.row_offset = np.int64(3)
    assert d.row_offset == 3 and type(d.row_offset) is int
    with pytest.raises(ValueError, match=r"row_offset 3 needs an input with rows, got a 0-d array"):
        d(np.ones((), np.float32))


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_the_fused_gpu_kernel_is_the_formula(dtype):
    """On a GPU the forward is one fused kernel; it gives mask() and x * mask() bit for bit
    (mask() is the formula the kernel replaces), from a row offset and for a channels-last
    input, and backward multiplies by the same mask."""
    import cupy as cp
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16

    def bits(a):
        return np.ascontiguousarray(cp.asnumpy(a)).view(np.uint8)

    rng = np.random.default_rng(2)
    host = rng.standard_normal((6, 5, 4, 3)).astype(dtype)
    for x in (cp.asarray(host), cp.asarray(host.transpose(0, 2, 3, 1).copy()).transpose(0, 3, 1, 2)):
        fused = D.Dropout(0.3, seed=2 ** 63 + 5)
        formula = D.Dropout(0.3, seed=2 ** 63 + 5)
        fused.row_offset = formula.row_offset = 11
        for step in range(2):
            y = fused(x)
            m = formula.mask(x)
            np.testing.assert_array_equal(bits(fused._saved("mask")), bits(m))
            np.testing.assert_array_equal(bits(y), bits(x * m))
        dy = cp.asarray(rng.standard_normal(x.shape).astype(dtype))
        np.testing.assert_array_equal(bits(fused.backward(dy)), bits(dy * m))
        assert int(fused.counter) == 2 and fused.counter.dtype == np.uint64


@pytest.mark.cuda
def test_a_captured_dropout_replays_a_fresh_mask():
    """The fused kernel reads the step counter on the device and the counter's increment is
    captured too: each replay of a CUDA graph draws the next step's mask."""
    import cupy as cp
    x = cp.ones((64, 33), cp.float32)
    d = D.Dropout(0.5, seed=4)
    d(x)  # compiles the kernels and moves the counter, outside the capture
    cp.cuda.Device().synchronize()  # that work ran on another stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        y = d(x)
        graph = stream.end_capture()
        masks = []
        for _ in range(2):
            graph.launch(stream=stream)
            masks.append(cp.asnumpy(y))
    stream.synchronize()
    reference = D.Dropout(0.5, counter_based=True, seed=4)
    expected = [reference.mask(np.ones((64, 33), np.float32)) for _ in range(4)]
    # Step 0 ran eagerly; a capture runs nothing, so the replays drew steps 1 and 2.
    np.testing.assert_array_equal(masks[0], expected[1])
    np.testing.assert_array_equal(masks[1], expected[2])
    assert int(d.counter) == 3
