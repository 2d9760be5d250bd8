"""One replica's model: the NF4 base loaded once, LoRA adapters attached under slot names, and the
batching layer that runs concurrent requests for different adapters in one forward pass.

Requests are queued; a worker thread takes up to `max_batch_size` of them (waiting at most
`max_wait_ms` after the first), left-pads the prompts and runs a KV-cached decode loop in which every
forward applies each row's adapter with grouped LoRA (lora.py; PEFT's per-row `adapter_names` for
adapters it does not implement). Rows leave the batch as they finish. Each row has its
own sampler (temperature, top-p, seed) and stop strings, and streams text back to its asyncio queue;
a row whose sampling or text handling fails gets its own error and leaves, the others go on.

Every adapter folder passes the allow-list of farm/catalog/adapter_rules.py (keys, options and, here
where the base is known, shapes) before PEFT loads it, so an adapter cannot write the shared base.
PEFT builds the adapter's layers from `inert_lora_config`, never from the file's own options, so no
initializer (olora, pissa, ... which rewrite base weights) can run even if the allow-list missed one.

Adapters are attached and detached only under the model lock, between batches; a detach requested
while queued or running requests still use the slot waits until they are done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import threading
import time
from pathlib import Path

from farm.serve import metrics
from farm.serve.engines.base import GenJob, Slot  # the interface owns its types
from farm.serve.fair import FairQueue
from farm.serve.limits import ApiError, overloaded
from farm.serve.logprobs import entries, prompt_first
from farm.serve.lora import GroupedLoRA, patch_module_copies
from farm.serve.sampling import find_stop, safe_prefix_len

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class PackedWeights:
    """Keeps bitsandbytes' CPU-repacked 4-bit weights intact across adapter loads.

    On CPUs with AVX512-BF16, bitsandbytes repacks each Linear4bit weight on its first inference
    forward; any `state_dict()` call converts it back, lossily, and the next forward repacks the
    degraded weight: the base's outputs would drift a little with every adapter load. The engine's
    own attaches avoid the call (`keys_only`), but PeftModel.from_pretrained (a classifier base's
    first adapter, or a replica started without warm-up) still makes one. We warm the model up once,
    remember the packed tensors, and put them back after every attach/detach. A no-op where nothing
    is packed (GPUs, other CPUs) or nothing was converted."""

    def __init__(self, model, warmup_ids: list[int]):
        import torch

        with torch.inference_mode():
            model(input_ids=torch.tensor([warmup_ids], device=model.device))
        self.saved = []
        for module in model.modules():
            w = getattr(module, "weight", None)
            qs = getattr(w, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False):
                # the inverse conversion rewrites the QuantState's fields in place: keep a copy of them
                self.saved.append((w, w.data, qs, dict(vars(qs))))

    def restore(self) -> None:
        for w, data, qs, fields in self.saved:
            if w.data is not data or not getattr(w.quant_state, "packing_format_for_cpu", False):
                qs.__dict__.update(fields)
                w.data, w.quant_state = data, qs


@contextlib.contextmanager
def keys_only(model):
    """Within the block, `model.state_dict()` is the model's parameters and buffers by name, taken
    without the modules' state-dict hooks.

    PEFT's load_adapter calls `state_dict()` of the whole PeftModel only to learn the adapter's key
    names (`_remap_adapter_state_dict_for_load`). bitsandbytes' hook on every Linear4bit converts a
    CPU-packed weight back to the plain layout to save it, so each attach paid that conversion over
    every 4-bit weight of the base (and PackedWeights then had to put the packed tensors back), a
    cost that grows with the base while the adapter stays small. The dict here has every parameter
    and buffer key (tied weights under each name) but not bitsandbytes' quantization-state entries
    (`...weight.absmax` and the like), which no adapter key matches."""

    def state_dict(*_args, **_kwargs):
        out = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
        out.update((n, b.detach()) for n, b in model.named_buffers(remove_duplicate=False))
        return out

    model.state_dict = state_dict  # an instance attribute shadows nn.Module.state_dict
    try:
        yield
    finally:
        del model.state_dict


def describe_base(model) -> dict[str, dict]:
    """module path -> {"in", "out" (linear/embedding modules), "params": {name: shape}}: what the
    allow-list (farm/catalog/adapter_rules.py) checks an adapter's keys and shapes against. Taken
    from the bare base before PEFT wraps any of its modules."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        info: dict = {"params": {p: list(t.shape) for p, t in mod.named_parameters(recurse=False)}}
        if isinstance(mod, torch.nn.Embedding):
            info["in"], info["out"] = mod.num_embeddings, mod.embedding_dim
        elif isinstance(getattr(mod, "in_features", None), int):
            info["in"], info["out"] = mod.in_features, mod.out_features
        elif type(mod).__name__ == "Conv1D":  # GPT-2's transposed linear: weight (in, out)
            info["in"], info["out"] = mod.weight.shape[0], mod.weight.shape[1]
        out[name] = info
    return out


