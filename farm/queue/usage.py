"""The per-customer usage ledger beside the jobs: what work outside the queue used, hour by hour.

Jobs carry their own cost (the `jobs` table's `accelerator_seconds` and `tokens`, see farm.costs).
The Tinker API's training and sampling are not jobs: the pack worker adds its hourly figures here
(`SQLiteStore.add_usage`), so `farm status` shows a customer's jobs and Tinker use side by side and
the Tinker billing endpoint answers across worker restarts. No Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# What one row counts: tokens (training: forward/backward tokens, with their accelerator-seconds;
# sampling_prefill: prompt tokens once per sample; sampling_sample: generated tokens) or
# checkpoints (a count of save_state and save_weights_for_sampler calls).
KINDS = ("training", "sampling_prefill", "sampling_sample", "checkpoint")


@dataclass(frozen=True)
class UsageRow:
    """One customer's use of one kind in one UTC hour, from one source."""

    customer: str
    hour: int
    """The hour's start, seconds since the epoch (a multiple of 3600)."""
    kind: str
    amount: int
    """Tokens, or a count for `checkpoint`."""
    accelerator_seconds: float = 0.0
    source: str = "tinker"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"usage kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.hour % 3600:
            raise ValueError(f"usage hour {self.hour}: not the start of a UTC hour")


def hour_of(ts: float) -> int:
    """The start of the UTC hour that `ts` falls in (a row's `hour`)."""
    return int(ts // 3600 * 3600)


@dataclass
class CustomerCost:
    """One customer's cost: its jobs' (every attempt) and its Tinker use, as `farm status` shows it."""

    jobs: int = 0
    job_accelerator_seconds: float = 0.0
    job_tokens: int = 0
    tinker_accelerator_seconds: float = 0.0
    tinker_training_tokens: int = 0
    tinker_prefill_tokens: int = 0
    tinker_sampled_tokens: int = 0
    tinker_checkpoints: int = 0

    @property
    def accelerator_seconds(self) -> float:
        return self.job_accelerator_seconds + self.tinker_accelerator_seconds

    @property
    def training_tokens(self) -> int:
        return self.job_tokens + self.tinker_training_tokens

    def to_dict(self) -> dict:
        return {**self.__dict__, "accelerator_seconds": self.accelerator_seconds,
                "training_tokens": self.training_tokens}


def customer_costs(job_costs: dict[str, dict[str, float]], rows: list[UsageRow]) -> dict[str, CustomerCost]:
    """Per customer, sorted: `SQLiteStore.job_costs()` and the usage rows summed."""
    out: dict[str, CustomerCost] = {}
    for customer, j in job_costs.items():
        out[customer] = CustomerCost(jobs=int(j["jobs"]), job_accelerator_seconds=float(j["accelerator_seconds"]),
                                     job_tokens=int(j["tokens"]))
    field = {"training": "tinker_training_tokens", "sampling_prefill": "tinker_prefill_tokens",
             "sampling_sample": "tinker_sampled_tokens", "checkpoint": "tinker_checkpoints"}
    for r in rows:
        c = out.setdefault(r.customer, CustomerCost())
        setattr(c, field[r.kind], getattr(c, field[r.kind]) + r.amount)
        c.tinker_accelerator_seconds += r.accelerator_seconds
    return dict(sorted(out.items()))
