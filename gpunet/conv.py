"""Convolution and pooling on NCHW images, with PyTorch's names, shapes and semantics.

``Conv2d`` is one matrix product per layer (im2col). The input, zero-padded, is viewed as
windows with ``as_strided`` (no copy), and one reshape copy lays the windows out as the rows of
a matrix, one row per output pixel::

    cols[(n, oh, ow), (i, j, c)] = x_padded[n, c, oh*sh + i, ow*sw + j]      (M x K)
    y[(n, oh, ow), o]            = cols @ W_mat + b,  W_mat[(i, j, c), o] = weight[o, c, i, j]

Backward is two more products, ``dW = dyᵀ @ cols`` and ``dcols = dy @ W_matᵀ``, and col2im,
which adds ``dcols`` back onto the input: one vectorised add per kernel offset (i, j), since
the windows of neighbouring pixels overlap.

Memory layout. Arrays keep PyTorch's NCHW *shape*, but a convolution's output lives in
channels-last memory (strides of an NHWC array, as PyTorch's ``channels_last`` format): the
product's (M, O) result *is* that layout, so no transpose copy is made. NumPy and CuPy work on
any strides, the layers after a convolution (ReLU, pooling) keep the layout, the next
convolution's im2col then reads contiguous runs of channels, and ``Flatten`` makes the one
copy into PyTorch's (C, H, W) order that a Dense layer expects. The im2col column order
(i, j, c), channels innermost, is chosen for the same reason.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from .backend import add_into, default_rng, device_of, get_array_module
from .kernels import cpu as cpu_kernels
from .layers import Dense, Module, Parameter, Sequential


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints as (height, width), each >= minimum (PyTorch's _pair)."""
    items = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


def _check_images(layer, x, channels=None):
    """x must be a float (N, C, H, W) array (with C == channels when given)."""
    if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
        raise TypeError(f"{layer!r} expects a numpy or cupy array, got {type(x).__name__}")
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else channels
        raise ValueError(f"{layer!r} expects input of shape (N, {c}, H, W), got {tuple(x.shape)}")
    if not F.is_float_dtype(x.dtype):
        raise TypeError(f"{layer!r} expects a floating-point input, got dtype {x.dtype}")


def _output_size(layer, size, kernel, stride, padding=(0, 0)):
    """(OH, OW) for an (H, W) input, or a ValueError when the kernel does not fit."""
    out = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"{layer!r}: input of height x width {size[0]}x{size[1]} (padding "
                         f"{padding}) is smaller than the kernel {kernel[0]}x{kernel[1]}")
    return out