def inspect_adapter(path: Path, base: dict[str, dict] | None = None, hidden: int | None = None) -> tuple[str, int | None]:
    """(task, num_labels) of a PEFT LoRA adapter folder. Refuses pickles, anything but LoRA, and
    whatever the shared allow-list refuses (with `base`, also modules and shapes that do not fit)."""
    from farm.catalog.adapter_rules import check_adapter, effective_modules_to_save, refusal
    from farm.catalog.peft_folder import safetensors_shapes
    from farm.errors import CatalogError

    files = [p.name for p in path.iterdir()]
    bad = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if bad:
        raise ApiError(422, f"adapter folder holds pickle files {bad}: only safetensors are loaded", "adapter_error")
    if "adapter_model.safetensors" not in files or "adapter_config.json" not in files:
        raise ApiError(422, "adapter folder lacks adapter_config.json or adapter_model.safetensors", "adapter_error")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
        shapes = safetensors_shapes(path / "adapter_model.safetensors")
    except (ValueError, CatalogError) as exc:
        raise ApiError(422, f"adapter folder is unreadable: {exc}", "adapter_error") from None
    if not isinstance(cfg, dict):
        raise ApiError(422, "adapter_config.json is not a JSON object", "adapter_error")
    if cfg.get("task_type") not in (None, "CAUSAL_LM", "SEQ_CLS"):
        raise ApiError(422, f"adapter task_type {cfg.get('task_type')!r} is not served (CAUSAL_LM, SEQ_CLS)", "adapter_error")
    task, num_labels = "causal_lm", None
    if cfg.get("task_type") == "SEQ_CLS":
        heads = set(effective_modules_to_save(cfg))
        for key, shape in shapes.items():
            parts = key.split(".")
            if key.endswith(".weight") and len(shape) == 2 and any(h in parts for h in heads):
                task, num_labels = "seq_cls", int(shape[0])
                break
        else:
            raise ApiError(422, "seq_cls adapter has no saved classification head (modules_to_save)", "adapter_error")
        if base is not None:  # the classifier base has a fresh head of this size where the LM has lm_head
            base = {**base, **{h: {"params": {"weight": [num_labels, hidden]}} for h in ("score", "classifier")}}
    problems = check_adapter(cfg, shapes, base)
    if problems:
        raise ApiError(422, refusal("adapter", problems), "adapter_error")
    return task, num_labels


def inert_lora_config(path: Path):
    """The adapter's LoraConfig with every initializer switched off (adapter_rules.inert_config).

    PEFT runs `init_lora_weights` (and the KaSA variant's init) when it creates an adapter's layers,
    before the saved weights are loaded into them; some initializers rewrite the base weights they
    wrap. With init_lora_weights=False and no initializer config, PEFT's update_layer only creates
    the LoRA A/B modules (peft 0.21 tuners/lora/layer.py), which the saved tensors then fill."""
    from peft import PeftConfig

    from farm.catalog.adapter_rules import inert_config

    try:
        cfg = PeftConfig.from_peft_type(**inert_config(json.loads((path / "adapter_config.json").read_text())))
    except (TypeError, ValueError, KeyError) as exc:
        raise ApiError(422, f"adapter_config.json cannot be loaded: {exc}", "adapter_error") from None
    cfg.inference_mode = True
    return cfg


def load_lora(model, path: Path, name: str):
    """Load the adapter folder into `model` under `name` from its inert config: a transformers model
    gets wrapped (returns the new PeftModel), a PeftModel gets one more adapter (returns it)."""
    from peft import PeftModel

    cfg = inert_lora_config(path)
    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, str(path), adapter_name=name, config=cfg).eval()
    try:
        with keys_only(model):
            model.add_adapter(name, cfg)  # load_adapter then reads weights only: the config is never re-read
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except Exception:
        if name in model.peft_config:  # leave no half-loaded adapter behind
            model.delete_adapter(name)
        raise
    return model


