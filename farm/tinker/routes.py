"""The HTTP routes of the Tinker API (`/api/v1/*`) as a FastAPI app the serve ingress mounts
(`extension`), in front of the pack worker (farm.tinker.worker).

Auth: the farm's key store; the SDK sends its key as `X-API-Key` (never `Authorization`), so both
headers are read. A tenant is the key's customer (an admin key is the tenant "admin": it sees its own
models only). Every refusal is a 4xx JSON body (farm.tinker.errors); a model or future of another
tenant is the same 404 as a missing one. Operations return a future at once; `retrieve_future`
long-polls the worker for `poll_s` and answers try_again while the operation waits or runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from farm.serve.auth import KeyStore
from farm.serve.limits import unwrap
from farm.tinker import types as t
from farm.tinker import wire
from farm.tinker.config import TinkerConfig
from farm.tinker.errors import TinkerApiError, bad
from farm.tinker.samplers import SamplerCatalog, stored
from farm.tinker.state import (
    TTL_MAX_S,
    TTL_MIN_S,
    StateStore,
    TrainingRunRecord,
    check_adapter_name,
    check_model_id,
    check_name,
    parse_path,
)

PREFIXES = ("/api/v1/",)
MAX_JSON_BYTES = 1024 * 1024
# Known Tinker endpoints the farm does not answer yet: a 422 that says so (a 404 reads like a wrong URL).
NOT_BUILT = ("join_sampling_session", "retrieve_futures", "create_custom_loss", "cancel_future", "save_weights_external",
             "copy_weights", "unload_model")

log = logging.getLogger("farm.tinker")


def principal_of(keys: KeyStore, request: Request):
    """The caller from `X-API-Key` or `Authorization: Bearer`; a 401 without a known key."""
    key = request.headers.get("x-api-key")
    principal = keys.authenticate(f"Bearer {key}" if key else request.headers.get("authorization"))
    if principal is None:
        raise TinkerApiError(401, "missing or unknown API key (send X-API-Key: <key> or Authorization: Bearer <key>)",
                             "api_key")
    return principal


def tenant_of(keys: KeyStore, request: Request) -> str:
    """The caller's tenant: the key's customer, or "admin"."""
    return principal_of(keys, request).customer or "admin"


async def read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise TinkerApiError(413, f"body: {declared} bytes is over the {cap}-byte limit", "body")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > cap:
            raise TinkerApiError(413, f"body: over the {cap}-byte limit", "body")
    return bytes(raw)


def idem(request: Request) -> str | None:
    """The SDK's X-Idempotency-Key: the same on every retry of one POST."""
    return request.headers.get("x-idempotency-key")


def _raise_error(answer: dict) -> dict:
    """A worker answer as is, or its {"_error": [status, message, field]} raised."""
    if "_error" in answer:
        status, message, field = answer["_error"]
        raise TinkerApiError(status, message, field)
    return answer


