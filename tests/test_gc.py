"""`farm gc` on a real SQLite queue and real folders: what goes, what stays, and bad ages."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from farm.catalog.fetch import VERIFIED
from farm.gc import GcError, collect, parse_age
from farm.queue import JobState, SQLiteStore
from tests.queue_runners import make_manifest

DAY = 86400.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _aged(path: Path, seconds_ago: float, now: float) -> Path:
    """Give a folder and everything in it the mtime of `seconds_ago`."""
    t = now - seconds_ago
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (t, t))
    os.utime(path, (t, t))
    return path


def _run(home: Path, job_id: str, seconds_ago: float, now: float) -> Path:
    run = home / "runs" / f"farm-{job_id}"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    return _aged(run, seconds_ago, now)


def test_gc_removes_by_age_and_keeps_active_jobs(farm_home, tmp_path):
    now = time.time()
    clock = Clock(now - 30 * DAY)
    store = SQLiteStore(farm_home / "queue.db", clock=clock)
    ids = {name: store.submit(make_manifest("acme", name)).job_id for name in
           ("old-ok", "old-failed", "new-ok", "running", "queued")}
    # old-ok and old-failed end 10 days ago, new-ok 1 day ago; running is running; queued waits.
    clock.t = now - 10 * DAY
    for name in ("old-ok", "old-failed"):
        job = store.claim_next("s1", lease_ttl=10 * DAY)
        assert job is not None and job.id == ids[name]
        if name == "old-ok":
            store.succeed(job.id, job.lease_id, adapter_ref="acme/old-ok@v1")
        else:
            store.fail_attempt(job.id, job.lease_id, "boom", retryable=False)
    clock.t = now - 1 * DAY
    job = store.claim_next("s1", lease_ttl=10 * DAY)
    assert job is not None and job.id == ids["new-ok"]
    store.succeed(job.id, job.lease_id, adapter_ref="acme/new-ok@v1")
    running = store.claim_next("s1", lease_ttl=100 * DAY)
    assert running is not None and running.id == ids["running"]
    assert store.get(ids["queued"]).state is JobState.QUEUED
    store.close()

    # Every run's files are 20 days old: the queue's end time decides for known jobs, not the files.
    runs = {name: _run(farm_home, ids[name], 20 * DAY, now) for name in ids}
    unknown_old = _run(farm_home, "foreground-old", 9 * DAY, now)
    unknown_new = _run(farm_home, "foreground-new", 2 * DAY, now)
    not_a_run = farm_home / "runs" / "notes"
    not_a_run.mkdir()
    _aged(not_a_run, 30 * DAY, now)

    temp = tmp_path / "tmp"
    stale_ckpt = _aged(_mkfile(temp / "farm-ckpt-abc" / "state.pt"), 8 * DAY, now)
    fresh_ckpt = _aged(_mkfile(temp / "farm-ckpt-def" / "state.pt"), 1 * DAY, now)
    other_tmp = _aged(_mkfile(temp / "something-else" / "f"), 30 * DAY, now)

    cache = farm_home / "cache" / "adapters" / "acme" / "chat"
    unused = _aged(_mkfile(cache / "v1-aaaaaaaaaaaa" / VERIFIED), 9 * DAY, now)
    used = _aged(_mkfile(cache / "v2-bbbbbbbbbbbb" / VERIFIED), 9 * DAY, now)
    os.utime(used / VERIFIED, (now - 3600, now - 3600))  # a cache hit an hour ago (fetch touches it)
    partial = _aged(_mkfile(cache / ".v3-cccccccccccc.partial-1234" / "adapter_model.safetensors"), 8 * DAY, now)
    catalog = _aged(_mkfile(farm_home / "catalog" / "acme" / "chat" / "v1" / "farm.json"), 90 * DAY, now)

    dry = collect(7 * DAY, dry_run=True, now=now, temp_root=temp)
    gone = {Path(i.path) for i in dry.removed}
    assert gone == {runs["old-ok"], runs["old-failed"], unknown_old, stale_ckpt, unused, partial}
    assert all(p.exists() for p in gone), "dry run removes nothing"
    why = {Path(i.path): i.why for i in dry.removed + dry.kept}
    assert why[runs["old-ok"]] == f"job {ids['old-ok']} succeeded 10.0 d ago"
    assert why[runs["running"]] == f"job {ids['running']} is running"
    assert why[runs["queued"]] == f"job {ids['queued']} is queued"
    assert why[unknown_old] == "no job foreground-old in the queue; nothing changed for 9.0 d"
    assert sum(i.bytes for i in dry.removed if i.kind == "run") == 3000

    report = collect(7 * DAY, now=now, temp_root=temp)
    assert {Path(i.path) for i in report.removed} == gone and not report.errors
    assert not any(p.exists() for p in gone)
    for kept in (runs["new-ok"], runs["running"], runs["queued"], unknown_new, not_a_run, fresh_ckpt,
                 other_tmp, used, catalog):
        assert kept.exists(), kept
    assert collect(7 * DAY, now=now, temp_root=temp).removed == []


def test_gc_judges_packs_by_their_jobs(farm_home, tmp_path):
    """A pack's run `farm-pack-<id>` stays while any job of the pack is active and goes AGE after its
    last job ended; a packed job's own checkpoints `farm-pack-jobs/<job id>` go by that job alone."""
    now = time.time()
    clock = Clock(now - 30 * DAY)
    store = SQLiteStore(farm_home / "queue.db", clock=clock)
    ids = {name: store.submit(make_manifest("acme", name)).job_id for name in ("p1", "p2", "q1", "q2")}
    leases = {}
    for name, pack in (("p1", "aaaaaaaaaa"), ("p2", "aaaaaaaaaa"), ("q1", "bbbbbbbbbb"), ("q2", "bbbbbbbbbb")):
        job = store.claim_next("s1", lease_ttl=100 * DAY)
        assert job is not None and job.id == ids[name]
        assert store.set_pack(job.id, job.lease_id, pack, f"joined pack {pack}")
        leases[name] = job.lease_id
    for name, ended in (("p1", 10 * DAY), ("p2", 9 * DAY), ("q1", 10 * DAY)):  # q2 still runs
        clock.t = now - ended
        assert store.succeed(ids[name], leases[name], adapter_ref=f"acme/{name}@v1") is not None
    store.close()

    runs = farm_home / "runs"

    def folder(rel: str) -> Path:
        return _aged(_mkfile(runs / rel / "ckpt-2" / "adapter_model.safetensors").parent, 20 * DAY, now)

    pack_a, pack_b, pack_c = (folder(f"farm-pack-{p}") for p in ("aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"))
    per_job = {name: folder(f"farm-pack-jobs/{ids[name]}") for name in ids}
    temp = tmp_path / "tmp"
    stale = _aged(_mkfile(temp / "farm-packckpt-x1" / "trainer_state.pt"), 8 * DAY, now)

    report = collect(7 * DAY, now=now, temp_root=temp)
    assert not report.errors
    why = {Path(i.path): i.why for i in report.removed}
    assert why == {
        pack_a: f"job {ids['p2']} succeeded 9.0 d ago",  # the pack's last job to end
        pack_c: "no job of pack cccccccccc in the queue; nothing changed for 20.0 d",
        per_job["p1"]: f"job {ids['p1']} succeeded 10.0 d ago",
        per_job["p2"]: f"job {ids['p2']} succeeded 9.0 d ago",
        per_job["q1"]: f"job {ids['q1']} succeeded 10.0 d ago",
        stale: "nothing changed for 8.0 d",  # a killed pack worker's local checkpoint folder
    }
    kept = {Path(i.path): i.why for i in report.kept}
    assert kept[pack_b] == f"job {ids['q2']} is running"  # q1 ended long ago, q2 still trains
    assert kept[per_job["q2"]] == f"job {ids['q2']} is running"
    assert pack_b.exists() and per_job["q2"].exists() and (runs / "farm-pack-jobs").is_dir()
    assert not any(p.exists() for p in why)


