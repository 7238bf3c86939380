"""Layers, as cs231n teaches them: ``forward(x)`` keeps what ``backward`` needs, and
``backward(dy)`` fills the parameters' ``.grad`` and returns ``dx``.

Gradients are *written*, not accumulated: each backward overwrites ``.grad`` (no zero_grad is
needed between steps, and a parameter shared by two layers is not supported), unless the
parameter's ``grad_decay`` is set: then ``grad = dL/dp + grad_decay * grad``, the old values
added in the same pass (1.0 accumulates over micro-batches; ``SGD.fold_momentum`` sets the
momentum, so that backward builds the momentum buffer itself). Layers take numpy or cupy input
and never ask which: ``get_array_module`` answers for them.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from .backend import (add_into, default_rng, device_of, get_array_module, is_cuda_array, is_integer,
                      is_real, to_device)


class Parameter:
    """A trainable array and its gradient, always of the same shape, dtype and device.

    Once an optimizer is built over it, ``.data`` and ``.grad`` are views of the optimizer's flat
    buffers (see ``optim.FlatParameters``), and assigning to them copies into those views, so the
    PyTorch habits ``p.grad = p.grad * 0.25`` (clipping) or ``p.data = w`` reach the optimizer.
    An assigned array must have the parameter's shape, dtype and device (ValueError/TypeError
    otherwise: the buffer cannot change them). Before any optimizer, ``p.data = w`` rebinds, as
    in PyTorch, and a differently shaped ``w`` gets a new zero gradient.

    ``p.grad = None`` (PyTorch's set_to_none) zeroes the gradient in its buffer and makes
    ``.grad`` read None until the next backward writes it. gpunet's backward overwrites (or,
    with ``grad_decay``, adds into a zero), so that is the same gradient as PyTorch's; what a
    flat buffer cannot do is PyTorch's skipping of a parameter without a gradient in
    ``step()``, so a step then raises, naming the parameter.

    ``grad_decay`` (default 0: overwrite) is how much of the old ``.grad`` backward keeps.
    ``name`` is the longest name a module listed it under (``"0.weight"``), for messages.
    """

    __slots__ = ("_data", "_grad", "_grad_decay", "_grad_none", "_flat", "name")

    def __init__(self, data):
        self._data = data
        self._grad = get_array_module(data).zeros_like(data)
        self._grad_decay = 0.0
        self._grad_none = False
        self._flat = None  # the optimizer buffers that .data and .grad are views of, if any
        self.name = None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        if self._flat is None and _is_array(value):  # rebinding, as in PyTorch
            if not F.is_float_dtype(value.dtype):
                raise TypeError(f"{self._label()}.data must be a floating-point array, got dtype "
                                f"{value.dtype}")
            if not _alike(value, self._grad):
                self._grad, self._grad_none = get_array_module(value).zeros_like(value), False
            self._data = value
            return
        self._check_alike(value, "data")
        if value is not self._data:
            self._data[...] = value

    @property
    def grad(self):
        """The gradient backward wrote, or None after ``grad = None`` until the next backward."""
        return None if self._grad_none else self._grad

    @grad.setter
    def grad(self, value) -> None:
        if value is None:
            self._grad.fill(0)
            self._grad_none = True
            if self._flat is not None:
                self._flat.check = True  # the next step() looks for parameters without one
            return
        self._check_alike(value, "grad")
        if value is not self._grad:
            self._grad[...] = value
        self._grad_none = False

    def grad_buffer(self):
        """The array backward writes this parameter's gradient into (its view of the
        optimizer's buffer), which makes ``.grad`` present again after ``grad = None``: the
        call for a layer's backward, where ``.grad`` may read None."""
        self._grad_none = False
        return self._grad

    @property
    def grad_decay(self) -> float:
        return self._grad_decay

    @grad_decay.setter
    def grad_decay(self, value) -> None:
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"grad_decay must be a finite number, got {value!r}")
        self._grad_decay = float(value)

    @property
    def shape(self):
        return self._data.shape

    @property
    def dtype(self):
        return self._data.dtype

    def _move(self, device, dtype) -> None:
        """Module.to's part: new arrays on ``device`` and/or in ``dtype``, with a zero gradient.
        A parameter leaves its optimizer's buffers, which follow it at the optimizer's next
        step (see ``Optimizer.step``)."""
        data = self._data if device is None else to_device(self._data, device)
        data = data if dtype is None else data.astype(dtype, copy=False)
        if data is self._data:
            return
        if self._flat is not None:
            self._flat.moved = True
            self._flat = None
        self._data, self._grad = data, get_array_module(data).zeros_like(data)
        self._grad_none = False

    def _check_alike(self, value, what: str) -> None:
        if not _is_array(value):
            raise TypeError(f"{self._label()}.{what} must be an array of shape {self.shape} and "
                            f"dtype {self.dtype}{'' if what == 'data' else ' or None'}, got "
                            f"{type(value).__name__}")
        if device_of(value) != device_of(self._data):
            raise TypeError(f"{self._label()}.{what} must be on {device_of(self._data)}, got an "
                            f"array on {device_of(value)}")
        if tuple(value.shape) != self.shape:
            raise ValueError(f"{self._label()}.{what} must have shape {self.shape}, got "
                             f"{tuple(value.shape)}")
        if value.dtype != self.dtype:
            raise TypeError(f"{self._label()}.{what} must have dtype {self.dtype}, got "
                            f"{value.dtype}")

    def _label(self) -> str:
        return f"parameter {self.name!r}" if self.name else repr(self)

    def __getstate__(self):
        # A copy (copy.deepcopy(model), pickle) is a parameter of its own: its arrays are no
        # views of the optimizer's buffers, so it must not point at them.
        return {name: getattr(self, name) for name in self.__slots__ if name != "_flat"}

    def __setstate__(self, state) -> None:
        self._flat = None
        for name, value in state.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={device_of(self._data)})"


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or is_cuda_array(value)


