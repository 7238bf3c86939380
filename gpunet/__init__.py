"""gpunet: a small training framework on NumPy and CuPy, with exact, tested softmax derivatives.

    import gpunet as gn
    model = gn.mlp([784, 256, 10])
    opt = gn.SGD(model.parameters(), lr=0.1, momentum=0.9)
"""

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
