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
# Every Ray the suite starts (the session clusters, `farm up`, `ray start` nodes) inherits this: Ray's
# raylet otherwise boots num_cpus idle workers when the first driver connects, 10-25 s of CPU per
# cluster on a 2-core box, for workers the tests mostly never use (each test's actors get their own).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# Two xdist workers, their Ray clusters' training workers, Serve replicas and vLLM share 2 cores: one torch
# thread per process. A CPU training worker otherwise takes every core (farm.settings), and two 2-thread
# processes on 2 cores step the tiny models ~3x slower than two 1-thread ones (OpenMP threads fighting).
os.environ.setdefault("FARM_TRAIN_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# `make test` runs two pytest-xdist workers (--dist loadgroup --no-loadscope-reorder); each has its own
# Ray cluster and SeaweedFS. The tests of a module that use a module-scoped fixture (a Serve app, a farm,
# a vLLM engine) form one group, so the fixture is built once, on one worker; every other test is a group
# of its own, so a module of independent Ray Train runs spreads over both workers. The vLLM modules share
# one group: two vLLM engines never run at once. Groups go out longest first (the longest-processing-time
# rule) by the seconds below, from the --durations report of a `make test` run; unlisted groups are short.
_SAME_GROUP = {"test_serve_vllm_bounds": "test_serve_vllm"}
_SECONDS = {  # from `make test PYTEST_ARGS=--durations=0` on 2026-12-07 (one torch thread per process)
    "test_multinode::test_two_nodes_jobs_serving_and_node_loss": 170, "test_finetune_e2e": 150, "test_serve_load": 140, "test_serve_vllm": 135,
    "test_serve_api": 60, "test_tinker_api": 60, "test_locked_doors": 35, "test_tinker_cookbook": 190,
    "test_publish_gate::test_the_gate_refuses_to_move_the_alias_to_a_deliberately_worse_version": 115,
    "test_s3_e2e::test_farm_train_publishes_to_s3_catalog_and_adapters_cli_reads_it": 110,
    "test_train::test_a_killed_worker_resumes_and_early_stopping_publishes_the_best_weights_once": 90,
    "test_pack_e2e::test_a_pack_trains_admits_cancels_survives_a_kill_and_publishes_each_job_once": 90,
    "test_scheduler_e2e::test_customer_x_job_trains_and_publishes_through_the_queue": 85,
    "test_cli_jobs::test_fresh_farm_survives_down_and_up_mid_job": 75,
    "test_train::test_causal_job_publishes_an_adapter_stock_peft_loads": 55,
    "test_publish_gate::test_a_short_job_on_the_real_smollm2_base_passes_the_gate": 50,
    "test_train::test_gpt2_seq_cls_job_trains_and_saves_its_head": 40,
    "test_autoscale::test_queued_job_brings_up_a_training_node_runs_there_and_publishes_once": 30,
    "test_bench_gpu::test_gpu_bench_cpu_smoke": 15,
    "test_scheduler::test_scheduler_killed_mid_job_the_job_finishes_once": 11,
}


def _group(item) -> str:
    module = item.path.stem
    if module in _SAME_GROUP:
        return _SAME_GROUP[module]
    defs = item._fixtureinfo.name2fixturedefs.values()
    if any(d and d[-1].scope == "module" for d in defs):
        return module
    return f"{module}::{item.name}"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {item: _group(item) for item in items}
    modules = {item.path.stem for item in items}
    # A timed group of a collected module that no test has any more (renamed, regrouped) would sort as 0 s.
    if stale := {g for g in _SECONDS if g.split("::")[0] in modules} - set(groups.values()):
        raise pytest.UsageError(f"tests/conftest.py _SECONDS names groups that do not exist: {sorted(stale)}")
    items.sort(key=lambda it: -_SECONDS.get(groups[it], 0))  # stable: the order within a group is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item]))


def pytest_collection_finish(session):
    """On an xdist worker with --dist loadgroup, the groups must have reached xdist (it appends `@group`
    to node ids); pytest 9.2 silently drops that (pytest-xdist#1386) and every module-scoped app is then
    built on both workers."""
    items = session.items
    if getattr(session.config.option, "loadgroup", False) and items and "@" not in items[0].nodeid:
        raise pytest.UsageError("pytest-xdist --dist loadgroup is not grouping tests with this pytest "
                                f"({pytest.__version__}; pytest-xdist#1386): pin pytest<9.2")
