"""gpunet: a small training framework on NumPy and CuPy, with exact, tested softmax derivatives.

    import gpunet as gn
    model = gn.mlp([784, 256, 10])
    opt = gn.SGD(model.parameters(), lr=0.1, momentum=0.9)
"""

import os as _os
import sys as _sys

# numpy's OpenBLAS keeps its worker threads spinning for 2**28 cycles (about 0.1 s) after each
# product, waiting for the next. On a machine whose cores are hyperthreads of one another, a
# spinning thread takes the execution units of the thread doing the real work: the small CNN's
# step, which alternates products with compiled loops and threads of its own, ran 1.7 x slower
# (85 against 50 ms). 2**20 cycles (about 0.4 ms) still spans the gaps between the products of a
# layer. OpenBLAS reads this once, as numpy loads it, so it only applies when gpunet is imported
# first (train.py is); an explicit setting is kept.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from . import conv, dropout, functional, layers, losses, norm, optim
from .backend import (Device, DeviceError, get_array_module, get_device, manual_seed, to_device,
                      to_numpy)
from .conv import AvgPool2d, Conv2d, Flatten, MaxPool2d, small_cnn
from .dropout import Dropout
from .layers import (GELU, Dense, LeakyReLU, Module, Parameter, ReLU, Sequential, Sigmoid, Softmax,
                     Tanh, mlp)
from .norm import BatchNorm1d, BatchNorm2d
from .losses import CrossEntropy, MSELoss, SoftmaxCrossEntropy
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"
__all__ = ["functional", "layers", "losses", "optim", "Device", "DeviceError", "get_array_module",
           "get_device", "manual_seed", "to_device", "to_numpy", "Dense", "Module", "Parameter",
           "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh", "mlp", "CrossEntropy", "MSELoss",
           "SoftmaxCrossEntropy", "SGD", "Adam", "AdamW", "conv", "dropout", "norm", "Conv2d",
           "MaxPool2d", "AvgPool2d", "Flatten", "small_cnn", "Dropout", "BatchNorm1d",
           "BatchNorm2d", "LeakyReLU", "GELU"]
