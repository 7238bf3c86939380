"""Pure functions: softmax, its derivatives, and the fused softmax-cross-entropy.

Every function takes numpy or cupy arrays and returns arrays of the same library, in the input's
float dtype. Reductions accumulate in float32 at least (float64 stays float64), so float16 and
bfloat16 inputs lose no more than their final rounding.

The derivative of ``s = softmax(x)`` is the Jacobian ``J = diag(s) - s sᵀ``. Backprop never needs
J itself, only the vector-Jacobian product with the upstream gradient ``g``::

    gᵀJ = s * (g - sum(s * g))          (softmax_vjp, O(C) instead of O(C²))

The common mistake is to use only J's diagonal, ``s * (1 - s) * g``; it drops the ``-s_i s_j``
terms and fails the gradient check (tests/test_functional.py shows it). Softmax followed by
cross-entropy collapses further: d(mean CE)/dx = (s - onehot(t)) / N, which
:func:`softmax_cross_entropy_grad` computes in one fused pass.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .kernels import cpu as cpu_kernels
from .backend import add_into, get_array_module, is_cuda_array, is_integer, is_real

REDUCTIONS = ("mean", "sum", "none")


# --- dtype helpers -------------------------------------------------------------------------------

def is_float_dtype(dtype) -> bool:
    """True for float16/32/64 and bfloat16 (ml_dtypes), the dtypes gpunet computes in."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name == "bfloat16")


