"""docs/manifest.md is generated from the manifest schema and must match it exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from farm.docs_manifest import render
from farm.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_md_matches_schema():
    current = (ROOT / "docs" / "manifest.md").read_text(encoding="utf-8")
    assert current == render(), "docs/manifest.md is stale: run `python -m farm.docs_manifest > docs/manifest.md`"


def test_every_field_documented():
    text = render()
    for name, info in Manifest.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        paths = [f"{name}.{s}" for s in sub] if sub else [name]
        for path in paths:
            assert f"| `{path}` |" in text, path
            field = Manifest.model_fields[name] if not sub else sub[path.split(".", 1)[1]]
            assert field.description, f"{path} has no docstring in farm/manifest.py"


def test_generator_is_light():
    """Like `farm validate`, the generator imports no torch, ray or transformers."""
    code = ("import sys, farm.docs_manifest as d; d.render(); "
            "print(','.join(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_readme_lists_every_environment_variable_the_farm_reads():
    """README's configuration table names every FARM_* (and the Ray Train) variable farm/ reads."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = {m for line in readme.splitlines() if line.startswith("| `") for m in re.findall(r"`([A-Z_]+)`", line)}
    read = set()
    for path in (ROOT / "farm").rglob("*.py"):
        read |= set(re.findall(r"[\"']((?:FARM|RAY_TRAIN)_[A-Z_]+)[\"']", path.read_text(encoding="utf-8")))
    assert read, "found no environment variables in farm/: the pattern is wrong"
    assert sorted(read - table) == []
