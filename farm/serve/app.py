"""The HTTP side: a FastAPI ingress deployment (auth, parsing, limits, resolution, OpenAI-shaped
responses) in front of the model deployment (server.py), and `build_app`/`deploy`.

The ingress tokenizes the prompt (after a character-length check, off the event loop: prompts.py),
so length limits are checked before a replica is involved, and
passes token ids plus the exact adapter version to a model replica of the version's base (from its
lineage, bases.py); with routing=affinity the call carries the version id as Serve's multiplexed
model id, so it lands on a replica holding it. Several bases = one AdapterServer deployment per base
(`AdapterServer-<name>`) behind one ingress.
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

from farm.errors import FarmError
from farm.serve import metrics, prompts, protocol
from farm.serve.auth import KeyStore, Principal
from farm.serve.bases import ServedBase
from farm.serve.config import ServeConfig, check_bind
from farm.serve.limits import ApiError, check_context, check_max_tokens, unwrap
from farm.serve.logprobs import TokenText, chat_logprobs, completion_logprobs
from farm.serve.resolver import Resolver, Target
from farm.serve.server import AdapterServer

log = logging.getLogger("farm.serve")
api = FastAPI(title="farm", docs_url=None, redoc_url=None, openapi_url=None)

# Ray's errors for a model replica that died (or became unreachable) while holding the request.
REPLICA_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError")


def _error(exc: BaseException, tag: str) -> JSONResponse:
    exc = unwrap(exc)
    if isinstance(exc, ApiError):
        err = exc
    elif type(exc).__name__ == "BackPressureError":
        err = ApiError(503, "server busy: too many queued requests; retry later", "overloaded", 1.0)
    elif type(exc).__name__ in REPLICA_LOST:
        # the model replica died with this request on it; Serve starts a replacement
        err = ApiError(503, f"the replica serving this request was lost ({type(exc).__name__}); retry", "replica_lost", 1.0)
    else:
        log.exception("internal error", exc_info=exc)
        err = ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
    metrics.get("errors").inc(tags={"adapter": tag, "status": str(err.status)})
    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after is not None else None
    return JSONResponse(protocol.error_body(err.message, err.type, err.status), err.status, headers=headers)


def _logprob_fields(req) -> dict:
    """The engine's logprob settings for a request: alternatives per completion token and (echo) per prompt token."""
    if isinstance(req, protocol.ChatCompletionRequest):
        return {"logprobs": req.top_count, "prompt_logprobs": None}
    return {"logprobs": req.logprobs, "prompt_logprobs": req.logprobs if req.echo else None}