def accumulation_dtype(dtype):
    """float64 for float64 inputs, float32 for everything narrower."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _float_array(x, name: str):
    if not hasattr(x, "dtype"):  # lists and scalars: numbers become float64, like np.exp would
        x = np.asarray(x)
        if x.dtype.kind in "iu":
            x = x.astype(np.float64)
    if not is_float_dtype(x.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


# --- softmax and friends -------------------------------------------------------------------------

def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """log(sum(exp(x))) along ``axis``, stable for any finite logits and for ``-inf`` entries.

    The row maximum is subtracted before ``exp`` so nothing overflows; a row of all ``-inf``
    gives ``-inf`` (the log of an empty sum), a row holding ``+inf`` gives ``+inf``.
    """
    x = _float_array(x, "x")
    xp = get_array_module(x)
    xa = x.astype(accumulation_dtype(x.dtype), copy=False)
    if xa.shape[axis] == 0:
        out = xp.full(xa.sum(axis=axis, keepdims=True).shape, -np.inf, dtype=xa.dtype)
    else:
        m, log_sum = _max_and_log_sum(xp, xa, axis)
        out = m + log_sum
    if not keepdims:
        out = out.squeeze(axis=axis)
    return out.astype(x.dtype, copy=False)


def softmax(x, axis: int = -1):
    """exp(x) / sum(exp(x)) along ``axis``, computed as exp(x - max) so it never overflows.

    Finite for logits like ±1e4; ``-inf`` entries get probability 0. A row of all ``-inf`` has no
    defined softmax and gives NaN, as in PyTorch.
    """
    x = _float_array(x, "x")
    xp = get_array_module(x)
    xa = x.astype(accumulation_dtype(x.dtype), copy=False)
    if xa.size == 0:
        return xp.empty_like(x)
    # over: x - max below -3e38 is -inf, whose exp is the right 0 (and a row holding NaN or
    # +inf is shifted by 0, so its exp may overflow: that row's answer is NaN either way).
    with np.errstate(over="ignore", invalid="ignore"):  # invalid: 0/0 of an all -inf row
        e = xp.exp(xa - _finite_max(xp, xa, axis))
        e /= e.sum(axis=axis, keepdims=True)
    return e.astype(x.dtype, copy=False)


def log_softmax(x, axis: int = -1):
    """x - logsumexp(x), formed as (x - max) - log(sum(exp(x - max))): the log of softmax
    without ever forming a probability that underflows.

    Subtracting the max first keeps float32 exact where it matters: ``max + log(sum)`` would be
    rounded to the spacing of the max (1e-3 at 1e4) before x is taken from it.
    """
    x = _float_array(x, "x")
    xp = get_array_module(x)
    xa = x.astype(accumulation_dtype(x.dtype), copy=False)
    if xa.size == 0:
        return xp.empty_like(x)
    m, log_sum = _max_and_log_sum(xp, xa, axis)
    # over: see softmax; invalid: -inf - -inf, an all -inf row has no log-softmax (NaN)
    with np.errstate(over="ignore", invalid="ignore"):
        return ((xa - m) - log_sum).astype(x.dtype, copy=False)


def _max_and_log_sum(xp, x, axis):
    """(m, log(sum(exp(x - m)))) along ``axis`` (kept as a length-1 axis), m the row max where
    it is finite and 0 where not: the two parts of the log-sum-exp, m + log_sum, kept apart so
    that x - logsumexp can be formed max first, as (x - m) - log_sum."""
    m = _finite_max(xp, x, axis)
    # over: as in softmax; divide: log(0) = -inf for all -inf rows is the right answer
    with np.errstate(over="ignore", divide="ignore"):
        return m, xp.log(xp.exp(x - m).sum(axis=axis, keepdims=True))


def _finite_max(xp, x, axis):
    # A row max of ±inf would turn x - max into nan; shifting by 0 instead keeps the exact answer.
    if x.ndim == 2 and axis in (1, -1):
        # numpy's max along a short last axis is several times slower than argmax and a gather.
        m = x[_arange(xp, x.shape[0]), x.argmax(axis=1)][:, None]
    else:
        m = x.max(axis=axis, keepdims=True)
    if xp is np and np.isfinite(m).all():  # the usual case, asked for free on the CPU
        return m
    return xp.where(xp.isfinite(m), m, 0)


def softmax_jacobian(s):
    """The Jacobian ``diag(s) - s sᵀ`` of softmax at output ``s``: (C,) -> (C, C), (N, C) -> (N, C, C).

    For teaching and tests; backprop uses :func:`softmax_vjp`, which never builds the C×C matrix.
    """
    s = _float_array(s, "s")
    if s.ndim not in (1, 2):
        raise ValueError(f"s must be a softmax output of shape (C,) or (N, C), got shape {s.shape}")
    xp = get_array_module(s)
    eye = xp.eye(s.shape[-1], dtype=s.dtype)
    # J_ij = s_i (δ_ij - s_j)
    return s[..., :, None] * (eye - s[..., None, :])


def softmax_vjp(s, g, axis: int = -1):
    """gᵀJ for softmax output ``s`` and upstream gradient ``g``: ``s * (g - sum(s * g))``.

    This is the exact backward of softmax for any upstream gradient, so softmax composes with any
    loss. It is the one home of this formula: the Softmax layer's backward calls it.
    """
    s, g = _float_array(s, "s"), _float_array(g, "g")
    get_array_module(s, g)
    if s.shape != g.shape:
        raise ValueError(f"g must have the shape of s {s.shape}, got {g.shape}")
    return s * (g - (s * g).sum(axis=axis, keepdims=True))


def softmax_jvp(s, v, axis: int = -1):
    """J v for softmax output ``s`` and tangent ``v``.

    J = diag(s) - s sᵀ is symmetric, so J v = vᵀ J and the formula is :func:`softmax_vjp`'s.
    """
    return softmax_vjp(s, v, axis=axis)


# --- softmax cross-entropy -----------------------------------------------------------------------
#
# With class-index targets t, label smoothing ε and class weights w (PyTorch's F.cross_entropy):
#
#     loss_i = sum_c a_ic (lse_i - x_ic),   a_ic = (1-ε) w_t [c = t_i] + (ε/C) w_c
#
# where lse_i - x_ic is always formed max first, (m_i - x_ic) + log_sum_i (see LogSumExp).
#
# and 0 for rows whose target is ignore_index. "mean" divides the sum by the summed weights
# w_t of the non-ignored rows; where that is 0 (every row ignored, or an empty batch) gpunet
# defines the mean as 0 with a zero gradient, where PyTorch returns NaN. The gradient is
#
#     dL/dx_ic = scale_i (A_i p_ic - a_ic),   A_i = sum_c a_ic,   p = softmax(x),
#
# with scale_i the reduction's factor (grad_output / denominator for "mean"). Without weights
# or smoothing this is the familiar (p - onehot(t)) / N.

def softmax_cross_entropy(logits, target, *, weight=None, ignore_index: int = -100,
                          label_smoothing: float = 0.0, reduction: str = "mean"):
    """Cross-entropy of ``softmax(logits)`` against ``target``, with PyTorch's semantics.

    ``logits`` is (N, C). ``target`` holds class indices (N,) or probabilities (N, C) whose rows
    sum to 1. Returns a 0-d array for "mean" and "sum", an (N,) array for "none".
    """
    plan = _CrossEntropyPlan(logits, target, weight, ignore_index, label_smoothing, reduction)
    return plan.loss(plan.lse_parts())


def softmax_cross_entropy_grad(logits, target, *, weight=None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, reduction: str = "mean",
                               grad_output=1.0):
    """d loss / d logits for :func:`softmax_cross_entropy`, in the fused form (p - onehot) * scale.

    ``grad_output`` is the upstream gradient of the loss: a scalar (or 0-d array) for "mean" and
    "sum", an (N,) array for "none". On cupy arrays one fused ElementwiseKernel computes it.
    """
    plan = _CrossEntropyPlan(logits, target, weight, ignore_index, label_smoothing, reduction)
    return plan.grad(plan.lse_parts(), grad_output)


def softmax_cross_entropy_with_grad(logits, target, *, weight=None, ignore_index: int = -100,
                                    label_smoothing: float = 0.0, reduction: str = "mean",
                                    validate: bool = True):
    """(loss, d loss / d logits) in a single pass over the logits: the training step's call.

    On cupy arrays with class-index targets one kernel launch reads the logits once and writes
    the gradient once. ``validate=False`` skips the argument checks (whose label range check
    synchronises with a GPU); pass it only for targets checked beforehand.
    """
    plan = _CrossEntropyPlan(logits, target, weight, ignore_index, label_smoothing, reduction,
                             validate=validate)
    return plan.loss_and_grad()


class _CrossEntropyPlan:
    """The checked arguments of one cross-entropy call and its per-row coefficients.

    Shared by the functions above and by ``losses.SoftmaxCrossEntropy``, which keeps the
    log-sum-exp from its forward pass for its backward.
    """

    def __init__(self, logits, target, weight, ignore_index, label_smoothing, reduction,
                 validate: bool = True):
        if validate:
            check_cross_entropy_args(logits, target, weight, ignore_index, label_smoothing,
                                     reduction)
        self.xp = get_array_module(logits, target, weight)
        self.logits, self.target, self.weight = logits, target, weight
        self.ignore_index, self.eps, self.reduction = ignore_index, float(label_smoothing), reduction
        self.probability_target = is_float_dtype(target.dtype)
        self.acc = accumulation_dtype(logits.dtype)
        self._rows = None

    def lse_parts(self):
        """Each row's log-sum-exp as a :class:`LogSumExp`, in the accumulation dtype: all that
        backward needs to keep."""
        m, log_sum = _max_and_log_sum(self.xp, self.logits.astype(self.acc, copy=False), 1)
        return LogSumExp(m[:, 0], log_sum[:, 0])

    def rows(self):
        """Per-row (t_safe, coef, A, valid, 1/denominator) for class-index targets, computed once.

        coef_i = (1-ε) w_t and A_i = sum_c a_ic, both 0 on ignored rows; the denominator of
        "mean" is the summed w_t of the kept rows (and its "reciprocal" is 0 when it is 0).
        """
        if self._rows is None:
            xp, acc, t, n_classes = self.xp, self.acc, self.target, self.logits.shape[1]
            valid = t != self.ignore_index
            if not is_cuda_array(t) and bool(valid.all()):
                # On the CPU that question is free (on a GPU it would synchronise), and with
                # every row kept the per-row factors collapse to scalars: fewer passes per step.
                valid = True
            t_safe = t if valid is True else xp.where(valid, t, 0)
            if self.weight is None:
                w_t, w_sum = (1.0 if valid is True else valid.astype(acc)), n_classes
            else:
                w = self.weight.astype(acc, copy=False)
                w_t, w_sum = w[t_safe] * valid, w.sum()
            coef = w_t if self.eps == 0 else (1.0 - self.eps) * w_t
            big_a = coef if self.eps == 0 else coef + (self.eps / n_classes) * w_sum * valid
            denominator = t.shape[0] if isinstance(w_t, float) else w_t.sum()
            self._rows = (t_safe, coef, big_a, valid, _reciprocal_or_zero(xp, denominator))
        return self._rows

    def smoothing_weights(self):
        """(ε/C) w_c, the smoothing part of a_ic: an array of shape (C,), or one number when
        there are no class weights."""
        c = self.logits.shape[1]
        if self.weight is None:
            return self.eps / c
        return self.weight.astype(self.acc) * (self.eps / c)

    def coefficients(self):
        """The full (N, C) matrix a_ic; only probability targets need it."""
        c = self.logits.shape[1]
        a = self.target.astype(self.acc) * (1.0 - self.eps) + self.eps / c
        if self.weight is not None:
            a *= self.weight.astype(self.acc, copy=False)
        return a

    def loss(self, lse: "LogSumExp"):
        # over: m - x past ±3e38 is inf, the loss rounded to the dtype; invalid: inf - inf of
        # a row holding ±inf, whose loss is NaN
        with np.errstate(over="ignore", invalid="ignore"):
            return self._loss(lse)

    def _loss(self, lse: "LogSumExp"):
        xp, x = self.xp, self.logits.astype(self.acc, copy=False)
        m, log_sum = lse.m[:, None], lse.log_sum[:, None]
        if self.probability_target:
            per_row = (self.coefficients() * ((m - x) + log_sum)).sum(axis=1)
            inverse = _reciprocal_or_zero(xp, x.shape[0])
        else:
            t_safe, coef, _, valid, inverse = self.rows()
            picked = x[_arange(xp, x.shape[0]), t_safe]
            nll = _keep(xp, valid, (lse.m - picked) + lse.log_sum)
            per_row = nll if isinstance(coef, float) and coef == 1.0 else coef * nll
            if self.eps:
                smooth = (((m - x) + log_sum) * self.smoothing_weights()).sum(axis=1)
                per_row += _keep(xp, valid, smooth)
        if self.reduction == "none":
            return per_row.astype(self.logits.dtype, copy=False)
        total = per_row.sum()
        if self.reduction == "mean":
            total = total * inverse
        return xp.asarray(total, dtype=self.logits.dtype)  # numpy sums give scalars, not 0-d arrays

    def row_scale(self, grad_output):
        """scale_i: the reduction's factor times the upstream gradient, per row (or a scalar)."""
        xp, n = self.xp, self.logits.shape[0]
        if isinstance(grad_output, (int, float)):  # a Python number stays one: no array ops
            g = float(grad_output)
        else:
            g = xp.asarray(grad_output, dtype=self.acc)
            if self.reduction == "none":
                if g.ndim != 0 and g.shape != (n,):
                    raise ValueError(f"grad_output must be a scalar or of shape ({n},) for "
                                     f"reduction='none', got shape {g.shape}")
            elif g.ndim != 0:
                raise ValueError(f"grad_output must be a scalar for reduction={self.reduction!r}, "
                                 f"got shape {g.shape}")
        if self.reduction == "mean":
            g = g * (_reciprocal_or_zero(xp, n) if self.probability_target else self.rows()[4])
        return g

    def grad(self, lse: "LogSumExp", grad_output=1.0):
        """The gradient, rebuilding p = exp((x - m) - log_sum) from the kept log-sum-exp."""
        x, scale = self.logits, self.row_scale(grad_output)
        if self.probability_target:
            a = self.coefficients()
            p = lse.probabilities(x)
            dx = _column(scale) * (a.sum(axis=1, keepdims=True) * p - a)
            return dx.astype(x.dtype, copy=False)
        args = self._kernel_arguments(scale)
        if is_cuda_array(x):
            from .kernels import cuda as cuda_kernels
            return cuda_kernels.cross_entropy_grad(x, lse.m, lse.log_sum, *args)
        return cross_entropy_grad_reference(x, lse, *args)

    def _kernel_arguments(self, scale):
        """(t, alpha, beta, gamma, smooth) of the gradient formula, scale folded in."""
        t_safe, coef, big_a, valid, _ = self.rows()
        gamma = scale * valid  # ignored rows get exactly zero gradient
        return t_safe, gamma * big_a, gamma * coef, gamma, self.smoothing_weights() if self.eps else None

    def loss_and_grad(self, grad_output=1.0):
        """(loss, gradient) computing exp(x - max) once for both."""
        xp, x = self.xp, self.logits
        if not self.probability_target and is_cuda_array(x):
            from .kernels import cuda as cuda_kernels
            return cuda_kernels.cross_entropy_loss_and_grad(self, grad_output)
        if cpu_kernels.cross_entropy_fits(self, grad_output):
            return cpu_kernels.cross_entropy_loss_and_grad(self, grad_output)
        if self.probability_target:
            lse = self.lse_parts()
            return self.loss(lse), self.grad(lse, grad_output)
        # One errstate for the whole pass (each costs 1.6 us): over as in softmax and in loss;
        # divide and invalid only for an all -inf row (log(0) = -inf, 0/0), whose answer is NaN.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            xa = x.astype(self.acc)  # a copy, which becomes the gradient in place
            m = _finite_max(xp, xa, axis=1)
            xa -= m
            xp.exp(xa, out=xa)
            total = _row_sums(xa)
            loss = self._loss(LogSumExp(m[:, 0], xp.log(total)))
            t, alpha, beta, gamma, smooth = self._kernel_arguments(self.row_scale(grad_output))
            # p = e / total and the gradient's alpha * p in one pass: e * (alpha / total)
            xa *= _column(alpha / total)
        return loss, _apply_grad(xa, t, 1.0, beta, gamma, smooth).astype(x.dtype, copy=False)


