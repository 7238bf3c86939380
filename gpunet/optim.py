"""Optimizers with PyTorch's update rules, and learning-rate schedules.

An optimizer lays its parameters out in one flat buffer (``Parameter.data`` and ``.grad`` become
views into it), so a step is a handful of whole-buffer operations in place: no per-parameter
Python loop, no parameter-sized temporaries (one scratch buffer is allocated once), and on a GPU
one fused kernel for all parameters.

The PyTorch habits still hold: assigning ``p.grad`` or ``p.data`` copies into the buffer (see
``layers.Parameter``); ``model.to(device)`` after the optimizer is built moves the buffers and
the optimizer's state along at its next step; two optimizers built over the same parameter list
share the buffers. What a flat buffer cannot do raises at ``step()``, naming what happened.
"""

from __future__ import annotations

import math

from .kernels import blas, cpu as cpu_kernels
from .backend import device_of, get_array_module, is_cuda_array, is_integer, is_real, to_device
from .layers import Parameter


class FlatParameters:
    """One flat buffer for the data and one for the gradients of a list of parameters, whose
    ``.data`` and ``.grad`` become views into them (``Parameter._flat`` points back here).

    It records what happened to its parameters since, for ``Optimizer.step`` to read in O(1):
    ``moved`` (``model.to`` took a parameter to new arrays), ``taken_by`` (another optimizer
    laid some of them out in its own buffers) and ``check`` (a ``.grad`` was set to None).
    """

    def __init__(self, params: list[Parameter], by: str):
        self.params = tuple(params)
        self.data, self.grad = flatten_parameters(params)
        self.moved, self.taken_by, self.check = False, None, False
        self.folded = False  # SGD.fold_momentum pointed the .grad views at its momentum buffer
        self.users = 0
        for p in params:
            old = p._flat
            if old is not None and old is not self and old.usable:
                old.taken_by = by
            p._flat = self

    @classmethod
    def of(cls, params: list[Parameter], by: str) -> "FlatParameters":
        """The buffers of exactly these parameters, in this order, if they are laid out so
        already (a second optimizer over ``model.parameters()`` shares them), else new ones."""
        flat = params[0]._flat
        if flat is None or not flat.usable or flat.folded or flat.params != tuple(params) \
                or not all(p._data.base is flat.data and p._grad.base is flat.grad for p in params):
            flat = cls(params, by)
        flat.users += 1
        return flat

    @property
    def usable(self) -> bool:
        return not self.moved and self.taken_by is None


def flatten_parameters(params: list[Parameter]):
    """Copy every parameter's data and grad into one flat buffer each, and make the parameters'
    ``.data`` and ``.grad`` views of them; returns both buffers."""
    first = params[0].data
    xp = get_array_module(first)
    for p in params:
        if device_of(p.data) != device_of(first) or p.data.dtype != first.dtype:
            raise ValueError(f"all parameters must share one device and dtype, got "
                             f"{first.dtype} on {device_of(first)} for {params[0]._label()} and "
                             f"{p.data.dtype} on {device_of(p.data)} for {p._label()}")
    total = sum(p.data.size for p in params)
    with device_of(first).scope():
        data, grad = xp.empty(total, first.dtype), xp.empty(total, first.dtype)
    for p, d, g in zip(params, parameter_views(data, params), parameter_views(grad, params)):
        d[...], g[...] = p._data, p._grad
        p._data, p._grad = d, g
    return data, grad


def parameter_views(flat, params):
    """Each parameter's part of a flat buffer laid out by ``flatten_parameters``, shaped like it."""
    offset = 0
    for p in params:
        yield flat[offset:offset + p.data.size].reshape(p.data.shape)
        offset += p.data.size


