"""Files that ship inside the package: demo configs, DeepSpeed JSONs, the demo data set.

A config names them by their path in the source tree (``sparsedoc/prep/demo/train.jsonl``), so
the same YAML works in a checkout and after ``pip install sparsedoc``: a relative path that does
not exist under the working directory but starts with ``sparsedoc/`` is read from the installed
package instead. Nothing else is rewritten; a path that exists is always taken as given.
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.errors import MissingFile

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPE_CONFIGS = PACKAGE_DIR / "recipes" / "configs"
DS_CONFIGS = PACKAGE_DIR / "ds_configs"
DEMO_DATA = PACKAGE_DIR / "prep" / "demo"
# Paths written by sparsedoc 0.1 checkouts (run folders keep them in config.yaml).
LEGACY_PREFIXES = {"data_prep/demo/": "sparsedoc/prep/demo/",
                   "recipes/configs/": "sparsedoc/recipes/configs/",
                   "ds_configs/": "sparsedoc/ds_configs/"}


def resolve_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else the installed copy of a bundled file it names."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    text = p.as_posix()
    for old, new in LEGACY_PREFIXES.items():
        if text.startswith(old):
            text = new + text[len(old):]
    if text.startswith("sparsedoc/"):
        bundled = PACKAGE_DIR.parent / text
        if bundled.exists():
            return bundled
    return p


def _bundled_or_path(name_or_path: str, folder: Path, suffix: str, what: str) -> Path:
    bundled = folder / f"{name_or_path}{suffix}"
    if "/" not in name_or_path and not name_or_path.endswith(suffix) and bundled.is_file():
        return bundled
    p = resolve_path(name_or_path)
    if not p.is_file():
        names = ", ".join(sorted(f.stem for f in folder.glob(f"*{suffix}")))
        raise MissingFile(f"{what} not found: {name_or_path} (bundled names: {names})")
    return p


def ds_config_path(name_or_path: str) -> Path:
    """``--ds zero2`` names a bundled DeepSpeed JSON; anything else is a path."""
    return _bundled_or_path(name_or_path, DS_CONFIGS, ".json", "DeepSpeed config")


def recipe_config_path(name_or_path: str) -> Path:
    """``--config llama3_8b_moe`` names a bundled recipe config; anything else is a path."""
    return _bundled_or_path(name_or_path, RECIPE_CONFIGS, ".yaml", "recipe config")


def is_bundled_demo_file(path: str | Path) -> bool:
    """Whether ``path`` is one of the bundled demo data files (for model cards and licenses)."""
    try:
        return resolve_path(path).resolve().parent == DEMO_DATA
    except OSError:
        return False