class LogSumExp(NamedTuple):
    """Each row's log-sum-exp in two parts, ``m + log_sum`` (both (N,)): m the row max (0 where
    it is not finite) and log_sum = log(sum(exp(x - m))).

    They are kept apart so that ``lse - x`` is formed as ``(m - x) + log_sum`` and ``x - lse``
    as ``(x - m) - log_sum``, max first, as PyTorch does: in float32 the sum ``m + log_sum``
    would be rounded to the spacing of m (1e-3 at 1e4) before x is taken from it.
    """

    m: object
    log_sum: object

    def whole(self):
        """m + log_sum: the log-sum-exp itself."""
        return self.m + self.log_sum

    def probabilities(self, x):
        """p = exp((x - m) - log_sum), in the dtype of the parts."""
        xp = get_array_module(x, self.m)
        with np.errstate(over="ignore", invalid="ignore"):  # as in softmax
            return xp.exp((x.astype(self.m.dtype, copy=False) - self.m[:, None])
                          - self.log_sum[:, None])


def cross_entropy_grad_reference(x, lse, t, alpha, beta, gamma, smooth):
    """dx_ic = alpha_i p_ic - beta_i [c = t_i] - gamma_i smooth_c,  p_ic = exp(x_ic - lse_i).

    The vectorised twin of the CUDA kernel ``kernels.cuda.cross_entropy_grad``, with ``lse`` a
    :class:`LogSumExp` and p formed max first, ``exp((x - m) - log_sum)`` (the kernel still
    takes ``m + log_sum`` whole). alpha = scale·A, beta = scale·coef and gamma = scale, per row
    (or scalars); smooth is (C,) or None when there is no label smoothing.
    """
    p = lse.probabilities(x)
    return _apply_grad(p, t, alpha, beta, gamma, smooth).astype(x.dtype, copy=False)


