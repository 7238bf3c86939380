"""The house has one direction: each module imports only from the layers below it.

    backend -> kernels -> functional -> layers, losses -> dropout, norm -> conv -> optim -> data
    -> graph -> trainer -> tools (gradcheck) -> bench, train.py

Read from the source with ast (imports inside functions count too), so a new import that runs
back up, or closes a circle, fails here before anyone has to draw the house.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpunet"

LAYERS = [
    {"gpunet.backend"},
    {"gpunet.kernels"},
    {"gpunet.functional"},
    {"gpunet.layers", "gpunet.losses"},
    {"gpunet.dropout", "gpunet.norm"},  # layers built on gpunet.layers
    {"gpunet.conv"},  # its small_cnn takes Dropout
    {"gpunet.optim"},
    {"gpunet.datasets", "gpunet.checkpoint", "gpunet.distributed"},
    {"gpunet.graph"},
    {"gpunet.trainer"},
    {"gpunet.gradcheck"},
    {"gpunet.bench", "train"},
]
# Modules that may import each other inside their layer: the parts of one package.
PACKAGES = {"gpunet.kernels", "gpunet.bench"}
CUDA_MODULES = {"gpunet.backend", "gpunet.kernels"}  # the only ones that may import cupy


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set:
    """Every module ``path`` (module ``name``) imports, as dotted names, relative ones resolved."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # submodules
    return found


def layer_of(name: str):
    """The index of the layer holding module ``name`` (a submodule belongs to its package's)."""
    for index, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    return None


def sources():
    files = sorted(PACKAGE.rglob("*.py")) + [ROOT / "train.py"]
    return [f for f in files if f.name != "__init__.py" or f.parent != PACKAGE]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    name = module_name(path)
    own = layer_of(name)
    assert own is not None, f"{name} has no place in LAYERS: say where it belongs"
    for target in imports(path):
        if not (target == "gpunet" or target.startswith("gpunet.")):
            continue
        theirs = layer_of(target)
        if theirs is None:
            continue  # a name imported from a module (from .x import y), not a module
        same_package = any(name.startswith(p) and target.startswith(p) for p in PACKAGES)
        assert theirs < own or same_package, (
            f"{name} (layer {own}) imports {target} (layer {theirs}): imports must run down")


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_backend_and_kernels_import_cupy(path):
    name = module_name(path)
    if any(name == m or name.startswith(m + ".") for m in CUDA_MODULES):
        return
    found = {t for t in imports(path) | dynamic_imports(path)
             if t.split(".")[0] in ("cupy", "cupyx", "cupy_backends")}
    assert not found, f"{name} imports {sorted(found)}: only backend.py and kernels/ may"


def dynamic_imports(path: Path) -> set:
    """Modules reached without an import statement: sys.modules["x"], importlib.import_module("x")
    and __import__("x"), with the name written out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
            key = node.slice
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "importlib.import_module", "import_module", "__import__") and node.args:
            key = node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.add(key.value)
    return found


def test_every_module_has_a_layer():
    """A new file must be placed in LAYERS (and the README's Layout) when it is added."""
    missing = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not missing


def test_the_checker_sees_cupy_reached_without_an_import_statement(tmp_path):
    source = tmp_path / "fake.py"
    source.write_text("import importlib, sys\n"
                      "def f():\n    return sys.modules['cupy'], importlib.import_module('cupyx')\n"
                      "def g():\n    return __import__('cupy.cuda'), sys.modules.get('numpy')\n")
    assert dynamic_imports(source) == {"cupy", "cupyx", "cupy.cuda"}


def test_the_checker_sees_a_wrong_import(tmp_path):
    """Relative imports, inside functions too, resolve to the module they name."""
    source = tmp_path / "fake.py"
    source.write_text("def f():\n    from ..optim import SGD\n    from . import blas\n")
    found = imports(source, "gpunet.kernels.fake")
    assert {"gpunet.optim", "gpunet.kernels", "gpunet.kernels.blas"} <= found
    assert layer_of("gpunet.optim") > layer_of("gpunet.kernels.fake")
