"""Job states and the one table of allowed transitions. Nothing else decides what may follow what."""

from __future__ import annotations

from enum import Enum

from farm.errors import QueueError


class JobState(str, Enum):
    QUEUED = "queued"
    """Waiting for a free slot."""
    RUNNING = "running"
    """Holds a slot and a lease; its Ray Train run is in progress."""
    RETRYING = "retrying"
    """An attempt failed; waits out its backoff, then runs again from the last checkpoint."""
    SUCCEEDED = "succeeded"
    """Trained and published; the job's adapter_ref says where."""
    FAILED = "failed"
    """Out of attempts, or failed in a way a retry cannot fix (the dead-letter state)."""
    CANCELLED = "cancelled"
    """Stopped on request; publishes nothing."""

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRYING})

# running -> queued is the re-run of an interrupted attempt (its scheduler died): not the job's fault.
# failed/cancelled -> queued is `farm retry`.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.RETRYING, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}


def parse_state(value: str) -> JobState:
    """A JobState from user input, or a QueueError naming the allowed values."""
    try:
        return JobState(str(value).lower())
    except ValueError:
        allowed = ", ".join(s.value for s in JobState)
        raise QueueError(f"unknown job state {value!r} (allowed: {allowed})") from None


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    """Raise QueueError unless `current -> target` is in the table."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none, it is final"
        raise QueueError(f"job {job_id}: cannot go from {current.value} to {target.value} (from {current.value}: {allowed})")


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff before attempt `attempt + 1`: base, 2*base, 4*base, ... at most cap."""
    return min(cap, base * (2 ** max(0, attempt - 1)))
