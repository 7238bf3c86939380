"""Shared fixtures: the real MNIST and Fashion-MNIST files when present, and skipping of GPU tests where no GPU is."""

import os
from pathlib import Path

import numpy as np
import pytest

from gpunet import backend
from gpunet.kernels import cpu as cpu_kernels

PROJECT = Path(__file__).resolve().parents[1]
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def pytest_collection_modifyitems(config, items):
    problem = backend.cuda_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA GPU: {problem}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may reach the internet: downloads are allowed to loopback servers only."""
    from urllib.error import URLError
    from urllib.parse import urlparse

    from gpunet import datasets

    real = datasets._urlopen

    def loopback_only(url, *args, **kwargs):
        host = urlparse(url if isinstance(url, str) else url.full_url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise URLError(f"the test suite does not use the network (asked for {host})")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(datasets, "_urlopen", loopback_only)


def _mnist_candidates() -> list[Path]:
    env = os.environ.get("GPUNET_DATA")
    found_by_env = [Path(env)] if env else []
    return found_by_env + [PROJECT.parent / "shared" / "data" / "mnist", PROJECT / "data"]


def _find_mnist() -> Path | None:
    for c in _mnist_candidates():
        if all((c / f).exists() or (c / f[:-3]).exists() for f in MNIST_FILES):
            return c
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding the real MNIST files (GPUNET_DATA, ../shared/data/mnist or data/)."""
    found = _find_mnist()
    if found is None:
        looked = ", ".join(map(str, _mnist_candidates()))
        unset = "" if os.environ.get("GPUNET_DATA") else "; GPUNET_DATA is not set"
        pytest.skip(f"real MNIST files not found (looked in {looked}{unset}): run "
                    "GPUNET_DATA=/path/to/mnist pytest to include the tests that train on them")
    return found


def _fashion_candidates() -> list[Path]:
    env = os.environ.get("GPUNET_DATA")
    found_by_env = [Path(env) / "fashion-mnist", Path(env).parent / "fashion-mnist"] if env else []
    return found_by_env + [PROJECT.parent / "shared" / "data" / "fashion-mnist",
                           PROJECT / "data" / "fashion-mnist"]


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The folder holding the real Fashion-MNIST files (a fashion-mnist/ folder in or beside
    GPUNET_DATA, ../shared/data/fashion-mnist or data/fashion-mnist)."""
    for c in _fashion_candidates():
        if all((c / f).exists() or (c / f[:-3]).exists() for f in MNIST_FILES):
            return c
    looked = ", ".join(map(str, _fashion_candidates()))
    pytest.skip(f"real Fashion-MNIST files not found (looked in {looked})")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(params=["cpu", "cpu-numpy", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request, monkeypatch):
    """Runs a test on the CPU twice, through the compiled CPU kernels and through the plain NumPy
    formulas they replace, and once on the GPU (that run is marked cuda)."""
    if request.param == "cpu-numpy":
        monkeypatch.setattr(cpu_kernels, "_lib", None)
    elif request.param == "cpu" and not cpu_kernels.available():
        pytest.skip(f"the compiled CPU kernels are not loaded: {cpu_kernels.DESCRIPTION}")
    return backend.get_device(request.param.removesuffix("-numpy"))


@pytest.fixture
def on(device):
    """Moves numpy test inputs to the test's device: ``on(x)``."""
    return lambda a: backend.to_device(a, device)
