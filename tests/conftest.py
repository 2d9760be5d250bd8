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


# `make test` runs two pytest-xdist workers with --dist loadgroup; each worker has its own Ray cluster
# and SeaweedFS. A module is one group (its module-scoped farms and Serve apps are built once); the
# vLLM modules share one, so two vLLM engines never run at once. Groups go out longest first (the
# longest-processing-time rule), from the --durations report of a serial run: the last one started
# should be short.
_SAME_GROUP = {"test_serve_vllm_bounds": "test_serve_vllm"}
_LONGEST_FIRST = [
    "test_multinode", "test_train", "test_pack_e2e", "test_publish_gate", "test_serve_load", "test_serve_vllm",
    "test_cli_jobs", "test_finetune_e2e", "test_scheduler_e2e", "test_s3_e2e", "test_serve_api", "test_locked_doors",
    "test_autoscale", "test_scheduler",
]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    def module(item) -> str:
        return item.path.stem

    def group(item) -> str:
        return _SAME_GROUP.get(module(item), module(item))

    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(group(it), len(rank)))  # stable: a module's own order is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
