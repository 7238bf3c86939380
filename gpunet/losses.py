"""Losses: ``forward(pred, target)`` returns a scalar (a 0-d array on pred's device) and
``backward(grad_output=1.0)`` returns d loss / d pred for the last forward.
"""

from __future__ import annotations

import numpy as np

from . import functional as F
from .backend import get_array_module, is_real


class Loss:
    reduction = "mean"

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def _saved(self):
        if getattr(self, "_plan", None) is None:
            raise ValueError(f"{type(self).__name__}.backward() called before forward()")
        return self._plan


class SoftmaxCrossEntropy(Loss):
    """Softmax and cross-entropy fused, on logits, with the keywords of PyTorch's F.cross_entropy.

    The forward keeps the rows' log-sum-exp (N numbers), from which backward rebuilds the
    probabilities in the same pass that writes the gradient (p - onehot) * scale.
    """

    def __init__(self, *, weight=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean"):
        # Checked here too, so a bad keyword fails when the loss is built, not at the first batch.
        if reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {reduction!r}")
        if not is_real(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        self.weight, self.ignore_index = weight, ignore_index
        self.label_smoothing, self.reduction = float(label_smoothing), reduction
        self._plan = self._lse = None

    def _make_plan(self, logits, target, validate=True):
        return F._CrossEntropyPlan(logits, target, self.weight, self.ignore_index,
                                   self.label_smoothing, self.reduction, validate=validate)

    def forward(self, logits, target):
        self._plan = self._make_plan(logits, target)
        self._lse = self._plan.lse_parts()
        return self._plan.loss(self._lse)

    def backward(self, grad_output=1.0):
        plan = self._saved()
        if self._lse is None:  # after forward_backward, which keeps no log-sum-exp
            self._lse = plan.lse_parts()
        return plan.grad(self._lse, grad_output)

    def forward_backward(self, logits, target, *, grad_output=1.0, validate: bool = True):
        """(loss, grad_output * d loss / d logits) in one pass over the logits: the training
        step's call (a single kernel launch on a GPU).

        ``grad_output`` scales the gradient only (mixed precision uses it as the loss scale).
        ``validate=False`` skips the argument checks, whose label range check costs a device
        synchronisation on a GPU; pass it only for targets checked once beforehand.
        """
        self._plan = self._make_plan(logits, target, validate=validate)
        self._lse = None
        return self._plan.loss_and_grad(grad_output)

    def __repr__(self) -> str:
        return (f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r})")


class CrossEntropy(Loss):
    """Cross-entropy of probabilities (the output of a Softmax layer) against targets.

    Softmax followed by CrossEntropy equals SoftmaxCrossEntropy on the logits, keyword for
    keyword, wherever no probability underflowed; the fused loss is faster and more accurate.
    A probability below the smallest normal number of the accumulation dtype (1.2e-38 in
    float32: an underflowed 0) counts as that number, as PyTorch's BCELoss clamps its log at
    -100: the loss stays finite (-log(1.2e-38) = 87.3 per unit of weight, where an exact 0 would
    give infinity), its gradient is 0 there, and a Softmax before it gets no 0/0 = NaN.
    Values outside [0, 1] (logits, say) are refused.
    """

    def __init__(self, *, weight=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean"):
        self._fused = SoftmaxCrossEntropy(weight=weight, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, reduction=reduction)
        self.reduction = reduction
        self._plan = None

    def forward(self, probs, target):
        probs = F._float_array(probs, "probs")
        xp = get_array_module(probs, target)
        acc = F.accumulation_dtype(probs.dtype)
        if probs.size:
            # Two reductions (one read back on a GPU) instead of two comparison passes; a NaN
            # passes both, and gives a NaN loss.
            low, high = float(probs.min()), float(probs.max())
            if low < 0 or high > 1 + 4 * float(np.finfo(acc).eps):
                raise ValueError(f"probs must be probabilities in [0, 1] (the output of a softmax),"
                                 f" got values from {low:.6g} to {high:.6g}; for raw scores "
                                 "(logits) use SoftmaxCrossEntropy")
        self._floor = float(np.finfo(acc).tiny)
        log_p = xp.log(xp.maximum(probs.astype(acc, copy=False), self._floor))
        # CE on probabilities p is the fused loss on logits log(p), whose log-sum-exp is 0.
        self._plan = self._fused._make_plan(log_p.astype(probs.dtype, copy=False), target)
        self._probs = probs
        zero = xp.zeros(probs.shape[0], dtype=acc)
        return self._plan.loss(F.LogSumExp(zero, zero))

    def backward(self, grad_output=1.0):
        plan = self._saved()
        # dL/dp_ic = -scale_i a_ic / p_ic: the fused gradient without its A_i p_ic term.
        xp = plan.xp
        scale = plan.row_scale(grad_output)
        if plan.probability_target:
            a = plan.coefficients()
        else:
            t_safe, coef, _, valid, _ = plan.rows()
            scale = scale * valid
            a = xp.zeros(self._probs.shape, dtype=plan.acc)
            a += plan.smoothing_weights()
            a[xp.arange(a.shape[0]), t_safe] += coef
        # The derivative of the clamped loss: 0 where the clamp holds p at the floor (1 / floor
        # still fits the dtype, so no p above it overflows the quotient).
        p = self._probs.astype(plan.acc, copy=False)
        kept = p > self._floor
        dp = xp.where(kept, -F._column(scale) * a / xp.where(kept, p, 1), 0)
        return dp.astype(self._probs.dtype, copy=False)


class MSELoss(Loss):
    """Mean squared error: mean((pred - target)²) over all elements (or "sum", "none")."""

    def __init__(self, reduction: str = "mean"):
        if reduction not in F.REDUCTIONS:
            raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._plan = None

    def forward(self, pred, target):
        pred = F._float_array(pred, "pred")
        get_array_module(pred, target)
        if pred.shape != target.shape:
            raise ValueError(f"target must have pred's shape {pred.shape}, got {target.shape}")
        diff = pred - target
        self._plan = diff
        sq = diff * diff
        if self.reduction == "none":
            return sq
        if self.reduction == "mean" and sq.size == 0:  # an empty batch has no error: 0, not NaN
            return get_array_module(sq).zeros((), dtype=sq.dtype)
        return sq.sum() if self.reduction == "sum" else sq.mean()

    def backward(self, grad_output=1.0):
        diff = self._saved()
        scale = 2.0 / diff.size if self.reduction == "mean" and diff.size else 2.0
        return (diff * scale * grad_output).astype(diff.dtype, copy=False)
