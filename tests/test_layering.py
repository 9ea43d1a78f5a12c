"""dlopt's sub-packages are layers: a module imports only from its own layer or the layers below it.

    cli -> api -> workflows | llm -> compression | deploy | onnx_backend -> flow -> report -> device -> measure
        -> targets | calibration -> passes -> core

Layers on one rank (``compression | deploy``) do not import each other; workflows (user journeys of several
steps: sweeps, tuning, verify/bench, load tests and the batching tuner) build on them.  Every import
counts, the ones inside functions too: a lazy import hides a dependency, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"optimizer": "dlopt", "passes": "dlopt.passes", "targets": "dlopt.targets", "calibration": "dlopt.calibration"}
RANK = {"core": 0, "passes": 1, "targets": 2, "calibration": 2, "measure": 3, "device": 4, "report": 5, "flow": 6,
        "compression": 7, "deploy": 7, "onnx_backend": 7, "workflows": 8, "llm": 8, "api": 9, "cli": 10}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> str | None:
    """The layer of a dlopt module; None for the package itself (``__version__`` and the lazy API)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported(path: Path, known: dict[str, Path]):
    """(line, dlopt module) for every import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("dlopt"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield node.lineno, full if full in known else node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("dlopt"))


def violations() -> list[str]:
    known = modules()
    found = []
    for module, path in known.items():
        here = layer(module)
        if here is None:
            continue
        for line, target in imported(path, known):
            there = layer(target)
            if there is None or there == here:
                continue
            if there not in RANK:
                found.append(f"{path.relative_to(ROOT)}:{line}: {target} is in no layer (add it to RANK)")
            elif RANK[there] >= RANK[here]:
                found.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} ({there}, "
                             f"{'the same rank' if RANK[there] == RANK[here] else 'above it'})")
    return found


def test_every_module_is_in_a_layer():
    stray = sorted({layer(m) for m in modules()} - set(RANK) - {None})
    assert stray == [], f"sub-packages with no place in the layering: {stray}"


def test_no_import_runs_against_the_layering():
    found = violations()
    assert found == [], "imports against the layering:\n" + "\n".join(found)


def test_a_wrong_import_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: a core module that imports the flow is reported, with its line."""
    planted = ROOT / "optimizer" / "core" / "errors.py"
    text = planted.read_text() + "\n\ndef _upward():\n    from dlopt.flow import driver  # noqa: F401\n"
    real_read = Path.read_text

    def read_text(self, *args, **kwargs):
        return text if self == planted else real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    line = text.count("\n")
    assert violations() == [f"optimizer/core/errors.py:{line}: core imports dlopt.flow.driver (flow, above it)"]


@pytest.mark.parametrize("name", ["compile", "compress", "load", "prune", "distill", "export"])
def test_no_module_shadows_the_public_api(name):
    """``import dlopt.X`` would replace the function ``dlopt.X`` with a module."""
    assert f"dlopt.{name}" not in modules()
