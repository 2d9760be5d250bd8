"""The serving side of the train/serve parity gate (farm.train.gate): the farm engine's echo logprobs.

Sits above both train and serve (the scheduler and `farm train` pass `serving_logprobs` into
farm.train.run.run_job as `check_parity`), so neither imports the other. It scores the rows exactly
as a replica would answer `echo` + `logprobs` on /v1/completions: the engine loads the base in the
job's quantization, attaches the trained adapter folder and reports each prompt token's logprob.
"""

from __future__ import annotations

import asyncio
from pathlib import Path


def serving_logprobs(base_model: str, quant: dict, adapter_dir: str, rows: list[dict]) -> list[list[float]]:
    """Per row, the served logprob of each token of `input_ids` after the first (farm.train.gate.ParityCheck)."""
    from farm.serve.engine import GenJob
    from farm.serve.engines.farm import FarmEngine
    from farm.serve.sampling import Sampler

    engine = FarmEngine(base_model, quantization=quant["mode"], dtype=quant["compute_dtype"],
                        max_batch_size=1, warm_up=False)
    slot = engine.attach(Path(adapter_dir))

    async def score(ids: list[int]) -> list[float]:
        job = GenJob(prompt_ids=list(ids), max_tokens=0, sampler=Sampler(temperature=0.0), slot=slot.name,
                     prompt_logprobs=0)
        async for event in engine.generate(job):
            if "error" in event:
                raise event["error"]
            if "done" in event:
                return [entry[1] for entry in event["done"]["prompt_logprobs"][1:]]
        raise RuntimeError("the engine ended without scoring the row")

    try:
        return [asyncio.run(score(r["input_ids"])) for r in rows]
    finally:
        engine.detach(slot.name)
