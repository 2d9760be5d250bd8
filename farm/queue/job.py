"""The job record as the store returns it: a plain value, JSON-friendly."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from farm.queue.lifecycle import TERMINAL, JobState


@dataclass
class Job:
    id: str
    customer: str
    adapter: str
    manifest: dict[str, Any]
    manifest_hash: str
    priority: int
    state: JobState
    attempts: int
    max_attempts: int
    seq: int
    created_at: float
    updated_at: float
    next_attempt_at: float | None = None
    last_error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    accelerator_seconds: float = 0.0
    tokens: int = 0
    adapter_ref: str | None = None
    cancel_requested: bool = False
    publish_started_at: float | None = None
    lease_owner: str | None = None
    lease_id: str | None = None
    lease_expires_at: float | None = None
    first_started_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pack_key: str | None = None
    """Compatibility key for packed training (farm.pack_key); None: the job runs alone."""
    pack: str | None = None
    """The pack the job runs (or last ran) in; None for a job that ran alone."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def name(self) -> str:
        return f"{self.customer}/{self.adapter}"

    @classmethod
    def from_row(cls, row: Any) -> Job:
        d = dict(row)
        d["state"] = JobState(d["state"])
        d["manifest"] = json.loads(d["manifest"])
        d["progress"] = json.loads(d["progress"]) if d.get("progress") else {}
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)

    def to_dict(self, *, manifest: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        if not manifest:
            d.pop("manifest")
        return d


@dataclass(frozen=True)
class Event:
    """One state change of a job (or a note such as a cancel request), with its time and reason."""

    job_id: str
    at: float
    from_state: str | None
    to_state: str
    reason: str


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool  # False: an identical job was already active and its id is returned
