"""The packages' imports point one way: each unit of sparsedoc imports only units of its own
layer or below (docs/architecture.md draws the same house). Function-level imports count too:
a lazy import running back up is still an arrow back up."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sparsedoc"

# bottom to top; a unit is a top-level module or subpackage of sparsedoc
LAYERS = [
    {"errors", "fsio", "resources", "cachedir", "privacy"},
    {"safeload"},
    {"config"},
    {"artifacts", "distributed", "logging"},
    {"moe"},
    {"models"},
    {"data", "prep"},
    {"methods", "checkpoint"},
    {"loader"},
    {"train", "eval"},
    {"export", "generate"},
    {"recipes", "env", "bench"},
    {"sweep", "cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
FACADE = "__init__"  # sparsedoc/__init__.py: the public entry points, above everything


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported sparsedoc unit) for every import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sparsedoc":
                out += [(node.lineno, a.name) for a in node.names if a.name != "__version__"]
            elif node.module.startswith("sparsedoc."):
                out.append((node.lineno, _unit(node.module)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, _unit(a.name)) for a in node.names
                    if a.name.startswith("sparsedoc.")]
    return out


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units - set(LAYER) == set(), "new units need a layer in LAYERS"
    assert set(LAYER) - units == set(), "LAYERS names units that no longer exist"


def test_no_import_runs_back_up():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent)
        src = _unit(".".join(rel.with_suffix("").parts))
        if src == FACADE:
            continue
        for line, dst in _imports(path):
            if dst != src and dst != FACADE and LAYER[dst] > LAYER[src]:
                upward.append(f"{rel}:{line}: {src} (layer {LAYER[src]}) imports {dst} "
                              f"(layer {LAYER[dst]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy import of the training loop from a method is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from sparsedoc.train.loop import train\n    import sparsedoc.eval.runner\n")
    assert _imports(f) == [(2, "train"), (3, "eval")]