def _apply_grad(p, t, alpha, beta, gamma, smooth):
    """Turn probabilities p into the gradient, in place (see cross_entropy_grad_reference)."""
    xp = get_array_module(p)
    if not (isinstance(alpha, float) and alpha == 1.0):
        p *= _column(alpha)
    p[_arange(xp, p.shape[0]), t] -= beta
    if smooth is not None:
        p -= _column(gamma) * smooth
    return p


def _arange(xp, n: int):
    """0..n-1 as an index array; on the CPU one cached, read-only array per n."""
    if xp is not np:
        return xp.arange(n)
    rows = _ARANGES.get(n)
    if rows is None:
        rows = _ARANGES[n] = np.arange(n)
        rows.flags.writeable = False
    return rows


_ARANGES: dict[int, np.ndarray] = {}


def _row_sums(x):
    """Each row's sum. For short rows (a classifier's few classes) a product with ones is 2-3x
    faster in numpy than sum(axis=1); long rows keep numpy's more accurate pairwise sum."""
    if x.shape[1] <= 64 and not is_cuda_array(x) and x.dtype in (np.float32, np.float64):
        return x @ _ones(x.shape[1], x.dtype)
    return x.sum(axis=1)


def column_sums(x, out, beta: float = 0.0):
    """``x.sum(axis=0)`` into ``out`` (plus ``beta * out``: see ``Parameter.grad_decay``): a
    layer's bias gradient. On the CPU it is a product with ones (BLAS gemv): twice as fast as
    numpy's reduction over rows, and as accurate, since both add the rows one after another."""
    if not is_cuda_array(x) and x.dtype == out.dtype and x.dtype in (np.float32, np.float64):
        ones = _ones(x.shape[0], x.dtype)
        if beta:  # as a (1, N) @ (N, C) product, which BLAS adds into out
            return matmul(ones[None], x, out=out[None], beta=beta)[0]
        return np.matmul(ones, x, out=out)
    if beta:
        return add_into(out, x.sum(axis=0), beta)
    return x.sum(axis=0, out=out)


