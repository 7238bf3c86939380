"""gpunet.kernels.blas: axpy and axpby from numpy's own OpenBLAS, and their numpy fallback."""

import os

import numpy as np
import pytest

from gpunet.kernels import blas


@pytest.fixture(params=["blas", "numpy"])
def path(request, monkeypatch):
    """Run a test through the BLAS routines (where numpy's wheel has them) and the fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(blas, "_FUNCTIONS", {})
    elif not blas._FUNCTIONS:
        pytest.skip(f"numpy's BLAS is not usable here: {blas.DESCRIPTION}")
    return request.param


def test_numpy_wheels_blas_is_found_on_linux():
    if os.environ.get("GPUNET_BLAS", "").lower() == "numpy":
        pytest.skip("GPUNET_BLAS=numpy switches numpy's BLAS off on purpose")
    libraries = blas._numpy_blas_libraries()
    if not any("scipy_openblas64" in lib for lib in libraries):
        pytest.skip(f"this numpy bundles no scipy-openblas64 ({libraries or 'none'})")
    assert blas._FUNCTIONS, blas.DESCRIPTION
    assert "scipy_cblas_" in blas.DESCRIPTION


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 100_003])
def test_axpy_and_axpby_match_float64(path, rng, dtype, n):
    x, y = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    want_axpy = -0.3 * x.astype(np.float64) + y
    want_axpby = 0.7 * x.astype(np.float64) + 0.9 * y
    tol = 1e-6 if dtype == np.float32 else 1e-14
    y1 = y.copy()
    assert blas.axpy(-0.3, x, y1) is y1
    np.testing.assert_allclose(y1, want_axpy, rtol=tol, atol=tol)
    y2 = y.copy()
    assert blas.axpby(0.7, x, 0.9, y2) is y2
    np.testing.assert_allclose(y2, want_axpby, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 100_003])
def test_bound_axpy_is_axpy_on_fixed_arrays(path, rng, dtype, n):
    x, y = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    want = y.copy()
    blas.axpy(-0.3, x, want)
    blas.axpy(0.5, x, want)
    step = blas.bound_axpy(x, y)
    step(-0.3)
    step(0.5)
    np.testing.assert_array_equal(y, want)


def test_the_blas_routine_is_what_runs(monkeypatch, rng):
    if not blas._FUNCTIONS:
        pytest.skip(f"numpy's BLAS is not usable here: {blas.DESCRIPTION}")
    calls = []
    real = blas._FUNCTIONS["axpby", np.dtype(np.float32)]
    monkeypatch.setitem(blas._FUNCTIONS, ("axpby", np.dtype(np.float32)),
                        lambda *args: calls.append(args) or real(*args))
    x, y = np.ones(10, np.float32), np.ones(10, np.float32)
    blas.axpby(2.0, x, 3.0, y)
    assert len(calls) == 1
    np.testing.assert_array_equal(y, 5.0)


@pytest.mark.parametrize("case", ["strided", "mixed dtypes", "float16", "same array",
                                  "overlapping", "read-only x", "2-D"])
def test_awkward_arrays_give_the_numpy_answer(path, rng, case):
    """Whatever BLAS cannot take (or takes only as it is) falls back without a wrong answer."""
    base = rng.standard_normal(40).astype(np.float32)
    x, y = base[:20].copy(), base[20:].copy()
    if case == "strided":
        x, y = base[::2].copy()[::2], base.copy()[::4]
    elif case == "mixed dtypes":
        x = x.astype(np.float64)
    elif case == "float16":
        x, y = x.astype(np.float16), y.astype(np.float16)
    elif case == "same array":
        x = y
    elif case == "overlapping":
        buf = base.copy()
        x, y = buf[:30], buf[10:]
    elif case == "read-only x":
        x.flags.writeable = False
    elif case == "2-D":
        x, y = x.reshape(4, 5), y.reshape(4, 5)
    want = (2.0 * x.astype(np.float64) + 0.5 * y).astype(y.dtype)
    blas.axpby(2.0, x, 0.5, y)
    np.testing.assert_allclose(y, want, rtol=1e-3 if y.dtype == np.float16 else 1e-6)


def test_gpunet_blas_numpy_forces_the_fallback(monkeypatch):
    monkeypatch.setenv("GPUNET_BLAS", "numpy")
    functions, why = blas._load()
    assert functions == {}
    assert "GPUNET_BLAS=numpy" in why
