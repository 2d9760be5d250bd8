"""Serving benchmark: mixed-adapter batching vs one adapter, vs a plain-PEFT adapter-swapping server,
and adapter cold-load latency from a local and an S3 catalog. One run, loopback only, bounded loops.

    .venv/bin/python bench/serve.py            # prints a table, writes bench/results/serve.json
    .venv/bin/python bench/serve.py --out /tmp/serve.json --no-s3 --no-routing   # shorter
    .venv/bin/python bench/serve.py --cold-only --out /tmp/cold.json   # only (c), no Ray (~1-2 min)

Reusable pieces (e.g. for bench/gpu_bench.py): `prepare()` builds a tiny base, adapters and a local
catalog; `farm_server()` deploys the farm app on a running Ray; `throughput(n_adapters, url=...)`
measures completions spread round-robin over the first n adapters.

(a) throughput with requests spread over 32 adapters / throughput with all on 1 adapter (goal >= 0.8)
(b) the farm server vs a baseline server (same Ray Serve + HTTP path, same workload over 32 adapters)
    that serves one request at a time with plain PEFT, swapping the active adapter (goal >= 5x)
(c) adapter cold-load (verified fetch + attach) p50/p99 from a local directory and from SeaweedFS S3,
    each in a fresh process as a new replica: with the replica's start-up warm-up and without (goal p99 <= 100 ms)
Also: affinity vs spread routing with 2 replicas on the 32-adapter workload, and the same 1- and
32-adapter workloads on the vLLM engine (`--engine vllm`, bf16 base: vLLM's NF4 is CUDA-only) when a
vLLM environment exists (`make vllm-env`); `--engines-only` runs just farm vs vLLM.
"""

# No `from __future__ import annotations`: the baseline's FastAPI route needs real type hints.
import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROMPT = "Hello there, how are you"