def build(cfg: TinkerConfig, keys: KeyStore, ingress=None) -> FastAPI:
    """The routes; `ingress` (the serve app's, for its `generate_ids`) is what sampling runs on."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    worker_handle: list[Any] = []
    sampling_tasks: set = set()  # running asample tasks (a reference, so they are not collected)

    def worker():
        """The pack worker's actor handle, started by the first replica that needs it (get_if_exists)."""
        if not worker_handle:
            import ray

            from farm.tinker.worker import TinkerWorker

            actor = ray.remote(TinkerWorker).options(
                name=cfg.actor_name, namespace=cfg.worker_namespace, get_if_exists=True, num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus, max_concurrency=1000, max_restarts=0)
            worker_handle.append(actor.remote(cfg.model_dump(mode="json")))
        return worker_handle[0]

    @app.exception_handler(TinkerApiError)
    async def _refused(_req, exc: TinkerApiError):
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(HTTPException)
    async def _http(_req, exc: HTTPException):
        status = exc.status_code if exc.status_code in (404, 405) else 400
        return JSONResponse({"error": "no such route" if status == 404 else str(exc.detail), "field": None,
                             "category": "user"}, status)

    @app.exception_handler(Exception)
    async def _bug(_req, exc: Exception):
        # a 5xx makes the SDK retry for minutes; a bug is reported as a 400 it raises at once
        from ray.exceptions import ActorUnschedulableError, RayActorError

        # the worker died (its replica went, it ran out of memory) or cannot be reached
        if isinstance(exc, (RayActorError, ActorUnschedulableError)):
            worker_handle.clear()  # the next call starts a new worker (get_if_exists finds none)
            return JSONResponse({"error": "the pack worker was lost, and every model it held; the next request "
                                          "starts a new one (models come back from save_state)",
                                 "field": None, "category": "server"}, 400)
        log.exception("tinker: internal error", exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"[:500], "field": None,
                             "category": "server"}, 400)

    async def json_body(request: Request, model):
        return t.parse(model, await read_body(request, MAX_JSON_BYTES))

    # ---- client and session -------------------------------------------------------------------
    @app.post("/api/v1/client/config")
    async def client_config(request: Request):
        tenant_of(keys, request)  # a bad key fails here, the SDK's first call, at once
        # no JWT exchange, plain fwd/bwd bodies, futures polled one by one
        return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False}

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request):
        tenant_of(keys, request)
        return {}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request):
        tenant = tenant_of(keys, request)
        await json_body(request, t.CreateSession)
        return await worker().create_session.remote(tenant)

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.SessionRef)
        return _raise_error(await worker().touch_session.remote(tenant, body.session_id))

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request):
        tenant = tenant_of(keys, request)
        return _raise_error(await worker().finish_session.remote(tenant, session_id))

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        tenant_of(keys, request)
        await read_body(request, MAX_JSON_BYTES)  # read and dropped: the farm keeps its own metrics
        return {"status": "accepted"}

    @app.get("/api/v1/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request):
        tenant_of(keys, request)
        return {"supported_models": [{"model_name": cfg.served_name, "trainable": True, "sampleable": False}]}

    # ---- models and training ------------------------------------------------------------------
    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.CreateModel)
        if body.lora_config is None:
            raise bad("lora_config", "is required (the farm trains LoRA models)")
        return _raise_error(await worker().submit.remote(tenant, "create_model", body, idem(request)))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.ModelRef)
        info = _raise_error(await worker().model_info.remote(tenant, body.model_id))
        return {"model_id": body.model_id, "type": "get_info", "is_lora": True, "lora_rank": info["lora_rank"],
                "optimizer_config": {"type": "adamw"}, "model_name": cfg.served_name,
                "model_data": {"model_name": cfg.served_name, "tokenizer_id": cfg.base_model}}

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        tenant = tenant_of(keys, request)
        ctype = request.headers.get("content-type", "")
        if wire.PROTO_TYPE not in ctype:
            raise bad("content-type", f"{ctype!r}: forward_backward takes a protobuf body ({wire.PROTO_TYPE})")
        encoding = request.headers.get("content-encoding")
        if encoding and encoding != "identity":
            raise bad("content-encoding", f"{encoding!r}: send the body uncompressed (client/config answers "
                                          "proto_compress_fwdbwd: false)")
        req = wire.parse_forward_backward(await read_body(request, cfg.max_body_bytes), cfg.max_request_tokens)
        return _raise_error(await worker().submit.remote(tenant, "forward_backward", req, idem(request)))

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.OptimStep)
        if body.adam_params is None:
            if body.optimizer_params is not None:
                raise TinkerApiError(422, f"optimizer_params: {body.optimizer_params.get('type')!r}: the farm's "
                                          "optimizer is adamw; send adam_params", "optimizer_params")
            body.adam_params = t.AdamParams()
        return _raise_error(await worker().submit.remote(tenant, "optim_step", body, idem(request)))

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.SaveWeights)
        check_name(body.path)
        return _raise_error(await worker().submit.remote(tenant, "save_weights", body, idem(request)))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.SaveWeightsForSampler)
        if body.path is None:
            if body.sampling_session_seq_id is None:
                raise bad("path", "missing: send path (named sampler weights) or sampling_session_seq_id")
        else:
            check_adapter_name(body.path)
        return _raise_error(await worker().submit.remote(tenant, "save_weights_for_sampler", body, idem(request)))

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.LoadWeights)
        parse_path(body.path)
        if body.session_id is not None:
            if body.model_seq_id is None:
                raise bad("model_seq_id", "is required with session_id (a load that creates a model)")
        elif body.model_id is None or body.seq_id is None:
            raise bad("session_id", "missing: send session_id + model_seq_id (create by load) or model_id + seq_id")
        return _raise_error(await worker().submit.remote(tenant, "load_weights", body, idem(request)))

    # ---- sampling: on the serving engine, through the ingress ----------------------------------
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.CreateSamplingSession)
        if (body.model_path is None) == (body.base_model is None):
            raise bad("model_path", "send model_path (tinker://…/sampler_weights/<name>) or base_model, one of them")
        answer = _raise_error(await worker().create_sampler.remote(
            tenant, body.session_id, body.sampling_session_seq_id, body.model_path, body.base_model))
        return {"sampling_session_id": answer["sampling_session_id"], "type": "create_sampling_session"}

    @app.get("/api/v1/samplers/{sampling_session_id}")
    async def get_sampler(sampling_session_id: str, request: Request):
        tenant = tenant_of(keys, request)
        answer = _raise_error(await worker().sampler.remote(tenant, sampling_session_id))
        return {"sampler_id": sampling_session_id, "base_model": cfg.served_name, "model_path": None,
                "model": answer["model"]}

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        principal = principal_of(keys, request)
        tenant = principal.customer or "admin"
        body = await json_body(request, t.Sample)
        if ingress is None:
            raise TinkerApiError(422, "asample: this service mounts the Tinker API without a serving engine", "path")
        if body.sampling_session_id is None:
            raise bad("sampling_session_id", "is required (create_sampling_session first)")
        params, stop = body.sampling_params, body.sampling_params.stop
        unsupported = [(f, v) for f, v in (("topk_prompt_logprobs", body.topk_prompt_logprobs),
                                           ("topk_sample_logprobs", body.topk_sample_logprobs),
                                           ("target_prompt_logprobs", body.target_prompt_logprobs),
                                           ("prompt_alt_tokens_k", body.prompt_alt_tokens_k)) if v]
        if unsupported:
            field, value = unsupported[0]
            raise TinkerApiError(422, f"{field}: {value!r} is not supported by the farm's sampler yet", field)
        # `stop`: a string, strings or token ids; `[]` turns off even EOS. The token that ends a sample
        # (a stop id or EOS) is in its tokens, as Tinker's (vLLM's) are: the cookbook's renderers look for it.
        stop = [stop] if isinstance(stop, str) else stop
        stop_ids = [x for x in stop or () if isinstance(x, int)]
        stop_texts = [x for x in stop or () if isinstance(x, str)]
        prompt = [tok for chunk in body.prompt.chunks for tok in chunk.tokens]
        if any(c.type != "encoded_text" for c in body.prompt.chunks):
            raise TinkerApiError(422, "prompt.chunks: encoded_text only", "prompt.chunks")
        model = _raise_error(await worker().sampler.remote(tenant, body.sampling_session_id))["model"]
        rid = await worker().open_future.remote(tenant, "sample")

        async def run() -> None:
            try:
                dones = await asyncio.gather(*(ingress.generate_ids(
                    principal, model, prompt, max_tokens=params.max_tokens, temperature=params.temperature,
                    top_p=params.top_p, seed=None if params.seed is None else params.seed + i, top_k=params.top_k,
                    stops=stop_texts, stop_token_ids=stop_ids, keep_stop_token=True, ignore_eos=stop == [],
                    prompt_logprobs=body.prompt_logprobs and i == 0) for i in range(body.num_samples)))
                result = {"sequences": [{"tokens": [e[0] for e in d["logprobs"]], "logprobs": [e[1] for e in d["logprobs"]],
                                         "stop_reason": "length" if d["finish_reason"] == "length" else "stop"}
                                        for d in dones]}
                if body.prompt_logprobs:  # the first prompt token has none (NaN on the wire), nor those before last_n
                    scored = [e[1] for e in dones[0]["prompt_logprobs"]]
                    first = len(scored) - (body.prompt_logprobs_last_n or len(scored))
                    result["prompt_logprobs"] = [None] * max(0, first) + scored[max(0, first):]
            except Exception as exc:  # noqa: BLE001 - the sampler's refusal or failure is the future's
                status = getattr(unwrap(exc), "status", None)
                result = {"error": str(unwrap(exc))[:500], "category": "user" if status and status < 500 else "server"}
            await worker().close_future.remote(rid, result, prompt_tokens=len(prompt) * body.num_samples)

        task = asyncio.get_running_loop().create_task(run())
        sampling_tasks.add(task)
        task.add_done_callback(sampling_tasks.discard)
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(body.num_samples)]}

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.RetrieveFuture)
        answer = _raise_error(await worker().retrieve.remote(tenant, body.request_id, cfg.poll_s))
        if "try_again" in answer:
            return {"type": "try_again", "request_id": body.request_id, "queue_state": answer["try_again"]}
        result = answer["result"]
        if "error" in result:
            return {"error": result["error"], "category": result.get("category", "unknown")}
        if answer["kind"] == "sample":
            return Response(wire.sample_response(result["sequences"], result.get("prompt_logprobs")),
                            media_type=wire.PROTO_TYPE)
        if answer["kind"] == "forward_backward":
            outputs = {"logprobs": result["logprobs"], "elementwise_loss": result["elementwise_loss"]}
            return Response(wire.forward_backward_output(outputs, result["metrics"]), media_type=wire.PROTO_TYPE)
        return result

    # ---- checkpoints (RestClient) and usage (AdminClient) ---------------------------------------
    def store() -> StateStore:
        from farm.settings import storage_path

        return StateStore(cfg.storage or storage_path())

    def samplers() -> SamplerCatalog:
        from farm.settings import catalog_url

        return SamplerCatalog(cfg.catalog_url or catalog_url())

    def iso(ts: float | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()

    @app.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str, request: Request):
        """The model's save_state checkpoints (run storage) and named sampler weights (the newest catalog
        version of each name it published); another tenant's model is a 404, as a missing one."""
        tenant = tenant_of(keys, request)
        check_model_id(model_id, "training_run_id")
        saved = await asyncio.to_thread(store().checkpoints, tenant, model_id)
        published = await asyncio.to_thread(samplers().published, tenant, model_id=model_id, ephemeral=False)
        newest = {s.adapter: s for s in sorted(published, key=lambda s: s.version)}
        if not saved and not newest and "_error" in await worker().model_info.remote(tenant, model_id):
            raise TinkerApiError(404, f"training run {model_id!r} not found", "training_run_id")
        rows = [state_row(c) for c in saved] + [sampler_row(s) for s in sorted(newest.values(), key=lambda s: s.created)]
        return {"checkpoints": rows, "cursor": None}

    def state_row(c) -> dict:
        """A save_state checkpoint as the SDK's `Checkpoint`."""
        return {"checkpoint_id": f"weights/{c.name}", "checkpoint_type": "training", "time": iso(c.created),
                "tinker_path": c.path, "size_bytes": c.size_bytes, "public": False, "expires_at": iso(c.expires_at)}

    def sampler_row(s) -> dict:
        """Named sampler weights (their newest version) as the SDK's `Checkpoint`, with the catalog ref."""
        return {"checkpoint_id": f"sampler_weights/{s.adapter}", "checkpoint_type": "sampler", "time": iso(s.created),
                "tinker_path": s.path, "size_bytes": s.size_bytes, "public": False, "expires_at": None,
                "user_metadata": {"catalog_ref": s.ref}}

    def newest_samplers(published) -> dict[tuple[str, str], Any]:
        """(model id, name) -> the newest version: what a sampler path names."""
        return {(s.model_id, s.adapter): s for s in sorted(published, key=lambda s: s.version)}

    # ---- training runs (RestClient.get_training_run / list_training_runs / weights_info) ---------
    def page_query(request: Request) -> t.Page:
        q = t.validate(t.Page, dict(request.query_params))
        if q.project_id is not None:
            raise TinkerApiError(422, f"project_id: {q.project_id!r}: the farm has no projects (list without one)",
                                 "project_id")
        return q

    def run_view(record, saved: list, published: list, live: dict | None) -> dict:
        """A run record, its newest checkpoints and the worker's view of it, as the SDK's `TrainingRun`."""
        last_state = max(saved, key=lambda c: c.created, default=None)
        last_sampler = max(published, key=lambda s: s.created, default=None)
        seen = [record.created] + [c.created for c in saved] + [s.created for s in published]
        last = (live or {}).get("last_used") or max(seen)
        return {"training_run_id": record.model_id, "base_model": record.base_model, "model_owner": record.tenant,
                "is_lora": True, "corrupted": False, "lora_rank": record.lora_rank, "last_request_time": iso(last),
                "last_checkpoint": state_row(last_state) if last_state else None,
                "last_sampler_checkpoint": sampler_row(last_sampler) if last_sampler else None,
                "user_metadata": record.user_metadata}

    async def run_record(tenant: str, model_id: str):
        """The tenant's run record, or the worker's live model when its record could not be written; a 404
        for anything else (another tenant's run included)."""
        check_model_id(model_id, "training_run_id")
        record = await asyncio.to_thread(store().run, tenant, model_id)
        live = await worker().model_info.remote(tenant, model_id)
        live = None if "_error" in live else live
        if record is None and live is None:
            raise TinkerApiError(404, f"training run {model_id!r} not found", "training_run_id")
        if record is None:
            record = TrainingRunRecord(tenant, model_id, cfg.served_name, int(live["lora_rank"]), True, True, True,
                                       live.get("last_used") or time.time())
        return record, live

    @app.get("/api/v1/training_runs/{model_id}")
    async def get_training_run(model_id: str, request: Request):
        tenant = tenant_of(keys, request)
        page_query(request)  # access_scope: owned or accessible (the farm publishes nothing: the same runs)
        record, live = await run_record(tenant, model_id)
        saved = await asyncio.to_thread(store().checkpoints, tenant, model_id)
        published = await asyncio.to_thread(samplers().published, tenant, model_id=model_id, ephemeral=False)
        return run_view(record, saved, list(newest_samplers(published).values()), live)

    @app.get("/api/v1/training_runs")
    async def list_training_runs(request: Request):
        """The caller's runs, newest first, a page at a time (runs whose record is in run storage)."""
        tenant = tenant_of(keys, request)
        q = page_query(request)
        runs = await asyncio.to_thread(store().runs, tenant)
        page = runs[q.offset:q.offset + q.limit]
        saved = await asyncio.to_thread(store().checkpoints, tenant) if page else []
        published = await asyncio.to_thread(samplers().published, tenant, ephemeral=False) if page else []
        newest = list(newest_samplers(published).values())
        lives = await asyncio.gather(*(worker().model_info.remote(tenant, r.model_id) for r in page))
        views = [run_view(r, [c for c in saved if c.model_id == r.model_id], [s for s in newest if s.model_id == r.model_id],
                          None if "_error" in live else live) for r, live in zip(page, lives, strict=True)]
        return {"training_runs": views, "cursor": {"offset": q.offset, "limit": q.limit, "total_count": len(runs)}}

    @app.get("/api/v1/checkpoints")
    async def list_user_checkpoints(request: Request):
        """Every checkpoint of the caller's runs (save_state and named sampler weights), newest first."""
        tenant = tenant_of(keys, request)
        q = page_query(request)
        saved = await asyncio.to_thread(store().checkpoints, tenant)
        published = await asyncio.to_thread(samplers().published, tenant, ephemeral=False)
        rows = sorted([state_row(c) for c in saved] + [sampler_row(s) for s in newest_samplers(published).values()],
                      key=lambda r: r["time"], reverse=True)
        return {"checkpoints": rows[q.offset:q.offset + q.limit],
                "cursor": {"offset": q.offset, "limit": q.limit, "total_count": len(rows)}}

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request):
        """What loading a checkpoint path needs to know: its base and LoRA shape (the caller's paths only)."""
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.WeightsInfo)
        source, kind, name = parse_path(body.tinker_path, "tinker_path")
        record, _ = await run_record(tenant, source)
        if kind == "weights":
            states = store()
            found = await asyncio.to_thread(states.exists, states.folder(tenant, source, name))
        else:
            found = await asyncio.to_thread(samplers().latest, tenant, source, name) is not None
        if not found:
            raise TinkerApiError(404, f"tinker_path: no checkpoint {body.tinker_path!r}", "tinker_path")
        return {"base_model": record.base_model, "optimizer_config": {"type": "adamw"}, "is_lora": True,
                "lora_rank": record.lora_rank, "train_unembed": record.train_unembed, "train_mlp": record.train_mlp,
                "train_attn": record.train_attn}

    def checkpoint_folder(tenant: str, model_id: str, kind: str, name: str) -> str:
        if kind == "sampler_weights":
            raise TinkerApiError(422, f"checkpoint_id: sampler_weights/{name} is a catalog version and does not "
                                      "expire; delete_checkpoint deletes it", "checkpoint_id")
        if kind != "weights":
            raise TinkerApiError(404, f"checkpoint {kind}/{name!r} not found", "checkpoint_id")
        return store().folder(tenant, model_id, check_name(name, "checkpoint_id"))

    def delete_sampler_weights(tenant: str, model_id: str, name: str) -> None:
        """Every version of `<tenant>/<name>` that the model published (its path named the newest)."""
        from farm.errors import AdapterNotFound

        found = samplers().published(tenant, model_id=check_model_id(model_id), adapter=check_name(name, "checkpoint_id"),
                                     ephemeral=False)
        if not found:
            raise TinkerApiError(404, f"checkpoint sampler_weights/{name!r} not found", "checkpoint_id")
        for s in found:
            try:
                samplers().delete(s)
            except AdapterNotFound:
                pass  # deleted meanwhile

    @app.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request):
        tenant = tenant_of(keys, request)
        if kind == "sampler_weights":
            await asyncio.to_thread(delete_sampler_weights, tenant, model_id, name)
            return {}
        folder = checkpoint_folder(tenant, model_id, kind, name)
        await asyncio.to_thread(store().delete, folder)
        return {}

    @app.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(model_id: str, kind: str, name: str, request: Request):
        tenant = tenant_of(keys, request)
        body = await json_body(request, t.SetTtl)
        if body.ttl_seconds is not None and not TTL_MIN_S <= body.ttl_seconds <= TTL_MAX_S:
            raise bad("ttl_seconds", f"{body.ttl_seconds!r} is not in [{TTL_MIN_S}, {TTL_MAX_S}] (1 hour to 10 years), "
                                     "or null (never expires)")
        folder = checkpoint_folder(tenant, model_id, kind, name)
        await asyncio.to_thread(store().set_ttl, folder, body.ttl_seconds)
        return {}

    @app.get("/api/v1/billing/usage/checkpoints/current")
    async def storage_usage(request: Request):
        """What the caller keeps now, as its storage quota counts it: save_state checkpoints and named
        sampler weights."""
        tenant = tenant_of(keys, request)
        now = await asyncio.to_thread(stored, store(), samplers(), tenant)
        return {"effective_rate_usd_per_gigabyte_month": None,
                "data": [{"user_name": tenant, "checkpoint_count": now.count, "size_bytes": now.size_bytes,
                          "size_gigabytes": now.size_bytes / 1e9, "estimated_monthly_cost_usd": None}]}

    @app.get("/api/v1/billing/usage/events")
    async def billing_usage(request: Request):
        """The caller's hourly usage on this base (the queue database's usage table, across worker
        restarts): training tokens, sampling prefill and sampled tokens, checkpoints made. No prices
        (the farm has no rate card)."""
        tenant = tenant_of(keys, request)
        q = t.validate(t.BillingWindow, dict(request.query_params))
        start, end = q.starting_on.timestamp(), q.ending_before.timestamp()
        for field, ts in (("starting_on", start), ("ending_before", end)):
            if ts % 3600:
                raise bad(field, f"{iso(ts)} is not on a UTC hour boundary")
        if end <= start or end - start > 14 * 86400:
            raise bad("ending_before", f"{iso(end)}: must be after starting_on and at most 14 days after it")
        if start > time.time():
            raise bad("starting_on", f"{iso(start)} is in the future")
        rows = await worker().billing.remote(tenant, start, end)
        if isinstance(rows, dict):
            _raise_error(rows)

        def info(kind: str, n: int) -> dict:
            if kind == "checkpoint":
                return {"type": kind, "count": n}
            return {"type": kind, "token_count": n, **({"cached": False} if kind == "sampling_prefill" else {})}

        return {"data": [{"bucket_start": iso(r["hour"]), "bucket_end": iso(r["hour"] + 3600),
                          "base_model": cfg.served_name, "user_name": tenant, "event_info": info(r["kind"], r["count"])}
                         for r in rows], "sessions": {}, "cost_data_through": None}

    @app.post("/api/v1/{name}")
    async def not_built(name: str, request: Request):
        tenant_of(keys, request)
        if name in NOT_BUILT:
            raise TinkerApiError(422, f"{name}: this farm does not offer it yet (built: create_model, "
                                      "forward_backward, forward, optim_step, save_state, load_state, "
                                      "save_weights_for_sampler, create_sampling_session, asample)", "path")
        raise TinkerApiError(404, f"/api/v1/{name}: no such endpoint", "path")

    return app


def extension(serve_cfg, keys: KeyStore, ingress=None) -> tuple[tuple[str, ...], Any]:
    """What the serve ingress mounts: (path prefixes, ASGI app). Config from serve_cfg.extra["tinker"]."""
    return PREFIXES, build(TinkerConfig.model_validate(serve_cfg.extra["tinker"]), keys, ingress)