def _ones(n: int, dtype) -> np.ndarray:
    """A cached, read-only host vector of n ones."""
    key = (n, np.dtype(dtype))
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = np.ones(n, dtype)
        ones.flags.writeable = False
    return ones


_ONES: dict[tuple, np.ndarray] = {}


def _column(v):
    """A per-row value as an (N, 1) column; scalars (Python or 0-d) broadcast as they are."""
    return v[:, None] if getattr(v, "ndim", 0) == 1 else v


def _keep(xp, valid, v):
    """v on kept rows and 0 on ignored ones (where, not *: v may be inf on ignored rows)."""
    return v if valid is True else xp.where(valid, v, 0)


def _reciprocal_or_zero(xp, denominator):
    """1 / denominator, or 0 when it is 0: a mean over nothing is 0, with a zero gradient."""
    if isinstance(denominator, (int, float)):
        return 1.0 / denominator if denominator else 0.0
    nonzero = denominator != 0
    return xp.where(nonzero, 1 / xp.where(nonzero, denominator, 1), 0)


def matmul(a, b, out=None, beta: float = 0.0):
    """a @ b, or with ``beta`` (which needs ``out``) out = a @ b + beta * out: a gradient added
    into a buffer (``Parameter.grad_decay``), in one BLAS call on either device.

    On a GPU every product goes through gpunet's own cuBLAS handle, which a CUDA graph can
    capture (CuPy's matmul cannot be captured; see kernels/cublas.py)."""
    if type(a) is not np.ndarray and is_cuda_array(a):
        from .kernels import cuda as cuda_kernels
        return cuda_kernels.matmul(a, b, out=out, beta=beta)
    if not beta:
        return np.matmul(a, b, out=out)
    if out is None:
        raise ValueError("matmul with beta needs out, the array it adds into")
    if cpu_kernels.gemm(a, b, beta, out):
        return out
    return add_into(out, np.matmul(a, b), beta)  # without the compiled kernels: one more pass