def _offsets(x, kernel, stride, out):
    """For each kernel offset (i, j), row-major, the view x[..., i::sh, j::sw] of (OH, OW)
    pixels: the values that offset of every window sees (pooling's vectorised loop)."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out
    return [x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


class _Workspace:
    """Arrays a layer reuses from step to step (the padded input, the im2col matrix): the hot
    path allocates them once, not per batch. One per name and mode, remade when the shape,
    dtype or device changes. Training and eval forwards use separate arrays, so that an eval
    forward between a training forward and its backward cannot overwrite what backward reads."""

    def __init__(self):
        self._arrays = {}

    def get(self, name, xp, shape, dtype, like, zero=False):
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype or get_array_module(a) is not xp \
                or device_of(a) != device_of(like):
            a = self._arrays[name] = (xp.zeros if zero else xp.empty)(shape, dtype=dtype)
        return a


class Conv2d(Module):
    """2-D convolution (cross-correlation, as in PyTorch) of NCHW images, as one GEMM.

    ``weight`` has shape (out_channels, in_channels, kh, kw) and ``bias`` (out_channels,), as in
    ``torch.nn.Conv2d``, and both are initialised as PyTorch does (kaiming-uniform with
    a = sqrt(5), i.e. uniform in ±1/sqrt(fan_in), and the bias uniform in ±1/sqrt(fan_in),
    fan_in = in_channels * kh * kw), drawn on the host from ``rng`` (default: the generator
    seeded by ``gpunet.manual_seed``). ``kernel_size``, ``stride`` and ``padding`` (zeros) are
    ints or (height, width) pairs.

    ``activation="relu"`` fuses a ReLU into the layer, as in ``Dense``: the bias and the ReLU in
    one pass over the product forward, the ReLU and bias gradients in one pass backward.

    On the host, with the compiled kernels, the im2col matrix is never made whole: it is made
    and multiplied a tile of rows at a time, in cache (``kernels/_cpu_conv.h``), and made again
    in backward from the input, which the layer keeps (copied unless ``copy_input=False``,
    as ``Dense.forward`` says). Otherwise the NumPy path below runs: the same formulas.
    """

    keeps_input = True
    returns_new_array = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, *, activation: str | None = None, dtype=np.float32,
                 rng: np.random.Generator | None = None):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not F.is_float_dtype(dtype):
            raise TypeError(f"dtype must be a floating-point dtype, got {np.dtype(dtype)}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        rng = default_rng() if rng is None else rng
        kh, kw = self.kernel_size
        bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
        w = rng.uniform(-bound, bound, (self.out_channels, self.in_channels, kh, kw))
        self.weight = Parameter(w.astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, self.out_channels).astype(dtype)) \
            if bias else None
        self._workspace = _Workspace()

    def forward(self, x, *, copy_input: bool = True):
        _check_images(self, x, self.in_channels)
        xp = get_array_module(x, self.weight.data)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{self!r} computes in {self.weight.dtype} but got {x.dtype} input; "
                            "convert the input (x.astype) or the model (model.to(dtype=...))")
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = _output_size(self, (h, w), self.kernel_size, self.stride, self.padding)
        bias = None if self.bias is None else self.bias.data
        if cpu_kernels.conv_available(x):
            kept, w_mat = self._host_operands(x, copy_input)
            y = cpu_kernels.conv2d_forward(kept, w_mat, bias, self.activation == "relu",
                                           self.kernel_size, self.stride, self.padding, (oh, ow))
            self._save(x=kept, cols=None, w_mat=w_mat, y=y if self.activation else None,
                       shape=(n, c, h, w, oh, ow), fused=False)
            return y.transpose(0, 3, 1, 2)
        mode = "train" if self.training else "eval"
        nhwc, k, w_mat = x.transpose(0, 2, 3, 1), kh * kw * c, self._weight_matrix()
        if ph or pw:  # the border stays zero from the first call on; only the inside is written
            padded = self._workspace.get("padded " + mode, xp, (n, h + 2 * ph, w + 2 * pw, c),
                                         x.dtype, x, zero=True)
            padded[:, ph:ph + h, pw:pw + w, :] = nhwc
        else:
            padded = nhwc
        s_n, s_h, s_w, s_c = padded.strides
        windows = xp.lib.stride_tricks.as_strided(
            padded, shape=(n, oh, ow, kh, kw, c), strides=(s_n, sh * s_h, sw * s_w, s_h, s_w, s_c))
        cols = self._workspace.get("cols " + mode, xp, (n * oh * ow, k), x.dtype, x)
        cols.reshape(n, oh, ow, kh, kw, c)[...] = windows  # the one im2col copy
        y = F.linear(cols, w_mat, bias, relu=self.activation == "relu")  # (M, O): NHWC memory
        self._save(x=None, cols=cols, w_mat=w_mat, y=y if self.activation else None,
                   shape=(n, c, h, w, oh, ow), fused=False)
        return y.reshape(n, oh, ow, self.out_channels).transpose(0, 3, 1, 2)

    def backward(self, dy, input_grad: bool = True):
        w_mat, (n, c, h, w, oh, ow) = self._saved("w_mat"), self._saved("shape")
        kept = getattr(self, "_saved_x", None)
        if tuple(dy.shape) != (n, self.out_channels, oh, ow):
            raise ValueError(f"{self!r}.backward expects dy of shape "
                             f"{(n, self.out_channels, oh, ow)}, got {tuple(dy.shape)}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if kept is not None:
            get_array_module(kept, dy)  # refuses a numpy/cupy mix
            dy_nhwc = np.ascontiguousarray(dy.transpose(0, 2, 3, 1), dtype=kept.dtype)
            y = None
            if self.activation and self._saved("fused"):
                # the forward pooled its output and kept none of it (forward_max_pool): this
                # backward, called on its own, makes it again for the ReLU's mask
                y = cpu_kernels.conv2d_forward(kept, w_mat, None if self.bias is None
                                               else self.bias.data, True, self.kernel_size,
                                               self.stride, self.padding, (oh, ow))
            elif self.activation:
                y = self._saved("y")
            dw, dx = cpu_kernels.conv2d_backward(kept, w_mat, dy_nhwc, y, *self._bias_grad(),
                                                 input_grad, self.kernel_size, self.stride,
                                                 self.padding)
            return self._finish_backward(dw, dx)
        cols = self._saved("cols")
        xp = get_array_module(cols, dy)
        # (M, O): a view when dy is in the layout this layer's forward gave, else one copy
        dy_mat = dy.transpose(0, 2, 3, 1).reshape(n * oh * ow, self.out_channels)
        bias_grad, bias_beta = self._bias_grad()
        if self.activation == "relu":
            dy_mat = F.relu_backward(dy_mat, self._saved("y"), bias_grad=bias_grad, beta=bias_beta)
        elif bias_grad is not None:
            F.column_sums(dy_mat, bias_grad, beta=bias_beta)
        # (K, O) = colsᵀ @ dy rather than (O, K) = dyᵀ @ cols: with numpy's OpenBLAS the first
        # was the faster at the small CNN's second layer (16-58 ms against 44-850 ms, loaded)
        self._add_weight_grad(F.matmul(cols.T, dy_mat))
        if not input_grad:
            return None
        dcols = F.matmul(dy_mat, w_mat.T).reshape(n, oh, ow, kh, kw, c)
        # col2im: every offset (i, j) of every window adds its column back onto the pixel it
        # read; the windows overlap, so this is a scatter-add, one strided add per offset.
        dpadded = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dcols.dtype)
        for i in range(kh):
            for j in range(kw):
                dpadded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += \
                    dcols[:, :, :, i, j, :]
        return dpadded[:, ph:ph + h, pw:pw + w, :].transpose(0, 3, 1, 2)

    def _weight_matrix(self):
        """The weight as im2col's (K, O) matrix, rows in (i, j, c) order (a copy)."""
        k = self.kernel_size[0] * self.kernel_size[1] * self.in_channels
        return self.weight.data.transpose(2, 3, 1, 0).reshape(k, self.out_channels)

    def _host_operands(self, x, copy_input: bool):
        """(x in C-ordered channels-last memory, which backward reads again; the weight matrix)
        for the compiled kernels. In training the caller's array is copied unless ``copy_input``
        is False: the caller may write into x before backward."""
        nhwc = x.transpose(0, 2, 3, 1)
        kept = nhwc if nhwc.flags.c_contiguous else np.ascontiguousarray(nhwc)
        if self.training and copy_input and kept is nhwc:
            kept = nhwc.copy()
        return kept, np.ascontiguousarray(self._weight_matrix())

    def _bias_grad(self):
        """(the bias gradient's buffer, its decay), or (None, 0.0) without a bias."""
        return (None, 0.0) if self.bias is None else (self.bias.grad_buffer(),
                                                      self.bias.grad_decay)

    def _add_weight_grad(self, dw):
        """Add dW, as a (K, O) matrix in im2col's row order, into the weight's gradient."""
        (kh, kw), c = self.kernel_size, self.in_channels
        add_into(self.weight.grad_buffer(),
                 dw.reshape(kh, kw, c, self.out_channels).transpose(3, 2, 0, 1),
                 self.weight.grad_decay)

    def _finish_backward(self, dw, dx):
        """The compiled kernels' dW (K, O) into the weight's gradient; dx back to NCHW."""
        self._add_weight_grad(dw)
        return None if dx is None else dx.transpose(0, 3, 1, 2)

    # --- fused with the max pooling after it (Sequential.forward asks) ---------------------------

    def fuses_with(self, layer, x) -> bool:
        """Whether this layer and ``layer`` after it can run as one on ``x``: a ReLU convolution
        and a MaxPool2d whose windows tile the output (stride = kernel, square), on the host with
        the compiled kernels, both in the same mode."""
        if not (isinstance(layer, MaxPool2d) and self.activation == "relu"
                and layer.training == self.training and cpu_kernels.conv_available(x)
                and getattr(x, "ndim", 0) == 4 and x.dtype == self.weight.dtype):
            return False
        (k1, k2), stride = layer.kernel_size, layer.stride
        if not (k1 == k2 == stride[0] == stride[1] and k1 <= 16):
            return False
        size = [(s + 2 * p - k) // st + 1 for s, k, st, p in
                zip(x.shape[2:], self.kernel_size, self.stride, self.padding)]
        return min(size) >= k1

    def forward_max_pool(self, x, pool: "MaxPool2d", *, copy_input: bool = True):
        """``pool(self.forward(x))`` in one pass (see :meth:`fuses_with`): the convolution's output
        is pooled a tile at a time, in cache, and never written whole (12.8 MB for the small
        CNN's first layer at batch 128, written, read back, and twice more in backward). Each
        layer keeps what its own backward needs, so ``pool.backward`` then ``self.backward``
        give what they give unfused; :meth:`backward_max_pool` does both at once."""
        _check_images(self, x, self.in_channels)
        n, c, h, w = x.shape
        oh, ow = _output_size(self, (h, w), self.kernel_size, self.stride, self.padding)
        kept, w_mat = self._host_operands(x, copy_input)
        size = pool.kernel_size[0]
        pooled, index = cpu_kernels.conv2d_max_pool_forward(
            kept, w_mat, None if self.bias is None else self.bias.data, True, self.kernel_size,
            self.stride, self.padding, (oh, ow), size, self.training)
        self._save(x=kept, cols=None, w_mat=w_mat, y=None, shape=(n, c, h, w, oh, ow),
                   fused=(pooled, index))
        pool._save(x=None, shape=(n, self.out_channels, oh, ow), dtype=x.dtype, index=index,
                   nhwc=True)
        return pooled.transpose(0, 3, 1, 2)

    def backward_max_pool(self, dy, pool: "MaxPool2d", input_grad: bool = True):
        """``self.backward(pool.backward(dy))`` after :meth:`forward_max_pool`, in one pass."""
        fused = self._saved("fused")
        if not fused:
            raise ValueError(f"{self!r}.backward_max_pool called after an unfused forward()")
        pooled, index = fused
        pool._check_dy(dy, pool._saved("shape"))
        kept, w_mat = self._saved("x"), self._saved("w_mat")
        get_array_module(kept, dy)
        dy_nhwc = np.ascontiguousarray(dy.transpose(0, 2, 3, 1), dtype=kept.dtype)
        dw, dx = cpu_kernels.conv2d_max_pool_backward(
            kept, w_mat, dy_nhwc, pooled, index, *self._bias_grad(), input_grad, self.kernel_size,
            self.stride, self.padding, pool.kernel_size[0])
        return self._finish_backward(dw, dx)

    def __repr__(self) -> str:
        extra = "" if self.padding == (0, 0) else f", padding={_show(self.padding)}"
        extra += "" if self.bias is not None else ", bias=False"
        extra += f", activation={self.activation!r}" if self.activation else ""
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={_show(self.kernel_size)}, stride={_show(self.stride)}{extra})")