def make_adapter(base: Path, dest: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    torch.manual_seed(seed)
    model = load_base_model(str(base), device="cpu")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(dest)
    return dest


async def load(url: str, models: list[str], n: int, concurrency: int, max_tokens: int, key: str | None = None) -> dict:
    """n completions (round-robin over models) from `concurrency` clients; returns req/s and tokens/s."""
    import httpx

    todo = list(range(n))
    lat, tokens, codes = [], 0, {}

    async def worker(h):
        nonlocal tokens
        while todo:
            i = todo.pop()
            body = {"model": models[i % len(models)], "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
            t = time.perf_counter()
            r = await h.post(url, json=body)
            lat.append(time.perf_counter() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as h:
        await asyncio.gather(*[worker(h) for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    lat.sort()
    ok = codes.get(200, 0)
    if ok < n:
        print(f"WARNING: only {ok}/{n} requests succeeded: {codes}", flush=True)
    return {"requests": n, "concurrency": concurrency, "wall_s": round(wall, 3), "req_per_s": round(ok / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(lat[len(lat) // 2], 3),
            "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3), "status": codes}


def throughput(n_adapters: int, *, url: str, names: list[str], requests: int = 256, concurrency: int = 32,
               max_tokens: int = 16, warm: bool = True) -> dict:
    """req/s, tokens/s, p50/p99 of `requests` greedy completions spread round-robin over names[:n_adapters],
    from `concurrency` clients against a deployed server's /v1/completions `url`. With `warm`, each of
    those adapters is requested twice first, so cold loads are not measured."""
    models = names[:n_adapters]
    if len(models) < n_adapters:
        raise ValueError(f"{n_adapters} adapters asked for, {len(models)} given")
    if warm:
        asyncio.run(load(url, models, 2 * len(models), min(8, concurrency), 2))
    return asyncio.run(load(url, models, requests, concurrency, max_tokens))


@contextlib.contextmanager
def farm_server(base: str, catalog_url: str, port: int, *, label: str = "bench-farm", replicas: int = 1,
                routing: str = "affinity", max_adapters: int = 32, **config):
    """Deploy the farm app (loopback, no keys) on the running Ray; yields its /v1/completions URL."""
    from ray import serve

    from farm.serve.app import deploy
    from farm.serve.auth import KeyStore
    from farm.serve.config import ServeConfig

    opts = dict(max_batch_size=32, max_wait_ms=5, max_waiting=256, max_tokens_cap=64, cpus_per_replica=1)
    cfg = ServeConfig(base_model=base, catalog_url=catalog_url, replicas=replicas, max_adapters=max_adapters,
                      routing=routing, port=port, **{**opts, **config})
    url = deploy(cfg, KeyStore({}), name=label) + "/v1/completions"
    try:
        yield url
    finally:
        serve.delete(label)


def gpu_base(tiny: Path, dest: Path) -> str:
    """bench/gpu_bench.py's ~0.8B Llama shape (random bf16 weights) with the tiny tokenizer's vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_bench import BENCH_MODEL

    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=16, **{**BENCH_MODEL, "vocab_size": len(tok)},
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return str(dest)


def copies(first: Path, work: Path, n: int) -> list[Path]:
    """n adapters of first's shape with different random weights (no base load per adapter)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(first / "adapter_model.safetensors"))
    out = [first]
    for i in range(1, n):
        d = work / "adapters" / f"a{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / "adapter_config.json", d)
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(v.shape, generator=g).to(v.dtype) * v.float().std().to(v.dtype) for k, v in weights.items()},
                  str(d / "adapter_model.safetensors"))
        out.append(d)
    return out


def prepare(work: Path, n_adapters: int, gpu: bool = False):
    """A tiny NF4-able Llama (with gpu: a ~0.8B one), n LoRA adapters (4 customers) published to a local
    catalog under `work`. Returns (base path, Catalog, {name: adapter dir}, versions)."""
    from farm.catalog import Catalog
    from farm.tiny import build_all

    base = str(build_all(work / "models", sorted((REPO / "jobs" / "data").glob("*.jsonl")))["llama"])
    if gpu:
        base = gpu_base(Path(base), work / "models" / "bench-llama-0.8b")
    cat = Catalog((work / "home" / "catalog").as_uri())
    dirs, versions = {}, []
    made = copies(make_adapter(Path(base), work / "adapters" / "a00", seed=0), work, n_adapters) if gpu else None
    for i in range(n_adapters):
        d = made[i] if gpu else make_adapter(Path(base), work / "adapters" / f"a{i:02d}", seed=i)
        versions.append(cat.publish(f"cust{i % 4}", f"a{i:02d}", d, {}))
        dirs[f"cust{i % 4}/a{i:02d}"] = str(d)
    return base, cat, dirs, versions


def baseline_app(base_model: str, adapter_dirs: dict[str, str]):
    """Plain PEFT behind the same Serve + HTTP path: one request at a time, set_adapter + generate."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Baseline:
        def __init__(self):
            import torch
            from peft import PeftModel

            from farm.modeling import load_base_model, load_tokenizer

            torch.set_num_threads(1)
            self.tok = load_tokenizer(base_model)
            model = load_base_model(base_model, device="cpu")
            names = list(adapter_dirs)
            self.model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0]).eval()
            for n in names[1:]:
                self.model.load_adapter(adapter_dirs[n], adapter_name=n)
            self.lock = threading.Lock()

        def _run(self, body: dict) -> dict:
            import torch

            with self.lock, torch.inference_mode():
                self.model.set_adapter(body["model"])
                ids = self.tok(body["prompt"], return_tensors="pt")
                out = self.model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False)
            n = out.shape[1] - ids.input_ids.shape[1]
            return {"usage": {"completion_tokens": int(n)}}

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await asyncio.to_thread(self._run, await request.json())

    return Baseline.bind()


def cold_loads(catalog_url: str, base_model: str, versions: list, env: dict | None = None, warm_up: bool = True) -> dict:
    """Verified fetch + attach + detach of each version, in this process, on an engine started with
    or without its warm-up (farm/serve/warmup.py); p50/p99 (of these few loads: the slowest) and the
    first load in ms, and the engine's start in s. The catalog is opened before the clock starts; with
    warm_up also connected, as the replica does at start (without: as replicas did before)."""
    import shutil

    from farm.catalog import Catalog
    from farm.serve.engine import Engine

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        cat = Catalog(catalog_url)
        if warm_up:  # as the replica does at start (farm/serve/server.py; its ping runs in the background)
            cat.connect()
            cat.ping()
        t = time.perf_counter()
        engine = Engine(base_model, max_waiting=4, warm_up=warm_up)
        start_s = time.perf_counter() - t
        out, fetch_ms = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i, v in enumerate(versions):
                dest = Path(tmp) / str(i)
                t = time.perf_counter()
                path = cat.fetch(cat.resolve(v.ref), dest)
                t_fetch = time.perf_counter()
                slot = engine.attach(path)
                out.append((time.perf_counter() - t) * 1000)
                fetch_ms.append((t_fetch - t) * 1000)
                engine.detach(slot.name)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    first = out[0]
    out.sort()
    return {"n": len(out), "warm_up": warm_up, "p50_ms": round(statistics.median(out), 1),
            "p99_ms": round(out[min(len(out) - 1, int(len(out) * 0.99))], 1), "first_ms": round(first, 1),
            "fetch_p50_ms": round(statistics.median(fetch_ms), 1), "engine_start_s": round(start_s, 2)}


def cold_loads_fresh(*args, **kwargs) -> dict:
    """cold_loads in a fresh Python process (spawned: nothing imported yet), as in a new replica."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(cold_loads, args, kwargs)


def cold_load_runs(results: dict, key: str, catalog_url: str, base: str, versions: list, env: dict | None = None) -> None:
    """results[key] with the warm-up (what a replica does), results[key + '_no_warmup'] without it."""
    for warm, name in ((False, key + "_no_warmup"), (True, key)):
        results[name] = cold_loads_fresh(catalog_url, base, versions, env, warm_up=warm)
        print(f"{name}: {results[name]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--baseline-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-routing", action="store_true", help="skip the 2-replica affinity vs spread runs")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine runs")
    ap.add_argument("--engines-only", action="store_true", help="only farm vs vLLM engine (1 and N adapters)")
    ap.add_argument("--cold-only", action="store_true", help="only the cold loads (c), with and without warm-up; no Ray")
    ap.add_argument("--gpu", action="store_true", help="replicas on one GPU (bench/gpu.sh): farm NF4 vs vLLM NF4")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json", help="where the JSON goes")
    args = ap.parse_args()

    from farm.catalog import Catalog

    work = Path(tempfile.mkdtemp(prefix="farm-bench-serve-"))
    os.environ["FARM_HOME"] = str(work / "home")
    if args.gpu:
        args.engines_only = True
    base, cat, dirs, versions = prepare(work, args.adapters, gpu=args.gpu)
    names = list(dirs)
    results: dict = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}, CPU only ({platform.processor() or 'n/a'})",
                     "command": "python " + " ".join(sys.argv),
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    if not args.cold_only:
        serving(args, results, base, cat, dirs, names)
    if not args.engines_only:
        cold_load_runs(results, "cold_load_local", cat.url, base, versions)
    if not args.no_s3 and not args.engines_only:
        from tests.fixtures.seaweedfs import start_seaweedfs

        s3 = start_seaweedfs(work / "seaweedfs")
        try:
            os.environ.update(s3.env)
            s3cat = Catalog(s3.url("bench-serve"))
            s3_versions = [s3cat.publish(v.customer, v.adapter, Path(dirs[v.name]), {}) for v in versions]
            cold_load_runs(results, "cold_load_s3", s3cat.url, base, s3_versions, s3.env)
        finally:
            s3.stop()
    report(results, names, args.out)


def serving(args, results: dict, base: str, cat, dirs: dict, names: list[str]) -> None:
    """The throughput runs (a), (b), routing and engines on a local Ray; results go into `results`."""
    import ray
    from ray import serve

    from tests.ports import free_port

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()  # Serve's proxy keeps the port of the first deploy; every app uses it
    try:
        def run(key: str, n: int, url: str) -> None:
            results[key] = throughput(n, url=url, names=names, requests=args.requests, concurrency=args.concurrency,
                                      max_tokens=args.max_tokens)
            print(f"{key}: {results[key]}", flush=True)

        gpu = {"gpus_per_replica": 1} if args.gpu else {}
        with farm_server(base, cat.url, port, max_adapters=args.adapters, engine="farm", **gpu) as url:
            asyncio.run(load(url, names, 2 * len(names), 8, 2))  # every adapter resident before either run
            run("farm_1_adapter", 1, url)
            run("farm_32_adapters", len(names), url)
        from farm.serve.engines.base import vllm_python

        if not args.no_vllm and vllm_python():
            # same workload on the vLLM engine; on CPU its base is bf16 (NF4 through bitsandbytes is CUDA-only)
            quant = "nf4" if args.gpu else "none"
            with farm_server(base, cat.url, port, label="bench-vllm", max_adapters=args.adapters, engine="vllm",
                             quantization=quant, max_lora_rank=8, **gpu) as url:
                asyncio.run(load(url, names, 2 * len(names), 8, 2))
                run("vllm_1_adapter", 1, url)
                run("vllm_32_adapters", len(names), url)
            results["vllm_over_farm_32"] = round(results["vllm_32_adapters"]["tokens_per_s"]
                                                 / max(results["farm_32_adapters"]["tokens_per_s"], 1e-9), 3)
            results["vllm_32_over_1"] = round(results["vllm_32_adapters"]["req_per_s"]
                                              / max(results["vllm_1_adapter"]["req_per_s"], 1e-9), 3)
        if args.engines_only:
            args.no_routing, args.no_s3 = True, True
        if not args.no_routing:
            for routing in ("affinity", "spread"):
                with farm_server(base, cat.url, port, label=f"bench-{routing}", replicas=2, routing=routing,
                                 max_adapters=args.adapters) as url:
                    asyncio.run(load(url, names, 4 * len(names), 8, 2))  # every adapter on every replica
                    run(f"routing_{routing}_2rep", len(names), url)

        if not args.engines_only:
            serve.run(baseline_app(base, dirs), name="bench-base", route_prefix="/baseline")
            burl = f"http://127.0.0.1:{port}/baseline/v1/completions"
            asyncio.run(load(burl, names, 8, 1, 2))
            results["baseline_32_adapters"] = asyncio.run(load(burl, names, args.baseline_requests, args.concurrency, args.max_tokens))
            print(f"baseline_32_adapters: {results['baseline_32_adapters']}", flush=True)
            serve.delete("bench-base")
        serve.shutdown()
    finally:
        ray.shutdown()
    one, many = results["farm_1_adapter"]["req_per_s"], results["farm_32_adapters"]["req_per_s"]
    results["a_spread_over_single"] = round(many / one, 3)
    if "baseline_32_adapters" in results:
        results["b_farm_over_baseline"] = round(many / results["baseline_32_adapters"]["req_per_s"], 2)


def report(results: dict, names: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "req_per_s" in v]
    if rows:
        print(f"\n{'run':<24}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}")
    for k, v in rows:
        print(f"{k:<24}{v['req_per_s']:>8}{v['tokens_per_s']:>9}{v['p50_s']:>8}{v['p99_s']:>8}")
    for k in ("cold_load_local_no_warmup", "cold_load_local", "cold_load_s3_no_warmup", "cold_load_s3"):
        if k in results:
            r = results[k]
            print(f"{k:<26} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  first {r['first_ms']} ms  "
                  f"(fetch p50 {r['fetch_p50_ms']} ms; engine start {r['engine_start_s']} s)")
    if "cold_load_local" in results:
        print(f"(c) cold load p99 with warm-up: local {results['cold_load_local']['p99_ms']} ms"
              + (f", S3 {results['cold_load_s3']['p99_ms']} ms" if "cold_load_s3" in results else "")
              + "  (goal <= 100 ms)")
    if "a_spread_over_single" in results:
        print(f"(a) 32 adapters / 1 adapter = {results['a_spread_over_single']}  (goal >= 0.8)")
    if "b_farm_over_baseline" in results:
        print(f"(b) farm / plain-PEFT swapping baseline = {results['b_farm_over_baseline']}x  (goal >= 5x)")
    if "vllm_over_farm_32" in results:
        print(f"vLLM engine / farm engine tokens/s, {len(names)} adapters = {results['vllm_over_farm_32']}x  "
              f"(goal on a GPU >= 5x); vLLM {len(names)}/1 adapters = {results['vllm_32_over_1']} (goal >= 0.8)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