def _positive(name: str, value, allow_zero: bool = False) -> float:
    ok = is_real(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: flat buffers, ``zero_grad``, ``step`` and ``state_dict``."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr: float):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params must be Parameter objects (model.parameters()), got "
                                f"{type(p).__name__} at position {i}")
        self.params = params
        self.lr = _positive("lr", lr)
        self._lay_out()
        xp = get_array_module(self.data)
        with device_of(self.data).scope():
            self.state = {name: xp.zeros_like(self.data) for name in self.state_names}
        self.step_count = 0

    def _lay_out(self) -> None:
        """Take (or share) the flat buffers of the parameters, and what depends on them."""
        self._flat = FlatParameters.of(self.params, by=f"another {type(self).__name__}")
        self.data, self.grad = self._flat.data, self._flat.grad
        with device_of(self.data).scope():
            self._scratch = get_array_module(self.data).empty_like(self.data)
        # On the CPU, the compiled one-pass update where it fits (decided per layout: the
        # buffers' dtype and layout are fixed until the parameters move), else _update's rule.
        compiled = None if is_cuda_array(self.data) else self._compiled_update()
        self.uses_compiled_update = compiled is not None
        self._host_update = compiled or self._update

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in one pass over the buffer; with ``set_to_none`` the
        parameters' ``.grad`` also read None until the next backward (``layers.Parameter``)."""
        self.grad.fill(0)
        if set_to_none:
            for p in self.params:
                p.grad = None

    def step(self) -> None:
        """One update of every parameter from its ``.grad``, in place."""
        flat = self._flat
        if flat.check or flat.moved or flat.taken_by is not None:  # three attribute tests
            self._follow_parameters()
        self.step_count += 1
        if is_cuda_array(self.data):
            self.device_update()
        else:
            self._host_update()

    def _follow_parameters(self) -> None:
        """Before a step: raise for what a flat buffer cannot follow, and move the buffers and
        the state to where ``model.to()`` took the parameters."""
        flat, name = self._flat, type(self).__name__
        if flat.taken_by is not None:
            taken = [p._label() for p in self.params if p._flat is not flat]
            raise RuntimeError(
                f"{name}.step(): {taken[0] if taken else 'its parameters'}"
                f"{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} now live in the "
                f"buffers of {flat.taken_by}, built afterwards over an overlapping but different "
                "parameter list. A parameter lives in one flat buffer: two optimizers can share "
                "parameters only when built over the same list (model.parameters()); otherwise "
                "give each its own parameters, or build this one again")
        if flat.moved:
            try:
                self._lay_out()
            except ValueError as error:
                raise ValueError(f"{name}.step(): the parameters were moved (model.to()) after "
                                 f"the optimizer was built, and {error}") from None
            self.state = {k: to_device(v, device_of(self.data)).astype(self.data.dtype, copy=False)
                          for k, v in self.state.items()}
        for p in self.params:
            if p._grad_none:
                raise RuntimeError(
                    f"{name}.step(): {p._label()} has no gradient: its .grad was set to None and "
                    "no backward has written it since. PyTorch's optimizers would skip it; "
                    "gpunet's update all their parameters in one pass over a flat buffer and "
                    "cannot, so run backward before step(), or leave the parameter out of the "
                    "optimizer")
        self._flat.check = False

    def _update(self) -> None:
        """The update rule, written once in NumPy-style calls: the reference, and what a GPU
        runs for an optimizer without a fused kernel."""
        raise NotImplementedError

    def _compiled_update(self):
        """The compiled CPU kernel that replaces ``_update`` for this optimizer, or None."""
        return None

    def device_update(self, lr_table=None, counters=None) -> None:
        """The update on a GPU, for ``step()`` (which has counted this step already) and for a
        captured CUDA graph, which passes ``lr_table`` and ``counters`` so that the rate and
        the step count are read on the device (see gpunet.graph). Without a fused kernel of
        its own, an optimizer runs its ``_update`` on cupy arrays (not under capture)."""
        if not self.fused_device_update:
            if lr_table is not None:
                raise NotImplementedError(f"{type(self).__name__} has no fused CUDA update that "
                                          "a captured graph can replay")
            self._update()
            return
        from .kernels import cuda as cuda_kernels
        cuda_kernels.optimizer_update(*self.fused_rule(), lr_table, counters)

    @property
    def fused_device_update(self) -> bool:
        """Whether ``device_update`` is one fused kernel that a captured graph can replay."""
        return False

    def fused_rule(self) -> tuple:
        """(rule, buffers, numbers) of the fused kernel that runs this optimizer's update, for
        ``kernels.cuda.optimizer_update``; only where ``fused_device_update`` is true."""
        raise NotImplementedError

    def _is_own_rule(self, cls) -> bool:
        """Whether this optimizer's rule is ``cls``'s own, not a subclass's override: only then
        may a fused kernel of ``cls``'s rule replace it."""
        return type(self)._update is cls._update

    def hyperparameters(self) -> dict:
        """The scalars of the update rule, by name (the CUDA kernel takes the same)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Scalars and flat state arrays (copies), ready for ``np.savez``."""
        out = {"lr": self.lr, "step": self.step_count}
        out.update({name: buf.copy() for name, buf in self.state.items()})
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("lr", "step", *self.state_names) if k not in state]
        if missing:
            raise ValueError(f"optimizer state_dict lacks {missing} (is it from another optimizer?)")
        for name in self.state_names:
            if tuple(state[name].shape) != self.data.shape:
                raise ValueError(f"optimizer state {name!r} has shape {tuple(state[name].shape)} but "
                                 f"the parameters need {self.data.shape}")
        self.lr = _positive("lr", float(state["lr"]), allow_zero=True)  # a schedule may end at 0
        self.step_count = int(state["step"])
        for name, buf in self.state.items():
            buf[...] = to_device(state[name], device_of(buf))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's rule::

        g = grad + weight_decay * p
        buf = g (first step), else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) or buf
        p -= lr * g
    """

    state_names = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        self.momentum = _positive("momentum", momentum, allow_zero=True)
        self.dampening = _positive("dampening", dampening, allow_zero=True)
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.nesterov = bool(nesterov)
        if self.momentum == 0:
            self.state_names = ()
        super().__init__(params, lr)

    def _lay_out(self) -> None:
        if getattr(self, "folded", False):  # the parameters moved while folded: start unfolded
            for p in self.params:
                p.grad_decay = 0.0
        super()._lay_out()
        self._gradient = self.grad  # the flat gradient buffer, while self.grad may be the momentum
        self.folded = False

    def _compiled_update(self):
        # SGD prefers its two BLAS passes where numpy's OpenBLAS is reachable: OpenBLAS runs
        # axpy on every core from its own thread pool, and inside a training step that beat the
        # single-threaded kernel by about 30 us a step (784-256-10 on 2 cores, same run).
        if not (self._is_own_rule(SGD) and cpu_kernels.update_fits(self.data)
                and not blas.available(self.data)):
            return None

        def update():
            buf = self.state.get("momentum_buffer", self._scratch)  # unused without momentum
            cpu_kernels.sgd_update(self.data, self.grad, buf, self.lr, self.momentum,
                                   self.dampening, self.weight_decay, self.nesterov,
                                   self.step_count == 1)
        return update

    @property
    def fused_device_update(self) -> bool:
        return self._is_own_rule(SGD)

    def fused_rule(self) -> tuple:
        buf = self.state.get("momentum_buffer", self._scratch)  # unused without momentum
        return "sgd", (self.data, self.grad, buf), {
            "lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
            "weight_decay": self.weight_decay, "nesterov": self.nesterov,
            "steps_taken": self.step_count - 1}  # step() counted this one already

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def fold_momentum(self) -> bool:
        """Let backward build the momentum buffer, and make a step one pass instead of two.

        Each parameter's ``.grad`` becomes its view of the momentum buffer, with ``grad_decay``
        set to the momentum, so backward leaves ``buf = momentum * buf + g`` there: on the CPU
        BLAS adds the weight gradient into ``momentum * buf`` inside its product. The step is
        then ``p -= lr * buf``: the same numbers as unfolded, to rounding, with one pass over
        the parameters fewer per step (``buf = momentum * buf + g`` is gone).

        Only the plain rule folds (momentum, no dampening, nesterov or weight decay), on host
        buffers with numpy's BLAS and the compiled kernels; returns whether it did. While
        folded, ``.grad`` holds the momentum buffer, not the gradient, so nothing may read or
        rescale gradients between backward and step (clipping, loss scaling), and
        ``zero_grad`` resets the momentum. ``unfold_momentum`` undoes it.
        """
        if self.folded:
            return True
        if self._flat.users > 1 or not self._flat.usable:  # shared buffers keep their gradients
            return False
        if not (self.momentum and not self.dampening and not self.nesterov
                and not self.weight_decay and blas.available(self.data)
                and cpu_kernels.gemm_available(self.data)):
            return False
        buf = self.state["momentum_buffer"]
        if self.step_count == 0:
            buf.fill(0)  # the first step's buffer is the gradient itself: 0 * momentum + g
        self._point_grads(buf, self.momentum)
        self._folded_step = blas.bound_axpy(buf, self.data)
        self.folded = True
        return True

    def unfold_momentum(self) -> None:
        """Give every parameter back its own gradient buffer (stale until the next backward),
        with ``grad_decay`` 0: backward overwrites gradients again."""
        if self.folded:
            self._point_grads(self._gradient, 0.0)
            self.folded = False

    def _point_grads(self, flat, decay: float) -> None:
        for p, view in zip(self.params, parameter_views(flat, self.params)):
            p._grad, p.grad_decay = view, decay
        self.grad = flat
        self._flat.folded = flat is not self._flat.grad

    def _update(self) -> None:
        # On the CPU each blas call is one pass: axpy/axpby fuse the multiply into the add.
        p, s = self.data, self._scratch
        if self.folded:  # backward already left momentum * buf + g in the buffer
            self._folded_step(-self.lr)
            return
        d = self.grad
        if self.weight_decay:
            s[...] = d
            d = blas.axpy(self.weight_decay, p, s)
        if self.momentum:
            buf = self.state["momentum_buffer"]
            if self.step_count == 1:
                buf[...] = d
            else:
                blas.axpby(1.0 - self.dampening, d, self.momentum, buf)
            if self.nesterov:  # p -= lr * (d + momentum * buf)
                blas.axpy(-self.lr, d, p)
                blas.axpy(-self.lr * self.momentum, buf, p)
                return
            d = buf
        blas.axpy(-self.lr, d, p)


class Adam(Optimizer):
    """Adam (Kingma and Ba) with PyTorch's rule; ``weight_decay`` adds L2 to the gradient.

    ``decoupled=True`` (what :class:`AdamW` sets) decays the weights directly instead.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        if len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _positive("eps", eps)
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.decoupled = bool(decoupled)
        super().__init__(params, lr)

    def _lay_out(self) -> None:
        super()._lay_out()
        with device_of(self.data).scope():
            self._scratch2 = get_array_module(self.data).empty_like(self.data)

    def _compiled_update(self):
        if not (self._is_own_rule(Adam) and cpu_kernels.update_fits(self.data)):
            return None

        def update():
            (b1, b2), (bc1, bc2) = self.betas, self.bias_corrections()
            cpu_kernels.adam_update(self.data, self.grad, self.state["exp_avg"],
                                    self.state["exp_avg_sq"], self.lr, b1, b2, self.eps,
                                    self.weight_decay, self.decoupled, bc1, bc2)
        return update

    @property
    def fused_device_update(self) -> bool:
        return self._is_own_rule(Adam)

    def fused_rule(self) -> tuple:
        b1, b2 = self.betas
        return "adam", (self.data, self.grad, self.state["exp_avg"], self.state["exp_avg_sq"]), {
            "lr": self.lr, "b1": b1, "b2": b2, "eps": self.eps, "weight_decay": self.weight_decay,
            "decoupled": self.decoupled, "steps_taken": self.step_count - 1}

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": self.decoupled}

    def bias_corrections(self) -> tuple[float, float]:
        b1, b2 = self.betas
        return 1 - b1 ** self.step_count, 1 - b2 ** self.step_count

    def _update(self) -> None:
        xp, p, g = get_array_module(self.data), self.data, self.grad
        s, s2 = self._scratch, self._scratch2
        (b1, b2), (bc1, bc2) = self.betas, self.bias_corrections()
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        if self.weight_decay and self.decoupled:
            p *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            xp.multiply(p, self.weight_decay, out=s)
            s += g
            g = s
        m *= b1
        xp.multiply(g, 1 - b1, out=s2)
        m += s2
        v *= b2
        xp.multiply(g, g, out=s2)
        s2 *= 1 - b2
        v += s2
        # p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps): PyTorch's exact arrangement
        xp.sqrt(v, out=s)
        s /= math.sqrt(bc2)
        s += self.eps
        xp.divide(m, s, out=s)
        s *= self.lr / bc1
        p -= s


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter): p *= 1 - lr * weight_decay."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)


