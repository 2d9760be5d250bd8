"""The durable job queue: states and their transitions (`lifecycle`), the record (`job`), the
dispatch policy (`fairness`) and the store (`store`). No Ray, no torch: the CLI imports it freely."""

from farm.queue.fairness import Candidate, fair_order, pick_next
from farm.queue.job import Event, Job, Submitted
from farm.queue.lifecycle import ACTIVE, TERMINAL, TRANSITIONS, JobState, check_transition, parse_state, retry_delay
from farm.queue.store import DEFAULT_MAX_ATTEMPTS, JobStore, SQLiteStore, open_store

__all__ = [
    "ACTIVE", "DEFAULT_MAX_ATTEMPTS", "TERMINAL", "TRANSITIONS", "Candidate", "Event", "Job", "JobState",
    "JobStore", "SQLiteStore", "Submitted", "check_transition", "fair_order", "open_store", "parse_state",
    "pick_next", "retry_delay",
]