class Engine:
    """The model side of one replica. Thread-safe; async entry points run on the replica's loop."""

    def __init__(
        self,
        base_model: str,
        *,
        quantization: str = "nf4",
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_waiting: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        warm_up: bool = True,
        fair: bool = True,
    ):
        import torch

        from farm.modeling import Quantization, load_base_model, load_tokenizer

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.base_model = base_model
        self.quant = Quantization(mode=quantization, compute_dtype=dtype)
        self.tokenizer = load_tokenizer(base_model)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("gpus_per_replica > 0 but this replica sees no CUDA device")
        self.device = device
        self.base = load_base_model(base_model, quant=self.quant, device=device).eval()
        cfg = self.base.config
        self.context_length = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        )
        self.eos_ids = self._eos_ids()
        self.base_modules = describe_base(self.base)  # before PEFT wraps anything: the allow-list's reference
        self.hidden_size = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))
        self._warmup_ids = self.tokenizer("warm up").input_ids or [0]
        self._packed = {"causal_lm": PackedWeights(self.base, self._warmup_ids)}
        self.peft = None  # PeftModel over self.base: built at start (warm_up) or by the first causal attach
        self.grouped: GroupedLoRA | None = None  # stacked LoRA weights of self.peft's adapters
        if warm_up:  # so that the first adapter load costs what every later one does (warmup.py)
            from farm.serve.warmup import build_wrapper

            self.peft, self.grouped = build_wrapper(self.base, self._warmup_ids)
            self._packed["causal_lm"].restore()
        self.classifiers: dict[int, object] = {}  # num_labels -> seq_cls base (PeftModel once used)
        self.slots: dict[str, Slot] = {}
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_waiting = max_waiting
        self._names = itertools.count()
        self._model_lock = threading.RLock()
        self._cv = threading.Condition()
        self._queue: FairQueue[GenJob] = FairQueue(fair)  # per-tenant FIFOs, round-robin (fair.py)
        self._in_use: collections.Counter[str] = collections.Counter()
        self._doomed: set[str] = set()
        self.stats = collections.Counter()  # loads / evictions / batches / rows, for /admin and tests
        self._worker = threading.Thread(target=self._run, name="farm-batcher", daemon=True)
        self._worker.start()

    def _eos_ids(self) -> set[int]:
        ids = self.base.generation_config.eos_token_id if self.base.generation_config else None
        ids = ids if ids is not None else self.base.config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {int(i) for i in ids if i is not None}

    # ---- adapters -------------------------------------------------------------------------
    def attach(self, path: Path, labels: list[str] | None = None) -> Slot:
        """Attach the adapter folder under a fresh slot name (blocking; call from a thread)."""
        task, num_labels = inspect_adapter(Path(path), self.base_modules, self.hidden_size)
        slot = Slot(name=f"s{next(self._names)}", task=task, num_labels=num_labels)
        if task == "seq_cls":
            slot.labels = labels if labels and len(labels) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]
        with self._model_lock:
            if task == "causal_lm":
                if self.peft is None:
                    self.peft = load_lora(self.base, path, slot.name)
                    self.grouped = GroupedLoRA(self.peft)
                else:
                    load_lora(self.peft, path, slot.name)
                    if self.peft.active_adapter not in self.peft.peft_config:  # the warm-up's, deleted
                        self.peft.set_adapter(slot.name, inference_mode=True)  # as from_pretrained leaves it
                self.grouped.add(slot.name)
            else:
                model = self.classifiers.get(num_labels)
                if model is None:
                    from farm.modeling import load_base_model

                    base = load_base_model(
                        self.base_model, task="seq_cls", num_labels=num_labels, quant=self.quant, device=self.device
                    ).eval()
                    self._packed[num_labels] = PackedWeights(base, self._warmup_ids)
                    model = load_lora(base, path, slot.name)
                    self.classifiers[num_labels] = model
                else:
                    load_lora(model, path, slot.name)
                patch_module_copies(model)  # each row's own head, whichever adapter PEFT holds active
            self._packed["causal_lm" if task == "causal_lm" else num_labels].restore()
            self.slots[slot.name] = slot
            self.stats["loads"] += 1
        return slot

    def detach(self, name: str) -> None:
        """Drop a slot once no queued or running request uses it."""
        with self._cv:
            self._doomed.add(name)
        self._reap()

    def _reap(self) -> None:
        with self._model_lock, self._cv:
            for name in list(self._doomed):
                slot = self.slots.get(name)
                if slot is None:
                    self._doomed.discard(name)
                    continue
                if self._in_use[name]:
                    continue
                model = self.peft if slot.task == "causal_lm" else self.classifiers[slot.num_labels]
                if len(model.peft_config) <= 1:
                    continue  # PEFT keeps >= 1 adapter: drop this one when the next is attached
                if slot.task == "causal_lm":
                    self.grouped.remove(name)
                # Active first: PEFT 0.21's ModulesToSaveWrapper.delete_adapter reads its own
                # active_adapters[0], which is empty once an adapter without that module copy was made
                # active (IndexError mid-delete, the model left half-deleted: every later attach then
                # fails with a KeyError). With the doomed adapter active, that list is never empty.
                model.set_adapter(name, inference_mode=True)
                model.delete_adapter(name)
                self._packed["causal_lm" if slot.task == "causal_lm" else slot.num_labels].restore()
                del self.slots[name]
                self._doomed.discard(name)
                self.stats["evictions"] += 1

    # ---- generation -----------------------------------------------------------------------
    async def generate(self, job: GenJob):
        """Queue a job and yield its events: {'delta': text} (stream only), then one {'done': ...}."""
        problems = job.sampler.problems()
        if problems:  # the API checks these too; a row must never reach the decode step with them
            raise ApiError(400, "invalid request: " + "; ".join(problems))
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        job.submitted = time.perf_counter()
        with self._cv:
            if job.slot is not None and job.slot not in self.slots:
                raise ApiError(503, "adapter was unloaded while the request waited; retry", "overloaded", 0.1)
            if len(self._queue) >= self.max_waiting:
                shed = self._queue.make_room_for(job.tenant)  # a flooding tenant's newest gives way
                if shed is None:
                    raise overloaded(len(self._queue))
                if shed.slot is not None:
                    self._in_use[shed.slot] -= 1
                shed.emit({"error": overloaded(len(self._queue))})
            if job.slot is not None:
                self._in_use[job.slot] += 1
            self._queue.append(job.tenant, job)
            metrics.get("waiting").set(len(self._queue))
            self._cv.notify()
        try:
            while True:
                event = await job.events.get()
                yield event
                if "done" in event or "error" in event:
                    return
        finally:
            job.cancelled = True

    def _take_batch(self) -> list[GenJob]:
        with self._cv:
            while not self._queue:
                self._cv.wait()
            deadline = time.perf_counter() + self.max_wait_s
            while len(self._queue) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = self._queue.take(self.max_batch_size)  # round-robin across tenants
            metrics.get("waiting").set(len(self._queue))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                self._decode(batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the replica
                for job in batch:
                    job.emit({"error": ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")})
            finally:
                with self._cv:
                    for job in batch:
                        if job.slot is not None:
                            self._in_use[job.slot] -= 1
                self._reap()

    def _decode(self, batch: list[GenJob]) -> None:
        import torch
        from transformers import DynamicCache

        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        metrics.get("batch_size").observe(len(batch))
        metrics.get("batch_adapters").observe(len({j.slot for j in batch}))
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, j in enumerate(batch):  # left padding: every row's last prompt token is at -1
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        with self._model_lock, torch.inference_mode():
            names = [j.slot or BASE for j in batch]
            if self.peft is None and any(j.slot for j in batch):
                raise RuntimeError("adapter slot requested but no adapter is attached")
            cache = DynamicCache()
            rows = list(batch)
            out = self._forward(names, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
            for i, job in enumerate(rows):
                if job.prompt_logprobs is not None:  # echo: every prompt position's logits, exactly
                    n = len(job.prompt_ids)
                    job.prompt_entries = [prompt_first(job.prompt_ids[0])] + entries(
                        out.logits[i, width - n : width - 1], job.prompt_ids[1:], job.prompt_logprobs)
            while True:
                # sampling runs on CPU: cheap for one row of logits, and seeded draws do not
                # depend on the device
                logits = out.logits[:, -1, :].float().cpu()
                next_ids, keep = [], []
                for i, job in enumerate(rows):
                    try:
                        tok = job.sampler.sample(logits[i])
                        entry = None if job.logprobs is None else entries(logits[i : i + 1], [tok], job.logprobs)[0]
                        going = self._advance(job, tok, entry)
                    except Exception as exc:  # noqa: BLE001 - one row's failure must not fail its batch
                        job.emit({"error": ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")})
                        going = False
                    if going:
                        keep.append(i)
                        next_ids.append(tok)
                if not keep:
                    return
                if len(keep) < len(rows):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, pos = mask[idx], pos[idx]
                    rows = [rows[i] for i in keep]
                    names = [names[i] for i in keep]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=mask.device)], dim=1)
                pos = pos[:, -1:] + 1
                out = self._forward(names, input_ids=torch.tensor(next_ids, device=self.device)[:, None], attention_mask=mask,
                                    position_ids=pos, past_key_values=cache)

    def _forward(self, names: list[str], **inputs):
        """One forward of the causal model, row i with adapter names[i] (under the model lock)."""
        if self.peft is None:
            return self.base(**inputs, use_cache=True)
        if self.grouped.supports(names):
            # the transformers model directly: PeftModel's forward would re-register hooks on every call
            with self.grouped.batch(names):
                return self.base(**inputs, use_cache=True)
        return self.peft(**inputs, use_cache=True, adapter_names=names)

    def _advance(self, job: GenJob, tok: int, entry: list | None = None) -> bool:
        """Record one token (and its logprob entry) for a row; emit text; return False when the row is finished."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            metrics.get("ttft").observe(now - job.submitted, tags={"adapter": job.tag})
        if job.cancelled:
            return False
        finish = None
        if job.max_tokens == 0:  # echo only: the prompt was scored, nothing is generated
            finish = "length"
        elif (tok in self.eos_ids and not job.ignore_eos) or tok in job.stop_token_ids:
            finish = "stop"
            if job.keep_stop_token:
                job.out_ids.append(tok)
                if entry is not None:
                    job.out_logprobs.append(entry)
        else:
            job.out_ids.append(tok)
            if entry is not None:
                job.out_logprobs.append(entry)
            if len(job.out_ids) >= job.max_tokens:
                finish = "length"
        text = None
        if job.stops or job.stream or finish:
            text = self.tokenizer.decode(job.out_ids, skip_special_tokens=True)
            cut = find_stop(text, job.stops) if job.stops else -1
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if job.stream and text is not None:
            end = len(text) if finish else safe_prefix_len(text, job.stops)
            if end > job.sent:
                job.emit({"delta": text[job.sent : end]})
                job.sent = end
        if finish is None:
            return True
        n = len(job.out_ids)
        elapsed = max(now - job.submitted, 1e-9)
        if n:  # Ray counters refuse 0 (a completion that stops at its first token)
            metrics.get("tokens").inc(n, tags={"adapter": job.tag})
        metrics.get("tokens_per_s").observe(n / elapsed, tags={"adapter": job.tag})
        job.emit({"done": {"text": text, "finish_reason": finish, "completion_tokens": n,
                           "prompt_tokens": len(job.prompt_ids), "logprobs": job.out_logprobs if job.logprobs is not None else None,
                           "prompt_logprobs": job.prompt_entries}})
        return False

    # ---- classification -------------------------------------------------------------------
    def classify(self, slot_name: str, input_ids: list[int]) -> dict:
        """Label and probabilities from a seq_cls adapter (blocking; call from a thread)."""
        import torch

        with self._cv:
            slot = self.slots.get(slot_name)
            if slot is None:
                raise ApiError(503, "adapter was unloaded while the request waited; retry", "overloaded", 0.1)
            self._in_use[slot_name] += 1
        try:
            with self._model_lock, torch.inference_mode():
                model = self.classifiers[slot.num_labels]
                ids = torch.tensor([input_ids], device=self.device)
                logits = model(input_ids=ids, adapter_names=[slot_name]).logits[0].float().cpu()
            probs = torch.softmax(logits, -1).tolist()
        finally:
            with self._cv:
                self._in_use[slot_name] -= 1
            self._reap()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": slot.labels[best], "index": best, "probabilities": dict(zip(slot.labels, probs))}
