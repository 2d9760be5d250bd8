"""`farm submit/jobs/status/logs/cancel/retry/up/down`. Commands that only touch the queue run
without Ray; submit/--wait run on the shared Ray cluster; one test drives `farm up`/`farm down` as
subprocesses with their own Ray head, FARM_HOME and ports, and checks that down stops only that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from farm.cli import app
from farm.errors import JobNotFound, QueueError
from farm.queue import JobState, SQLiteStore
from tests.queue_runners import make_manifest
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
FARM = str(Path(sys.executable).with_name("farm"))
runner = CliRunner()


def write_manifest(tmp_path: Path, name: str = "job.yaml", **over) -> Path:
    train = tmp_path / "train.jsonl"  # submit checks that the data exists (farm.preflight)
    train.write_text('{"text": "hello"}\n')
    data = {"customer": "acme", "adapter": "chat", "base_model": "tiny/llama",
            "dataset": {"train": str(train)}, "training": {"max_steps": 3, "seed": 10}, **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_invalid_manifest_enqueues_nothing(farm_home, tmp_path):
    good = write_manifest(tmp_path, "good.yaml")
    bad = write_manifest(tmp_path, "bad.yaml", customer="Bad Name!", trainig={"max_steps": 1})
    result = runner.invoke(app, ["submit", str(good), str(bad)])
    assert result.exit_code == 1
    assert "customer: must be 1-63 characters" in result.output
    assert "unknown key 'trainig'; did you mean 'training'?" in result.output
    assert "nothing queued: 1 invalid manifest" in result.output
    assert SQLiteStore(farm_home / "queue.db").list() == []
    assert not (farm_home / "cluster.json").exists()  # and no farm was started for it


def test_queue_commands_without_ray(farm_home):
    store = SQLiteStore(farm_home / "queue.db")
    first = store.submit(make_manifest("acme", "x")).job_id
    second = store.submit(make_manifest("beta", "y", priority=5)).job_id
    out = runner.invoke(app, ["jobs", "--json"])
    rows = {r["id"]: r for r in json.loads(out.output)}
    assert rows[second]["queue_position"] == 1 and rows[first]["queue_position"] == 2
    assert "manifest" not in rows[first]
    table = runner.invoke(app, ["jobs", "--customer", "beta"]).output
    assert second in table and first not in table
    status = json.loads(runner.invoke(app, ["status", first, "--json"]).output)
    assert status["state"] == "queued" and status["ray_task_name"] == f"farm-{first}"
    assert status["manifest"]["customer"] == "acme" and status["events"][0]["to_state"] == "queued"
    assert "cancelled" in runner.invoke(app, ["cancel", first]).output
    assert store.get(first).state is JobState.CANCELLED
    assert "queued" in runner.invoke(app, ["retry", first]).output
    assert store.get(first).state is JobState.QUEUED
    assert "has no log yet" in runner.invoke(app, ["logs", first]).output
    assert isinstance(runner.invoke(app, ["status", "nope"]).exception, JobNotFound)
    bad_state = runner.invoke(app, ["jobs", "--state", "done"])
    assert isinstance(bad_state.exception, QueueError) and "allowed: queued, running" in str(bad_state.exception)
    assert isinstance(runner.invoke(app, ["retry", second]).exception, QueueError)


def test_farm_status_without_a_job_shows_each_customers_jobs_and_tinker_cost(farm_home):
    from farm.queue.usage import UsageRow

    store = SQLiteStore(farm_home / "queue.db")
    assert runner.invoke(app, ["status"]).output.splitlines() == ["jobs: none", "no usage yet"]
    store.submit(make_manifest("acme", "x"))
    store.add_usage([UsageRow("acme", 3600, "training", 27, 1.25), UsageRow("globex", 3600, "sampling_sample", 12)])
    out = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert out["jobs"]["queued"] == 1 and set(out["customers"]) == {"acme", "globex"}
    acme = out["customers"]["acme"]
    assert (acme["jobs"], acme["tinker_training_tokens"], acme["accelerator_seconds"]) == (1, 27, 1.25)
    table = runner.invoke(app, ["status", "--customer", "globex"]).output
    assert "jobs: 1 queued" in table and "globex" in table and "acme" not in table and "0 / 12" in table
    mixed = runner.invoke(app, ["status", "acme-0000", "--customer", "acme"])
    assert mixed.exit_code == 2 and "--customer goes without a job id" in mixed.output


def test_errors_print_one_line_not_a_traceback(farm_home):
    env = {**os.environ, "FARM_HOME": str(farm_home)}
    proc = subprocess.run([FARM, "cancel", "acme-0000"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no job with id 'acme-0000' (list jobs with `farm jobs`)"
    assert "Traceback" not in proc.stderr


@pytest.fixture
def scheduler_env(ray_address, farm_home, monkeypatch):
    """`farm submit` against the shared cluster with its own scheduler actor running test runners."""
    import ray

    name = f"cli-sched-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("FARM_SCHEDULER", name)
    monkeypatch.setenv("FARM_RAY_NAMESPACE", "farm-tests")
    monkeypatch.setenv("FARM_RUNNER", "tests.queue_runners:record")
    yield farm_home
    try:
        ray.kill(ray.get_actor(name, namespace="farm-tests"), no_restart=True)
    except ValueError:
        pass


@pytest.mark.ray
def test_submit_duplicate_then_wait(scheduler_env, tmp_path):
    path = write_manifest(tmp_path)
    first = runner.invoke(app, ["submit", str(path), "--json"])
    assert first.exit_code == 0, first.output
    (job,) = json.loads(first.stdout)
    again = runner.invoke(app, ["submit", str(path), "--json", "--wait"])
    assert again.exit_code == 0, again.output
    (final,) = json.loads(again.stdout)
    assert final["id"] == job["id"] and final["state"] == "succeeded"
    assert final["adapter_ref"] == "acme/chat@v1"
    forced = runner.invoke(app, ["submit", str(path), "--force"])
    assert forced.exit_code == 0 and job["id"] not in forced.output
    log = runner.invoke(app, ["logs", job["id"]]).output
    assert "attempt 1 started" in log and "step 3/3" in log and "succeeded" in log


@pytest.mark.ray
def test_fresh_farm_survives_down_and_up_mid_job(tmp_path, farm_home):
    """A fresh FARM_HOME, no RAY_ADDRESS: `farm submit` starts its own Ray head; `farm down` with a job
    running stops exactly that head's processes; the next `farm submit --wait` of the same manifest
    starts a farm again, returns the same job, which resumes and publishes once."""
    from farm.cluster import _pid_alive, _processes_under
    from tests.queue_runners import read_trace

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FARM_HOME=str(farm_home), FARM_RUNNER="tests.queue_runners:record")
    # 150 steps of 0.1 s: long enough that the job is still running when `farm down` returns on a busy box.
    path = write_manifest(tmp_path, training={"max_steps": 150, "seed": 100})

    def farm(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
        return subprocess.run([FARM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)

    heads = []
    try:
        first = farm("submit", str(path))
        assert first.returncode == 0, first.stdout + first.stderr
        assert "no farm running: starting one" in first.stdout
        assert "farm started: Ray at 127.0.0.1:" in first.stdout and "dashboard http://127.0.0.1:" in first.stdout
        job_id = first.stdout.split("farm started")[1].splitlines()[1].split()[0]
        heads.append(json.loads((farm_home / "cluster.json").read_text()))
        store = SQLiteStore(farm_home / "queue.db")
        wait_for(lambda: store.get(job_id).progress.get("step", 0) >= 3, timeout=60, what="step 3 of the job")
        assert store.get(job_id).state is JobState.RUNNING
        down = farm("down")
        assert down.returncode == 0 and "stopped the local Ray head" in down.stdout, down.stdout + down.stderr
        assert store.get(job_id).state is JobState.RUNNING  # the record survives; its lease will lapse

        again = farm("submit", str(path), "--wait")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "no farm running: starting one" in again.stdout
        assert f"{job_id}  running" in again.stdout and "identical job already active" in again.stdout
        heads.append(json.loads((farm_home / "cluster.json").read_text()))
        job = store.get(job_id)
        assert job.state is JobState.SUCCEEDED and job.adapter_ref == "acme/chat@v1"
        assert read_trace(farm_home, "start.log") == [job_id, job_id]  # interrupted, then resumed
        assert read_trace(farm_home, "publish.log") == [job_id]  # published once
        up = farm("up")
        assert up.returncode == 0 and "farm running" in up.stdout  # idempotent
    finally:
        down = farm("down")
    assert down.returncode == 0, down.stderr
    assert not (farm_home / "cluster.json").exists()
    for head in heads:
        assert not _pid_alive(head["pid"]) and _processes_under(head["temp_dir"]) == []
    import ray

    if ray.is_initialized():  # the shared test cluster of this session is untouched
        assert ray.cluster_resources().get("CPU")


def test_pack_max_from_the_command_line_wins_over_the_environment(monkeypatch):
    from farm import cluster
    from farm.errors import ClusterError

    monkeypatch.setenv("FARM_PACK_MAX", "5")
    assert cluster.scheduler_config().pack_max == 5
    assert cluster.scheduler_config(pack_max=2).pack_max == 2  # `farm up --pack-max 2`
    assert "FARM_PACK_MAX" in os.environ and os.environ["FARM_PACK_MAX"] == "5"  # nothing written back
    monkeypatch.delenv("FARM_PACK_MAX")
    assert cluster.scheduler_config().pack_max is None  # derived by the scheduler (4 on CPU)
    monkeypatch.setenv("FARM_PACK_MAX", "zero")
    with pytest.raises(ClusterError, match="FARM_PACK_MAX='zero': must be a whole number"):
        cluster.scheduler_config()