def _show(pair):
    return pair[0] if pair[0] == pair[1] else pair


class _Pool2d(Module):
    """Shared by MaxPool2d and AvgPool2d: kernel and stride (default: the kernel), as PyTorch."""

    def __init__(self, kernel_size, stride=None):
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair("stride", stride, 1)

    def _windows(self, x):
        _check_images(self, x)
        out = _output_size(self, x.shape[2:], self.kernel_size, self.stride)
        return _offsets(x, self.kernel_size, self.stride, out)

    def _overlapping(self) -> bool:
        return self.stride[0] < self.kernel_size[0] or self.stride[1] < self.kernel_size[1]

    def _input_grad(self, dy, x, per_offset):
        """dx from what each offset t sends back, ``per_offset(t, out)``, which writes it into
        ``out`` (the offset's view of dx) or, with out None, returns it.

        dx takes x's memory layout (``*_like``: order K), like everything else here: numpy runs
        an elementwise operation on arrays of different layouts several times slower."""
        xp = get_array_module(x, dy)
        (kh, kw), (sh, sw), (oh, ow) = self.kernel_size, self.stride, dy.shape[2:]
        tiled = (kh, kw) == (sh, sw) and x.shape[2:] == (kh * oh, kw * ow)
        dx = xp.empty_like(x) if tiled else xp.zeros_like(x)  # pixels no window covers get 0
        overlapping = self._overlapping()
        for t, view in enumerate(_offsets(dx, self.kernel_size, self.stride, dy.shape[2:])):
            if overlapping:
                view += per_offset(t, None)
            else:
                per_offset(t, view)
        return dx

    def _check_dy(self, dy, shape):
        """dy must be the gradient of this layer's output for an input of ``shape``."""
        out = _output_size(self, shape[2:], self.kernel_size, self.stride)
        expected = (*shape[:2], *out)
        if tuple(getattr(dy, "shape", ())) != expected:
            raise ValueError(f"{self!r}.backward expects dy of shape {expected}, got "
                             f"{tuple(getattr(dy, 'shape', ()))}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kernel_size={_show(self.kernel_size)}, "
                f"stride={_show(self.stride)})")


