"""farm.autoscale: on a cluster that can grow, queued work asks the Ray autoscaler for `farm_train`
nodes (never more than the work needs or the cluster's max) and withdraws the request as the queue
drains. The end-to-end test runs Ray's fake multi-node autoscaler in its own process
(tests/autoscale_driver.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from farm.autoscale import TrainNodeRequests, slots_from_config, train_slot_limit
from farm.queue import SQLiteStore
from tests.queue_runners import make_manifest

REPO = Path(__file__).resolve().parents[1]


def test_slots_from_cluster_yaml():
    import yaml

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert slots_from_config(cfg) == 8  # farm-train: 0..8 nodes, farm_train: 1 each
    cfg["max_workers"] = 3
    assert slots_from_config(cfg) == 3  # the cluster's global max caps it
    assert slots_from_config({"available_node_types": {"x": {"resources": {"CPU": 4}, "max_workers": 5}}}) == 0


def test_limit_from_the_autoscaling_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_AUTOSCALING_CONFIG", str(tmp_path / "absent.yaml"))
    assert train_slot_limit() is None  # no autoscaler config: the cluster cannot grow
    cfg = tmp_path / "bootstrap.yaml"
    cfg.write_text("max_workers: 4\navailable_node_types:\n  t: {resources: {farm_train: 2}, max_workers: 3}\n")
    monkeypatch.setenv("FARM_AUTOSCALING_CONFIG", str(cfg))
    assert train_slot_limit() == 6


class Recorder:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, *, bundles):
        assert all(b == {"farm_train": 1} for b in bundles)
        self.calls.append(len(bundles))


def test_requests_follow_the_queue_and_respect_the_max(tmp_path):
    store = SQLiteStore(tmp_path / "q.db")
    rec = Recorder()
    grow = TrainNodeRequests(limit=3, request=rec)
    ids = [store.submit(make_manifest("acme", f"a{i}")).job_id for i in range(5)]

    assert grow.update(store, running=0, slots=0) == 3  # 5 wait, the cluster can hold 3
    assert grow.update(store, running=0, slots=0) == 3 and rec.calls == [3]  # unchanged: not re-sent
    for job_id in ids:
        (note,) = [e.reason for e in store.events(job_id) if "training node" in e.reason]
        assert note == "waiting for a training node: asked the autoscaler for 3 farm_train slot(s) (0 up, at most 3)"

    for job_id in ids[:3]:  # three nodes came up, three jobs run, two still wait
        assert store.claim_next("s", lease_ttl=30).id == job_id
    assert grow.update(store, running=3, slots=3) == 3
    for job_id in ids[3:]:
        store.request_cancel(job_id)
    assert grow.update(store, running=3, slots=3) == 0  # nothing waits: withdrawn
    assert rec.calls == [3, 0]


def test_fewer_waiting_jobs_ask_for_fewer_nodes_and_free_slots_ask_for_none(tmp_path):
    store = SQLiteStore(tmp_path / "q.db")
    rec = Recorder()
    grow = TrainNodeRequests(limit=8, request=rec)
    store.submit(make_manifest("acme", "one"))
    assert grow.update(store, running=0, slots=1) == 0  # a free slot: the scheduler starts it itself
    assert grow.update(store, running=1, slots=1) == 2  # one running + one waiting
    assert rec.calls == [2]


def test_a_cluster_that_cannot_grow_is_left_alone(tmp_path):
    store = SQLiteStore(tmp_path / "q.db")
    store.submit(make_manifest("acme", "one"))
    grow = TrainNodeRequests(limit=None, request=lambda **kw: pytest.fail("asked a fixed cluster to grow"))
    assert grow.update(store, running=0, slots=0) == 0
    assert grow.slots(lambda: 7) == 7  # slots counted as before


@pytest.mark.ray
def test_queued_job_brings_up_a_training_node_runs_there_and_publishes_once(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.autoscale_driver", str(home)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["train_nodes_before"] == []
    assert out["request_while_waiting"] == [{"farm_train": 1}]  # one job waits: one node, not the max (2)
    assert out["state"] == "succeeded" and out["adapter_ref"] == "acme/grow@v1"
    assert any(e.startswith("waiting for a training node") for e in out["events"]), out["events"]
    (node,) = out["ran_on"]
    assert node != out["head_node"]  # on the node the autoscaler brought up
    assert len(out["published"]) == 1
    assert out["request_after"] == "empty"  # queue drained: request withdrawn
    assert out["train_nodes_after_drain"] == "none"  # and the idle node scaled down