# --- the other fused pieces of a training step ---------------------------------------------------
#
# Each has a CUDA kernel as its fast path on cupy arrays and runs the same formula in numpy.

def linear(x, w, b=None, relu: bool = False):
    """``x @ w + b``, then ``max(·, 0)`` when ``relu``: a Dense layer's forward (on a GPU, the
    bias and the ReLU are one kernel launch after the product)."""
    y = matmul(x, w)
    if relu:
        return bias_relu_(y, 0 if b is None else b)
    if b is not None:
        y += b
    return y


def bias_relu_(y, b):
    """y = max(y + b, 0), in place: a Dense layer's bias and ReLU in one pass (one launch)."""
    if is_cuda_array(y):
        from .kernels import cuda as cuda_kernels
        return cuda_kernels.bias_relu_(y, b)
    if cpu_kernels.bias_relu_fits(y, b):
        return cpu_kernels.bias_relu_(y, b)
    y += b
    return np.maximum(y, y.dtype.type(0), out=y)  # a zero of y's dtype: no cast per call


def relu_backward(dy, y, bias_grad=None, beta: float = 0.0):
    """dy * (y > 0), the gradient through a ReLU whose output was y; with ``bias_grad`` given,
    also writes the column sums into it (the bias gradient of the layer before), in one launch.
    With ``beta`` the sums are added to ``beta * bias_grad`` (``Parameter.grad_decay``)."""
    if is_cuda_array(y):
        from .kernels import cuda as cuda_kernels
        if not beta:
            return cuda_kernels.relu_backward(dy, y, bias_grad=bias_grad)
        dz = cuda_kernels.relu_backward(dy, y)
    elif cpu_kernels.relu_backward_fits(dy, y, bias_grad):
        return cpu_kernels.relu_backward(dy, y, bias_grad, beta)
    else:
        # A select, as the CUDA and C kernels and PyTorch's threshold_backward: an inf or NaN
        # upstream where the ReLU was off gives 0 (dy * (y > 0) would give NaN there).
        dz = np.where(y > 0, dy, dy.dtype.type(0))
    if bias_grad is not None:
        column_sums(dz, bias_grad, beta)
    return dz