def _with_logprobs(req, done: dict, text_of: TokenText) -> tuple[str, dict | None]:
    """The choice's text (the prompt first with echo) and its `logprobs` object in the route's shape."""
    if isinstance(req, protocol.ChatCompletionRequest):
        return done["text"], (chat_logprobs(text_of, done["logprobs"]) if req.logprobs else None)
    prefix = req.prompt if req.echo else ""
    if req.logprobs is None:
        return prefix + done["text"], None
    lp = completion_logprobs(text_of, done["logprobs"], done.get("prompt_logprobs"), len(prefix))
    return prefix + done["text"], lp


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
    def load(cls, cfg: ServeConfig, keys: KeyStore, ingress=None) -> None:
        """A factory with an `ingress` parameter also gets the ingress (its `generate_ids`: the Tinker
        API samples through the serving engine)."""
        import importlib
        import inspect

        mounted = []
        for spec in cfg.extra.get("extensions", ()):
            module, _, name = spec.partition(":")
            factory = getattr(importlib.import_module(module), name)
            wants = "ingress" in inspect.signature(factory).parameters
            mounted.append(factory(cfg, keys, ingress=ingress) if wants else factory(cfg, keys))
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
    def __init__(self, config: dict | list[dict], keys: dict, servers=None):
        """`config`: one base's ServeConfig as a dict, or a list of them (one per base; the first one's
        service-wide knobs apply: limits, catalog, extensions). `servers`: {base name: its AdapterServer
        deployment handle} (a bare handle for one base), or None to hold the one base in this replica."""
        from farm.modeling import config_fingerprint, load_config, load_tokenizer

        cfgs = [ServeConfig(**c) for c in (config if isinstance(config, list) else [config])]
        self.cfg = cfgs[0]
        self.keys = KeyStore({h: Principal(**p) for h, p in keys.items()})
        if servers is None:
            servers = {self.cfg.served_name: LocalServer(AdapterServer(self.cfg.to_dict()))}
        elif not isinstance(servers, dict):
            servers = {self.cfg.served_name: servers}
        self.bases: dict[str, SimpleNamespace] = {}
        served = []
        for c in cfgs:
            mc = load_config(c.base_model)
            ctx = int(getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", 2048))
            tokenizer = load_tokenizer(c.base_model)
            limit = prompts.PromptLimit(ctx, prompts.longest_token(tokenizer))
            self.bases[c.served_name] = SimpleNamespace(cfg=c, server=servers[c.served_name], context_length=ctx,
                                                        tokenizer=tokenizer, prompt_limit=limit)
            served.append(ServedBase(c.served_name, c.base_model, config_fingerprint(c.base_model)))
        self.resolver = Resolver(self.cfg.catalog_url, served, self.cfg.resolve_ttl_s)
        Extensions.load(self.cfg, self.keys, self)

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
        base = self.bases[target.base]
        h = base.server
        if target.vid is not None and base.cfg.routing == "affinity":
            h = h.options(multiplexed_model_id=target.vid)
        return h.options(stream=True) if stream else h

    def _job(self, req, target: Target, prompt_ids: list[int]) -> dict:
        max_tokens = check_max_tokens(req.max_tokens, self.cfg.max_tokens_cap)
        check_context(len(prompt_ids), max_tokens, self.bases[target.base].context_length)
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
            **_logprob_fields(req),
        }

    async def _generate(self, request: Request, kind: str):
        tag = "unknown"
        try:
            principal = self._principal(request)
            req = await self._body(request, protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest)
            target = await self._target(principal, req.model)
            tag = target.name
            metrics.get("requests").inc(tags={"adapter": tag, "route": kind})
            base = self.bases[target.base]
            # characters checked here, template + tokenizer off the event loop (farm/serve/prompts.py)
            if kind == "chat":
                prompt_ids = await prompts.prompt_ids(base.tokenizer, base.prompt_limit,
                                                      messages=prompts.chat_messages(req.messages))
            else:
                prompt_ids = await prompts.prompt_ids(base.tokenizer, base.prompt_limit, prompt=req.prompt)
            job = self._job(req, target, prompt_ids)
            job["tenant"] = principal.customer or "admin"  # the farm engine's batches are fair per tenant
            rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
            if not req.stream:
                done = await self._handle(target).complete.remote(job)
                make = protocol.chat_body if kind == "chat" else protocol.completion_body
                text, logprobs = _with_logprobs(req, done, TokenText(base.tokenizer))
                body = make(rid, target.ref, text, done["finish_reason"], done["prompt_tokens"], done["completion_tokens"],
                            logprobs)
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

    async def generate_ids(self, principal: Principal, model: str, prompt_ids: list[int], *, max_tokens: int,
                           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                           stops: list[str] | None = None, top_k: int = 0, stop_token_ids: list[int] | None = None,
                           keep_stop_token: bool = False, ignore_eos: bool = False,
                           prompt_logprobs: bool = False) -> dict:
        """One completion of token ids by `model` (a base or `customer/adapter[@vN]` the principal may use),
        with each completion token's id and logprob: the engine's done event. For extensions (the Tinker
        API's sampling); the same resolution, limits and engine call as the OpenAI routes. Beyond them:
        `top_k`, `stop_token_ids` (sampling one ends the completion), `keep_stop_token` (the token that
        ended it, EOS or a stop id, is in the output, as vLLM's token ids have it), `ignore_eos` and
        `prompt_logprobs` (each prompt token's logprob, the first None: the done event's
        "prompt_logprobs" entries)."""
        from farm.serve.sampling import sampling_problems

        problems = sampling_problems(temperature, top_p, seed, top_k)
        bad_ids = [t for t in stop_token_ids or () if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad_ids:
            problems.append(f"stop: token ids {bad_ids[:5]!r} are not whole numbers >= 0")
        if problems:
            raise ApiError(400, "; ".join(problems))
        target = await self._target(principal, model)
        max_tokens = check_max_tokens(max_tokens, self.cfg.max_tokens_cap)
        check_context(len(prompt_ids), max_tokens, self.bases[target.base].context_length)
        job = {"ref": target.ref, "name": target.name, "version": target.version, "prompt_ids": list(prompt_ids),
               "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "top_k": top_k,
               "stops": list(stops or []), "stop_token_ids": list(stop_token_ids or []),
               "keep_stop_token": keep_stop_token, "ignore_eos": ignore_eos, "stream": False, "logprobs": 0,
               "prompt_logprobs": 0 if prompt_logprobs else None, "tenant": principal.customer or "admin"}
        done = await self._handle(target).complete.remote(job)
        return {**done, "model": target.ref}

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
            base = self.bases[target.base]
            ids = await prompts.classify_ids(base.tokenizer, base.prompt_limit, req.input)
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
        return JSONResponse({"status": "ok", "base_model": self.cfg.served_name, "bases": list(self.bases)})

    @api.get("/admin/cache")
    async def cache(self, request: Request):
        """One model replica's resident adapters and counters (admin keys only); `?base=<name>` picks
        the base (default: the first one)."""
        try:
            if not self._principal(request).admin:
                raise ApiError(404, "not found", "not_found_error")
            name = request.query_params.get("base", self.cfg.served_name)
            if name not in self.bases:
                raise ApiError(404, f"no served base {name!r}; served: {', '.join(self.bases)}", "not_found_error")
            return JSONResponse(await self.bases[name].server.cache_state.remote())
        except Exception as exc:  # noqa: BLE001
            return _error(exc, "admin")


def build_app(cfg: ServeConfig | list[ServeConfig], keys: KeyStore | None = None):
    """The Serve application for one base's config, or a list (one per base; the first one's host,
    port, keys, catalog and limits apply to the service). Refuses a non-loopback host without keys."""
    from farm.settings import Settings

    settings = Settings.resolve()
    cfgs = [cfg] if isinstance(cfg, ServeConfig) else list(cfg)
    first = cfgs[0]
    names = [c.served_name for c in cfgs]
    if len(set(names)) != len(names):
        raise FarmError(f"serve config: base names must be unique, got {names}")
    keys = keys if keys is not None else KeyStore.load(first.keys_file)
    check_bind(first.host, len(keys))
    for c in cfgs:
        # resolved here so every replica uses the same catalog
        c.catalog_url = c.catalog_url or first.catalog_url or settings.catalog_url
    env = settings.ray_env()  # farm.settings.FORWARDED_ENV: the replica sees the same farm

    def actor_options(c: ServeConfig) -> dict:
        opts = {"num_cpus": c.cpus_per_replica, "runtime_env": {"env_vars": env}}
        if c.gpus_per_replica:
            opts["num_gpus"] = c.gpus_per_replica
        if c.replica_resources:
            opts["resources"] = dict(c.replica_resources)
        return opts

    if len(cfgs) == 1 and first.fused:
        # one hop less per request: the proxy calls replicas that parse, resolve and generate
        ingress = Ingress.options(
            name="AdapterServer",
            num_replicas=first.replicas,
            ray_actor_options=actor_options(first),
            max_ongoing_requests=4 * (first.max_batch_size + first.max_waiting),
        )
        return ingress.bind(first.to_dict(), keys.entries(), None)
    servers = {}
    for c in cfgs:  # several bases: always a separate ingress, which routes each request to its base
        servers[c.served_name] = serve.deployment(AdapterServer).options(
            name="AdapterServer" if len(cfgs) == 1 else f"AdapterServer-{c.served_name}",
            num_replicas=c.replicas,
            ray_actor_options=actor_options(c),
            max_ongoing_requests=c.max_batch_size + c.max_waiting,
            max_queued_requests=c.max_waiting * c.replicas,
        ).bind(c.to_dict())
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=sum(4 * (c.max_batch_size + c.max_waiting) * c.replicas for c in cfgs),
    )
    return ingress.bind([c.to_dict() for c in cfgs], keys.entries(), servers)


def deploy(
    cfg: ServeConfig | list[ServeConfig], keys: KeyStore | None = None, *, name: str = "farm", route_prefix: str = "/", blocking: bool = False
) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port (if not running) and deploy; returns the base URL
    where the proxy really listens. Without keys, refuses a cluster whose proxy is already off loopback."""
    from farm.serve.proxy import check_existing, running_proxy

    first = cfg if isinstance(cfg, ServeConfig) else cfg[0]
    keys = keys if keys is not None else KeyStore.load(first.keys_file)
    app = build_app(cfg, keys)
    host, port = check_existing(running_proxy(), first.host, first.port, len(keys))
    serve.start(http_options={"host": first.host, "port": first.port})
    # our own wait (startup.py): the first replica that cannot start ends the deploy, no crash loop
    serve._run(app, name=name, route_prefix=route_prefix, _blocking=False)
    from farm.serve.startup import wait_running

    wait_running(name, [c.served_name for c in ([cfg] if isinstance(cfg, ServeConfig) else cfg)])
    if blocking:
        from ray.serve._private.utils import wait_for_interrupt

        wait_for_interrupt()
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