# --- learning-rate schedules ---------------------------------------------------------------------

class LRScheduler:
    """Sets ``optimizer.lr`` from a closed-form function of the step count.

    Call ``step()`` once per optimizer step (or per epoch: the unit is yours). An optional linear
    warm-up ramps from ``base_lr / warmup_steps`` to ``base_lr`` over the first ``warmup_steps``.
    Being closed-form, a schedule resumes exactly from its ``state_dict``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0):
        if not is_integer(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.optimizer, self.warmup_steps = optimizer, int(warmup_steps)
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self.base_lr * self.factor(step - self.warmup_steps)

    def factor(self, step: int) -> float:
        """The multiplier of base_lr ``step`` steps after warm-up."""
        return 1.0

    def step(self) -> None:
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)

    def get_last_lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        """Only the position: the rest is configuration, so a resumed run may change it."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.optimizer.lr = self.lr_at(self.last_step)


class ConstantLR(LRScheduler):
    """base_lr throughout (after the optional warm-up)."""


class StepLR(LRScheduler):
    """base_lr * gamma ** (step // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 warmup_steps: int = 0):
        if not is_integer(step_size) or step_size <= 0:
            raise ValueError(f"step_size must be a positive int, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), _positive("gamma", gamma)
        super().__init__(optimizer, warmup_steps)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """Half a cosine from base_lr down to eta_min over T_max steps (after warm-up), then eta_min."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 warmup_steps: int = 0):
        if not is_integer(T_max) or T_max <= 0:
            raise ValueError(f"T_max must be a positive int, got {T_max!r}")
        self.T_max, self.eta_min = int(T_max), _positive("eta_min", eta_min, allow_zero=True)
        super().__init__(optimizer, warmup_steps)

    def factor(self, step: int) -> float:
        progress = min(step, self.T_max) / self.T_max
        low = self.eta_min / self.base_lr
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
