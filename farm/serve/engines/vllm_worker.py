"""The vLLM side of a replica's `vllm` engine: a process of the vLLM environment (`.venv-vllm`)
that runs vLLM's AsyncLLM and answers the replica (farm/serve/engines/vllm.py) on a loopback port.

    <vllm python> -m farm.serve.engines.vllm_worker --config JSON --ready-file PATH

Routes (JSON; bound to 127.0.0.1 only, started and owned by one replica; every call carries
`Authorization: Bearer <token>`, the secret the replica put in $FARM_VLLM_WORKER_TOKEN):
    POST   /adapters          {"name", "id", "path"}: validate with vLLM's PEFTHelper, then add_lora
    DELETE /adapters/{id}     remove_lora
    POST   /generate          token ids + sampling -> NDJSON lines {"delta"} ... {"done"} | {"error"}
    GET    /metrics           vLLM's own Prometheus metrics (text format)
    GET    /state             the LoRA admission gate and the loaded adapters

Every generation passes the AdapterGate (gate.py): never more distinct adapters in flight than
max_loras. The gate sits here, next to vLLM, so "in flight" ends only when vLLM has finished or
aborted the request. The process exits when the replica that started it goes away.
Imports: the standard library, vLLM's environment, and farm's stdlib-only gate module.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request type.

import argparse
import asyncio
import hmac
import json
import os
import socket
import sys

TOKEN_ENV = "FARM_VLLM_WORKER_TOKEN"  # the per-replica secret every call must carry (Bearer)


def _capacity(cfg: dict) -> int:
    return cfg["max_cpu_loras"] + cfg["max_loras"] + 2


def registrable(cfg: dict) -> int:
    """How many adapters the replica may register at once: vLLM's LoRA capacity less the base's
    identity adapter. The replica waits for room (farm/serve/engines/vllm.py) and this worker refuses
    an add beyond it, so vLLM's own LRU never has to evict (see _settings)."""
    return _capacity(cfg) - 1


def _settings(cfg: dict):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw = dict(
        model=cfg["model"],
        tokenizer=cfg.get("tokenizer") or cfg["model"],
        dtype=cfg.get("dtype", "bfloat16"),
        enforce_eager=cfg.get("enforce_eager", True),
        enable_lora=True,
        # Every adapter vLLM holds has its own LoRA slot: room for the replica's LRU of K, the ones it
        # dropped that still finish requests (at most the gate's slots), and the identity adapter.
        # vLLM then never evicts on its own, neither from its CPU cache nor from its slots: checked
        # on 0.32 CPU, eviction while it activates a batch's adapters can drop one it activated for
        # that same batch (KeyError in the LoRA mapping, then EngineDeadError). The replica adds and
        # removes adapters itself; the gate (slots + 1) bounds how many share the batches.
        max_loras=_capacity(cfg),
        max_cpu_loras=_capacity(cfg),
        max_lora_rank=cfg["max_lora_rank"],
        max_num_seqs=cfg["max_num_seqs"],
        seed=0,
        # logprobs are the log-softmax of the raw logits (before temperature/top-p), as the farm
        # engine's and stock transformers' are; up to max_logprobs alternatives per token
        logprobs_mode="raw_logprobs",
        max_logprobs=cfg.get("max_logprobs", 20),
    )
    if cfg.get("max_model_len"):
        kw["max_model_len"] = cfg["max_model_len"]
    if cfg.get("quantization"):
        kw["quantization"] = cfg["quantization"]
    if cfg.get("gpu_memory_utilization"):
        kw["gpu_memory_utilization"] = cfg["gpu_memory_utilization"]
    return AsyncEngineArgs(**kw)


IDENTITY_ID = 2**31 - 1  # lora_int_id of the base's identity adapter; the replica's counter starts at 1


def identity_adapter(engine, dest: str) -> str:
    """A rank-1 LoRA whose B is zero: exactly the base model's output, as a LoRA row.

    Checked on vLLM 0.32 CPU: in a batch that mixes LoRA rows with rows without a LoRA, the rows
    without one were computed with an adapter (base requests got another adapter's text). So no
    request runs without a LoRA: base-model requests carry this one."""
    import torch
    from safetensors.torch import save_file

    hf = engine.vllm_config.model_config.hf_config
    hidden = int(hf.hidden_size)
    head_dim = int(getattr(hf, "head_dim", None) or hidden // hf.num_attention_heads)
    os.makedirs(dest, exist_ok=True)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(1, hidden, dtype=torch.bfloat16),
               f"{prefix}.lora_B.weight": torch.zeros(hf.num_attention_heads * head_dim, 1, dtype=torch.bfloat16)},
              os.path.join(dest, "adapter_model.safetensors"))
    with open(os.path.join(dest, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"],
                   "layers_to_transform": [0], "bias": "none"}, f)
    return dest