def _alike(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and device_of(a) == device_of(b)


class Module:
    """Base class: parameters are discovered from attributes, like PyTorch's ``nn.Module``."""

    training = True
    # Whether forward keeps its input itself for backward (Dense: dW = xᵀ dy); such a layer
    # takes forward(x, copy_input=...), see Dense.forward.
    keeps_input = False
    # Whether forward returns an array of its own making, which no caller holds yet (so the
    # next layer of a Sequential may keep it without a copy).
    returns_new_array = False

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, input_grad: bool = True):
        """Fill the parameters' ``.grad`` from upstream gradient ``dy`` and return ``dx``.

        With ``input_grad=False`` the layer skips ``dx`` and returns None: the first layer of a
        network never needs the gradient with respect to the data.
        """
        raise NotImplementedError

    def children(self):
        return [(name, m) for name, m in vars(self).items() if isinstance(m, Module)]

    def named_parameters(self, prefix: str = ""):
        """(name, Parameter) pairs in a stable order, e.g. ``("0.weight", p)``. Each parameter
        keeps its longest name, for messages (``model[0].parameters()`` keeps "0.weight")."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                full = prefix + name
                if value.name is None or full.endswith("." + value.name):
                    value.name = full
                yield full, value
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def register_buffer(self, name: str, array) -> None:
        """Keep ``array`` as attribute ``name``: state that is not trained (batch norm's running
        statistics), which ``state_dict`` saves and ``to()`` moves, as PyTorch's buffers.
        Update it in place, so that ``load_state_dict`` and ``to()`` reach it."""
        if name not in vars(self).setdefault("_buffer_names", []):
            self._buffer_names.append(name)
        setattr(self, name, array)

    def named_buffers(self, prefix: str = ""):
        """(name, array) pairs of the registered buffers, in a stable order."""
        for name in vars(self).get("_buffer_names", ()):
            yield prefix + name, getattr(self, name)
        for name, child in self.children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every parameter's gradient in place; with ``set_to_none`` their ``.grad`` also
        reads None until the next backward (see :class:`Parameter`)."""
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            else:
                p.grad_buffer().fill(0)

    def train(self, mode: bool = True):
        """Training mode (the default): forward keeps what backward needs."""
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self):
        """Evaluation mode: forward keeps nothing, so backward is unavailable."""
        return self.train(False)

    def state_dict(self) -> dict:
        """A copy of every parameter and buffer, by name, on the module's device."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        state.update((name, b.copy()) for name, b in self.named_buffers())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy ``state`` into the parameters and buffers in place; names and shapes must match
        exactly."""
        own = {name: p.data for name, p in self.named_parameters()}
        own.update(self.named_buffers())
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the model: missing {missing}, "
                             f"unexpected {unexpected}")
        for name, a in own.items():
            shape = tuple(np.shape(state[name]))  # a 0-d buffer may come back as a scalar
            if shape != a.shape:
                raise ValueError(f"state_dict tensor {name!r} has shape {shape} but "
                                 f"the model's is {a.shape}")
        for name, a in own.items():
            a[...] = to_device(state[name], device_of(a)).astype(a.dtype, copy=False)

    def to(self, device=None, dtype=None):
        """Move (and/or cast) every parameter and buffer; returns self. Each parameter that
        changes gets a zero gradient; an optimizer built before follows its parameters at its
        next step."""
        for p in self.parameters():
            p._move(device, dtype)
        self._move_buffers(device, dtype)
        self._forget()
        return self

    def _move_buffers(self, device, dtype) -> None:
        """Module.to's part for buffers: floating ones take ``dtype``, integer ones keep theirs."""
        for name in vars(self).get("_buffer_names", ()):
            b = getattr(self, name)
            b = b if device is None else to_device(b, device)
            setattr(self, name, b.astype(dtype) if dtype is not None and F.is_float_dtype(b.dtype)
                    else b)
        for _, child in self.children():
            child._move_buffers(device, dtype)

    def _forget(self) -> None:
        """Drop what forward kept (it lives on the old device)."""
        for name in [k for k in vars(self) if k.startswith("_saved")]:
            setattr(self, name, None)
        for _, child in self.children():
            child._forget()

    def _save(self, **arrays) -> None:
        if self.training:
            for name, value in arrays.items():
                setattr(self, "_saved_" + name, value)

    def _saved(self, name: str):
        value = getattr(self, "_saved_" + name, None)
        if value is None:
            mode = "" if self.training else " (it is in eval mode: call .train() first)"
            raise ValueError(f"{type(self).__name__}.backward() called before forward(){mode}")
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Dense(Module):
    """y = x @ weight + bias, with weight of shape (in_features, out_features).

    ``activation="relu"`` fuses a ReLU into the layer: bias and ReLU in one pass forward, and the
    ReLU and bias gradients in one pass backward (one kernel each on a GPU instead of two).

    ``init="he"`` (normal, std sqrt(2/in)) suits ReLU; ``init="xavier"`` (uniform, limit
    sqrt(6/(in+out))) suits tanh and sigmoid. Weights are drawn on the host from ``rng`` (default:
    the generator seeded by ``gpunet.manual_seed``), so a seed gives the same model on every device.

    ``compute_dtype`` (float16 or bfloat16) gives mixed precision: the weights stay in ``dtype``
    (float32 master copies, which the optimizer updates), inputs and products run in
    ``compute_dtype``, and the gradients land in float32.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 activation: str | None = None, init: str = "he", dtype=np.float32,
                 compute_dtype=None, rng: np.random.Generator | None = None):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not is_integer(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if init not in ("he", "xavier"):
            raise ValueError(f"init must be 'he' or 'xavier', got {init!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype or dtype)):
            if not F.is_float_dtype(value):
                raise TypeError(f"{name} must be a floating-point dtype, got {np.dtype(value)}")
        rng = default_rng() if rng is None else rng
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.activation = activation
        self.compute_dtype = None if compute_dtype is None else np.dtype(compute_dtype)
        shape = (self.in_features, self.out_features)
        if init == "he":
            w = rng.standard_normal(shape) * math.sqrt(2.0 / in_features)
        else:
            limit = math.sqrt(6.0 / (in_features + out_features))
            w = rng.uniform(-limit, limit, shape)
        self.weight = Parameter(w.astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None

    keeps_input = returns_new_array = True

    def _compute(self, array):
        """``array`` in the compute dtype (a cast only under mixed precision)."""
        if self.compute_dtype is None or array.dtype == self.compute_dtype:
            return array
        return array.astype(self.compute_dtype)

    def forward(self, x, *, copy_input: bool = True):
        """y = x @ weight + bias. Backward needs x itself (dW = xᵀ dy), so in training mode the
        layer keeps a copy of it: a reference would see whatever the caller writes into x
        before backward, and give the gradient of that data, silently. NumPy arrays have no
        version counter with which to detect such a write, as PyTorch does, and a checksum
        would miss some, so the copy it is (12 us for a 128 x 784 float32 batch).

        ``copy_input=False`` keeps a reference instead: the caller promises not to change x
        until backward has run. The trainer passes it for its fixed batch buffer, which the
        next step's gather rewrites only after this step's backward, and Sequential for every
        layer whose input is the fresh output of the layer before.
        """
        w = self._compute(self.weight.data)
        get_array_module(x, w)  # refuses a numpy/cupy mix
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r} expects input of shape (N, {self.in_features}), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != w.dtype:
            raise TypeError(f"{self!r} computes in {w.dtype} but got {x.dtype} input; convert "
                            "the input (x.astype) or the model (model.to(dtype=...))")
        b = None if self.bias is None else self._compute(self.bias.data)
        y = F.linear(x, w, b, relu=self.activation == "relu")
        if self.training:
            self._save(x=x.copy() if copy_input else x, y=y if self.activation else None, w=w)
        return y

    def backward(self, dy, input_grad: bool = True):
        x, w = self._saved("x"), self._saved("w")
        get_array_module(x, dy)  # refuses a numpy/cupy mix
        if dy.shape != (x.shape[0], self.out_features):
            raise ValueError(f"{self!r}.backward expects dy of shape {(x.shape[0], self.out_features)},"
                             f" got {dy.shape}")
        mixed = self.compute_dtype is not None and self.compute_dtype != self.weight.dtype
        w_grad = self.weight.grad_buffer()
        b_grad = None if self.bias is None else self.bias.grad_buffer()
        bias_beta = 0.0 if self.bias is None else self.bias.grad_decay
        if self.activation == "relu":
            dy = F.relu_backward(dy, self._saved("y"), bias_grad=None if mixed else b_grad,
                                 beta=bias_beta)
        elif b_grad is not None and not mixed:
            F.column_sums(dy, b_grad, beta=bias_beta)
        if mixed:  # float32 gradients from half-precision products
            add_into(w_grad, F.matmul(x.T, dy), self.weight.grad_decay)
            if b_grad is not None:
                add_into(b_grad, dy.sum(axis=0, dtype=b_grad.dtype), bias_beta)
        else:
            F.matmul(x.T, dy, out=w_grad, beta=self.weight.grad_decay)
        return F.matmul(dy, w.T) if input_grad else None

    def __repr__(self) -> str:
        extra = ", activation='relu'" if self.activation else ""
        return f"Dense({self.in_features}, {self.out_features}{extra})"


class ReLU(Module):
    """max(x, 0). Its derivative at exactly 0 is taken as 0, as in PyTorch.

    ``inplace=True`` overwrites the input in forward and the upstream gradient in backward,
    saving two passes and two allocations per step; ``mlp`` uses it, since the Dense layer
    before it does not keep its output.
    """

    def __init__(self, inplace: bool = False):
        self.inplace = inplace

    @property
    def returns_new_array(self) -> bool:  # in place, it returns its input
        return not self.inplace

    def forward(self, x):
        xp = get_array_module(x)
        y = xp.maximum(x, 0, out=x if self.inplace else None)
        self._save(y=y)
        return y

    def backward(self, dy, input_grad: bool = True):
        y = self._saved("y")
        _check_grad_shape(self, y, dy)
        if not input_grad:
            return None
        # A multiply by the mask is several times faster in numpy than where(y > 0, dy, 0).
        return get_array_module(y, dy).multiply(dy, y > 0, out=dy if self.inplace else None)

    def __repr__(self) -> str:
        return "ReLU(inplace=True)" if self.inplace else "ReLU()"


class LeakyReLU(Module):
    """x for x > 0, ``negative_slope * x`` otherwise, as ``torch.nn.LeakyReLU`` (whose
    derivative at exactly 0 is also the slope)."""

    def __init__(self, negative_slope: float = 0.01):
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float, np.floating)) \
                or not math.isfinite(negative_slope):
            raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        xp = get_array_module(x)
        positive = x > 0
        self._save(positive=positive)
        return xp.where(positive, x, x * x.dtype.type(self.negative_slope))

    def backward(self, dy, input_grad: bool = True):
        positive = self._saved("positive")
        _check_grad_shape(self, positive, dy)
        if not input_grad:
            return None
        return get_array_module(dy).where(positive, dy, dy * dy.dtype.type(self.negative_slope))

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class GELU(Module):
    """x Φ(x), Φ the standard normal CDF, as ``torch.nn.GELU``: exact, Φ(x) = (1 + erf(x/√2))/2,
    by default, or ``approximate="tanh"``: Φ(x) ≈ (1 + tanh(√(2/π) (x + 0.044715 x³)))/2.

    NumPy has no erf, and a layer may not ask for cupyx, so :func:`erf` is written here once in
    ``xp`` operations (Cephes' rational approximations, accurate to float64 rounding).
    """

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        xp = get_array_module(x)
        if self.approximate == "tanh":
            t = xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))
            self._save(x=x, t=t)
            return 0.5 * x * (1 + t)
        cdf = 0.5 * (1 + erf(x * (1 / math.sqrt(2))))
        self._save(x=x, t=cdf)
        return x * cdf

    def backward(self, dy, input_grad: bool = True):
        x, t = self._saved("x"), self._saved("t")
        _check_grad_shape(self, x, dy)
        if not input_grad:
            return None
        xp = get_array_module(x, dy)
        if self.approximate == "tanh":  # d/dx of x (1 + t) / 2, t = tanh(u), u' = c (1 + 3a x²)
            du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)
        pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return dy * (t + x * pdf)  # d/dx x Φ(x) = Φ(x) + x φ(x)

    def __repr__(self) -> str:
        return "GELU()" if self.approximate == "none" else f"GELU(approximate={self.approximate!r})"


# Cephes' erf (|x| < 1) and erfc (|x| >= 1) rational approximations (S. L. Moshier, public
# domain; scipy's ndtr uses the same), highest power first; relative error ~1e-16.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)


def erf(x):
    """The error function, elementwise on numpy or cupy arrays, in x's float dtype.

    Both branches are evaluated everywhere and one is kept (``where``), so that it is a fixed
    sequence of elementwise operations on either library. erfc(a) = exp(-a²) P(a)/Q(a) is used
    for 1 <= |x| < 6, beyond which erf is 1 to float64 precision.
    """
    xp = get_array_module(x)
    a = xp.minimum(xp.abs(x), x.dtype.type(6))
    z = a * a
    small = a * _poly(z, _ERF_T) / _poly(z, _ERF_U)
    large = 1 - xp.exp(-z) * _poly(a, _ERFC_P) / _poly(a, _ERFC_Q)
    return xp.copysign(xp.where(a < 1, small, large), x)


def _poly(x, coefficients):
    """sum c_k x^(n-k) by Horner's rule, highest power first."""
    y = x * 0 + coefficients[0]
    for c in coefficients[1:]:
        y = y * x + c
    return y


class Sigmoid(Module):
    """1 / (1 + exp(-x)), computed from e = exp(-|x|) as 1 / (1 + e) for x >= 0 and e / (1 + e)
    for x < 0: exp never overflows, and small outputs keep their relative accuracy (the form
    (1 + tanh(x/2)) / 2 loses it below x = -10 in float32, and gives 0 at -20)."""

    returns_new_array = True

    def forward(self, x):
        xp = get_array_module(x)
        e = xp.exp(-xp.abs(x))
        y = 1 / (1 + e)
        y = xp.where(x >= 0, y, e * y)
        self._save(y=y)
        return y

    def backward(self, dy, input_grad: bool = True):
        y = self._saved("y")
        _check_grad_shape(self, y, dy)
        return dy * y * (1 - y) if input_grad else None


class Tanh(Module):
    returns_new_array = True

    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self._save(y=y)
        return y

    def backward(self, dy, input_grad: bool = True):
        y = self._saved("y")
        _check_grad_shape(self, y, dy)
        return dy * (1 - y * y) if input_grad else None


class Softmax(Module):
    """softmax along ``axis``, with the exact backward for any upstream gradient.

    Use it to feed probabilities to any loss; for classification, ``SoftmaxCrossEntropy`` on the
    logits is faster and more accurate than Softmax followed by ``CrossEntropy``.
    """

    returns_new_array = True

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        s = F.softmax(x, axis=self.axis)
        self._save(s=s)
        return s

    def backward(self, dy, input_grad: bool = True):
        s = self._saved("s")
        return F.softmax_vjp(s, dy, axis=self.axis) if input_grad else None

    def __repr__(self) -> str:
        return f"Softmax(axis={self.axis})"


def _check_grad_shape(layer, y, dy):
    get_array_module(y, dy)
    if dy.shape != y.shape:
        raise ValueError(f"{type(layer).__name__}.backward expects dy of shape {y.shape}, got {dy.shape}")


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers: Module):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Module layers, got {type(layer).__name__} at position {i}")
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    keeps_input = True

    @property
    def returns_new_array(self) -> bool:
        return bool(self.layers) and self.layers[-1].returns_new_array

    def forward(self, x, *, copy_input: bool = True):
        """The layers in order. ``copy_input`` goes to the first layer that keeps its input
        (see Dense.forward); a later layer's input is the output of the layer before, which
        needs no copy when that layer made it (``returns_new_array``): nobody else holds it.

        A layer that says it ``fuses_with`` the next (a ReLU Conv2d and the MaxPool2d after it,
        on the host) runs both in one pass, ``forward_max_pool``; backward then runs both in one,
        ``backward_max_pool``. The results are those of the layers one by one."""
        self._fused = set()  # indices i whose layers i and i + 1 ran as one
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            fuses = getattr(layer, "fuses_with", None)
            if after is not None and fuses is not None and fuses(after, x):
                x = layer.forward_max_pool(x, after, copy_input=copy_input)
                self._fused.add(i)
                layer = after
                i += 1
            elif layer.keeps_input:
                x = layer.forward(x, copy_input=copy_input)
            else:
                x = layer.forward(x)
            copy_input = not layer.returns_new_array
            i += 1
        return x

    def backward(self, dy, input_grad: bool = True):
        fused = getattr(self, "_fused", ())
        i = len(self.layers) - 1
        while i >= 0:
            if i - 1 in fused:
                dy = self.layers[i - 1].backward_max_pool(dy, self.layers[i],
                                                          input_grad=input_grad or i > 1)
                i -= 2
            else:
                dy = self.layers[i].backward(dy, input_grad=input_grad or i > 0)
                i -= 1
        return dy

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


def mlp(sizes, activation: str = "relu", *, dtype=np.float32, compute_dtype=None,
        rng=None) -> Sequential:
    """A multilayer perceptron ending in logits: ``mlp([784, 256, 10])``.

    ReLU networks use Dense layers with the ReLU fused in (``Dense(784, 256, activation='relu')``,
    then ``Dense(256, 10)``); tanh and sigmoid networks get separate activation layers.
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least the input and output widths, got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2
        fused = "relu" if hidden and activation == "relu" else None
        layers.append(Dense(fan_in, fan_out, activation=fused,
                            init="he" if activation == "relu" else "xavier",
                            dtype=dtype, compute_dtype=compute_dtype, rng=rng))
        if hidden and activation != "relu":
            layers.append(ACTIVATIONS[activation]())
    return Sequential(*layers)
