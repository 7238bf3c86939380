"""gpunet's calls into the array module, checked against the CuPy that is installed: no GPU needed.

The layers write each formula once, ``xp = get_array_module(x)``, and on a GPU every ``xp.NAME``
is CuPy's. NumPy-only names and keywords (``xp.errstate``, ``as_strided(writeable=...)``,
``xp.multiply(..., where=...)``) pass every CPU test and fail only on a GPU. So this reads the
source with ast and asks the real ``cupy`` namespace, which imports without a GPU:

- every attribute reached through an array module (``xp.X``, ``xp.lib.stride_tricks.X``,
  ``cupy.cuda.X``, ``self.xp.X``, ``get_array_module(...).X``, ``backend._cupy().X``) exists in
  cupy, and, where the module may be numpy (``xp``), in numpy too;
- every keyword passed to such a function is one the CuPy function takes;
- every keyword passed to an array method (``x.astype(copy=False)``, ``x.sum(out=...)``) is one
  ``cupy.ndarray``'s method takes, except at the few calls listed in HOST_ONLY.

Without CuPy these tests skip, unless ``GPUNET_REQUIRE_NVRTC=1`` (as in CI) makes that a failure.
That only backend.py and kernels/ import cupy is tests/test_layout.py's check.
"""

import ast
import inspect
import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Names that hold an array module: numpy or cupy ("either"), or cupy alone.
NAMES = {"xp": "either", "cupy": "cupy", "cp": "cupy"}
ATTRIBUTES = {"xp": "either", "cupy": "cupy"}  # Device.xp, plan.xp, GraphStep.cupy
CALLS = {"get_array_module": "either", "_cupy": "cupy"}  # functions that return one

# The keywords a CuPy ufunc takes (cupy/_core/_kernel.pyx, ufunc.__call__): NumPy's also take
# where=, order=, subok= and signature=, CuPy's raise TypeError for them.
UFUNC_KEYWORDS = {"out", "dtype", "casting"}

# Method calls with keywords that never see a cupy array, each with the reason:
# (file, method, keyword).
HOST_ONLY = {
    ("gpunet/backend.py", "take", "mode"): "take_rows' numpy branch (type(x) is np.ndarray)",
    ("gpunet/conv.py", "get", "zero"): "_Workspace.get, not an array",
    ("gpunet/bench/contenders.py", "argmax", "dim"): "a torch tensor",
    ("gpunet/bench/__main__.py", "dumps", "indent"): "json.dumps",
    ("gpunet/bench/__main__.py", "dumps", "default"): "json.dumps",
    ("gpunet/trainer.py", "dumps", "indent"): "json.dumps",
}


def _cupy():
    try:
        import cupy
    except Exception as exc:
        if os.environ.get("GPUNET_REQUIRE_NVRTC") == "1":
            raise
        pytest.skip(f'CuPy is not installed (pip install -e ".[kernels]"): {exc}')
    return cupy


def sources():
    return sorted((ROOT / "gpunet").rglob("*.py")) + [ROOT / "train.py"]


def module_kind(node) -> str | None:
    """"either" or "cupy" when ``node`` evaluates to an array module, else None."""
    if isinstance(node, ast.Name):
        return NAMES.get(node.id)
    if isinstance(node, ast.Attribute):
        return ATTRIBUTES.get(node.attr)
    if isinstance(node, ast.Call):
        f = node.func
        return CALLS.get(f.id if isinstance(f, ast.Name) else getattr(f, "attr", None))
    if isinstance(node, ast.Subscript) and ast.unparse(node) == "sys.modules['cupy']":
        return "cupy"
    return None


def module_uses(tree):
    """(kind, dotted name, the call of it or None, line) for each attribute chain that hangs off
    an array module: ``xp.lib.stride_tricks.as_strided(...)`` gives ("either",
    "lib.stride_tricks.as_strided", <the Call>, line)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        kind = module_kind(node)
        if kind is None:
            continue
        chain, top = [], node
        while isinstance(parents.get(top), ast.Attribute) and parents[top].value is top:
            top = parents[top]
            chain.append(top.attr)
        if chain:
            parent = parents.get(top)
            call = parent if isinstance(parent, ast.Call) and parent.func is top else None
            yield kind, ".".join(chain), call, node.lineno


def method_calls(tree, methods):
    """(method, keyword names, line) of each call ``obj.method(..., kw=...)`` with keywords whose
    method name is one of ``methods`` and whose object is no array module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in methods and node.keywords \
                and module_kind(node.func.value) is None:
            yield node.func.attr, [k.arg for k in node.keywords if k.arg], node.lineno


