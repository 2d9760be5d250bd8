"""Shared fixtures. One local Ray cluster per test session (Ray start-up costs ~8 s here); tiny
models built from config once per session; every test gets its own FARM_HOME."""

from __future__ import annotations

import os

import pytest

# Fixture modules, one owner each: ray (cluster), models (tiny base models), s3 (SeaweedFS).
pytest_plugins = ["tests.fixtures.ray", "tests.fixtures.models", "tests.fixtures.s3"]

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def farm_home(tmp_path, monkeypatch):
    """An isolated FARM_HOME (catalog, runs, queue) for one test."""
    home = tmp_path / "farm_home"
    home.mkdir()
    monkeypatch.setenv("FARM_HOME", str(home))
    monkeypatch.delenv("FARM_CATALOG", raising=False)
    monkeypatch.delenv("FARM_STORAGE", raising=False)
    monkeypatch.delenv("FARM_QUEUE_DB", raising=False)
    return home


@pytest.fixture(scope="module")
def module_farm_home(tmp_path_factory):
    """An isolated FARM_HOME shared by one module's tests (for module-scoped farms and Serve apps);
    set through a MonkeyPatch, so it is undone when the module ends."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("farm_home")
        mp.setenv("FARM_HOME", str(home))
        for name in ("FARM_CATALOG", "FARM_STORAGE", "FARM_QUEUE_DB"):
            mp.delenv(name, raising=False)
        yield home
