"""gpunet.backend: device names, the array-module shim, moving arrays, seeding."""

import subprocess
import sys
import types

import numpy as np
import pytest

from gpunet import backend


def test_import_does_not_load_cupy():
    code = "import sys, gpunet, gpunet.layers, gpunet.losses, gpunet.optim; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_device_names():
    assert backend.get_device("cpu") == backend.CPU
    assert str(backend.get_device(" CPU ")) == "cpu"
    assert backend.get_device(backend.CPU) is backend.CPU
    for bad in ("gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(ValueError, match="device must be"):
            backend.get_device(bad)
    with pytest.raises(TypeError, match="device must be a str"):
        backend.get_device(0)


def test_auto_says_which_device_it_chose():
    device = backend.get_device("auto")
    assert device.reason.startswith("auto: ")
    if backend.cuda_problem() is None:
        assert device.type == "cuda"
    else:  # briefly: what is wrong, not the whole advice, which --device cuda gives
        what = backend.cuda_problem().split(";")[0]
        assert device.type == "cpu" and device.reason == f"auto: no usable GPU ({what})"
        assert "pip install" not in device.reason


def test_cuda_without_gpu_is_an_error_not_a_fallback():
    if backend.cuda_problem() is None:
        pytest.skip("a GPU is usable here")
    with pytest.raises(backend.DeviceError, match="cannot be used: .*(install|check)"):
        backend.get_device("cuda:0")


def test_diagnosis_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    problem = backend._diagnose_cuda()
    assert problem.startswith("CuPy is not installed; ")
    assert 'pip install -e ".[cuda13]"' in problem and 'pip install -e ".[cuda12]"' in problem


LIBRARIES = ("nvrtc", "cublas", "curand", "headers")


def fake_cupy(monkeypatch, missing=(), **runtime):
    """A stand-in cupy whose CUDA runtime answers as told, and a stand-in cuda.pathfinder that
    finds every CUDA library except those in ``missing`` (names from LIBRARIES)."""
    def call(value):
        def f(*args):
            if isinstance(value, Exception):
                raise value
            return value
        return f
    rt = types.SimpleNamespace(**{k: call(v) for k, v in runtime.items()})
    not_found = OSError("cannot open shared object file")
    nvrtc = types.SimpleNamespace(getVersion=call(not_found if "nvrtc" in missing else (13, 0)))
    module = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, nvrtc=nvrtc),
                                   ndarray=type("ndarray", (), {}))

    def load(name):
        if name in missing:
            raise RuntimeError(f"lib{name} not found")
        return types.SimpleNamespace(abs_path=f"/lib/lib{name}.so")

    pathfinder = types.SimpleNamespace(
        load_nvidia_dynamic_lib=load,
        find_nvidia_header_directory=lambda name: None if "headers" in missing else "/include")
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(pathfinder=pathfinder))
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", pathfinder)
    return module


H200 = dict(driverGetVersion=13000, runtimeGetVersion=13020, getDeviceCount=1)  # driver 580


