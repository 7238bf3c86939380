"""Every CUDA kernel of gpunet, the very source strings CuPy compiles, run on the CPU by the SIMT
harness (tests/simt) against its float64 NumPy reference.

Launch configurations come from gpunet.kernels.cuda's own functions (the ones a GPU launch asks) and
argument tuples from the launchers' own argument builders, on a device with few
multiprocessors (small grids, so that the grid-stride loops take more than one turn) and
Hopper's shared memory (so that the cross-entropy's variants switch where they do on an H100).
Every output is poisoned (NaN) before its launch; AddressSanitizer checks every access; a subset
runs with the threads and blocks in shuffled orders.

The ElementwiseKernels' loops are CuPy's generated code (CArray, CIndexer), not gpunet's: for
those the harness wraps gpunet's part, the operation string, in a plain loop of its own
(simt.harness.elementwise_source) with the same declarations.
"""

import numpy as np
import pytest

from gpunet import functional as F, layers as L, optim
from gpunet.kernels import cuda as K
from simt import BFLOAT16, module, require_bfloat16, require_compiler
from simt.harness import (elementwise_arguments, elementwise_entry, elementwise_source,
                          parameter_names)
from test_kernels_cuda import TOLERANCE

pytestmark = pytest.mark.simt

DTYPES = [np.float32, np.float64, np.float16] + ([BFLOAT16] if BFLOAT16 else [])
NAMES = [np.dtype(d).name for d in DTYPES]
ONE_SM = K.DeviceFacts(multiprocessors=1, shared_memory_optin=K.HOPPER.shared_memory_optin)
MANY_SM = K.DeviceFacts(multiprocessors=16, shared_memory_optin=K.HOPPER.shared_memory_optin)


@pytest.fixture(autouse=True)
def _compiler():
    require_compiler()


def acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def assert_close(got, expected, dtype):
    tol = TOLERANCE[np.dtype(dtype).name]
    scale = np.abs(expected[np.isfinite(expected)]).max(initial=0)
    np.testing.assert_allclose(np.asarray(got).astype(np.float64), expected, rtol=tol, atol=tol * scale)


# --- the single-pass cross-entropy ---------------------------------------------------------------------

def cross_entropy():
    return module(K.CROSS_ENTROPY_SOURCE, tuple(K.CROSS_ENTROPY_ENTRIES), "CROSS_ENTROPY_SOURCE")


def variant_boundaries(dtype, top: int = 200_000) -> list[int]:
    """Every C at which cross_entropy_launch moves to another kernel (the first C of the new
    one), found by asking it: the thresholds are its own, not restated here."""
    def kernel(c):
        return K.cross_entropy_launch(8, c, dtype, ONE_SM).kernel

    found, lo = [], 1
    while True:
        hi = lo + 1
        while kernel(hi) == kernel(lo):
            if hi >= top:
                return found
            lo, hi = hi, min(2 * hi, top)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if kernel(mid) == kernel(lo) else (lo, mid)
        found.append(hi)
        lo = hi


def class_counts(dtype) -> list[int]:
    edges = {b + d for b in variant_boundaries(dtype) for d in (-1, 0)}
    return sorted({10, 31, 32, 33, 70000} | edges)


def rows_for(c: int) -> int:
    """Enough rows that some warp (C <= 2048) or block takes a second row on one multiprocessor."""
    return 70 if c <= 2048 else 5


# The GPU test's keyword sets: every reduction, and weights, smoothing and an ignore_index at once.
KEYWORDS = [{}, {"reduction": "sum"}, {"reduction": "none"},
            {"weight": True, "label_smoothing": 0.1, "ignore_index": 1}]


