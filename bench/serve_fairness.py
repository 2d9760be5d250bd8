"""Tenant B's latency while tenant A floods the farm engine: fair per-tenant batching vs one FIFO.

Tenant A sends --flood requests at once; right after, tenant B sends --b requests. Both engines are
the same tiny model with the same batch size; `fair` is farm/serve/fair.py's round-robin (the
default), `fifo` the single queue it replaced (Engine(fair=False)). Prints, per mode, B's latency
(p50 / max seconds from its send to its answer), the batch index of B's last request, A's total time,
and the ratio fifo / fair of B's max latency, all measured in this one run. Writes
bench/results/serve_fairness.json.

    python bench/serve_fairness.py [--flood 200] [--b 5] [--batch 8] [--tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def run(engine, flood: int, nb: int, tokens: int) -> dict:
    from farm.serve.engine import GenJob
    from farm.serve.sampling import Sampler

    ids = engine.tokenizer("Hello there, how are").input_ids
    batches: list[list[str]] = []
    decode = engine._decode

    def recording(batch):
        batches.append([j.tenant for j in batch])
        return decode(batch)

    engine._decode = recording

    async def ask(tenant: str) -> float:
        t0 = time.perf_counter()
        job = GenJob(prompt_ids=ids, max_tokens=tokens, sampler=Sampler(temperature=0.0), tenant=tenant)
        async for event in engine.generate(job):
            if "done" in event or "error" in event:
                return time.perf_counter() - t0
        raise RuntimeError("no result")

    async def main():
        t0 = time.perf_counter()
        a = [asyncio.ensure_future(ask("a")) for _ in range(flood)]
        await asyncio.sleep(0)
        b = [asyncio.ensure_future(ask("b")) for _ in range(nb)]
        b_lat = await asyncio.gather(*b)
        await asyncio.gather(*a)
        return b_lat, time.perf_counter() - t0

    try:
        b_lat, total = asyncio.run(main())
    finally:
        engine._decode = decode
    return {"b_p50_s": statistics.median(b_lat), "b_max_s": max(b_lat), "a_total_s": total,
            "b_last_batch": max(i for i, b in enumerate(batches) if "b" in b), "batches": len(batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flood", type=int, default=200)
    ap.add_argument("--b", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    args = ap.parse_args()
    from farm.serve.engine import Engine

    out = {}
    for mode in ("fifo", "fair"):
        engine = Engine(args.model, max_batch_size=args.batch, max_wait_ms=5, max_waiting=args.flood + args.b,
                        fair=mode == "fair")
        run(engine, 16, 1, 2)  # warm-up
        out[mode] = run(engine, args.flood, args.b, args.tokens)
        r = out[mode]
        print(f"{mode}: B p50 {r['b_p50_s']:.2f} s, max {r['b_max_s']:.2f} s, B's last request in batch "
              f"{r['b_last_batch']} of {r['batches']}; A's {args.flood} done in {r['a_total_s']:.2f} s")
    out["ratio_b_max_fifo_over_fair"] = out["fifo"]["b_max_s"] / out["fair"]["b_max_s"]
    print(f"B's max latency, fifo / fair: {out['ratio_b_max_fifo_over_fair']:.1f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_fairness.json").write_text(json.dumps({"args": vars(args), **out}, indent=2))


if __name__ == "__main__":
    main()