def build_api(engine, cfg: dict, base_lora, token: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    from farm.serve.engines.gate import AdapterGate, GateFull

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    expected = ("Bearer " + token).encode()

    @api.middleware("http")
    async def only_the_replica(request: Request, call_next):
        # Loopback is not enough: any local user or process could add adapters or generate. Only
        # the replica that started this worker knows its token (passed in the environment).
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return JSONResponse(err(401, "this vLLM worker answers only its replica (bad or missing token)",
                                    "authentication_error"), 401)
        return await call_next(request)
    # vLLM's max_loras = the replica's slots + the base's identity adapter; the gate counts both
    # at most a batch's worth in vLLM at once, the rest waits in the gate, fair per tenant
    gate = AdapterGate(cfg["max_loras"] + 1, cfg["max_held"], max_active=cfg["max_num_seqs"])
    loras: dict[int, LoRARequest] = {}
    lora_cfg = engine.vllm_config.lora_config
    tokenizer = engine.get_tokenizer()
    max_pos = engine.vllm_config.model_config.max_model_len

    def err(status: int, message: str, kind: str = "adapter_error", retry_after=None):
        return {"error": {"status": status, "message": message, "type": kind, "retry_after": retry_after}}

    @api.get("/health")
    async def health():
        await engine.check_health()
        return {"ok": True}

    room = registrable(cfg)
    changing = asyncio.Lock()  # one add/remove at a time: the count below is what vLLM holds

    @api.post("/adapters")
    async def add(body: dict):
        req = LoRARequest(lora_name=str(body["name"]), lora_int_id=int(body["id"]), lora_path=str(body["path"]))
        async with changing:
            if req.lora_int_id not in loras and len(loras) >= room:
                # the replica bounds itself (VllmEngine.attach waits for room); this is the backstop
                # that keeps vLLM from evicting an adapter on its own
                return JSONResponse(err(503, f"the vLLM worker holds {len(loras)} adapters, its capacity; "
                                             "retry once one is dropped", "overloaded", 1.0), 503)
            try:
                helper = PEFTHelper.from_local_dir(req.lora_path, max_pos)
                helper.validate_legal(lora_cfg)  # vLLM's own feature/rank checks, before the worker sees it
                await engine.add_lora(req)
            except Exception as exc:  # noqa: BLE001 - reported to the replica as a 422
                return JSONResponse(err(422, f"vLLM refused the adapter: {exc}"), 422)
            loras[req.lora_int_id] = req
        return {"ok": True}

    @api.delete("/adapters/{lora_id}")
    async def remove(lora_id: int):
        async with changing:
            try:
                await engine.remove_lora(lora_id)
            except Exception:  # noqa: BLE001 - already gone
                pass
            loras.pop(lora_id, None)  # counted until vLLM has really dropped it
        return {"ok": True}

    @api.get("/state")
    async def state():
        async with changing:  # never halfway through an add or a remove
            return {"gate": gate.snapshot(), "loras": sorted(loras), "vllm_loras": sorted(await engine.list_loras())}

    @api.get("/metrics")
    async def metrics():
        from prometheus_client import generate_latest
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return PlainTextResponse(generate_latest(get_prometheus_registry()).decode())

    @api.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        lid = body.get("lora_id")
        lora = loras.get(lid) if lid is not None else base_lora
        if lid is None:
            lid = IDENTITY_ID
        elif lora is None:
            return JSONResponse(err(503, "adapter was unloaded while the request waited; retry", "overloaded", 0.1))
        score_only = int(body["max_tokens"]) == 0  # echo with max_tokens 0: vLLM generates >= 1, dropped below
        params = SamplingParams(
            n=1, max_tokens=max(1, int(body["max_tokens"])), temperature=float(body["temperature"]),
            top_p=float(body["top_p"]), seed=body.get("seed"), stop=list(body.get("stops") or []) or None,
            top_k=int(body.get("top_k") or 0), stop_token_ids=list(body.get("stop_token_ids") or []) or None,
            ignore_eos=bool(body.get("ignore_eos")),
            skip_special_tokens=True, output_kind=RequestOutputKind.DELTA,
            logprobs=body.get("logprobs"),
        )
        rid, stream = str(body["request_id"]), bool(body.get("stream"))

        async def lines():
            text, out_ids, finish, stop_reason = [], [], None, None
            out_lps = []  # no prompt logprobs: the replica refuses them (vllm.py)
            try:
                async with gate.hold(lid, str(body.get("tenant") or "")):
                    try:
                        async for out in engine.generate(TokensPrompt(prompt_token_ids=body["prompt_ids"]), params,
                                                         rid, lora_request=lora):
                            c = out.outputs[0]
                            if c.logprobs is not None:
                                out_lps.extend(_entry(t, d, body["logprobs"]) for t, d in zip(c.token_ids, c.logprobs))
                            out_ids.extend(c.token_ids)
                            if c.text:
                                text.append(c.text)
                                if stream:
                                    yield json.dumps({"delta": c.text}) + "\n"
                            if c.finish_reason is not None:
                                finish, stop_reason = c.finish_reason, c.stop_reason
                    except BaseException:
                        # the replica went away or the request failed: vLLM drops it before its slot is free
                        await asyncio.shield(engine.abort(rid))
                        raise
            except GateFull as exc:
                yield json.dumps(err(503, f"server busy: {exc}; retry later", "overloaded", 1.0)) + "\n"
                return
            except Exception as exc:  # noqa: BLE001 - one bad request must not kill the worker
                yield json.dumps(err(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")) + "\n"
                return
            if finish == "stop" and stop_reason is None and out_ids and not body.get("keep_stop_token"):
                out_ids.pop()  # the EOS token: not counted, like the farm engine (Tinker's sampler keeps it)
                del out_lps[len(out_ids):]
            if score_only:
                text, out_ids, out_lps, finish, stop_reason = [], [], [], "length", None
            streamed = "".join(text)
            final = streamed
            if not isinstance(stop_reason, str):
                # vLLM's incremental detokenizer holds back a trailing incomplete character; the
                # answer is the whole decode of the tokens, as with the farm engine and stock PEFT
                final = tokenizer.decode(out_ids, skip_special_tokens=True)
                if stream and final.startswith(streamed) and len(final) > len(streamed):
                    yield json.dumps({"delta": final[len(streamed):]}) + "\n"
                elif not final.startswith(streamed):
                    final = streamed  # never contradict what was already streamed
            done = {"text": final, "finish_reason": "length" if finish == "length" else "stop",
                    "completion_tokens": len(out_ids), "prompt_tokens": len(body["prompt_ids"]),
                    "logprobs": out_lps if body.get("logprobs") is not None else None, "prompt_logprobs": None}
            yield json.dumps({"done": done}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api


def _entry(token_id: int, position: dict, k: int) -> list:
    """farm's logprob entry (farm/serve/logprobs.py) from vLLM's {token id: Logprob} at one position,
    which holds the top k and the chosen token (k + 1 keys when the chosen one is not among them)."""
    alts = sorted(position.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
    return [int(token_id), float(position[token_id].logprob), [[int(t), float(lp.logprob)] for t, lp in alts]]


async def _watch_parent(parent: int, engine) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    # The replica is gone: so is its engine. vLLM's engine-core process does not follow a parent
    # that just exits (checked: one outlived its killed parent), so shut it down first.
    try:
        engine.shutdown()
    finally:
        # the replica started this worker as a process-group leader: end vLLM's processes with it
        os.killpg(os.getpgid(0), 9)
        os._exit(0)


async def main(cfg: dict, ready_file: str, token: str) -> None:
    import uvicorn
    from vllm.v1.engine.async_llm import AsyncLLM

    parent = os.getppid()
    engine = AsyncLLM.from_engine_args(_settings(cfg))
    from vllm.lora.request import LoRARequest

    base_lora = LoRARequest(lora_name="farm-base-identity", lora_int_id=IDENTITY_ID,
                            lora_path=identity_adapter(engine, os.path.abspath("base-identity")))
    await engine.add_lora(base_lora)
    await engine.pin_lora(IDENTITY_ID)
    api = build_api(engine, cfg, base_lora, token)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False))
    watcher = asyncio.ensure_future(_watch_parent(parent, engine))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, ready_file)
    try:
        await serving
    finally:
        watcher.cancel()
        engine.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="JSON settings (see farm/serve/engines/vllm.py)")
    p.add_argument("--ready-file", required=True, help="written with the port once serving")
    a = p.parse_args()
    secret = os.environ.pop(TOKEN_ENV, "")  # not in argv: any local user can read another's argv
    if not secret:
        sys.exit(f"{TOKEN_ENV} is not set: the replica passes the worker its token")
    try:
        asyncio.run(main(json.loads(a.config), a.ready_file, secret))
    except KeyboardInterrupt:
        sys.exit(0)
