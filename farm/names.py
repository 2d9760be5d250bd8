"""Names and ids every layer shares: the job id rule, the names of Ray tasks and Ray Train runs (their run
storage folders), the packed jobs' checkpoint folder, and where a job's log lives.

The queue, training, the scheduler, `farm gc` and the CLI all name the same things, so the rule lives
here, below all of them (docs/architecture.md, "Import direction"). Pure: no heavy imports.
"""

from __future__ import annotations

import re
from pathlib import Path

from farm.errors import QueueError

JOB_ID_RULE = "1-100 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit, no '..'"
_JOB_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")


def check_job_id(job_id: str) -> str:
    """A job id names run storage (`farm-<job id>`) and log files: refuse anything that could leave
    their folder or read oddly. Raises QueueError naming the rule."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        raise QueueError(f"bad job id {job_id!r}: must be {JOB_ID_RULE}")
    return job_id


def run_name(job_id: str) -> str:
    """The name of a job's Ray task and Ray Train run (its run storage folder): `farm-<job id>`."""
    return f"farm-{check_job_id(job_id)}"


PACK_RUN_PREFIX = "farm-pack-"
PACK_JOBS_FOLDER = "farm-pack-jobs"
"""Run storage folder of packed jobs' own checkpoints: `<storage>/farm-pack-jobs/<job id>/`."""


def pack_run_name(pack_id: str) -> str:
    """The name of a pack's Ray task and Ray Train run (its run storage folder): `farm-pack-<pack id>`."""
    return f"{PACK_RUN_PREFIX}{pack_id}"


def job_log_path(job_id: str, logs_dir: str | Path | None = None) -> Path:
    """Where a job's log lives: <logs_dir>/jobs/<job id>.log (default logs_dir: farm.settings.logs_dir())."""
    if logs_dir is None:
        from farm.settings import logs_dir as default

        logs_dir = default()
    return Path(logs_dir) / "jobs" / f"{check_job_id(job_id)}.log"
