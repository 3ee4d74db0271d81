"""The package's layers: everything outside mult.launch imports without Ray, imports point down
the layers, and no product file grows past one concept."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mult

REPO = Path(__file__).resolve().parents[1]
# Lower layers first; a module may import from its own layer and the ones before it.
LAYERS = ("core", "model", "data", "training", "experiments", "launch")
CORE = {"mult", "mult.config", "mult.tasks", "mult.encodings", "mult.drawing", "mult.losses", "mult.accumulators",
        "mult.weighting", "mult.metrics", "mult.outputs"}


def _layer(module: str) -> str:
    if module in CORE:
        return "core"
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer; add it to CORE or a subpackage")
    return part


def _modules() -> list[str]:
    names = ["mult"] + [m.name for m in pkgutil.walk_packages(mult.__path__, "mult.")]
    return sorted(names)


def _ours(name: str) -> bool:
    return name == "mult" or name.startswith("mult.")


def _imports(module: str) -> set[str]:
    """Every ``mult.*`` module that ``module`` imports, at the top or inside functions."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if _ours(a.name))
    return out


def test_every_module_outside_launch_imports_with_ray_blocked() -> None:
    """A fresh interpreter where ``import ray`` fails: every module but mult.launch.* imports."""
    modules = [m for m in _modules() if not m.startswith("mult.launch")]
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


def test_the_blocker_really_blocks_ray() -> None:
    """The check above can fail: a module of mult.launch does need Ray."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mult.launch.tune\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ray is blocked" in result.stderr


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down_the_layers(module: str) -> None:
    own = LAYERS.index(_layer(module))
    upward = sorted(m for m in _imports(module) if LAYERS.index(_layer(m)) > own)
    assert not upward, f"{module} ({LAYERS[own]}) imports from higher layers: {upward}"


def test_entry_points_import_the_library_not_each_other() -> None:
    for path in sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("pipelines", "bench"), f"{path.name} imports {name}"


def test_files_stay_small() -> None:
    """Product modules under 500 lines; entry points under 200 (they parse, load and call)."""
    for path in sorted((REPO / "mult").rglob("*.py")):
        assert len(path.read_text().splitlines()) <= 500, path
    for path in sorted((REPO / "pipelines").glob("*.py")):
        assert len(path.read_text().splitlines()) < 200, path
