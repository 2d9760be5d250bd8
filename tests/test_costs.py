"""One definition of cost (farm.costs): the worker's events, the queue's per-attempt charge, the
adapter's farm.json and the docs say the same thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.costs import AttemptCost, accelerator_seconds, attempt_cost, job_cost
from farm.train.report import build_metadata
from tests.queue_runners import make_manifest

REPO = Path(__file__).resolve().parents[1]


def _events(n: int, seconds: float, tokens: int) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        out.append({"step": step, "step_seconds": seconds, "step_tokens": tokens,
                    "train_seconds": seconds * step, "tokens": tokens * step})
    out.append({"step": n, "final": True, "train_seconds": seconds * n, "tokens": tokens * n})
    return out


@pytest.mark.parametrize("gpus, device, accels", [(0, "cpu", 1), (1, "cuda", 1), (4, "cuda", 4)])
def test_queue_farm_json_and_progress_agree_for_a_job_that_ran_once(gpus, device, accels):
    cost = AttemptCost(gpus)
    events = [cost.annotate(e) for e in _events(8, 0.25, 100)]
    last, final = events[-1], events[-1]
    queue = attempt_cost(last, elapsed=999.0)  # the wall time is not the cost when steps were reported
    meta = build_metadata(job_id="j", manifest=make_manifest(), base_fingerprint="x", data_stats={},
                          label_names=None, final=final, history=events, device=device, gpus=gpus,
                          wall_seconds=999.0)
    assert queue == {"accelerator_seconds": 2.0 * accels, "tokens": 800}
    assert meta["accelerator_seconds"] == queue["accelerator_seconds"] == last["accelerator_seconds"]
    assert meta["tokens_trained"] == queue["tokens"] == job_cost(final, gpus)["tokens"]


def test_a_resumed_attempt_is_charged_its_own_steps_only():
    # The checkpoint restored 6 steps (train_seconds starts at 1.5); this attempt ran 2 more.
    cost = AttemptCost(2)
    for step in (7, 8):
        last = cost.annotate({"step": step, "step_seconds": 0.25, "step_tokens": 10, "train_seconds": 0.25 * step})
    assert attempt_cost(last, elapsed=60.0) == {"accelerator_seconds": 1.0, "tokens": 20}
    assert last["accelerator_seconds"] == accelerator_seconds(2.0, 2) == 4.0  # the job's own total so far


def test_runners_without_step_figures_are_charged_their_figures_else_wall_time():
    assert attempt_cost({"accelerator_seconds": 3.0, "tokens": 5}, elapsed=9.0) == {
        "accelerator_seconds": 3.0, "tokens": 5}
    assert attempt_cost({}, elapsed=9.0) == {"accelerator_seconds": 9.0, "tokens": 0}


def test_the_docs_state_the_same_definition():
    text = (REPO / "docs" / "monitoring.md").read_text()
    assert "farm/costs.py" in text
    assert "step time × GPUs" in text and "a CPU job counts as one accelerator" in text
