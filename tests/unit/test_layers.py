"""Every import points down the layers: pipeline/ (data side) imports neither actors/ nor jobs/,
actors/ (model side) does not import jobs/ (entrypoints)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"pipeline": ("actors", "jobs"), "actors": ("jobs",)}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_only_point_down():
    wrong = []
    for layer, banned in FORBIDDEN.items():
        files = sorted((ROOT / layer).rglob("*.py"))
        assert files, layer
        for path in files:
            hits = _imports(path) & set(banned)
            if hits:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not wrong, wrong


def test_the_check_would_catch_an_upward_import(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from actors.predictor import Predictor\n")
    assert "actors" in _imports(sample)