def resolve(module, dotted):
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _doc_signature(obj):
    """The signature Cython writes as the first line of a docstring (CuPy builds with
    embedsignature): ``_ndarray_base.astype(self, dtype, order='K', ...) -> _ndarray_base``."""
    first = (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
    match = re.match(r"^[\w.]*\((.*)\)(\s*->.*)?$", first[0]) if first else None
    if not match:
        return None
    try:
        function = ast.parse(f"def f({match.group(1)}): pass").body[0]
    except SyntaxError:
        return None
    args = function.args
    if args.kwarg is not None:
        return None
    return {a.arg for a in args.args + args.kwonlyargs} - {"self"}


def keywords_taken(cupy, obj):
    """The keyword names ``obj`` takes, or None where it takes any (or cannot be told)."""
    if isinstance(obj, cupy.ufunc):
        return UFUNC_KEYWORDS
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return _doc_signature(obj)
    kinds = {p.kind for p in signature.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    return {name for name, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def problems(cupy, source: str, path: str) -> list[str]:
    """What in ``source`` (the file at ``path``, relative to the root) CuPy would refuse."""
    tree = ast.parse(source)
    found = []
    for kind, dotted, call, line in module_uses(tree):
        obj = resolve(cupy, dotted)
        if obj is None:
            found.append(f"{path}:{line}: cupy has no {dotted}")
            continue
        if kind == "either" and resolve(np, dotted) is None:
            found.append(f"{path}:{line}: numpy has no {dotted}, and xp may be numpy")
        if call is not None:
            taken = keywords_taken(cupy, obj)
            for k in call.keywords:
                if k.arg and taken is not None and k.arg not in taken:
                    found.append(f"{path}:{line}: cupy.{dotted} takes no keyword {k.arg}= "
                                 f"(it takes {', '.join(sorted(taken)) or 'none'})")
    methods = {n for n in dir(cupy.ndarray) if not n.startswith("_")}
    for method, keywords, line in method_calls(tree, methods):
        taken = keywords_taken(cupy, getattr(cupy.ndarray, method))
        for k in keywords:
            if taken is not None and k not in taken and (path, method, k) not in HOST_ONLY:
                found.append(f"{path}:{line}: cupy.ndarray.{method} takes no keyword {k}= "
                             f"(it takes {', '.join(sorted(taken)) or 'none'})")
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_what_reaches_cupy_exists_in_cupy(path):
    cupy = _cupy()
    relative = str(path.relative_to(ROOT))
    assert problems(cupy, path.read_text(), relative) == []


def test_every_module_use_is_seen():
    """The reader finds the uses it is there for, so an empty answer above means something."""
    _cupy()
    seen = {(kind, dotted) for path in sources()
            for kind, dotted, _, _ in module_uses(ast.parse(path.read_text()))}
    for expected in [("either", "lib.stride_tricks.as_strided"), ("either", "zeros_like"),
                     ("cupy", "cuda.Stream"), ("cupy", "take"), ("cupy", "cuda.runtime.getDevice"),
                     ("either", "multiply"), ("cupy", "RawKernel")]:
        assert expected in seen


def test_the_checker_sees_what_cupy_lacks():
    """Each of these passes every CPU test and fails on a GPU."""
    cupy = _cupy()
    source = "\n".join([
        "def f(x, m, get_array_module, device):",
        "    xp = get_array_module(x)",
        "    xp.sliding_window_viewz(x, 3)",                              # no such name
        "    with xp.errstate(over='ignore'):",                           # numpy only
        "        pass",
        "    xp.lib.stride_tricks.as_strided(x, (2, 2), (8, 8), writeable=False)",  # numpy only
        "    xp.multiply(x, 2, where=m)",                                 # ufuncs: no where=
        "    x.max(axis=0, initial=0)",                                   # method: no initial=
        "    get_array_module(x).put_along_axis(x, m, 0, axis=1)",        # fine
        "    device.xp.cuda.Stream(non_blocking=True)",                   # cupy only: numpy lacks
        "    x.astype(np.float32, copy=False)",                           # fine
    ])
    assert sorted(problems(cupy, source, "fake.py")) == sorted([
        "fake.py:3: cupy has no sliding_window_viewz",
        "fake.py:4: cupy has no errstate",
        "fake.py:6: cupy.lib.stride_tricks.as_strided takes no keyword writeable= (it takes "
        "shape, strides, x)",
        "fake.py:7: cupy.multiply takes no keyword where= (it takes casting, dtype, out)",
        "fake.py:10: numpy has no cuda.Stream, and xp may be numpy",
        "fake.py:8: cupy.ndarray.max takes no keyword initial= (it takes axis, keepdims, out)",
    ])


def test_cupys_embedded_signatures_are_read():
    """Array methods are Cython functions without inspect.signature; their keywords come from
    the signature line CuPy's build writes into each docstring. If that stops, say so."""
    cupy = _cupy()
    assert {"dtype", "order", "casting", "subok", "copy"} <= keywords_taken(cupy, cupy.ndarray.astype)
    assert keywords_taken(cupy, cupy.ndarray.copy) == {"order"}
    assert keywords_taken(cupy, cupy.ndarray.set) == {"arr", "stream"}