def _mkfile(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"y" * 10)
    return path.parent


def test_gc_without_a_queue_database_creates_none(farm_home, tmp_path):
    now = time.time()
    run = _run(farm_home, "lonely", 8 * DAY, now)
    report = collect(7 * DAY, now=now, temp_root=tmp_path)
    assert [Path(i.path) for i in report.removed] == [run] and not run.exists()
    assert not (farm_home / "queue.db").exists()


@pytest.mark.parametrize("text,seconds", [("7d", 7 * DAY), ("12h", 43200), ("90m", 5400), ("2w", 14 * DAY),
                                          ("1.5d", 1.5 * DAY), ("30s", 30)])
def test_parse_age(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["7", "7x", "d", "-1d", "0d", "", "7 days"])
def test_bad_ages_say_what_is_allowed(text):
    with pytest.raises(GcError) as info:
        parse_age(text)
    assert str(info.value).startswith(f"--older-than {text!r} ")
    assert "90m, 12h, 7d, 2w" in str(info.value)


def test_cli_gc_dry_run_json_and_bad_age(farm_home, tmp_path):
    from farm.cli import app

    now = time.time()
    run = _run(farm_home, "cli-old", 8 * DAY, now)
    out = CliRunner().invoke(app, ["gc", "--older-than", "7d", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["dry_run"] is True and [i["path"] for i in data["removed"] if i["kind"] == "run"] == [str(run)]
    assert run.exists()
    bad = CliRunner().invoke(app, ["gc", "--older-than", "soon"])
    assert bad.exit_code != 0 and isinstance(bad.exception, GcError)


@pytest.mark.s3
def test_gc_on_s3_run_storage(farm_home, s3_env, monkeypatch, tmp_path):
    """Run storage on S3: an ended job's run goes by the queue's end time; a fresh unknown run stays."""
    import fsspec

    from farm.settings import storage_options

    storage = f"{s3_env}/runs"
    monkeypatch.setenv("FARM_STORAGE", storage)
    now = time.time()
    clock = Clock(now - 10 * DAY)
    store = SQLiteStore(farm_home / "queue.db", clock=clock)
    job_id = store.submit(make_manifest("acme", "s3-old")).job_id
    job = store.claim_next("s1", lease_ttl=DAY)
    store.succeed(job.id, job.lease_id, adapter_ref="acme/s3-old@v1")
    store.close()
    fs, _ = fsspec.core.url_to_fs(storage, **storage_options(storage))
    for name in (f"farm-{job_id}", "farm-foreground-new"):
        fs.pipe(f"{storage}/{name}/checkpoint_000001/adapter_model.safetensors", b"z" * 500)

    report = collect(7 * DAY, now=now, temp_root=tmp_path)
    assert [(i.path, i.bytes) for i in report.removed] == [(f"{storage}/farm-{job_id}", 500)]
    assert [i.path for i in report.kept if i.kind == "run"] == [f"{storage}/farm-foreground-new"]
    fs.invalidate_cache()
    assert not fs.exists(f"{storage}/farm-{job_id}/checkpoint_000001/adapter_model.safetensors")
    assert fs.exists(f"{storage}/farm-foreground-new/checkpoint_000001/adapter_model.safetensors")