def run_cross_entropy(x, t, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                      grad_output=1.0, facts=ONE_SM, seed=None):
    """(loss, grad, launch) from the kernel, launched as cross_entropy_loss_and_grad launches it."""
    plan = F._CrossEntropyPlan(x, t, weight, ignore_index, label_smoothing, reduction)
    counter = np.zeros(1, np.uint32)
    launch, args, loss, grad = K.cross_entropy_call(plan, grad_output, np, facts, counter)
    partials = args[5]
    cross_entropy().launch(launch, args, poison=(loss, grad, partials), seed=seed)
    assert counter[0] == 0, "the last block must leave the ticket counter at 0 for the next launch"
    return loss, grad, launch


def check_cross_entropy(x, t, keywords, rng, grad_output=1.0, **options):
    kw = dict(keywords)
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2, x.shape[1]).astype(acc(x.dtype))
    loss, grad, launch = run_cross_entropy(x, t, grad_output=grad_output, **kw, **options)
    x64 = x.astype(np.float64)
    kw64 = dict(kw, weight=None if "weight" not in kw else kw["weight"].astype(np.float64))
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    assert_close(loss, F.softmax_cross_entropy(x64, t, **kw64), x.dtype)
    assert_close(grad, F.softmax_cross_entropy_grad(x64, t, grad_output=grad_output, **kw64), x.dtype)
    return launch, loss


CASES = [(d, c) for d in DTYPES for c in class_counts(d)]


@pytest.mark.parametrize("dtype,c", CASES, ids=[f"{np.dtype(d).name}-C{c}" for d, c in CASES])
def test_cross_entropy_across_every_variant_threshold(dtype, c):
    rng = np.random.default_rng(c)
    n = rows_for(c)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    for k, keywords in enumerate(KEYWORDS):
        t = rng.integers(0, c, n)
        t[::7] = keywords.get("ignore_index", -100)
        check_cross_entropy(x, t, keywords, rng, grad_output=0.75 if k == 1 else 1.0)


def test_bfloat16_is_covered():
    require_bfloat16()
    assert np.dtype(DTYPES[-1]).name == "bfloat16"


def test_every_cross_entropy_kernel_is_covered():
    require_bfloat16()  # the bfloat16 entries are reached only with bfloat16 cases
    covered = {K.cross_entropy_launch(rows_for(c), c, d, ONE_SM).kernel for d, c in CASES}
    assert covered == set(K.CROSS_ENTROPY_ENTRIES)


def one_c_per_variant(dtype, vectors: bool = False) -> list[int]:
    """The first C of each variant; with ``vectors``, rounded up to whole 16-byte rows where
    that stays in the variant, so that the shared-memory kernel takes its vector path."""
    cs = [10] + variant_boundaries(dtype)
    if vectors:
        per_vector = 16 // np.dtype(dtype).itemsize
        same = lambda a, b: K.cross_entropy_launch(5, a, dtype, ONE_SM).kernel == \
            K.cross_entropy_launch(5, b, dtype, ONE_SM).kernel
        cs = [a if same(a, c) else c for c in cs for a in [c + (-c) % per_vector]]
    return cs


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_cross_entropy_of_an_all_ignored_batch_is_zero(dtype):
    for c in one_c_per_variant(dtype):
        x = np.random.default_rng(c).standard_normal((5, c)).astype(dtype)
        t = np.full(5, -100)
        for reduction in ("mean", "sum", "none"):
            loss, grad, _ = run_cross_entropy(x, t, reduction=reduction)
            assert not loss.astype(np.float64).any() and not grad.astype(np.float64).any()


