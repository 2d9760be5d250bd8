"""What training costs, defined once: accelerator-seconds and tokens.

Every figure the farm shows (the adapter's farm.json, the queue's per-job totals, `farm status`,
the Prometheus counters, docs/monitoring.md) comes from these functions:

* accelerator-seconds = optimizer-step time x accelerators, where a GPU job has `gpus`
  accelerators and a CPU job one (its training slot is the accelerator there);
* tokens = non-padding tokens of the steps.

A job's farm.json counts the steps of the adapter it publishes (a resumed run's steps once). The
queue charges each attempt the steps that attempt ran (`attempt_*`, steps redone after a restart
included, since they used the hardware), so for a job that ran once both agree exactly; a cancelled
or failed attempt is charged its steps too. Runners that report no per-step figures are charged
their own cumulative figures, else the attempt's wall time.
No heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass

# The per-customer cost counters on Ray's metrics endpoint (docs/monitoring.md), one definition for every
# process that adds to them: the scheduler (each job attempt) and the Tinker pack worker (each model's
# share of its steps). `ray.util.metrics.Counter(name, description=..., tag_keys=("customer",))`.
ACCELERATOR_SECONDS_COUNTER = ("farm_accelerator_seconds", "Accelerator-seconds used, per customer.")
TOKENS_COUNTER = ("farm_tokens", "Tokens trained, per customer.")


def accelerators(gpus: int | None) -> int:
    """How many accelerators a job holds: its GPUs, or 1 for a CPU job."""
    return max(1, int(gpus or 0))


def accelerator_seconds(step_seconds: float, gpus: int | None) -> float:
    return float(step_seconds) * accelerators(gpus)


@dataclass
class AttemptCost:
    """Running sums of the steps one attempt ran (restarts within it included)."""

    gpus: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add_step(self, tokens: int, seconds: float) -> None:
        self.tokens += int(tokens)
        self.seconds += float(seconds or 0.0)

    def annotate(self, item: dict) -> dict:
        """Add the cost fields to one progress event of the worker (see farm.train.loop)."""
        if "step_tokens" in item:
            self.add_step(item["step_tokens"], item.get("step_seconds") or 0.0)
        if "train_seconds" in item:
            item["accelerator_seconds"] = accelerator_seconds(item["train_seconds"], self.gpus)
            item.update(gpus=self.gpus, attempt_tokens=self.tokens, attempt_seconds=self.seconds)
        return item


def attempt_cost(progress: dict, elapsed: float) -> dict:
    """What one attempt costs, from its last progress event: {'accelerator_seconds', 'tokens'}.
    The store adds this to the job's totals, so it is this attempt's share only."""
    if "attempt_seconds" in progress:
        return {"accelerator_seconds": accelerator_seconds(progress["attempt_seconds"], progress.get("gpus")),
                "tokens": int(progress.get("attempt_tokens") or 0)}
    return {"accelerator_seconds": float(progress.get("accelerator_seconds") or elapsed),
            "tokens": int(progress.get("tokens") or 0)}


def job_cost(final: dict, gpus: int | None) -> dict:
    """The published adapter's own cost (farm.json), from the worker's final metrics."""
    return {"accelerator_seconds": accelerator_seconds(final.get("train_seconds") or 0.0, gpus),
            "tokens": int(final.get("tokens") or 0)}
