"""The pack worker: one long-lived Ray actor per base that holds the base once and every Tinker
model on it, runs each model's operations in seq_id order, and answers futures.

Why a Ray actor and not the Serve replica: the SDK's consecutive calls of one model may reach any
ingress replica (and `retrieve_future` another one again), so the models, their order and their
futures must live in one place that every replica reaches by name; the training base (prepared for
k-bit training, gradients through it) is not the serving engine's inference base; and a step
(seconds on a big batch) must not hold the ingress's event loop. The actor is named
(`TinkerConfig.actor_name`, in the farm's Ray namespace) and created by the first ingress replica
that needs it; it is not detached, so it ends with that replica and its models with it (durable
state is save_state's job).

Clock cycles: the actor is async; requests are queued and answered with a request id at once. A
loop takes, after a short window (`window_ms`) for others to arrive, the next operation of every
model whose next seq_id is there (a gap waits: the SDK sends chunks of a batch in parallel), runs
them in one thread call (`Executor`): all forward_backward requests of the cycle in one grouped
forward/backward, then each optim_step, and starts the next cycle at once while operations are
ready. `retrieve_future` waits up to `poll_s` for the result and otherwise answers try_again with
queue_state "active": a busy farm queues, it never refuses.

Idle models: a model with no operation for `idle_evict_s` is evicted at the next sweep (between
cycles, at least every idle_evict_s / 2): the executor writes its LoRA, AdamW moments and counters to
the worker's local disk and frees them; the model's next operation restores it first, in the same
cycle, so its client sees the same numbers, a little later. A model whose gradients wait for their
optim_step stays resident. The spill folder lives as long as the worker, as the models do.

Cost: each cycle charges every model's tenant its tokens and its share of the cycle (its tokens' share of
the grouped forward/backward's time plus its optimizer step's, times the worker's accelerators, as
farm.costs defines a job's), and each sample its prompt and generated tokens. The totals per tenant
are in `state()["usage"]`; hour by hour they go to the queue database's usage table every
`usage_flush_s` (farm.tinker.ledger), which `farm status` and `billing()` (Tinker's GET
billing/usage/events) read; on Ray's metrics endpoint they add to the jobs' per-customer counters
(`farm_accelerator_seconds`, `farm_tokens`), with `farm_tinker_tokens{kind}` (train, prefill, sample)
beside them.

Sessions: a session with no heartbeat and no operation for `session_timeout_s` ends as a closed one
does (its client died): its models leave, their snapshots are deleted, what they saved stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from farm.tinker.errors import TinkerApiError, bad, not_found

log = logging.getLogger("farm.tinker")


@dataclass
class Op:
    kind: str  # create_model | forward_backward | optim_step
    request_id: str
    model_id: str
    payload: Any
    seq_id: int = 0
    tenant: str = ""


class Sequencer:
    """Each model's pending operations by seq_id; `ready()` pops the next one of every model whose
    next seq_id has arrived. A model's first operation is seq 1 (create_model is outside the order)."""

    def __init__(self):
        self.next: dict[str, int] = {}
        self.pending: dict[str, dict[int, Op]] = {}

    def add_model(self, model_id: str, first: int = 1) -> None:
        self.next[model_id], self.pending[model_id] = first, {}

    def drop_model(self, model_id: str) -> list[Op]:
        self.next.pop(model_id, None)
        return list(self.pending.pop(model_id, {}).values())

    def add(self, op: Op) -> None:
        nxt, pending = self.next[op.model_id], self.pending[op.model_id]
        if op.seq_id < nxt:
            raise bad("seq_id", f"{op.seq_id} of model {op.model_id!r} has run already (the next is {nxt})")
        if op.seq_id in pending:
            raise bad("seq_id", f"{op.seq_id} of model {op.model_id!r} is queued already")
        pending[op.seq_id] = op

    def ready(self) -> list[Op]:
        out = []
        for model_id, pending in self.pending.items():
            op = pending.pop(self.next[model_id], None)
            if op is not None:
                self.next[model_id] += 1
                out.append(op)
        return out

    def waiting(self) -> int:
        return sum(len(p) for p in self.pending.values())


@dataclass
class Future:
    tenant: str
    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: dict | None = None
    finished: float | None = None
    deadline: float | None = None  # a sample's: past it unanswered, its ingress replica is taken as lost


