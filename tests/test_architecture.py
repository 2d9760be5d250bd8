"""The layer contract of pyproject.toml (checked by `make lint`) covers every module of farm, and
docs/architecture.md lists the same layers."""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import farm

REPO = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_every_farm_module_has_a_layer_so_lint_imports_checks_it():
    named = {part.strip() for layer in _layers() for part in re.split(r"[|:]", layer)}
    modules = {f"farm.{m.name}" for m in pkgutil.iter_modules(farm.__path__)}
    missing = sorted(modules - named)
    assert not missing, f"give these modules a layer in pyproject.toml and docs/architecture.md: {missing}"
    assert not named - modules, f"layers name modules that do not exist: {sorted(named - modules)}"


def test_architecture_doc_lists_the_layers_of_the_contract():
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Import direction", 1)[1]
    block = section.split("```", 2)[1]
    assert block.strip().splitlines() == _layers()
