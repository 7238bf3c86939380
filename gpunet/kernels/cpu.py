"""Compiled CPU kernels: the fast paths of gpunet's formulas on NumPy arrays.

The CPU twin of ``cuda.py``. NumPy runs one operation per pass over memory, so the small
fused steps of training (bias then ReLU, the cross-entropy's eight operations, the optimizer's
passes) cost several times what one loop over the data would. ``_cpu_kernels.c`` is that one
loop for each, with the formula of its NumPy twin, which stays the reference:

    bias_relu_                  functional.bias_relu_
    relu_backward               functional.relu_backward
    gemm                        functional.matmul with beta (BLAS gemm, which numpy does not expose)
    conv2d_forward, _backward   conv.Conv2d's im2col, product, bias and ReLU, a tile at a time
    conv2d_max_pool_forward, _backward  the same with the MaxPool2d after it fused (Sequential)
    max_pool2d_forward, _backward  conv.MaxPool2d
    cross_entropy_loss_and_grad functional._CrossEntropyPlan.loss_and_grad (numpy branch)
    sgd_update, adam_update     optim.SGD._update, optim.Adam._update

The extension is built by ``pip install`` where a C compiler is found (setup.py marks it
optional). Without it, or with ``GPUNET_CPU_KERNELS=0``, every formula runs in NumPy: same
results to rounding, only slower. ``DESCRIPTION`` says which path this process takes.

Each ``*_fits`` function says whether the arrays are ones the kernels take (float32 or float64,
C-contiguous, host); anything else goes to NumPy.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from . import blas

if os.environ.get("GPUNET_CPU_KERNELS", "").lower() in ("0", "off", "numpy"):
    _lib, DESCRIPTION = None, "numpy fallback (GPUNET_CPU_KERNELS=0)"  # switched off: not loaded
else:
    try:
        from . import _cpu_kernels as _lib
        DESCRIPTION = "compiled (gpunet.kernels._cpu_kernels)"
    except ImportError as error:
        _lib = None
        if importlib.util.find_spec(f"{__package__}._cpu_kernels") is None:
            DESCRIPTION = ("numpy fallback (gpunet.kernels._cpu_kernels is not built: pip install "
                           "found no C compiler, or this source tree was not installed)")
        else:
            DESCRIPTION = f"numpy fallback (gpunet.kernels._cpu_kernels did not load: {error})"
if _lib is not None:
    _lib.set_gemm(blas.gemm_address(np.float32), blas.gemm_address(np.float64))
    _lib.set_blas_threads(*(blas.thread_addresses() or (None, None)))

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


def available() -> bool:
    """Whether the compiled kernels are loaded (and not switched off) in this process."""
    return _lib is not None


def _host_float(a) -> bool:
    return type(a) is np.ndarray and a.dtype in _FLOATS and a.flags.c_contiguous


# --- Dense + ReLU ----------------------------------------------------------------------------------

def bias_relu_fits(y, b) -> bool:
    return (_lib is not None and _host_float(y) and y.ndim == 2 and _host_float(b)
            and b.dtype == y.dtype and b.shape == (y.shape[1],) and y.flags.writeable)


def bias_relu_(y, b):
    """y = max(y + b, 0) in place, in one pass."""
    _lib.bias_relu(y, b)
    return y


def relu_backward_fits(dy, y, bias_grad) -> bool:
    return (_lib is not None and _host_float(y) and y.ndim == 2 and _host_float(dy)
            and dy.dtype == y.dtype and dy.shape == y.shape
            and (bias_grad is None or (_host_float(bias_grad) and bias_grad.dtype == y.dtype
                                       and bias_grad.shape == (y.shape[1],)
                                       and bias_grad.flags.writeable)))


def relu_backward(dy, y, bias_grad=None, beta: float = 0.0):
    """dy where y > 0 (else 0), as a new array; with ``bias_grad``, its column sums go there
    (added to ``beta * bias_grad`` when ``beta`` is not 0)."""
    out = np.empty_like(y)
    _lib.relu_backward(dy, y, out, bias_grad, beta)
    return out


# --- a product added into its output ---------------------------------------------------------

def gemm_available(x) -> bool:
    """Whether :func:`gemm` runs in BLAS for arrays like ``x`` (float32/float64 on the host)."""
    return (_lib is not None and type(x) is np.ndarray and x.dtype in _FLOATS
            and blas.gemm_address(x.dtype) is not None)


def gemm(a, b, beta: float, out) -> bool:
    """out = a @ b + beta * out in one BLAS call (numpy's matmul has no beta), where it can:
    host arrays of one float dtype, a and b C- or F-contiguous (a ``.T`` view is fine), out
    C-contiguous, writable and apart from a and b. Returns whether it ran; on False nothing
    was written and the caller computes it another way."""
    if _lib is None or type(a) is not np.ndarray or type(b) is not np.ndarray \
            or type(out) is not np.ndarray or out.dtype not in _FLOATS \
            or not a.dtype == b.dtype == out.dtype:
        return False
    return _lib.gemm(a, b, beta, out)


# --- convolution and max pooling ------------------------------------------------------------

def conv_available(x) -> bool:
    """Whether the conv and pooling kernels take arrays like ``x``: host float32/float64, with
    a BLAS gemm for the dtype. They take channels-last arrays (N, H, W, C), C-contiguous."""
    return _lib is not None and type(x) is np.ndarray and x.dtype in _FLOATS \
        and blas.gemm_address(x.dtype) is not None


def conv2d_forward(x, w, bias, relu: bool, kernel, stride, padding, out_size):
    """y (N, OH, OW, O) = the convolution of channels-last ``x`` (N, H, W, C) with ``w``
    (K, O), K = kh * kw * C in (i, j, c) order, plus ``bias``, then ReLU when ``relu``: the
    im2col matrix is made and consumed a tile of rows at a time (see _cpu_conv.h)."""
    y = np.empty((x.shape[0], *out_size, w.shape[1]), dtype=x.dtype)
    _lib.conv2d_forward(x, w, bias, y, relu, *kernel, *stride, *padding, 0, None)
    return y


def conv2d_max_pool_forward(x, w, bias, relu: bool, kernel, stride, padding, out_size,
                            pool: int, with_index: bool):
    """(pooled, index) of :func:`conv2d_forward` followed by a max pooling of window and stride
    ``pool``, fused: the convolution's output is pooled a tile at a time, in cache, and never
    written whole. ``index`` (uint8, or None when not asked) holds each window's offset of its
    first maximum, as :func:`max_pool2d_forward` gives it."""
    shape = (x.shape[0], out_size[0] // pool, out_size[1] // pool, w.shape[1])
    pooled = np.empty(shape, dtype=x.dtype)
    index = np.empty(shape, dtype=np.uint8) if with_index else None
    _lib.conv2d_forward(x, w, bias, pooled, relu, *kernel, *stride, *padding, pool, index)
    return pooled, index


def conv2d_backward(x, w, dy, y, bias_grad, beta: float, input_grad: bool, kernel, stride,
                    padding):
    """(dW (K, O), dx (N, H, W, C) or None) of :func:`conv2d_forward` for upstream ``dy``
    (N, OH, OW, O); ``y``, the forward's output, masks dy for a fused ReLU (None: none). The
    bias gradient, with ``bias_grad``, goes there, added to ``beta * bias_grad``."""
    dw = np.empty(w.shape, dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    _lib.conv2d_backward(x, w, dy, y, dw, bias_grad, beta, dx, *kernel, *stride, *padding, 0, None)
    return dw, dx


def conv2d_max_pool_backward(x, w, dy, pooled, index, bias_grad, beta: float, input_grad: bool,
                             kernel, stride, padding, pool: int):
    """(dW, dx or None) of :func:`conv2d_max_pool_forward` (with its ReLU) for ``dy``, the
    gradient of the pooled output: dy goes to each window's maximum where ``pooled`` is > 0."""
    dw = np.empty(w.shape, dtype=x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype) if input_grad else None
    _lib.conv2d_backward(x, w, dy, pooled, dw, bias_grad, beta, dx, *kernel, *stride, *padding,
                         pool, index)
    return dw, dx


def max_pool2d_forward(x, kernel, stride, out_size, with_index: bool):
    """(y, index) of max pooling channels-last ``x``: index (uint8, or None when not asked)
    holds each window's offset of its first maximum, row-major."""
    shape = (x.shape[0], *out_size, x.shape[3])
    y = np.empty(shape, dtype=x.dtype)
    index = np.empty(shape, dtype=np.uint8) if with_index else None
    _lib.max_pool2d_forward(x, y, index, *kernel, *stride)
    return y, index


def max_pool2d_backward(dy, index, in_shape, kernel, stride):
    """dx (channels-last, of ``in_shape``) of max pooling for upstream ``dy``."""
    dx = np.empty(in_shape, dtype=dy.dtype)
    _lib.max_pool2d_backward(dy, index, dx, *kernel, *stride)
    return dx


# --- cross-entropy -----------------------------------------------------------------------------------

def cross_entropy_fits(plan, grad_output) -> bool:
    """Class-index targets on host float arrays and a scalar upstream gradient."""
    x, t, w = plan.logits, plan.target, plan.weight
    return (_lib is not None and not plan.probability_target and _host_float(x)
            and type(t) is np.ndarray and (w is None or type(w) is np.ndarray)
            and (isinstance(grad_output, (int, float)) or np.ndim(grad_output) == 0))


def cross_entropy_loss_and_grad(plan, grad_output=1.0):
    """(loss, dL/dlogits) of a ``functional._CrossEntropyPlan`` in one pass over the logits: the
    same numbers as its NumPy branch. Out-of-range labels raise ValueError, even unvalidated."""
    x = plan.logits
    t = np.ascontiguousarray(plan.target, dtype=np.int64)
    weight = None if plan.weight is None else np.ascontiguousarray(plan.weight, dtype=x.dtype)
    grad = np.empty_like(x)
    reduction = _REDUCTIONS[plan.reduction]
    loss = np.empty(x.shape[0] if reduction == 2 else (), dtype=x.dtype)
    _lib.cross_entropy(x, t, weight, grad, loss, int(plan.ignore_index), plan.eps,
                       float(grad_output), reduction)
    return loss, grad


# --- optimizers ----------------------------------------------------------------------------------------

def update_fits(p) -> bool:
    """Whether the compiled optimizer updates take the flat parameter buffer ``p``: host
    float32/float64 memory, with the compiled kernels loaded."""
    return _lib is not None and _host_float(p)


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first) -> None:
    """SGD's rule (see optim.SGD) in one pass over the flat buffers, in place; ``buf`` is the
    momentum buffer (any scratch buffer without momentum), ``first`` whether it is step 1."""
    _lib.sgd(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first)


def adam_update(p, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2) -> None:
    """Adam's rule (see optim.Adam) in one pass, in place; bc1 and bc2 are this step's bias
    corrections 1 - beta ** t."""
    _lib.adam(p, g, m, v, lr, b1, b2, eps, weight_decay, decoupled, bc1, bc2)