@pytest.mark.parametrize("runtime,expected", [
    (dict(H200, driverGetVersion=0), "no NVIDIA driver was found"),
    (dict(H200, getDeviceCount=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")),
     "no CUDA GPU is visible; check nvidia-smi"),
    (dict(H200, getDeviceCount=0), "no CUDA GPU is visible"),
    (dict(H200, driverGetVersion=12040),
     'the NVIDIA driver supports CUDA 12.4, but this CuPy is built for CUDA 13.2; install the CuPy '
     'for your driver: pip install -e ".[cuda12]"'),
    (dict(driverGetVersion=11080, runtimeGetVersion=12040, getDeviceCount=1),
     "supports CUDA 11.8, older than gpunet supports"),
    # CUDA's minor-version compatibility: CuPy's runtime 13.2 on the 13.0 driver of the H200.
    (H200, None),
    (dict(H200, driverGetVersion=13040), None),
    (dict(driverGetVersion=13000, runtimeGetVersion=12080, getDeviceCount=1), None),
], ids=["no-driver", "no-device", "zero-devices", "older-major", "cuda-11", "h200", "newer-minor",
        "newer-major"])
def test_diagnosis_of_each_cuda_problem(monkeypatch, runtime, expected):
    fake_cupy(monkeypatch, **runtime)
    problem = backend._diagnose_cuda()
    assert problem == expected if expected is None else expected in problem


@pytest.mark.parametrize("missing,named", [
    (("nvrtc",), "NVRTC (the CUDA runtime compiler)"),
    (("cublas",), "cuBLAS"),
    (("curand",), "cuRAND"),
    (("headers",), "the CUDA headers"),
    (("nvrtc", "headers"), "NVRTC (the CUDA runtime compiler) and the CUDA headers"),
])
def test_diagnosis_names_each_missing_cuda_library(monkeypatch, missing, named):
    fake_cupy(monkeypatch, missing=missing, **H200)
    assert backend._diagnose_cuda() == (
        f'CuPy cannot find {named}, which a GPU run needs; pip install -e ".[cuda13]" brings them '
        "(CuPy's ctk extra), or point CUDA_PATH at a CUDA 13 toolkit that has them")
    fake_cupy(monkeypatch, missing=missing, **dict(H200, runtimeGetVersion=12080, driverGetVersion=12080))
    assert 'pip install -e ".[cuda12]"' in backend._diagnose_cuda()


@pytest.mark.nvrtc
def test_the_compile_time_libraries_are_found_here():
    """Where CI installed the kernels extra (CuPy, NVRTC, cuBLAS, the headers), the diagnosis
    finds them: only cuRAND, which that extra leaves out, may be missing."""
    pytest.importorskip("cupy")
    assert set(backend.missing_cuda_libraries()) <= {"cuRAND"}


def test_mixing_numpy_and_cupy_is_an_error(monkeypatch):
    cupy = fake_cupy(monkeypatch, **dict(H200, getDeviceCount=0))
    a, b = np.zeros(3), cupy.ndarray()
    assert backend.get_array_module(b) is cupy
    assert backend.get_array_module(a, 1.0, None) is np
    with pytest.raises(TypeError, match="numpy and cupy arrays mixed in one call"):
        backend.get_array_module(a, b)


def test_to_numpy_and_to_device_on_cpu():
    x = np.arange(3.0)
    assert backend.to_device(x, "cpu") is x
    assert backend.to_numpy([1, 2]).tolist() == [1, 2]
    assert backend.device_of(x) == backend.CPU


@pytest.mark.cuda
def test_round_trip_through_the_gpu(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    on_gpu = backend.to_device(x, "cuda")
    assert backend.device_of(on_gpu).type == "cuda"
    assert backend.get_array_module(on_gpu) is not np
    np.testing.assert_array_equal(backend.to_numpy(on_gpu), x)
    with pytest.raises(TypeError, match="mixed"):
        backend.get_array_module(on_gpu, x)
    assert "cuda:0" in backend.get_device("cuda").describe()


def test_manual_seed_makes_initialisation_repeatable():
    from gpunet.layers import Dense
    backend.manual_seed(5)
    a = Dense(4, 3).weight.data.copy()
    backend.manual_seed(5)
    np.testing.assert_array_equal(Dense(4, 3).weight.data, a)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        backend.manual_seed(-1)


def test_numbers_from_numpy_are_numbers():
    for value in (1, 0.5, np.float32(0.1), np.float16(2), np.int64(5), np.uint8(3)):
        assert backend.is_real(value)
    for value in (np.int64(5), np.int32(-1), 7):
        assert backend.is_integer(value)
    for value in (True, np.bool_(True), "1", None, np.array([1.0]), 1j):
        assert not backend.is_real(value) and not backend.is_integer(value)
    assert not backend.is_integer(np.float32(5)) and not backend.is_integer(2.0)
    backend.manual_seed(np.int64(3))
