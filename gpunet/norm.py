"""Batch normalisation, as ``torch.nn.BatchNorm1d`` and ``BatchNorm2d``.

In training, each channel c is normalised with the batch's mean and *biased* variance over
every axis but the channel one (m values per channel), and the running statistics move by
``momentum``, the variance with the *unbiased* estimate, PyTorch's rule::

    x̂ = (x - μ_B) / sqrt(σ²_B + eps),   y = weight · x̂ + bias
    running_mean ← (1 - momentum) running_mean + momentum μ_B
    running_var  ← (1 - momentum) running_var  + momentum σ²_B · m / (m - 1)

``momentum=None`` is the cumulative average (momentum 1 / num_batches_tracked). In eval mode
the running statistics take the batch's place. The backward pass, with the mean and variance
depending on x, is::

    dx = (g - mean(g) - x̂ · mean(g · x̂)) / sqrt(σ²_B + eps),   g = weight · dy

where ``mean(g) = weight · sum(dy) / m`` and ``mean(g · x̂) = weight · sum(dy · x̂) / m`` reuse
the two parameter gradients. The running statistics are buffers (``Module.register_buffer``):
they are in ``state_dict``, so in checkpoints, and ``to()`` moves them.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import functional as F
from .backend import add_into, get_array_module
from .layers import Module, Parameter


class _BatchNorm(Module):
    """BatchNorm over axis 1 of inputs with ``ndims`` dimensions (one of them)."""

    ndims: tuple[int, ...] = ()
    layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, dtype=np.float32):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, numbers.Real)
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if not F.is_float_dtype(dtype):
            raise TypeError(f"dtype must be a floating-point dtype, got {np.dtype(dtype)}")
        self.num_features, self.eps = int(num_features), float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))

    def _check(self, x):
        if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
            raise TypeError(f"{self!r} expects a numpy or cupy array, got {type(x).__name__}")
        if x.ndim not in self.ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{self!r} expects input of shape {self.layout.format(self.num_features)}"
                             f", got {tuple(x.shape)}")
        if not F.is_float_dtype(x.dtype):
            raise TypeError(f"{self!r} expects a floating-point input, got dtype {x.dtype}")

    def forward(self, x):
        self._check(x)
        xp = get_array_module(x, None if self.weight is None else self.weight.data)
        axes = (0, *range(2, x.ndim))
        shape = (1, self.num_features) + (1,) * (x.ndim - 2)
        m = x.size // self.num_features
        if self.training or not self.track_running_stats:
            if m <= 1 and self.training:
                raise ValueError(f"{self!r} expects more than 1 value per channel when training, "
                                 f"got input of shape {tuple(x.shape)}")
            mean = x.mean(axis=axes)
            centred = x - mean.reshape(shape)
            var = (centred * centred).mean(axis=axes)  # biased: what normalises
            if self.training and self.track_running_stats:
                self._update_running(mean, var, m)
        else:
            centred = x - self.running_mean.reshape(shape).astype(x.dtype, copy=False)
            var = self.running_var.astype(x.dtype, copy=False)
        inv_std = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        x_hat = centred
        x_hat *= inv_std.reshape(shape)
        self._save(x_hat=x_hat, inv_std=inv_std)
        if not self.affine:
            return x_hat
        y = x_hat * self.weight.data.reshape(shape)
        y += self.bias.data.reshape(shape)
        return y

    def _update_running(self, mean, var, m: int) -> None:
        """The running statistics step, in place, on the device (no host synchronisation)."""
        self.num_batches_tracked += 1
        if self.momentum is None:  # cumulative average
            factor = 1 / self.num_batches_tracked.astype(self.running_mean.dtype)
        else:
            factor = self.running_mean.dtype.type(self.momentum)
        unbiased = var * var.dtype.type(m / (m - 1))
        self.running_mean += factor * (mean.astype(self.running_mean.dtype) - self.running_mean)
        self.running_var += factor * (unbiased.astype(self.running_var.dtype) - self.running_var)

    def backward(self, dy, input_grad: bool = True):
        x_hat, inv_std = self._saved("x_hat"), self._saved("inv_std")
        get_array_module(x_hat, dy)
        if tuple(dy.shape) != tuple(x_hat.shape):
            raise ValueError(f"{self!r}.backward expects dy of shape {tuple(x_hat.shape)}, got "
                             f"{tuple(dy.shape)}")
        axes = (0, *range(2, dy.ndim))
        shape = (1, self.num_features) + (1,) * (dy.ndim - 2)
        m = dy.size // self.num_features
        sum_dy = dy.sum(axis=axes)
        sum_dy_x_hat = (dy * x_hat).sum(axis=axes)
        if self.affine:
            add_into(self.bias.grad_buffer(), sum_dy, self.bias.grad_decay)
            add_into(self.weight.grad_buffer(), sum_dy_x_hat, self.weight.grad_decay)
        if not input_grad:
            return None
        w = self.weight.data if self.affine else 1
        scale = w * inv_std  # (C,): weight / sqrt(var + eps)
        dx = dy - (sum_dy / m).reshape(shape)
        dx -= x_hat * (sum_dy_x_hat / m).reshape(shape)
        dx *= scale.reshape(shape)
        return dx

    def __repr__(self) -> str:
        extra = "" if self.momentum == 0.1 else f", momentum={self.momentum}"
        extra += "" if self.eps == 1e-5 else f", eps={self.eps}"
        extra += "" if self.affine else ", affine=False"
        extra += "" if self.track_running_stats else ", track_running_stats=False"
        return f"{type(self).__name__}({self.num_features}{extra})"


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) features or (N, C, L) sequences, per channel C."""

    ndims = (2, 3)
    layout = "(N, {0}) or (N, {0}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) images, per channel C (statistics over N, H and W)."""

    ndims = (4,)
    layout = "(N, {0}, H, W)"