class MaxPool2d(_Pool2d):
    """The maximum of each window. Its gradient goes to the first maximum of the window in
    row-major order, as in PyTorch (ties do not share it); a NaN in a window gives NaN."""

    returns_new_array = True

    def forward(self, x):
        _check_images(self, x)
        out = _output_size(self, x.shape[2:], self.kernel_size, self.stride)
        nhwc = x.transpose(0, 2, 3, 1)
        if self.kernel_size[0] * self.kernel_size[1] <= 256 and cpu_kernels.conv_available(x) \
                and nhwc.flags.c_contiguous:
            y, index = cpu_kernels.max_pool2d_forward(nhwc, self.kernel_size, self.stride, out,
                                                      self.training)
            self._save(x=None, shape=tuple(x.shape), dtype=x.dtype, index=index,
                       nhwc=True)  # index: (N, OH, OW, C)
            return y.transpose(0, 3, 1, 2)
        views = _offsets(x, self.kernel_size, self.stride, out)
        xp = get_array_module(x)
        y = views[0].copy(order="K")
        # Which offset holds each window's first maximum: only a strictly greater value moves
        # it, so ties keep the earlier offset. Offsets come in increasing order, so
        # where(greater, t, index) is max(index, greater * t): two passes that numpy runs at
        # memory speed, where copyto(..., where=) and where() take ~15x longer (and index[mask]
        # = t would synchronise a GPU).
        index = scratch = None
        if self.training:
            index = xp.zeros_like(y, dtype=np.uint8 if len(views) <= 256 else np.int32)
            scratch = xp.empty_like(index)
        for t in range(1, len(views)):
            if index is not None:
                xp.multiply(views[t] > y, index.dtype.type(t), out=scratch)
                xp.maximum(index, scratch, out=index)
            xp.maximum(y, views[t], out=y)
        self._save(x=x, shape=tuple(x.shape), dtype=x.dtype, index=index, nhwc=False)
        return y

    def backward(self, dy, input_grad: bool = True):
        shape, index = self._saved("shape"), self._saved("index")
        self._check_dy(dy, shape)
        get_array_module(index, dy)  # refuses a numpy/cupy mix
        if not input_grad:
            return None
        if self._saved("nhwc"):  # the compiled forward's index: (N, OH, OW, C)
            n, c, h, w = shape
            dy_nhwc = np.ascontiguousarray(dy.transpose(0, 2, 3, 1), dtype=self._saved("dtype"))
            return cpu_kernels.max_pool2d_backward(dy_nhwc, index, (n, h, w, c), self.kernel_size,
                                                   self.stride).transpose(0, 3, 1, 2)
        x = self._saved("x")
        return self._input_grad(dy, x, lambda t, out: get_array_module(dy).multiply(
            dy, index == t, out=out))