def test_cross_entropy_of_an_empty_batch_launches_nothing():
    plan = F._CrossEntropyPlan(np.zeros((0, 10), np.float32), np.zeros(0, np.int64), None, -100,
                               0.0, "mean")
    launch, args, loss, grad = K.cross_entropy_call(plan, 1.0, np, ONE_SM, np.zeros(1, np.uint32))
    assert launch is None and args == () and float(loss) == 0.0 and grad.shape == (0, 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_cross_entropy_of_extreme_logits(dtype):
    rng = np.random.default_rng(1)
    for c in one_c_per_variant(dtype):
        x = np.zeros((5, c), dtype)
        x[0, 0], x[1, 1] = 1e4, -1e4
        x[2, :] = -np.inf
        x[2, 3] = 0.0
        x[4, 5] = np.nan  # a NaN poisons its row, as in numpy
        t = np.array([0, 0, 3, 1, 2])
        for reduction in ("mean", "sum", "none"):
            keep = slice(None) if reduction == "none" else slice(0, 4)  # the NaN row: per row only
            check_cross_entropy(x[keep], t[keep], {"reduction": reduction}, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_cross_entropy_vector_path_aligned_odd_and_misaligned(dtype):
    """The shared-memory kernel moves 16-byte vectors only when the logits, the gradient and a
    row's bytes are 16-byte aligned; odd C and a logits array 1 element off take the scalar path."""
    itemsize = np.dtype(dtype).itemsize
    c = next(c for c in range(4097, 200_000)  # the shortest shared-memory rows with aligned bytes
             if K.cross_entropy_launch(5, c, dtype, ONE_SM).kernel.startswith("ce_block_rows_smem")
             and c * itemsize % 16 == 0)
    rng = np.random.default_rng(2)
    for columns, offset in ((c, 0), (c + 1, 0), (c, 1)):
        buffer = np.empty(5 * columns + 1, dtype)
        assert buffer.ctypes.data % 16 == 0
        x = buffer[offset:offset + 5 * columns].reshape(5, columns)
        x[...] = (rng.standard_normal((5, columns)) * 3).astype(dtype)
        for keywords in ({}, {"weight": True, "label_smoothing": 0.1, "reduction": "none"}):
            t = rng.integers(0, columns, 5)
            launch, _ = check_cross_entropy(x, t, keywords, rng)
            assert launch.kernel.startswith("ce_block_rows_smem")


@pytest.mark.parametrize("c", [10, 3000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_last_block_sum_over_many_blocks(c, reduction):
    """64 blocks hand in partial losses; whichever comes last (blocks in shuffled orders) adds
    them up, in a fixed order, and resets the ticket counter."""
    rng = np.random.default_rng(3)
    n = 512 if c <= 2048 else 64
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    t = rng.integers(0, c, n)
    t[::7] = -100
    losses = []
    for seed in (None, 1, 2, 3):
        launch, loss = check_cross_entropy(x, t, {"reduction": reduction}, rng, facts=MANY_SM, seed=seed)
        assert launch.grid == 64
        losses.append(loss)
    assert len({loss.tobytes() for loss in losses}) == 1, "the sum must not depend on block order"


@pytest.mark.parametrize("dtype", [d for d in DTYPES if np.dtype(d).name in ("float32", "bfloat16")],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cross_entropy_in_shuffled_thread_orders(dtype, seed):
    rng = np.random.default_rng(seed)
    for c in one_c_per_variant(dtype, vectors=True):
        n = rows_for(c)
        x = (rng.standard_normal((n, c)) * 3).astype(dtype)
        t = rng.integers(0, c, n)
        for keywords in ({}, {"weight": True, "label_smoothing": 0.1, "ignore_index": 1}):
            check_cross_entropy(x, t, keywords, rng, seed=seed)


# --- the gradient from a kept log-sum-exp (an ElementwiseKernel) -------------------------------------

def elementwise(definition, types):
    """The module of ``definition`` with an instantiation for each dtype."""
    entries = tuple(dict.fromkeys(elementwise_entry(definition, types(d)) for d in DTYPES))
    return module(elementwise_source(definition), entries, definition[3])


def run_elementwise(definition, types, dtype, operands: dict, shape, poison=(), seed=None):
    args = elementwise_arguments(definition, operands, shape)
    launch = K.Launch(elementwise_entry(definition, types(dtype)),
                      *K.grid_stride(shape[0] * shape[1], ONE_SM, threads=128))
    elementwise(definition, types).launch(launch, args, poison=poison, seed=seed)


def grad_types(dtype):
    return {"T": dtype, "S": acc(dtype), "I": np.int64}


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "scalar"])
def test_cross_entropy_grad_from_kept_lse(dtype, per_row):
    """Per-row factors (weights, smoothing, an ignored row, reduction none with an upstream
    gradient), or scalar ones (mean, nothing else), broadcast as cross_entropy_grad passes them."""
    rng = np.random.default_rng(4)
    n, c = 70, 37
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    t = rng.integers(0, c, n)
    if per_row:
        t[5] = -100
        kw = dict(weight=rng.uniform(0.5, 2, c), label_smoothing=0.2, reduction="none")
        upstream = rng.standard_normal(n)
    else:
        kw, upstream = dict(reduction="mean"), 1.0
    weight = None if "weight" not in kw else kw["weight"].astype(acc(dtype))
    plan = F._CrossEntropyPlan(x, t, weight, -100, kw.get("label_smoothing", 0.0), kw["reduction"])
    lse = plan.lse_parts()
    operands = K.cross_entropy_grad_operands(np, x, lse.m, lse.log_sum,
                                             *plan._kernel_arguments(plan.row_scale(upstream)))
    if not per_row:
        assert all(v.ndim == 0 for v in operands[4:8]), "alpha, beta, gamma and smooth as scalars"
    dx = np.empty_like(x)
    names = parameter_names(K.CROSS_ENTROPY_GRAD)
    run_elementwise(K.CROSS_ENTROPY_GRAD, grad_types, dtype, dict(zip(names, (*operands, dx))),
                    (n, c), poison=(dx,))
    expected = F.softmax_cross_entropy_grad(x.astype(np.float64), t, grad_output=upstream, **kw)
    assert_close(dx, expected, dtype)


# --- Dense + ReLU -----------------------------------------------------------------------------------

EPSILON = {"float32": 2.0 ** -23, "float64": 2.0 ** -52, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def same_types(dtype):
    return {"T": dtype}


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_bias_relu(dtype):
    rng = np.random.default_rng(5)
    n, c = 70, 45
    y = rng.standard_normal((n, c)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    y[0, 0] = np.nan  # passes through, as numpy's maximum lets it
    expected = np.maximum((y.astype(np.float64) + b.astype(np.float64)).astype(dtype).astype(np.float64), 0)
    run_elementwise(K.BIAS_RELU, same_types, dtype, {"b": b, "y": y}, (n, c))
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=EPSILON[np.dtype(dtype).name],
                               atol=0)  # one rounding of the exact sum, as on the GPU


def relu_backward():
    return module(K.RELU_BACKWARD_SOURCE, tuple(K.RELU_BACKWARD_ENTRIES), "RELU_BACKWARD_SOURCE")


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("bias", [True, False], ids=["with-bias-grad", "no-bias-grad"])
@pytest.mark.parametrize("seed", [None, 1])
def test_relu_backward(dtype, bias, seed):
    """300 columns: more 32-column tiles than blocks; 45 rows: not a multiple of the 8 warps."""
    rng = np.random.default_rng(6)
    n, c = 45, 300
    y = np.maximum(rng.standard_normal((n, c)), 0).astype(dtype)
    dy = rng.standard_normal((n, c)).astype(dtype)
    out = np.empty_like(y)
    bias_grad = np.empty(c, dtype) if bias else None
    (launch, arguments), = K.relu_backward_launches(dy, y, out, bias_grad, ONE_SM, np)
    relu_backward().launch(launch, arguments, poison=(out, bias_grad) if bias else (out,),
                           seed=seed)
    dz = np.where(y.astype(np.float64) > 0, dy.astype(np.float64), 0)
    np.testing.assert_array_equal(out.astype(np.float64), dz)
    if bias:
        expected = dz.sum(axis=0)
        tol = TOLERANCE[np.dtype(dtype).name]
        np.testing.assert_allclose(bias_grad.astype(np.float64), expected, rtol=tol,
                                   atol=tol * np.abs(dz).sum(axis=0).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("facts", [ONE_SM, MANY_SM], ids=["one-sm", "many-sm"])
@pytest.mark.parametrize("seed", [None, 3])
def test_relu_backward_of_a_tall_dz_in_groups_of_rows(dtype, facts, seed):
    """A convolution's dz is tall: its rows are cut into groups, each block sums its group, and
    column_sums adds the groups up. 4601 rows: not a multiple of a group; 45 columns: two tiles,
    the second part empty."""
    rng = np.random.default_rng(7)
    n, c = 4601, 45
    assert K.relu_backward_groups(n, c, facts) > 1
    y = np.maximum(rng.standard_normal((n, c)), 0).astype(dtype)
    dy = rng.standard_normal((n, c)).astype(dtype)
    out, bias_grad = np.empty_like(y), np.empty(c, dtype)
    launches = K.relu_backward_launches(dy, y, out, bias_grad, facts, np)
    assert [launch.kernel.split("<")[0] for launch, _ in launches] == ["relu_backward", "column_sums"]
    (first, first_args), (second, second_args) = launches
    partials = first_args[4]
    relu_backward().launch(first, first_args, poison=(out, partials), seed=seed)
    relu_backward().launch(second, second_args, poison=(bias_grad,), seed=seed)
    dz = np.where(y.astype(np.float64) > 0, dy.astype(np.float64), 0)
    np.testing.assert_array_equal(out.astype(np.float64), dz)
    tol = TOLERANCE[np.dtype(dtype).name]
    np.testing.assert_allclose(bias_grad.astype(np.float64), dz.sum(axis=0), rtol=tol,
                               atol=tol * np.abs(dz).sum(axis=0).max())


def test_a_batch_is_one_group_and_one_launch():
    """The MLP's batches keep the one-launch kernel that writes the bias gradient itself."""
    y = np.ones((128, 800), np.float32)
    launches = K.relu_backward_launches(y, y, np.empty_like(y), np.empty(800, np.float32),
                                        K.HOPPER, np)
    assert len(launches) == 1 and launches[0][1][4] == 0  # no partial sums
    assert K.relu_backward_groups(100352, 32, K.HOPPER) == 132 * 4  # the small CNN's first layer
    tall = np.ones((5000, 32), np.float32)
    forced = K.relu_backward_launches(tall, tall, np.empty_like(tall), np.empty(32, np.float32),
                                      K.HOPPER, np, groups=1)  # the benchmark's comparison
    assert len(forced) == 1 and forced[0][0].grid == 1
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"groups must be an int >= 1 or None, got {bad!r}"):
            K.relu_backward_launches(tall, tall, tall, None, K.HOPPER, np, groups=bad)


# --- accuracy ------------------------------------------------------------------------------------------

def count_correct():
    return module(K.COUNT_CORRECT_SOURCE, tuple(K.COUNT_CORRECT_ENTRIES), "COUNT_CORRECT_SOURCE")


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("c", [1, 10, 37])
def test_count_correct(dtype, c):
    """2000 rows: more than one grid-stride turn. Ties go to the first maximum, and a NaN counts
    as the maximum, as numpy's argmax has it; the count adds to what ``out`` held."""
    rng = np.random.default_rng(c)
    n = 2000
    x = rng.standard_normal((n, c)).astype(dtype)
    labels = rng.integers(0, c, n)
    if c > 7:
        x[::13, 3] = x[::13, 7] = 9.0
        labels[::13] = 3
        labels[::26] = 7  # a tie's second maximum is not the argmax
        x[::17, 6] = np.nan
        labels[::17] = 6
    x64 = x.astype(np.float64)
    out = np.array(5, np.uint64)
    count_correct().launch(K.count_correct_launch(n, c, dtype, ONE_SM),
                           K.count_correct_arguments(x, labels, out))
    assert int(out) == 5 + np.count_nonzero(x64.argmax(axis=1) == labels)


# --- Dropout: the Philox mask and x * mask in one ElementwiseKernel ------------------------------------

# (seed, step, offset, p): 64-bit seeds and steps, offsets that are not multiples of 4, and the
# last words of a stream (block numbers near 2**32, where e >> 2 must not wrap).
DROPOUT_DRAWS = [(5, 0, 0, 0.25), (2 ** 64 - 1, 2 ** 40 + 3, 7, 0.5),
                 (123 + (9 << 32), 1, 2 ** 34 - 37 * 29, 0.1), (77, 2 ** 64 - 1, 2, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("seed,step,offset,p", DROPOUT_DRAWS)
def test_dropout_is_the_counter_based_formula_bit_for_bit(dtype, seed, step, offset, p):
    """The kernel's mask is Dropout's NumPy formula (counter_words) to the bit, and y its one
    rounded product with x; 37 x 29 elements: an odd count, no multiple of 4."""
    from gpunet import dropout as D
    n, c = 37, 29
    x = np.random.default_rng(8).standard_normal((n, c)).astype(dtype)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    operands = K.dropout_operands(x, np.array(step, np.uint64), offset, seed,
                                  D.keep_threshold(p), scale)
    y, mask = np.empty_like(x), np.empty_like(x)
    names = parameter_names(K.DROPOUT)
    run_elementwise(K.DROPOUT, same_types, dtype,
                    dict(zip(names, [np.asarray(v) for v in operands] + [y, mask])), (n, c),
                    poison=(y, mask))
    words = D.counter_words(x.size, seed, np.uint64(step), np, offset).reshape(x.shape)
    expected = (words >= D.keep_threshold(p)).astype(dtype) * x.dtype.type(scale)
    np.testing.assert_array_equal(mask.view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal((x * expected).view(np.uint8), y.view(np.uint8))


def test_dropout_keeps_a_word_equal_to_its_threshold():
    """keep when word >= threshold: with p = w / 2**32 for a word w of the stream, the element
    that drew w is kept, and one that drew w - 1 would not be."""
    from gpunet import dropout as D
    n, c, seed, step = 5, 7, 99, 3
    words = D.counter_words(n * c, seed, np.uint64(step), np)
    w = int(words[11])
    p = w / 2 ** 32
    assert int(D.keep_threshold(p)) == w
    x = np.ones((n, c), np.float32)
    operands = K.dropout_operands(x, np.array(step, np.uint64), 0, seed, D.keep_threshold(p),
                                  D.keep_scale(p))
    y, mask = np.empty_like(x), np.empty_like(x)
    run_elementwise(K.DROPOUT, same_types, np.float32,
                    dict(zip(parameter_names(K.DROPOUT), [np.asarray(v) for v in operands] + [y, mask])),
                    (n, c), poison=(y, mask))
    assert mask.reshape(-1)[11] == np.float32(D.keep_scale(p))
    np.testing.assert_array_equal(mask.reshape(-1) != 0, words >= w)


# --- the optimizers' fused updates ------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd-nesterov-decay": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": lambda p: optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.2),
    "adam-decay": lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def optim_module():
    return module(K.OPTIM_SOURCE, tuple(K.OPTIM_ENTRIES), "OPTIM_SOURCE")


def fused_update(opt, lr_table=None, counters=None):
    """What ``opt.device_update`` launches on a GPU, run by the harness."""
    rule, buffers, hyper = opt.fused_rule()
    optim_module().launch(K.optimizer_launch(rule, opt.data.dtype, opt.data.size, ONE_SM),
                          K.optimizer_arguments(rule, buffers, hyper, lr_table, counters))


def optimizer_pair(make, dtype):
    """(reference, kernel): one model's parameters twice, the reference in float64 updated by
    optim.py's NumPy rule, the other in ``dtype`` by the fused kernel. 3010 parameters: more
    than one grid-stride turn."""
    reference = make(L.mlp([64, 40, 10], rng=np.random.default_rng(0), dtype=np.float64).parameters())
    kernel = make(L.mlp([64, 40, 10], rng=np.random.default_rng(0), dtype=dtype).parameters())
    reference.data[...] = kernel.data
    reference._host_update = reference._update  # the reference formula, not the compiled CPU kernel
    return reference, kernel


def assert_same_state(reference, kernel, tol):
    np.testing.assert_allclose(kernel.data, reference.data, rtol=tol, atol=tol)
    for name, buffer in reference.state.items():
        np.testing.assert_allclose(kernel.state[name], buffer, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", list(OPTIMIZERS))
def test_fused_optimizer_update(dtype, rule):
    reference, kernel = optimizer_pair(OPTIMIZERS[rule], dtype)
    kernel._host_update = lambda: fused_update(kernel)  # step() counts the step, then updates
    rng = np.random.default_rng(7)
    for _ in range(4):
        g = rng.standard_normal(reference.grad.shape)
        reference.grad[...] = g
        kernel.grad[...] = g.astype(dtype)
        reference.step()
        kernel.step()
    assert_same_state(reference, kernel, 1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("rule", ["sgd-nesterov-decay", "adamw"])
def test_fused_optimizer_reads_rate_and_step_from_the_device(rule):
    """As in a captured graph: counters = {steps taken, batch} and a table of rates on the
    device; the step count and rate that the host holds are ignored."""
    reference, kernel = optimizer_pair(OPTIMIZERS[rule], np.float32)
    rates = np.array([0.05, 0.02, 0.01, 0.005], np.float32)
    rng = np.random.default_rng(8)
    for steps_taken, batch in ((0, 0), (1, 2), (2, 3)):
        g = rng.standard_normal(reference.grad.shape)
        reference.grad[...] = g
        kernel.grad[...] = g.astype(np.float32)
        reference.lr, reference.step_count = float(rates[batch]), steps_taken
        reference.step()
        kernel.step_count, kernel.lr = 100, 1.0  # stale host values the kernel must not use
        fused_update(kernel, lr_table=rates, counters=np.array([steps_taken, batch], np.int64))
    assert_same_state(reference, kernel, 1e-5)


# --- the pieces of a captured training step ---------------------------------------------------------

def step_module():
    return module(K.STEP_SOURCE, tuple(K.STEP_ENTRIES), "STEP_SOURCE")


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_gather_batch(dtype):
    """Batch 2 of 70 rows (2800 elements: more than one grid-stride turn), then the short last
    batch of 20."""
    rng = np.random.default_rng(9)
    total, features, batch_size = 300, 40, 70
    x = rng.standard_normal((total, features)).astype(dtype)
    y = rng.integers(0, 10, total)
    order = rng.permutation(total)
    for batch, rows in ((2, 70), (4, 20)):
        counters = np.array([11, batch], np.int64)
        xb, yb = np.empty((rows, features), dtype), np.empty(rows, np.int64)
        step_module().launch(K.gather_batch_launch(rows, features, dtype, ONE_SM),
                             K.gather_batch_arguments(x, y, order, counters, xb, yb, batch_size),
                             poison=(xb, yb))
        chosen = order[batch * batch_size:batch * batch_size + rows]
        np.testing.assert_array_equal(xb.view(np.uint8), x[chosen].view(np.uint8))
        np.testing.assert_array_equal(yb, y[chosen])
        np.testing.assert_array_equal(counters, [11, batch])


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
def test_finish_step(dtype):
    loss = np.array(np.random.default_rng(10).standard_normal(), dtype)
    losses = np.arange(6, dtype=np.float64)
    counters = np.array([7, 3], np.int64)
    step_module().launch(K.finish_step_launch(dtype), (loss, losses, counters))
    np.testing.assert_array_equal(losses, [0, 1, 2, float(loss.astype(np.float64)), 4, 5])
    np.testing.assert_array_equal(counters, [8, 4])