def count_correct(logits, labels, out=None):
    """The number of rows whose argmax is the label, as a device scalar (added to ``out``)."""
    xp = get_array_module(logits, labels)
    if out is None:
        out = xp.zeros((), dtype=np.uint64)
    if is_cuda_array(logits):
        from .kernels import cuda as cuda_kernels
        return cuda_kernels.count_correct(logits, labels, out)
    out += np.uint64(np.count_nonzero(logits.argmax(axis=1) == labels))
    return out


def check_cross_entropy_args(logits, target, weight, ignore_index, label_smoothing, reduction):
    """Raise ValueError/TypeError for any argument the cross-entropy cannot take.

    Runs before any CUDA kernel, in every reduction mode. On a GPU the label range check reads
    two numbers back to the host: that is the price of rejecting bad labels up front.
    """
    if not hasattr(logits, "dtype") or not hasattr(target, "dtype"):
        raise TypeError("logits and target must be numpy or cupy arrays, got "
                        f"{type(logits).__name__} and {type(target).__name__}")
    xp = get_array_module(logits, target, weight)
    if not is_float_dtype(logits.dtype):
        raise TypeError(f"logits must be a floating-point array, got dtype {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {logits.shape}")
    n, c = logits.shape
    if c == 0:
        raise ValueError("logits must have at least one class, got shape (N, 0)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not is_real(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not is_integer(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if weight is not None:
        if not hasattr(weight, "dtype") or not is_float_dtype(weight.dtype):
            raise TypeError(f"weight must be a floating-point array of shape ({c},), got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if weight.shape != (c,):
            raise ValueError(f"weight must have shape ({c},), one per class, got {weight.shape}")
        if bool((weight < 0).any()) or not bool(xp.isfinite(weight).all()):
            raise ValueError("weight must be finite and non-negative")

    if target.dtype == np.bool_:
        raise TypeError("target must hold integer class indices or float probabilities, got bool")
    if is_float_dtype(target.dtype):
        if target.shape != logits.shape:
            raise TypeError(f"float target must be probabilities of the logits' shape {logits.shape}"
                            f", got shape {target.shape}; class indices must be integers")
        _check_probabilities(xp, target)
        return
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.ndim != 1:
        raise ValueError(f"target must be 1-D (N,) class indices, got shape {target.shape}")
    if target.shape[0] != n:
        raise ValueError(f"target has batch size {target.shape[0]} but logits have {n}")
    if n == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= c))
    if bool(bad.any()):
        i = int(xp.argmax(bad))
        raise ValueError(f"target has label {int(target[i])} at index {i} but logits have {c} "
                         f"classes (expected 0..{c - 1} or ignore_index={ignore_index})")


def _check_probabilities(xp, target):
    tol = 10 * float(np.finfo(accumulation_dtype(target.dtype)).eps) ** 0.5
    t = target.astype(accumulation_dtype(target.dtype), copy=False)
    if bool((t < -tol).any()) or not bool(xp.isfinite(t).all()):
        raise ValueError("probability target must be finite and non-negative")
    sums = t.sum(axis=1)
    off = xp.abs(sums - 1)
    if t.shape[0] and bool((off > tol * max(1, t.shape[1]) ** 0.5).any()):
        i = int(xp.argmax(off))
        raise ValueError(f"probability target rows must sum to 1, but row {i} sums to "
                         f"{float(sums[i]):.6g}")
