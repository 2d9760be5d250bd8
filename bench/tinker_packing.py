"""The Tinker API's packing gain: N clients doing SFT steps on one base, together vs one after another.

One local Ray and one `farm serve --tinker` app (real HTTP, the official `tinker` SDK, the pack worker
on the tiny NF4 Llama or `--base`), N tenants each with its own `tml-` key and LoRA. Each client runs
`--steps` SFT steps: forward_backward(batch, "cross_entropy") then optim_step(Adam), waiting for both
results, as a training loop does. Two phases on the same warm worker, each client a fresh LoRA:
  sequential - client 1 runs all its steps, then client 2, ... (one model on the worker at a time);
  together   - the N clients run at once, each in its own thread; the worker groups the
               forward_backward requests that meet in one clock cycle into one grouped step.
Prints and writes bench/results/tinker_packing.json: steps per second per client and in total for each phase,
and together/sequential (total steps per second; the packing gain, goal > 1).

    .venv/bin/python bench/tinker_packing.py [--clients 4] [--steps 8] [--batch 4] [--seq-len 64]

(Not bench/tinker.py: run as a script, bench/ is first on sys.path, and a bench/tinker.py would be what
`import tinker` finds, here and in the tests that import bench modules.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.ports, as bench/serve.py does
RESULTS = REPO / "bench" / "results"


def _batch(rng: random.Random, vocab: int, batch: int, seq_len: int):
    from tinker import types

    out = []
    for _ in range(batch):
        tokens = [rng.randrange(5, vocab) for _ in range(seq_len + 1)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * seq_len}))
    return out


def _client_steps(service, served: str, args, seed: int, vocab: int) -> dict:
    """One client: a fresh LoRA, `args.steps` SFT steps; its step times (seconds) and last loss."""
    from tinker import types

    rng = random.Random(seed)
    tc = service.create_lora_training_client(base_model=served, rank=args.rank, seed=seed).result()
    data = _batch(rng, vocab, args.batch, args.seq_len)
    times, loss = [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fb = tc.forward_backward(data, "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        loss = fb.result().metrics["loss:sum"]
        op.result()
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "last_loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="datums per forward_backward")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=20.0, help="the worker's clock-cycle window")
    p.add_argument("--base", default=str(REPO / "models" / "tiny-llama"))
    args = p.parse_args(argv)

    import tempfile

    home = Path(tempfile.mkdtemp(prefix="farm-bench-tinker-"))
    os.environ["FARM_HOME"] = str(home)
    for name in ("FARM_CATALOG", "FARM_STORAGE", "FARM_QUEUE_DB"):
        os.environ.pop(name, None)
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    import ray
    import tinker
    from ray import serve
    from transformers import AutoConfig

    from farm.serve.app import deploy
    from farm.serve.auth import KeyStore, Principal, hash_key
    from farm.serve.config import ServeConfig
    from farm.tinker.config import mount
    from tests.ports import free_port

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    vocab = AutoConfig.from_pretrained(args.base).vocab_size
    keys = {f"bench{i}": f"tml-bench-{i}-key" for i in range(args.clients)}
    port = free_port()  # Serve's proxy on a free loopback port
    cfg = ServeConfig(base_model=args.base, catalog_url=(home / "catalog").as_uri(), replicas=1, port=port)
    mount(cfg, window_ms=args.window_ms, worker_name="farm-tinker-bench")
    store = KeyStore({hash_key(k): Principal(who) for who, k in keys.items()})
    base = deploy(cfg, store, name="farm-tinker-bench")  # returns once the app is RUNNING
    services = {who: tinker.ServiceClient(base_url=base, api_key=k) for who, k in keys.items()}
    try:
        # Warm: the worker loads the base on its first operation; neither phase pays that.
        warm = argparse.Namespace(**{**vars(args), "steps": 1})
        _client_steps(services["bench0"], cfg.served_name, warm, seed=999, vocab=vocab)

        def phase(together: bool, seed0: int) -> dict:
            results: dict[str, dict] = {}

            def run(i: int, who: str) -> None:
                results[who] = _client_steps(services[who], cfg.served_name, args, seed=seed0 + i, vocab=vocab)

            t0 = time.perf_counter()
            if together:
                threads = [threading.Thread(target=run, args=(i, who)) for i, who in enumerate(services)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for i, who in enumerate(services):
                    run(i, who)
            wall = time.perf_counter() - t0
            steps = args.clients * args.steps
            per_client = [args.steps / sum(r["step_s"]) for r in results.values()]
            return {"wall_s": wall, "steps": steps, "total_steps_per_s": steps / wall,
                    "per_client_steps_per_s": statistics.median(per_client),
                    "median_step_s": statistics.median(s for r in results.values() for s in r["step_s"])}

        sequential = phase(False, 0)
        print(f"sequential: {sequential['wall_s']:.1f} s, {sequential['total_steps_per_s']:.2f} steps/s in total, "
              f"{sequential['per_client_steps_per_s']:.2f} per client", flush=True)
        together = phase(True, 100)
        print(f"together:   {together['wall_s']:.1f} s, {together['total_steps_per_s']:.2f} steps/s in total, "
              f"{together['per_client_steps_per_s']:.2f} per client", flush=True)
    finally:
        for service in services.values():
            try:
                service.close("success").result(timeout=30)
            except Exception:  # noqa: BLE001 - a session that never started
                pass
        serve.shutdown()
        ray.shutdown()
    ratio = together["total_steps_per_s"] / sequential["total_steps_per_s"]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python bench/tinker_packing.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "base": args.base, "clients": args.clients, "steps": args.steps, "batch": args.batch,
           "seq_len": args.seq_len, "rank": args.rank, "window_ms": args.window_ms,
           "sequential": sequential, "together": together, "together_over_sequential": ratio}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tinker_packing.json").write_text(json.dumps(out, indent=2))
    print(f"together / sequential, total steps per second: x{ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