class AvgPool2d(_Pool2d):
    """The mean of each window (no padding, so every window has kh * kw pixels)."""

    def forward(self, x):
        views = self._windows(x)
        xp = get_array_module(x)
        y = views[0].copy(order="K") if len(views) == 1 else xp.add(views[0], views[1])
        for view in views[2:]:
            y += view
        y *= y.dtype.type(1.0 / len(views))
        self._save(x=x)
        return y

    def backward(self, dy, input_grad: bool = True):
        x = self._saved("x")
        self._check_dy(dy, x.shape)
        get_array_module(x, dy)
        if not input_grad:
            return None
        share = dy * dy.dtype.type(1.0 / (self.kernel_size[0] * self.kernel_size[1]))

        def per_offset(t, out):
            if out is None:
                return share
            out[...] = share
        return self._input_grad(dy, x, per_offset)


class Flatten(Module):
    """Dimensions ``start_dim`` to ``end_dim`` merged into one, in C order, as torch.flatten:
    ``Flatten()`` turns (N, C, H, W) into (N, C*H*W), the input of a Dense layer."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        for name, value in (("start_dim", start_dim), ("end_dim", end_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}")
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def forward(self, x):
        if not hasattr(x, "ndim"):
            raise TypeError(f"{self!r} expects a numpy or cupy array, got {type(x).__name__}")
        start = self.start_dim + x.ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + x.ndim if self.end_dim < 0 else self.end_dim
        if not 0 <= start <= end < x.ndim:
            raise ValueError(f"{self!r} cannot flatten dimensions {self.start_dim}..{self.end_dim}"
                             f" of an input of shape {tuple(x.shape)}")
        shape = (*x.shape[:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:])
        self._save(x=x)
        return x.reshape(shape)  # a copy into C order where x is channels-last (see top)

    def backward(self, dy, input_grad: bool = True):
        x = self._saved("x")
        if dy.size != x.size:
            raise ValueError(f"{self!r}.backward expects dy with {x.size} elements (input shape "
                             f"{tuple(x.shape)}), got shape {tuple(dy.shape)}")
        if not input_grad:
            return None
        if dy.flags.c_contiguous and x.flags.c_contiguous:
            return dy.reshape(x.shape)
        dx = get_array_module(x, dy).empty_like(x)  # back into x's (channels-last) layout,
        dx[...] = dy.reshape(x.shape)  # which the layers before work in
        return dx

    def __repr__(self) -> str:
        return f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim})"


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, *,
              channels=(32, 64), hidden: int = 128, dropout: float = 0.25, dtype=np.float32,
              rng: np.random.Generator | None = None) -> Sequential:
    """The small CNN for MNIST-sized images, as ``Sequential``::

        Conv2d(1, 32, 3, padding=1) - ReLU - MaxPool2d(2)        28x28 -> 14x14
        Conv2d(32, 64, 3, padding=1) - ReLU - MaxPool2d(2)       14x14 -> 7x7
        Flatten - Dense(64*7*7, 128) - ReLU - Dropout(0.25) - Dense(128, 10)

    Each ReLU is fused into the layer before it (``activation="relu"`` of Conv2d and Dense):
    the same function and gradients as separate ReLU layers, in fewer passes over memory.
    ``dropout=0`` leaves the Dropout layer out. ``image_size`` must be divisible by 4 (two 2x2 poolings).
    """
    from .dropout import Dropout

    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size <= 0 or image_size % 4:
        raise ValueError(f"image_size must be a positive multiple of 4, got {image_size!r}")
    c1, c2 = channels
    dropout_rng, rng = rng, default_rng() if rng is None else rng  # Dropout draws at each step
    layers = [Conv2d(in_channels, c1, 3, padding=1, activation="relu", dtype=dtype, rng=rng),
              MaxPool2d(2),
              Conv2d(c1, c2, 3, padding=1, activation="relu", dtype=dtype, rng=rng), MaxPool2d(2),
              Flatten(),
              Dense(c2 * (image_size // 4) ** 2, hidden, activation="relu", dtype=dtype, rng=rng)]
    if dropout:
        layers.append(Dropout(dropout, rng=dropout_rng))
    layers.append(Dense(hidden, num_classes, dtype=dtype, rng=rng))
    return Sequential(*layers)
