"""`farm gc`: remove what the farm leaves behind once it is older than an age.

Three kinds of leftovers, each with its own rule (docs/operations.md, "Disk and storage clean-up"):

- **Run storage** (`FARM_STORAGE`, local or s3://): the Ray Train run `farm-<job id>` of a job that
  ended (succeeded, failed or cancelled in the queue) longer ago than the age. A run of a queued,
  running or retrying job is never touched. A run the queue does not know (a foreground `farm train`,
  a queue database that was replaced) goes when nothing in it changed for longer than the age.
  A pack's run `farm-pack-<pack id>` is judged by its jobs (kept while any is active, else the age
  counts from the last to end); a packed job's own checkpoints `farm-pack-jobs/<job id>` like that
  job's run.
- **Temporary checkpoint folders** (`farm-ckpt-*`, `farm-publish-*` and a pack worker's
  `farm-packckpt-*`, `farm-packpub-*`, `farm-packresume-*` in this machine's temp dir): Ray
  Train deletes a checkpoint folder once uploaded and publish deletes its own, so what is left is
  from killed workers; removed when nothing in it changed for longer than the age.
- **Fetched adapter folders** (`$FARM_HOME/cache/adapters`, `farm adapters fetch` without --dest):
  removed when not used for longer than the age (a cache hit refreshes the folder's marker), along
  with half-written `.partial-*` folders of interrupted fetches.

The adapter catalog itself is never touched here (`farm adapters gc` owns its debris). No heavy
imports: fsspec for run storage, the queue's SQLite store for job states.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import FarmError
from farm.names import PACK_JOBS_FOLDER, PACK_RUN_PREFIX, check_job_id
from farm.queue.lifecycle import ACTIVE, TERMINAL

if TYPE_CHECKING:
    from farm.queue.job import Job
    from farm.queue.store import SQLiteStore
    from farm.settings import Settings

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE_RULE = "a number and a unit s, m, h, d or w, e.g. 90m, 12h, 7d, 2w"
TEMP_PREFIXES = ("farm-ckpt-", "farm-publish-", "farm-packckpt-", "farm-packpub-", "farm-packresume-")
RUN_PREFIX = "farm-"
_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)


class GcError(FarmError):
    """A bad `farm gc` argument (an age that is not one)."""


def parse_age(text: str) -> float:
    """'7d' -> seconds. Raises GcError naming the value and what is allowed."""
    m = _AGE.fullmatch(text or "")
    if m is None:
        raise GcError(f"--older-than {text!r} is not an age: use {AGE_RULE}")
    seconds = float(m.group(1)) * UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise GcError(f"--older-than {text!r} must be more than 0: use {AGE_RULE}")
    return seconds


@dataclass
class Item:
    kind: str
    """run | temp checkpoint | fetched adapter"""
    path: str
    age_s: float
    why: str
    bytes: int = 0
    target: str = ""
    """Run storage: the path inside its filesystem (what `path` shows as a URL)."""


@dataclass
class Report:
    removed: list[Item] = field(default_factory=list)
    """Removed, or what would be with dry_run."""
    kept: list[Item] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        item = lambda i: {"kind": i.kind, "path": i.path, "age_s": round(i.age_s), "why": i.why, "bytes": i.bytes}  # noqa: E731
        return {"dry_run": self.dry_run, "removed": [item(i) for i in self.removed],
                "kept": [item(i) for i in self.kept], "errors": self.errors,
                "bytes": sum(i.bytes for i in self.removed)}


def _days(s: float) -> str:
    return f"{s / 86400:.1f} d" if s >= 86400 else f"{s / 3600:.1f} h"


# ---- local folders -------------------------------------------------------------------------------


def _newest_local(path: Path) -> tuple[float, int]:
    """(newest mtime under path, total bytes)."""
    newest, size = path.lstat().st_mtime, 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            if name in files:
                size += st.st_size
    return newest, size


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _temp_dirs(root: Path, now: float, age: float) -> tuple[list[Item], list[Item]]:
    old, young = [], []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return [], []
    for p in entries:
        if not p.name.startswith(TEMP_PREFIXES) or not p.is_dir() or p.is_symlink():
            continue
        newest, size = _newest_local(p)
        item = Item("temp checkpoint", str(p), now - newest, "", size)
        if now - newest > age:
            item.why = f"nothing changed for {_days(now - newest)}"
            old.append(item)
        else:
            item.why = f"changed {_days(now - newest)} ago"
            young.append(item)
    return old, young


def _fetched(cache: Path, now: float, age: float) -> tuple[list[Item], list[Item]]:
    from farm.catalog.fetch import VERIFIED

    old, young = [], []
    if not cache.is_dir():
        return [], []
    for customer in sorted(cache.iterdir()):
        if not customer.is_dir():
            continue
        for adapter in sorted(customer.iterdir()):
            if not adapter.is_dir():
                continue
            for folder in sorted(adapter.iterdir()):
                marker = folder / VERIFIED
                partial = ".partial-" in folder.name
                try:
                    used = marker.stat().st_mtime if marker.exists() else _newest_local(folder)[0]
                except OSError:
                    continue
                item = Item("fetched adapter", str(folder), now - used, "", _newest_local(folder)[1])
                if now - used > age:
                    item.why = (f"interrupted fetch, {_days(now - used)} old" if partial
                                else f"not used for {_days(now - used)}")
                    old.append(item)
                else:
                    item.why = f"used {_days(now - used)} ago"
                    young.append(item)
    return old, young


# ---- run storage ---------------------------------------------------------------------------------


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _run_contents(fs, path: str) -> tuple[float | None, int]:
    newest, size = None, 0
    for info in fs.find(path, withdirs=False, detail=True).values():
        size += int(info.get("size") or 0)
        t = _mtime(info)
        if t is not None:
            newest = t if newest is None else max(newest, t)
    return newest, size


def _judge(item: Item, what: str, ended: list[Job], active: Job | None, newest: float | None,
           now: float, age: float) -> bool:
    """Whether a run folder is old enough to go (and item.why says why): kept while `active` (a job of
    it still queued or running); else by the latest end time of its `ended` jobs; else (no job in the
    queue knows it) by its newest file."""
    if active is not None:
        item.why = f"job {active.id} is {active.state.value}"
        return False
    if ended:
        last = max(ended, key=lambda j: j.finished_at or j.updated_at)
        item.age_s = now - (last.finished_at or last.updated_at)
        item.why = f"job {last.id} {last.state.value} {_days(item.age_s)} ago"
        return item.age_s > age
    item.age_s = now - (newest if newest is not None else now)
    verb = "nothing changed for" if item.age_s > age else "changed"
    item.why = f"no {what} in the queue; {verb} {_days(item.age_s)}" + ("" if item.age_s > age else " ago")
    return item.age_s > age


def _runs(settings: Settings, store: SQLiteStore | None, now: float, age: float) -> tuple[list[Item], list[Item], Any]:
    """Run storage: `farm-<job id>` (a job alone), `farm-pack-<pack id>` (a pack's Ray Train run, kept
    while any of its jobs is active) and `farm-pack-jobs/<job id>` (a packed job's own checkpoints,
    judged like that job's run)."""
    from farm.settings import run_filesystem

    fs, root = run_filesystem(settings.storage_path)
    old: list[Item] = []
    young: list[Item] = []
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return [], [], fs
    jobs = {j.id: j for j in store.list()} if store is not None else {}
    shown_root = settings.storage_path.rstrip("/") if "://" in settings.storage_path else None

    def consider(info: dict, rel: str, what: str, members: list[Job]) -> None:
        path = info["name"].rstrip("/")
        newest, size = _run_contents(fs, path)
        if newest is None:
            newest = _mtime(info)  # an empty run folder counts as its own time
        item = Item("run", f"{shown_root}/{rel}" if shown_root else path, 0.0, "", size, target=path)
        active = next((j for j in members if j.state in ACTIVE), None)
        ended = [j for j in members if j.state in TERMINAL]
        (old if _judge(item, what, ended, active, newest, now, age) else young).append(item)

    def job_id_of(name: str) -> str | None:
        try:
            return check_job_id(name)
        except FarmError:
            return None

    for info in sorted(entries, key=lambda i: i["name"]):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "directory" or not name.startswith(RUN_PREFIX):
            continue
        if name == PACK_JOBS_FOLDER:
            for sub in sorted(fs.ls(info["name"], detail=True), key=lambda i: i["name"]):
                job_id = job_id_of(sub["name"].rstrip("/").rsplit("/", 1)[-1])
                if sub.get("type") == "directory" and job_id is not None:
                    consider(sub, f"{PACK_JOBS_FOLDER}/{job_id}", f"job {job_id}",
                             [jobs[job_id]] if job_id in jobs else [])
            continue
        job_id = job_id_of(name[len(RUN_PREFIX):])
        if job_id is None:
            continue  # not a farm run name
        if name.startswith(PACK_RUN_PREFIX) and job_id not in jobs:
            pack_id = name[len(PACK_RUN_PREFIX):]
            consider(info, name, f"job of pack {pack_id}", [j for j in jobs.values() if j.pack == pack_id])
        else:
            consider(info, name, f"job {job_id}", [jobs[job_id]] if job_id in jobs else [])
    return old, young, fs


def _open_store(settings: Settings) -> SQLiteStore | None:
    """The queue store if its database exists (gc never creates one)."""
    if not Path(settings.queue_db).exists():
        return None
    from farm.queue.store import SQLiteStore

    return SQLiteStore(settings.queue_db)


def collect(older_than_s: float, *, dry_run: bool = False, settings: Settings | None = None,
            now: float | None = None, temp_root: Path | None = None) -> Report:
    """Find (and unless dry_run remove) the leftovers older than `older_than_s`; see the module doc."""
    from farm.settings import Settings as _Settings

    settings = settings or _Settings.resolve()
    now = time.time() if now is None else now
    report = Report(dry_run=dry_run)
    store = _open_store(settings)
    try:
        old_runs, young_runs, fs = _runs(settings, store, now, older_than_s)
    finally:
        if store is not None:
            store.close()
    old_tmp, young_tmp = _temp_dirs(Path(temp_root or tempfile.gettempdir()), now, older_than_s)
    old_fetch, young_fetch = _fetched(settings.home / "cache" / "adapters", now, older_than_s)
    report.kept = young_runs + young_tmp + young_fetch
    for item in old_runs + old_tmp + old_fetch:
        if not dry_run:
            try:
                if item.kind == "run":
                    fs.rm(item.target, recursive=True)
                else:
                    _remove_local(Path(item.path))
            except (OSError, FileNotFoundError) as exc:
                report.errors.append(f"{item.path}: {type(exc).__name__}: {exc}")
                continue
        report.removed.append(item)
    return report

