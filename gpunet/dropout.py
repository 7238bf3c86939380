"""Dropout, and the counter-based random numbers that draw its mask on a GPU.

``Dropout(p)`` zeroes each element with probability p in training and scales the rest by
1 / (1 - p) ("inverted" dropout, as PyTorch), so that eval mode is the identity.

Where the mask comes from:

- numpy arrays: gpunet's seeded host generator (``rng``, default the one ``gpunet.manual_seed``
  seeds), as uniform floats compared with p;
- cupy arrays: :func:`philox4x32`, a counter-based generator (Salmon et al., "Parallel random
  numbers: as easy as 1, 2, 3", SC 2011; the Philox-4x32-10 of cuRAND and Random123). Each
  element's random word is a pure function of (seed, step counter, element index), so it is
  drawn on the device with no host synchronisation and no generator state on the host. cuRAND's
  host API refuses CUDA-graph capture; here the step counter is a 0-d device array that each
  forward increments in place, so a captured step replays with a fresh mask every time.

``philox4x32`` is one formula in ``xp`` integer operations (32x32->64-bit products, shifts and
xors on uint32/uint64 arrays), which numpy and cupy both run elementwise: the same seed and
counter give the same mask on both devices. ``Dropout(p, counter_based=True)`` uses it on the
CPU too (to reproduce a GPU run's masks there), at about 140 elementwise operations per draw
(14 a round). On a GPU the same formula runs as one fused kernel instead
(``counter_dropout``'s fast path, ``kernels.cuda.dropout``: the mask and ``x * mask`` in one
launch), which the tests hold equal to this one bit for bit.

Element ``offset + i`` of the stream is the mask of element i, where ``offset`` counts the
elements of the rows before it (``Dropout.row_offset``). Data-parallel ranks each set it to the
first row of their shard of the global batch, so together they draw the mask that one process
would draw for the whole global batch, not one identical mask each.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import functional as F
from .backend import default_rng, device_of, get_array_module, is_cuda_array, to_device
from .layers import Module, _check_grad_shape

# Philox-4x32's round multipliers and Weyl key increments (Salmon et al., table 2).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32(counter, key, rounds: int = 10):
    """Philox-4x32-``rounds``: four uint32 words of a 128-bit counter and two of a 64-bit key
    to four uint32 words of output, elementwise.

    ``counter`` holds four uint32 arrays (or 0-d arrays) that broadcast together; ``key`` two
    Python ints. One round is two 32x32->64-bit products, whose high halves are xored with the
    other two counter words and the key; the key takes a Weyl step between rounds.
    """
    xp = get_array_module(*counter)
    u32, u64 = np.uint32, np.uint64
    c0, c1, c2, c3 = (xp.asarray(c, dtype=u32) for c in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        p0 = c0.astype(u64) * u64(PHILOX_M0)
        p1 = c2.astype(u64) * u64(PHILOX_M1)
        hi0, lo0 = (p0 >> u64(32)).astype(u32), p0.astype(u32)
        hi1, lo1 = (p1 >> u64(32)).astype(u32), p1.astype(u32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ u32(k0), lo1, hi0 ^ c3 ^ u32(k1), lo0
    return c0, c1, c2, c3


def counter_words(n: int, seed: int, counter, xp=None, offset: int = 0):
    """n uint32 random words for step ``counter`` (a 0-d uint64 array, or an int) of stream
    ``seed``, from element ``offset`` on: element e of the stream is word e % 4 of
    Philox(counter = (e // 4, step_lo, step_hi, 0), key = seed's two 32-bit halves)."""
    if xp is None:
        xp = get_array_module(counter)
    first, stop = _stream_blocks(n, offset)
    step = xp.asarray(counter, dtype=np.uint64)
    words = philox4x32((xp.arange(first, stop, dtype=np.uint32), step & np.uint64(_MASK32),
                        step >> np.uint64(32), xp.zeros((), dtype=np.uint32)),
                       (seed & _MASK32, seed >> 32))
    start = offset % 4
    return xp.stack(xp.broadcast_arrays(*words), axis=-1).reshape(-1)[start:start + n]


def _stream_blocks(n: int, offset: int) -> tuple[int, int]:
    """The Philox blocks (four words each) that hold words offset .. offset + n - 1: a stream
    has 2**32 blocks, since the block number is one 32-bit word of the counter."""
    first, stop = offset // 4, -(-(offset + n) // 4)
    if stop > _MASK32 + 1:
        raise ValueError(f"a Philox stream has 2**34 words; asked for {n} from word {offset}")
    return first, stop


def keep_threshold(p: float) -> np.uint32:
    """The least random word that keeps an element: a word >= p * 2**32 keeps it, probability
    1 - p to within 2**-32."""
    return np.uint32(min(int(p * 2 ** 32), _MASK32))


def keep_scale(p: float) -> float:
    """What a kept element is multiplied by: 1 / (1 - p) (0 when everything is dropped)."""
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def counter_mask(shape, dtype, p: float, seed: int, counter, xp, offset: int = 0):
    """The scaled keep-mask (0 or 1 / (1 - p), in ``dtype``) of step ``counter`` of stream
    ``seed``, from stream element ``offset`` on: the formula, in ``xp`` operations."""
    words = counter_words(math.prod(shape), seed, counter, xp, offset)
    keep = (words >= keep_threshold(p)).reshape(shape)
    return keep.astype(dtype) * np.dtype(dtype).type(keep_scale(p))


def counter_dropout(x, p: float, seed: int, counter, offset: int = 0):
    """(x * mask, mask) with mask = counter_mask(x.shape, x.dtype, ...); reads ``counter``, does
    not advance it. On a GPU one fused kernel (kernels.cuda.dropout) draws and applies the mask,
    which the tests hold equal to the formula bit for bit."""
    if is_cuda_array(x) and F.is_float_dtype(x.dtype):
        from .kernels import cuda as cuda_kernels  # imports cupy: only once a GPU is in use
        _stream_blocks(x.size, offset)
        return cuda_kernels.dropout(x, counter, offset, seed, keep_threshold(p), keep_scale(p))
    mask = counter_mask(x.shape, x.dtype, p, seed, counter, get_array_module(x), offset)
    return x * mask, mask


class Dropout(Module):
    """Inverted dropout: in training, each element is zeroed with probability ``p`` and the
    others are scaled by 1 / (1 - p); in eval mode it is the identity (``torch.nn.Dropout``).

    ``counter_based`` None (the default) draws the mask with the host generator ``rng`` for
    numpy arrays and with :func:`philox4x32` on the device for cupy arrays; True uses Philox on
    both (the same masks on both devices). ``seed`` (default: drawn from ``rng`` now) keys the
    Philox stream, and ``counter``, a 0-d uint64 array on the input's device, counts its draws.

    ``row_offset`` (0 unless set) is the number of rows of a larger batch that come before the
    input's first row: a counter-based mask for rows r.. of the input is then the one that
    rows row_offset + r.. of the larger batch would get. Data-parallel training sets it to each
    rank's first row of the global batch (see ``gpunet.trainer``).
    """

    def __init__(self, p: float = 0.5, *, counter_based: bool | None = None,
                 seed: int | None = None, rng: np.random.Generator | None = None):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        if counter_based not in (None, True, False):
            raise TypeError(f"counter_based must be None, True or False, got {counter_based!r}")
        if seed is None:
            seed = int((default_rng() if rng is None else rng).integers(0, 2 ** 64, dtype=np.uint64))
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
                or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.p, self.counter_based, self.seed, self.rng = float(p), counter_based, int(seed), rng
        self.counter = np.zeros((), dtype=np.uint64)
        self.row_offset = 0

    @property
    def row_offset(self) -> int:
        return self._row_offset

    @row_offset.setter
    def row_offset(self, rows) -> None:
        if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 0:
            raise ValueError(f"row_offset must be an int >= 0, got {rows!r}")
        self._row_offset = int(rows)

    def _uses_counter(self, x) -> bool:
        return bool(self.counter_based) or (self.counter_based is None and is_cuda_array(x))

    def _stream_offset(self, x) -> int:
        """The element of the Philox stream where x's mask starts."""
        if self._row_offset and x.ndim == 0:
            raise ValueError(f"{self!r}: row_offset {self._row_offset} needs an input with rows, "
                             "got a 0-d array")
        return self._row_offset * (x.size // x.shape[0]) if self._row_offset and x.size else 0

    def _counter_on(self, x):
        """The step counter, moved to x's device if it is elsewhere."""
        if device_of(self.counter) != device_of(x):
            self.counter = to_device(self.counter, device_of(x))
        return self.counter

    def mask(self, x):
        """The scaled keep-mask for one training step (0 or 1/(1-p), in x's dtype); a draw."""
        if self._uses_counter(x):
            m = counter_mask(x.shape, x.dtype, self.p, self.seed, self._counter_on(x),
                             get_array_module(x), self._stream_offset(x))
            self.counter += np.uint64(1)  # in place: on a GPU a kernel, which a graph replays
            return m
        rng = default_rng() if self.rng is None else self.rng
        keep = to_device(rng.random(x.shape, dtype=np.float32) >= self.p, device_of(x))
        return keep.astype(x.dtype) * x.dtype.type(keep_scale(self.p))

    def forward(self, x):
        if not hasattr(x, "dtype"):
            raise TypeError(f"{self!r} expects a numpy or cupy array, got {type(x).__name__}")
        if not self.training or self.p == 0.0:
            self._save(mask=1)
            return x
        if self._uses_counter(x):
            y, m = counter_dropout(x, self.p, self.seed, self._counter_on(x), self._stream_offset(x))
            self.counter += np.uint64(1)  # after the draw read it (in stream order on a GPU)
        else:
            m = self.mask(x)
            y = x * m
        self._save(mask=m)
        return y

    def backward(self, dy, input_grad: bool = True):
        m = self._saved("mask")
        if not input_grad:
            return None
        if isinstance(m, int):  # p = 0: the identity
            return dy
        _check_grad_shape(self, m, dy)
        return dy * m

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