class TinkerWorker:
    """The actor's class (farm.tinker.routes starts it with `ray.remote`); see the module docstring."""

    def __init__(self, cfg: dict):
        from farm.tinker.config import TinkerConfig

        self.cfg = TinkerConfig.model_validate(cfg)
        self.executor = None  # loaded on the first cycle, in the compute thread
        self.sessions: dict[str, str] = {}  # session id -> tenant
        self.session_seen: dict[str, float] = {}  # session id -> its last heartbeat or operation
        self.models: dict[str, str] = {}  # model id -> tenant (from the create request on)
        self.ranks: dict[str, int] = {}
        self.futures: dict[str, Future] = {}
        self.seq = Sequencer()
        self.controls: list[Op] = []
        self.samplers: dict[str, tuple[str, str]] = {}  # sampling session id -> (tenant, model the serving engine runs)
        self.retired: dict[str, str] = {}  # sampling session id -> why its snapshot is gone (pruned, session ended)
        self.answered: dict[tuple, tuple[float, dict]] = {}  # (tenant, kind, idempotency key) -> (when, answer)
        self.last_used: dict[str, float] = {}  # model id -> its last operation's submit or finish time
        self.evicted: dict[str, str] = {}  # model id -> the local folder of its state (compute thread only)
        self.evictions = 0  # models evicted so far
        self.spill: str | None = None  # the local folder of evicted models
        self.last_expiry_sweep = 0.0  # when the expired-checkpoint sweep last ran (0: at the first cycle)
        self.usage: dict[str, dict[str, float]] = {}  # tenant -> its totals (see _charge)
        self._cycle_usage: dict[str, tuple[int, float]] = {}  # tenant -> (tokens, seconds) of the last cycle
        # (tenant, UTC hour start, kind) -> [tokens or count, accelerator-seconds] not yet in the queue database's
        # usage table (farm.tinker.ledger), and those being added now
        self.pending: dict[tuple[str, int, str], list] = {}
        self.flushing: dict[tuple[str, int, str], list] = {}
        self.last_flush = time.time()
        self._ledger = None
        self._ledger_lock: asyncio.Lock | None = None
        self._flushes: set = set()  # running flush tasks (a reference, so they are not collected)
        self._meters: dict | None = None
        self.cycles = 0  # clock cycles run
        self.largest_group = 0  # most models in one grouped forward/backward so far
        self.wake: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None

    # ---- plumbing -----------------------------------------------------------------------------
    def _start(self) -> None:
        if self.loop_task is None:
            self.wake = asyncio.Event()
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    def _session(self, tenant: str, session_id: str) -> None:
        if self.sessions.get(session_id) != tenant:
            raise not_found("session_id", session_id)

    def _model(self, tenant: str, model_id: str) -> None:
        if self.models.get(model_id) != tenant:  # another tenant's model looks exactly like a missing one
            raise not_found("model_id", model_id)

    def _future(self, tenant: str, kind: str) -> str:
        now = time.time()
        ttl = self.cfg.result_ttl_s
        for rid in [r for r, f in self.futures.items() if (f.finished and now - f.finished > ttl)
                    or (f.deadline and not f.finished and now - f.deadline > ttl)]:  # never answered nor polled
            del self.futures[rid]
        rid = uuid.uuid4().hex
        self.futures[rid] = Future(tenant, kind)
        return rid

    @staticmethod
    def _answer(fn, *args):
        """Run fn; a TinkerApiError becomes {"_error": [status, message, field]} (Ray would wrap it)."""
        try:
            return fn(*args)
        except TinkerApiError as exc:
            return {"_error": [exc.status, exc.message, exc.field]}

    # ---- sessions -----------------------------------------------------------------------------
    async def create_session(self, tenant: str) -> dict:
        self._start()  # the loop's sweeps end this session if its client goes quiet
        sid = "farm-" + secrets.token_hex(8)
        self.sessions[sid] = tenant
        self.session_seen[sid] = time.time()
        return {"session_id": sid, "type": "create_session"}

    async def touch_session(self, tenant: str, session_id: str) -> dict:
        return self._answer(self._touch, tenant, session_id)

    def _touch(self, tenant: str, session_id: str) -> dict:
        self._session(tenant, session_id)
        self.session_seen[session_id] = time.time()
        return {"type": "session_heartbeat"}

    async def finish_session(self, tenant: str, session_id: str) -> dict:
        """The session ends: its models leave the worker (their queued operations fail, the compute thread
        releases their LoRAs at the next cycle) and later calls on them are 404s. What they saved stays."""
        return self._answer(self._finish_session, tenant, session_id)

    def _seen(self, model_id: str, now: float) -> None:
        """The model's session is active now (an operation of it was sent or finished)."""
        session_id = model_id.rsplit(":train:", 1)[0]
        if session_id in self.session_seen:
            self.session_seen[session_id] = now

    def _finish_session(self, tenant: str, session_id: str, why: str = "has finished") -> dict:
        self._session(tenant, session_id)
        del self.sessions[session_id]
        self.session_seen.pop(session_id, None)
        ended = [m for m, t in self.models.items() if t == tenant and m.startswith(f"{session_id}:train:")]
        for model_id in ended:
            self._forget(model_id, f"session {session_id!r} {why}")
            self.controls.append(Op("release", "", model_id, None, tenant=tenant))
        if ended:
            self._start()
            self.wake.set()
        return {"released_models": len(ended)}

    # ---- operations ---------------------------------------------------------------------------
    async def submit(self, tenant: str, kind: str, payload: Any, idempotency_key: str | None = None) -> dict:
        """Queue an operation; {"request_id", "model_id"} at once, or {"_error": ...}. A retry of a POST
        (the SDK sends the same X-Idempotency-Key on each) gets the first answer instead of a second
        operation, or a refusal of its already used seq_id."""
        self._start()
        key = (tenant, kind, idempotency_key) if idempotency_key else None
        if key is not None and key in self.answered:
            return self.answered[key][1]
        answer = self._answer(self._submit, tenant, kind, payload)
        if key is not None and "_error" not in answer:
            now = time.time()
            for k in [k for k, (t, _) in self.answered.items() if now - t > self.cfg.result_ttl_s]:
                del self.answered[k]
            self.answered[key] = (now, answer)
        return answer

    def _submit(self, tenant: str, kind: str, payload: Any) -> dict:
        if kind == "create_model" or (kind == "load_weights" and payload.session_id is not None):
            self._session(tenant, payload.session_id)
            if payload.base_model is not None and payload.base_model != self.cfg.served_name:
                raise bad("base_model", f"{payload.base_model!r} is not served here; get_server_capabilities "
                                        f"lists {self.cfg.served_name!r}")
            model_id = f"{payload.session_id}:train:{payload.model_seq_id}"  # the SDK derives ids this way too
            if model_id in self.models:
                raise bad("model_seq_id", f"{payload.model_seq_id}: model {model_id!r} exists already")
            self.models[model_id] = tenant
            self.ranks[model_id] = payload.lora_config.rank if kind == "create_model" else 0  # a load: set once read
            self.seq.add_model(model_id)  # a create or a load is seq 0: the model's own operations start at 1
            self.session_seen[payload.session_id] = time.time()
            self.last_used[model_id] = time.time()
            rid = self._future(tenant, kind)
            self.controls.append(Op(kind, rid, model_id, payload, tenant=tenant))
        else:
            model_id = payload.model_id
            self._model(tenant, model_id)
            op = Op(kind, "", model_id, payload, payload.seq_id, tenant)
            self.seq.add(op)  # refused (used or queued seq_id) before a future exists
            rid = op.request_id = self._future(tenant, kind)
            self.last_used[model_id] = time.time()
            self._seen(model_id, time.time())
        self.wake.set()
        return {"request_id": rid, "model_id": model_id}

    # ---- sampling (the ingress runs it on the serving engine; futures live here) -----------------
    async def create_sampler(self, tenant: str, session_id: str, seq: int, model_path: str | None,
                             base_model: str | None) -> dict:
        """A sampling session on a sampler checkpoint (`tinker://…/sampler_weights/<name>`: its catalog
        version) or on the base alone."""
        found = None
        if model_path is not None and self.sessions.get(session_id) == tenant:
            try:  # the catalog version the path names: storage reads, off the event loop
                found = await asyncio.to_thread(self._sampler_version, tenant, model_path)
            except TinkerApiError as exc:
                return {"_error": [exc.status, exc.message, exc.field]}
        return self._answer(self._create_sampler, tenant, session_id, seq, model_path, base_model, found)

    def _sampler_version(self, tenant: str, model_path: str) -> str:
        """`tinker://<model>/sampler_weights/<name>`: the newest version of `<tenant>/<name>` that model published."""
        from farm.tinker.state import parse_path

        source, kind, name = parse_path(model_path, "model_path")
        if kind != "sampler_weights":
            raise TinkerApiError(422, f"model_path: {model_path!r}: sampling runs on sampler weights "
                                      "(save_weights_for_sampler), not on a save_state checkpoint", "model_path")
        found = self._samplers().latest(tenant, source, name)
        if found is None:
            raise TinkerApiError(404, f"model_path: no sampler weights {model_path!r}", "model_path")
        return found.ref

    def _create_sampler(self, tenant, session_id, seq, model_path, base_model, found) -> dict:
        self._session(tenant, session_id)
        if model_path is not None:
            model = found
        elif base_model == self.cfg.served_name:
            model = self.cfg.served_name
        else:
            raise bad("base_model", f"{base_model!r} is not served here; get_server_capabilities lists "
                                    f"{self.cfg.served_name!r}")
        ssid = f"{session_id}:sample:{seq}"
        self.samplers[ssid] = (tenant, model)
        return {"sampling_session_id": ssid, "model": model}

    async def sampler(self, tenant: str, sampling_session_id: str) -> dict:
        found = self.samplers.get(sampling_session_id)
        if found is None or found[0] != tenant:
            return {"_error": [404, f"sampling_session_id {sampling_session_id!r} not found", "sampling_session_id"]}
        if sampling_session_id in self.retired:
            return {"_error": [410, f"sampling_session_id {sampling_session_id!r}: {self.retired[sampling_session_id]}",
                               "sampling_session_id"]}
        return {"model": found[1]}

    async def open_future(self, tenant: str, kind: str) -> str:
        """A future an ingress replica answers (a sample it runs on its serving engine). If that replica
        dies, nothing answers it: after `sample_timeout_s` it fails, so the SDK raises instead of polling on."""
        rid = self._future(tenant, kind)
        self.futures[rid].deadline = time.time() + self.cfg.sample_timeout_s
        return rid

    async def close_future(self, request_id: str, result: dict, prompt_tokens: int = 0) -> None:
        """A sample's result (the ingress ran it); its tenant is charged `prompt_tokens` (the prompt times
        the samples) and the generated tokens."""
        fut = self.futures.get(request_id)
        if fut is not None and not fut.done.is_set():
            fut.result, fut.finished = result, time.time()
            fut.done.set()
            if fut.kind == "sample" and "error" not in result:
                sampled = sum(len(seq["tokens"]) for seq in result.get("sequences", ()))
                self._charge(fut.tenant, prefill=int(prompt_tokens), sample=sampled)

    async def retrieve(self, tenant: str, request_id: str, wait_s: float) -> dict:
        """The result ({"result": ...}), {"try_again": queue_state} after wait_s, or {"_error": ...}."""
        fut = self.futures.get(request_id)
        if fut is None or fut.tenant != tenant:
            return {"_error": [404, f"request_id {request_id!r} not found", "request_id"]}
        if fut.deadline is not None and not fut.done.is_set():
            wait_s = max(0.0, min(wait_s, fut.deadline - time.time()))
        try:
            await asyncio.wait_for(fut.done.wait(), timeout=wait_s)
        except TimeoutError:
            if fut.deadline is None or time.time() < fut.deadline:
                return {"try_again": "active"}
            fut.result, fut.finished = {"error": f"the {fut.kind} was not answered in {self.cfg.sample_timeout_s:.0f} s: "
                                                 "the serve replica running it was lost; send it again",
                                        "category": "server"}, time.time()
            fut.done.set()
        return {"result": fut.result, "kind": fut.kind}

    async def model_info(self, tenant: str, model_id: str) -> dict:
        return self._answer(lambda: self._model(tenant, model_id) or {"lora_rank": self.ranks[model_id],
                                                                        "last_used": self.last_used.get(model_id)})

    async def state(self) -> dict:
        """Counters for tests and operators: models, sessions, queued operations, base loaded."""
        return {"models": len(self.models), "sessions": len(self.sessions), "waiting": self.seq.waiting(),
                "loaded": self.executor is not None, "cycles": self.cycles, "largest_group": self.largest_group,
                "resident": 0 if self.executor is None else len(self.executor.models),
                "evicted": len(self.evicted), "evictions": self.evictions,
                "usage": {tenant: dict(u) for tenant, u in self.usage.items()}}

    async def billing(self, tenant: str, start: float, end: float) -> list[dict] | dict:
        """The tenant's hourly usage in [start, end): {"hour", "kind", "count"}, by hour; the queue
        database's rows plus what this worker has not added yet."""
        async with self._lock():
            try:
                kept = await self._usage_ledger().rows(tenant, start, end)
            except Exception as exc:  # noqa: BLE001 - the database's trouble, named (the SDK retries no 400)
                log.exception("tinker: reading the usage ledger failed")
                return {"_error": [400, f"the usage ledger ({self.cfg.queue_db}) cannot be read now: "
                                        f"{type(exc).__name__}: {exc}"[:500], "queue_db"]}
            totals: dict[tuple[int, str], int] = {}
            for r in kept:
                totals[(r.hour, r.kind)] = totals.get((r.hour, r.kind), 0) + r.amount
            for source in (self.pending, self.flushing):
                for (who, hour, kind), (n, _) in source.items():
                    if who == tenant and start <= hour < end:
                        totals[(hour, kind)] = totals.get((hour, kind), 0) + n
        return [{"hour": hour, "kind": kind, "count": n}
                for (hour, kind), n in sorted(totals.items(), key=lambda kv: (kv[0][0], -kv[1]))]

    # ---- the usage ledger (farm.tinker.ledger) ------------------------------------------------
    def _lock(self) -> asyncio.Lock:
        if self._ledger_lock is None:
            self._ledger_lock = asyncio.Lock()
        return self._ledger_lock

    def _usage_ledger(self):
        if self._ledger is None:
            from farm.settings import queue_db_path
            from farm.tinker.ledger import Ledger

            self._ledger = Ledger(self.cfg.queue_db or str(queue_db_path()))
        return self._ledger

    async def flush_usage(self) -> int:
        """Add the pending hours to the queue database's usage table; how many rows. A failed add keeps
        them pending for the next flush."""
        from farm.queue.usage import UsageRow

        async with self._lock():
            self.flushing, self.pending = self.pending, {}
            self.last_flush = time.time()
            rows = [UsageRow(who, hour, kind, int(n), float(sec)) for (who, hour, kind), (n, sec) in self.flushing.items()]
            try:
                if rows:
                    await self._usage_ledger().add(rows)
            except Exception:  # noqa: BLE001 - kept for the next flush; the counters have it meanwhile
                log.exception("tinker: adding %d usage rows to %s failed; kept for the next flush", len(rows),
                              self.cfg.queue_db)
                for key, (n, sec) in self.flushing.items():
                    got = self.pending.setdefault(key, [0, 0.0])
                    got[0] += n
                    got[1] += sec
                rows = []
            self.flushing = {}
        return len(rows)

    # ---- cost ---------------------------------------------------------------------------------
    def _charge(self, tenant: str, *, tokens: int = 0, seconds: float = 0.0, prefill: int = 0, sample: int = 0,
                checkpoints: int = 0) -> None:
        """Add to the tenant's totals, to its hourly ledger (GET billing/usage/events) and to the
        per-customer counters on Ray's metrics endpoint."""
        from farm.costs import accelerator_seconds
        from farm.queue.usage import hour_of

        accel = accelerator_seconds(seconds, int(self.cfg.num_gpus)) if seconds else 0.0
        u = self.usage.setdefault(tenant, {"tokens": 0, "accelerator_seconds": 0.0, "prefill_tokens": 0,
                                           "sample_tokens": 0, "checkpoints": 0})
        u["tokens"] += tokens
        u["accelerator_seconds"] += accel
        u["prefill_tokens"] += prefill
        u["sample_tokens"] += sample
        u["checkpoints"] += checkpoints
        hour = hour_of(time.time())
        for kind, n, sec in (("training", tokens, accel), ("sampling_prefill", prefill, 0.0),
                             ("sampling_sample", sample, 0.0), ("checkpoint", checkpoints, 0.0)):
            if n or sec:
                got = self.pending.setdefault((tenant, hour, kind), [0, 0.0])
                got[0] += n
                got[1] += sec
        meters = self._metrics()
        if meters is None:
            return
        tags = {"customer": tenant}
        for kind, n in (("train", tokens), ("prefill", prefill), ("sample", sample)):
            if n:
                meters["tinker_tokens"].inc(n, tags={**tags, "kind": kind})
        if tokens:
            meters["tokens"].inc(tokens, tags=tags)
        if accel:
            meters["accel"].inc(accel, tags=tags)

    def _metrics(self) -> dict | None:
        """The counters, made once; None outside Ray (the worker class driven in process by tests)."""
        if self._meters is None:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util.metrics import Counter

            from farm.costs import ACCELERATOR_SECONDS_COUNTER, TOKENS_COUNTER

            self._meters = {
                "accel": Counter(*ACCELERATOR_SECONDS_COUNTER, tag_keys=("customer",)),
                "tokens": Counter(*TOKENS_COUNTER, tag_keys=("customer",)),
                "tinker_tokens": Counter("farm_tinker_tokens", "Tokens of Tinker API calls, per customer and kind "
                                         "(train: forward/backward, prefill: sample prompts, sample: generated).",
                                         tag_keys=("customer", "kind"))}
        return self._meters

    # ---- the clock ----------------------------------------------------------------------------
    async def _run(self) -> None:
        sweeps = [self.cfg.expiry_sweep_s, self.cfg.usage_flush_s] + [x / 2 for x in (
            self.cfg.idle_evict_s, self.cfg.session_timeout_s) if x is not None]
        sweep_s = min(60.0, max(0.05, min(sweeps)))
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=sweep_s)
                if self.cfg.window_ms:
                    await asyncio.sleep(self.cfg.window_ms / 1000)
            except TimeoutError:
                pass  # quiet for sweep_s: only the sweep below
            self.wake.clear()
            self._sweep_idle()
            self._maybe_flush()
            while True:
                controls, self.controls = self.controls, []
                ready = self.seq.ready()
                if not controls and not ready:
                    break
                try:
                    results = await asyncio.to_thread(self._cycle, controls, ready)
                except Exception as exc:  # noqa: BLE001 - a bug or an OOM fails the cycle's operations, not the worker
                    log.exception("tinker cycle failed")
                    why = {"error": f"internal error: {type(exc).__name__}: {exc}"[:500], "category": "server"}
                    results = {op.request_id: why for op in controls + ready}
                for op in controls:  # a model that could not be created: its queued operations fail too
                    if op.kind in ("create_model", "load_weights") and "error" in results.get(op.request_id, {}):
                        self._forget(op.model_id)
                usage, self._cycle_usage = self._cycle_usage, {}
                for tenant, (tokens, seconds) in usage.items():
                    self._charge(tenant, tokens=tokens, seconds=seconds)
                for op in ready:  # a checkpoint made (state or sampler weights) is a billed operation, as Tinker's
                    if op.kind in ("save_weights", "save_weights_for_sampler") and "error" not in results.get(
                            op.request_id, {"error": None}):
                        self._charge(op.tenant, checkpoints=1)
                now = time.time()
                for op in controls + ready:
                    if op.model_id in self.models:
                        self.last_used[op.model_id] = now
                        self._seen(op.model_id, now)  # a long step is not a quiet session
                for rid, res in results.items():
                    fut = self.futures.get(rid)
                    if fut is not None:
                        fut.result, fut.finished = res, now
                        fut.done.set()
                self._maybe_flush()  # a worker busy for hours still adds its usage every usage_flush_s

    def _maybe_flush(self) -> None:
        """Start a flush of the pending usage when one is due (a task beside the cycles, not before them)."""
        if self.pending and not self._flushes and time.time() - self.last_flush >= self.cfg.usage_flush_s:
            flush = asyncio.get_running_loop().create_task(self.flush_usage())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)

    def _sweep_idle(self) -> None:
        """Queue an evict control for every resident model idle for idle_evict_s, and the expired-checkpoint
        sweep every expiry_sweep_s (between cycles)."""
        if time.time() - self.last_expiry_sweep >= self.cfg.expiry_sweep_s:
            self.last_expiry_sweep = time.time()
            self.controls.append(Op("expire", "", "", None))
        if self.cfg.session_timeout_s is not None:  # a client that died without closing its session
            quiet = time.time() - self.cfg.session_timeout_s
            for sid, tenant in list(self.sessions.items()):
                busy = any(self.seq.pending.get(m) for m, t in self.models.items() if m.startswith(f"{sid}:train:"))
                if self.session_seen.get(sid, 0.0) < quiet and not busy:
                    log.info("tinker session %s of %s expired: no heartbeat or operation for %.0f s", sid, tenant,
                             self.cfg.session_timeout_s)
                    self._finish_session(tenant, sid, f"expired (no heartbeat for {self.cfg.session_timeout_s:.0f} s)")
        if self.cfg.idle_evict_s is None or self.executor is None:
            return
        cutoff = time.time() - self.cfg.idle_evict_s
        for model_id, tenant in self.models.items():
            if (model_id in self.executor.models and model_id not in self.evicted
                    and self.last_used.get(model_id, 0.0) < cutoff and not self.seq.pending.get(model_id)):
                self.controls.append(Op("evict", "", model_id, None, tenant=tenant))

    def _evict(self, model_id: str) -> None:
        if self.spill is None:
            self.spill = tempfile.mkdtemp(prefix="farm-tinker-idle-")
        folder = f"{self.spill}/{hashlib.sha256(model_id.encode()).hexdigest()[:16]}"
        if self.executor.evict(model_id, folder):
            self.evicted[model_id] = folder
            self.evictions += 1
            log.info("tinker model %s evicted after %.0f s idle", model_id, self.cfg.idle_evict_s)

    def _cycle(self, controls: list[Op], ready: list[Op]) -> dict[str, dict]:
        """One clock cycle, in the compute thread: creations, evictions and restores, one grouped
        forward/backward, optimizer steps."""
        if self.executor is None and not ready and all(op.kind in ("expire", "release") for op in controls):
            if any(op.kind == "expire" for op in controls):
                self._sweep_expired()  # storage only: no reason to load the base (nor to release from it)
            return {}
        if self.executor is None:
            import torch

            from farm.tinker.executor import Executor

            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
            device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            self.executor = Executor.load(self.cfg.base_model, quantization=self.cfg.quantization, device=device)
        ex = self.executor
        out: dict[str, dict] = {}
        busy = {op.model_id for op in ready}
        for op in controls:
            if op.kind == "expire":
                self._sweep_expired()
                continue
            if op.kind == "release":  # a finished session's model: no future waits on it
                ex.release(op.model_id)
                if (folder := self.evicted.pop(op.model_id, None)) is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                self._prune_snapshots(op.tenant, op.model_id, 0, "its session has finished")
                continue
            if op.kind == "evict":
                if op.model_id in ex.models and op.model_id not in busy:
                    self._evict(op.model_id)
                continue
            try:
                out[op.request_id] = self._create(op) if op.kind == "create_model" else self._create_by_load(op)
            except TinkerApiError as exc:
                ex.release(op.model_id)
                out[op.request_id] = {"error": exc.message, "category": "user"}
        for model_id in busy & self.evicted.keys():  # an evicted model's operation: the model comes back first
            ex.restore(model_id, self.evicted[model_id])
            shutil.rmtree(self.evicted.pop(model_id), ignore_errors=True)
        before = {m: (ex.models[m].tokens, ex.models[m].seconds) for m in busy if m in ex.models}
        try:
            return self._steps(ex, ready, out)
        finally:  # what the models' counters moved by this cycle, per tenant (the event loop charges it)
            usage: dict[str, tuple[int, float]] = {}
            for model_id, (tokens, seconds) in before.items():
                m = ex.models.get(model_id)
                if m is not None and (m.tokens > tokens or m.seconds > seconds):
                    t, sec = usage.get(m.tenant, (0, 0.0))
                    usage[m.tenant] = (t + m.tokens - tokens, sec + m.seconds - seconds)
            self._cycle_usage = usage

    def _steps(self, ex, ready: list[Op], out: dict[str, dict]) -> dict[str, dict]:
        """The cycle's operations: one grouped forward/backward, then each optimizer step, save or load."""
        self.cycles += 1
        fbs = [op for op in ready if op.kind == "forward_backward"]
        self.largest_group = max(self.largest_group, len(fbs))
        if fbs:
            for op, res in zip(fbs, ex.forward_backward([op.payload for op in fbs])):
                out[op.request_id] = ({"error": res["error"], "category": "user"} if "error" in res else res)
        steps = {"optim_step": lambda op: {**ex.optim_step(op.model_id, op.payload.adam_params), "type": "optim_step"},
                 "save_weights": self._save, "load_weights": self._load_into,
                 "save_weights_for_sampler": self._publish}
        for op in ready:
            if op.kind in steps:
                try:
                    out[op.request_id] = steps[op.kind](op)
                except TinkerApiError as exc:
                    out[op.request_id] = {"error": exc.message, "category": "user"}
        return out

    # ---- models and their state (compute thread) -----------------------------------------------
    def _store(self):
        from farm.settings import storage_path
        from farm.tinker.state import StateStore

        return StateStore(self.cfg.storage or storage_path())

    def _samplers(self):
        from farm.settings import catalog_url
        from farm.tinker.samplers import SamplerCatalog

        return SamplerCatalog(self.cfg.catalog_url or catalog_url())

    def _check_quota(self, tenant: str, size: int, replaced: int = 0) -> None:
        """Refuse a save of `size` bytes (replacing `replaced`) that would pass the tenant's storage quota:
        its save_state checkpoints and named sampler weights together."""
        from farm.tinker.samplers import stored

        limit = self.cfg.max_stored_bytes
        if limit is None:
            return
        now = stored(self._store(), self._samplers(), tenant)
        if now.size_bytes - replaced + size > limit:
            raise bad("path", f"storage quota: tenant {tenant!r} keeps {now.describe()}; this one ({size} bytes) "
                              f"would pass its {limit}-byte limit. Delete some (RestClient.delete_checkpoint) "
                              "or save state with ttl_seconds")

    def _prune_snapshots(self, tenant: str, model_id: str, keep: int, why: str) -> None:
        """Delete the model's ephemeral snapshots but the newest `keep`; their sampling clients get a 410."""
        try:
            gone = {s.ref for s in self._samplers().prune(tenant, model_id, keep)}
        except Exception:  # noqa: BLE001 - catalog trouble must not fail the cycle; the next prune retries
            log.exception("tinker: pruning the snapshots of %s failed", model_id)
            return
        for ssid, (_, ref) in list(self.samplers.items()):
            if ref in gone:
                self.retired[ssid] = (f"its weights ({ref}) were deleted: {why}. Make a new sampling client "
                                      "(save_weights_and_get_sampling_client), or save_weights_for_sampler(name) "
                                      "for weights that stay")

    def _create(self, op: Op) -> dict:
        lora = op.payload.lora_config
        seed = lora.seed if lora.seed is not None else secrets.randbelow(2**31)
        self.executor.create(op.model_id, op.tenant, rank=lora.rank, seed=seed, train_attn=lora.train_attn,
                             train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)
        self._record_run(op, lora.rank, {"train_attn": lora.train_attn, "train_mlp": lora.train_mlp,
                                         "train_unembed": lora.train_unembed})
        return {"model_id": op.model_id, "type": "create_model"}

    def _record_run(self, op: Op, rank: int, flags: dict, loaded_from: str | None = None) -> None:
        """The run's record in run storage (RestClient.get_training_run after the session). Storage trouble
        does not fail the model: its run is then known only while the worker holds it."""
        from farm.tinker.state import TrainingRunRecord

        meta = op.payload.user_metadata
        record = TrainingRunRecord(op.tenant, op.model_id, self.cfg.served_name, int(rank), created=time.time(),
                                   user_metadata={str(k): str(v) for k, v in meta.items()} if meta else None,
                                   loaded_from=loaded_from, **{k: bool(v) for k, v in flags.items()})
        try:
            self._store().write_run(record)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("tinker: writing the run record of %s failed", op.model_id)

    def _fetch(self, op: Op, tmp: str):
        """The checkpoint a load names, downloaded; only the caller's own checkpoints are found."""
        from pathlib import Path

        from farm.tinker.state import parse_path

        source, kind, name = parse_path(op.payload.path)
        if kind != "weights":
            raise TinkerApiError(422, f"path: {op.payload.path!r}: loading sampler weights is not built yet; "
                                      "load a save_state checkpoint (…/weights/<name>)", "path")
        store = self._store()
        return store.download(store.folder(op.tenant, source, name), Path(tmp) / "ckpt")

    def _create_by_load(self, op: Op) -> dict:
        with tempfile.TemporaryDirectory(prefix="farm-tinker-") as tmp:
            folder = self._fetch(op, tmp)
            state = self.executor.read_state(folder)
            self.executor.create(op.model_id, op.tenant, rank=int(state["rank"]), seed=int(state["seed"]),
                                 **state["flags"])
            self.executor.load_state(op.model_id, folder, optimizer=op.payload.optimizer)
        self.ranks[op.model_id] = int(state["rank"])
        self._record_run(op, int(state["rank"]), state["flags"], loaded_from=op.payload.path)
        return {"model_id": op.model_id, "path": op.payload.path, "type": "load_weights"}

    def _load_into(self, op: Op) -> dict:
        with tempfile.TemporaryDirectory(prefix="farm-tinker-") as tmp:
            self.executor.load_state(op.model_id, self._fetch(op, tmp), optimizer=op.payload.optimizer)
        return {"model_id": op.model_id, "path": op.payload.path, "type": "load_weights"}

    def _publish(self, op: Op) -> dict:
        """The model's LoRA as the next immutable catalog version `<tenant>/<name>@vN`: the OpenAI API of
        `farm serve` answers it like any trained adapter (lineage: this base's fingerprint)."""
        from pathlib import Path

        from farm.catalog import Catalog
        from farm.errors import CatalogError
        from farm.modeling import config_fingerprint
        from farm.settings import catalog_url
        from farm.tinker.samplers import snapshot_adapter
        from farm.tinker.state import check_adapter_name, tinker_path

        # named: <tenant>/<name>; a snapshot for a sampling client: one adapter per model, a version per save
        ephemeral = op.payload.path is None
        name = snapshot_adapter(op.model_id) if ephemeral else check_adapter_name(op.payload.path)
        m = self.executor.models[op.model_id]
        meta = {"source": "tinker", "base_model": {"source": self.cfg.base_model, "revision": None,
                                                   "sha256": config_fingerprint(self.cfg.base_model)},
                "tinker": {"model_id": op.model_id, "steps": m.steps, "tokens": m.tokens, "rank": m.rank,
                           "ephemeral": ephemeral}}
        with tempfile.TemporaryDirectory(prefix="farm-tinker-") as tmp:
            folder = self.executor.pack.export_adapter(op.model_id, Path(tmp) / "adapter", self.cfg.base_model)
            if not ephemeral:  # named sampler weights stay: they count towards the storage quota
                self._check_quota(op.tenant, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
            try:
                version = Catalog(self.cfg.catalog_url or catalog_url()).publish(
                    op.tenant, name, folder, meta, idempotency_key=f"tinker:{op.model_id}:{op.seq_id}")
            except CatalogError as exc:
                raise bad("path", f"cannot publish {op.tenant}/{name}: {exc}") from None
        if ephemeral:
            session_id = op.model_id.rsplit(":train:", 1)[0]
            ssid = f"{session_id}:sample:{op.payload.sampling_session_seq_id}"
            self.samplers[ssid] = (op.tenant, version.ref)
            keep = self.cfg.sampler_snapshots_kept
            self._prune_snapshots(op.tenant, op.model_id, keep, f"the worker keeps the newest {keep} snapshots of "
                                                                f"model {op.model_id!r} (sampler_snapshots_kept)")
            return {"sampling_session_id": ssid, "catalog_ref": version.ref, "type": "save_weights_for_sampler"}
        path = tinker_path(op.model_id, name, "sampler_weights")
        return {"path": path, "catalog_ref": version.ref, "type": "save_weights_for_sampler"}

    def _save(self, op: Op) -> dict:
        """save_state: the checkpoint into run storage, within the tenant's storage quota."""
        from pathlib import Path

        from farm.tinker.state import check_name, tinker_path

        name = check_name(op.payload.path)
        if op.payload.ttl_seconds is not None and op.payload.ttl_seconds < 1:
            raise bad("ttl_seconds", f"{op.payload.ttl_seconds!r} is not a whole number of seconds >= 1 (or null: kept)")
        store = self._store()
        folder = store.folder(op.tenant, op.model_id, name)
        with tempfile.TemporaryDirectory(prefix="farm-tinker-") as tmp:
            local = self.executor.save_state(op.model_id, Path(tmp) / "ckpt")
            if self.cfg.max_stored_bytes is not None:
                size = sum(p.stat().st_size for p in local.iterdir() if p.is_file())
                replaced = sum(c.size_bytes for c in store.checkpoints(op.tenant, op.model_id)
                               if c.folder == folder) if op.payload.overwrite else 0
                self._check_quota(op.tenant, size, replaced)
            store.upload(local, folder, overwrite=op.payload.overwrite, ttl_seconds=op.payload.ttl_seconds)
        return {"path": tinker_path(op.model_id, name), "type": "save_weights"}

    def _sweep_expired(self) -> None:
        """Delete every tenant's expired checkpoints (compute thread: storage may be S3)."""
        try:
            gone = self._store().sweep_expired()
        except Exception:  # noqa: BLE001 - storage trouble must not fail the cycle's operations
            log.exception("tinker: expired-checkpoint sweep failed")
            return
        if gone:
            log.info("tinker: deleted %d expired checkpoints", gone)

    def _forget(self, model_id: str, why: str | None = None) -> None:
        self.models.pop(model_id, None)
        self.ranks.pop(model_id, None)
        self.last_used.pop(model_id, None)
        for op in self.seq.drop_model(model_id):
            fut = self.futures.get(op.request_id)
            if fut is not None:
                fut.result = {"error": why or f"model {model_id!r} was not created", "category": "user"}
                fut.finished = time.time()
                fut.done.set()
