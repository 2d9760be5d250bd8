"""The HTTP side: a FastAPI ingress deployment (auth, parsing, limits, resolution, OpenAI-shaped
responses) in front of the model deployment (server.py), and `build_app`/`deploy`.

The ingress tokenizes the prompt, so length limits are checked before a replica is involved, and
passes token ids plus the exact adapter version to a model replica; with routing=affinity the call
carries the version id as Serve's multiplexed model id, so it lands on a replica holding it.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods.

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from farm.serve import metrics, protocol
from farm.serve.auth import KeyStore, Principal
from farm.serve.config import ServeConfig, check_bind
from farm.serve.limits import ApiError, check_context, check_max_tokens, unwrap
from farm.serve.resolver import Resolver, Target
from farm.serve.server import AdapterServer

log = logging.getLogger("farm.serve")
api = FastAPI(title="farm", docs_url=None, redoc_url=None, openapi_url=None)


def _error(exc: BaseException, tag: str) -> JSONResponse:
    exc = unwrap(exc)
    if isinstance(exc, ApiError):
        err = exc
    elif type(exc).__name__ == "BackPressureError":
        err = ApiError(503, "server busy: too many queued requests; retry later", "overloaded", 1.0)
    else:
        log.exception("internal error", exc_info=exc)
        err = ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
    metrics.get("errors").inc(tags={"adapter": tag, "status": str(err.status)})
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after is not None else None
    return JSONResponse(protocol.error_body(err.message, err.type, err.status), err.status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Extensions:
    """ASGI middleware: requests under an extension's path prefixes go to the app that extension
    built when this replica started (`ServeConfig.extra["extensions"]`: "module:factory" strings,
    factory(cfg, keys) -> (prefixes, asgi_app)). Serve pickles `api`, so the apps live on the class,
    once per replica process. This is how routes above serve (the fine-tuning API) are mounted
    without serve importing them."""

    mounted: list[tuple[tuple[str, ...], Any]] = []

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for prefixes, ext in Extensions.mounted:
                if scope["path"].startswith(prefixes):
                    return await ext(scope, receive, send)
        return await self.app(scope, receive, send)

    @classmethod
    def load(cls, cfg: ServeConfig, keys: KeyStore) -> None:
        import importlib

        mounted = []
        for spec in cfg.extra.get("extensions", ()):
            module, _, name = spec.partition(":")
            mounted.append(getattr(importlib.import_module(module), name)(cfg, keys))
        cls.mounted = mounted


api.add_middleware(Extensions)


class LocalServer:
    """An AdapterServer in the ingress's own process, called like its deployment handle
    (`.options(...)` is a no-op, `.method.remote(...)` returns the coroutine or async generator)."""

    def __init__(self, server: AdapterServer):
        self._server = server

    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        return SimpleNamespace(remote=getattr(self._server, name))


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, keys: dict, server=None):
        """`server`: the AdapterServer deployment's handle, or None to hold the model in this replica."""
        from farm.modeling import load_config, load_tokenizer

        self.cfg = ServeConfig(**config)
        self.keys = KeyStore({h: Principal(**p) for h, p in keys.items()})
        self.server = server if server is not None else LocalServer(AdapterServer(config))
        self.tokenizer = load_tokenizer(self.cfg.base_model)
        mc = load_config(self.cfg.base_model)
        self.context_length = int(getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", 2048))
        self.resolver = Resolver(self.cfg.catalog_url, self.cfg.served_name, self.cfg.resolve_ttl_s)
        Extensions.load(self.cfg, self.keys)

    # ---- plumbing -------------------------------------------------------------------------
    async def _body(self, request: Request, model: type):
        declared = request.headers.get("content-length")
        cap = self.cfg.max_body_bytes
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"request body of {declared} bytes is over the {cap}-byte limit")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise ApiError(413, f"request body is over the {cap}-byte limit")
        try:
            return model.model_validate_json(bytes(raw))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
            raise ApiError(400, f"invalid request: {problems}") from None

    def _principal(self, request: Request) -> Principal:
        p = self.keys.authenticate(request.headers.get("authorization"))
        if p is None:
            raise ApiError(401, "missing or unknown API key (Authorization: Bearer <key>)", "authentication_error")
        return p

    async def _target(self, principal: Principal, model: str) -> Target:
        return await asyncio.to_thread(self.resolver.resolve, principal, model)

    def _handle(self, target: Target, stream: bool = False):
        h = self.server
        if target.vid is not None and self.cfg.routing == "affinity":
            h = h.options(multiplexed_model_id=target.vid)
        return h.options(stream=True) if stream else h

    def _job(self, req, target: Target, prompt_ids: list[int]) -> dict:
        max_tokens = check_max_tokens(req.max_tokens, self.cfg.max_tokens_cap)
        check_context(len(prompt_ids), max_tokens, self.context_length)
        return {
            "ref": target.ref,
            "name": target.name,
            "version": target.version,
            "prompt_ids": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "stops": req.stops,
            "stream": req.stream,
        }

    async def _generate(self, request: Request, kind: str):
        tag = "unknown"
        try:
            principal = self._principal(request)
            req = await self._body(request, protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest)
            target = await self._target(principal, req.model)
            tag = target.name
            metrics.get("requests").inc(tags={"adapter": tag, "route": kind})
            if kind == "chat":
                try:
                    text = self.tokenizer.apply_chat_template(
                        [{"role": m.role, "content": m.text()} for m in req.messages],
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                except ValueError as exc:
                    raise ApiError(400, f"messages: {exc}") from None
                prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
            else:
                prompt_ids = self.tokenizer(req.prompt).input_ids
            job = self._job(req, target, prompt_ids)
            rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
            if not req.stream:
                done = await self._handle(target).complete.remote(job)
                make = protocol.chat_body if kind == "chat" else protocol.completion_body
                body = make(rid, target.ref, done["text"], done["finish_reason"], done["prompt_tokens"], done["completion_tokens"])
                return JSONResponse(body)
            events = self._handle(target, stream=True).generate.remote(job)
            first = await events.__anext__()  # errors before the first token are real HTTP errors
            return StreamingResponse(self._stream(kind, rid, target, first, events, tag), media_type="text/event-stream")
        except Exception as exc:  # noqa: BLE001 - mapped to a status; only real bugs become 500
            return _error(exc, tag)

    async def _stream(self, kind: str, rid: str, target: Target, first: dict, events, tag: str):
        model = target.ref
        if kind == "chat":
            yield _sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        event = first
        try:
            while True:
                if "delta" in event:
                    if kind == "chat":
                        yield _sse(protocol.chat_chunk(rid, model, {"content": event["delta"]}, None))
                    else:
                        yield _sse(protocol.completion_chunk(rid, model, event["delta"], None))
                if "done" in event:
                    finish = event["done"]["finish_reason"]
                    if kind == "chat":
                        yield _sse(protocol.chat_chunk(rid, model, {}, finish))
                    else:
                        yield _sse(protocol.completion_chunk(rid, model, "", finish))
                    break
                event = await events.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
            err = unwrap(exc)
            status = err.status if isinstance(err, ApiError) else 500
            metrics.get("errors").inc(tags={"adapter": tag, "status": str(status)})
            yield _sse(protocol.error_body(str(err), "server_error", status))
        yield "data: [DONE]\n\n"

    # ---- routes ---------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    @api.post("/v1/classify")
    async def classify(self, request: Request):
        tag = "unknown"
        try:
            principal = self._principal(request)
            req = await self._body(request, protocol.ClassifyRequest)
            target = await self._target(principal, req.model)
            tag = target.name
            metrics.get("requests").inc(tags={"adapter": tag, "route": "classify"})
            ids = self.tokenizer(req.input, truncation=True, max_length=self.context_length).input_ids
            result = await self._handle(target).classify.remote(
                {"ref": target.ref, "name": target.name, "version": target.version, "prompt_ids": ids}
            )
            return JSONResponse({"id": protocol.new_id("cls"), "object": "classification", "model": target.ref, **result})
        except Exception as exc:  # noqa: BLE001
            return _error(exc, tag)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            principal = self._principal(request)
            data = await asyncio.to_thread(self.resolver.models, principal)
            return JSONResponse({"object": "list", "data": data})
        except Exception as exc:  # noqa: BLE001
            return _error(exc, "models")

    @api.get("/healthz")
    async def healthz(self):
        return JSONResponse({"status": "ok", "base_model": self.cfg.served_name})

    @api.get("/admin/cache")
    async def cache(self, request: Request):
        """One model replica's resident adapters and counters (admin keys only)."""
        try:
            if not self._principal(request).admin:
                raise ApiError(404, "not found", "not_found_error")
            return JSONResponse(await self.server.cache_state.remote())
        except Exception as exc:  # noqa: BLE001
            return _error(exc, "admin")


def build_app(cfg: ServeConfig, keys: KeyStore | None = None):
    """The Serve application for a config. Refuses a non-loopback host when no keys are configured."""
    from farm.settings import Settings

    keys = keys if keys is not None else KeyStore.load(cfg.keys_file)
    check_bind(cfg.host, len(keys))
    settings = Settings.resolve()
    if cfg.catalog_url is None:
        cfg.catalog_url = settings.catalog_url  # resolved here so every replica uses the same catalog
    env = settings.ray_env()  # farm.settings.FORWARDED_ENV: the replica sees the same farm
    opts = {"num_cpus": cfg.cpus_per_replica, "runtime_env": {"env_vars": env}}
    if cfg.gpus_per_replica:
        opts["num_gpus"] = cfg.gpus_per_replica
    if cfg.replica_resources:
        opts["resources"] = dict(cfg.replica_resources)
    if cfg.fused:
        # one hop less per request: the proxy calls replicas that parse, resolve and generate
        ingress = Ingress.options(
            name="AdapterServer",
            num_replicas=cfg.replicas,
            ray_actor_options=opts,
            max_ongoing_requests=4 * (cfg.max_batch_size + cfg.max_waiting),
        )
        return ingress.bind(cfg.to_dict(), keys.entries(), None)
    server = serve.deployment(AdapterServer).options(
        name="AdapterServer",
        num_replicas=cfg.replicas,
        ray_actor_options=opts,
        max_ongoing_requests=cfg.max_batch_size + cfg.max_waiting,
        max_queued_requests=cfg.max_waiting * cfg.replicas,
    )
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=4 * (cfg.max_batch_size + cfg.max_waiting) * cfg.replicas,
    )
    return ingress.bind(cfg.to_dict(), keys.entries(), server.bind(cfg.to_dict()))


def deploy(
    cfg: ServeConfig, keys: KeyStore | None = None, *, name: str = "farm", route_prefix: str = "/", blocking: bool = False
) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port (if not running) and deploy; returns the base URL
    where the proxy really listens. Without keys, refuses a cluster whose proxy is already off loopback."""
    from farm.serve.proxy import check_existing, running_proxy

    keys = keys if keys is not None else KeyStore.load(cfg.keys_file)
    app = build_app(cfg, keys)
    host, port = check_existing(running_proxy(), cfg.host, cfg.port, len(keys))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
