"""The step executor: one resident base, every Tinker model's LoRA on it, grouped forward/backward.

Plain Python on torch (no Ray, no HTTP): `farm.tinker.worker` wraps it in the long-lived actor,
tests drive it directly. The LoRA math is the packed trainer's: each model is a `PackLoRA` slot
(`farm.train.pack_lora`: its own leaf A/B, B zero at the start so a fresh model scores exactly as
the base does), and one `forward_backward` call takes the requests of several models, puts their
rows in one right-padded batch (`farm.train.pack_step.collate_pack`), runs the base once under
`pack.rows(...)` and backpropagates the sum of the models' losses once: a model's parameters get
gradients from its own rows only, so its numbers are its solo run's (up to float reassociation in
the base's matmuls over a wider batch).

Tinker semantics kept here (the notes, ../shared/notes/tinker.md §6):
  * `cross_entropy` is a sum over datums and positions of -logprob(target) * weight, reported as
    `loss:sum`; the per-position logprobs come back as `logprobs` (float32, one per input token);
    `importance_sampling` and `ppo` are the same sums of their per-token policy-gradient terms
    (`_elementwise_loss`), with the sampler's logprobs and the advantages as inputs;
  * gradients accumulate over forward_backward calls until `optim_step`, which is torch AdamW with
    the request's lr, betas, eps and decoupled weight decay, and clips only when grad_clip_norm > 0;
  * no dropout, and the forward runs with the base in eval mode: deterministic.
  * Why eval mode (the pack trainer keeps train mode): Tinker promises deterministic steps, and a
    base with dropout (GPT-2) would otherwise draw masks. The cost: a base prepared with gradient
    checkpointing (GPU) does not checkpoint in eval mode, so activations are held for the backward.

LoRA placement from Tinker's flags: `train_attn` targets the Linear layers under an attention
module (a name part containing "attn" or "attention"), `train_mlp` those under an MLP ("mlp",
"feed_forward", "ffn", "experts"), `train_unembed` the output head; alpha is 32 for every rank
(LoRA Without Regret's convention, which Tinker's learning-rate guidance assumes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.tinker.errors import TinkerApiError, bad
from farm.tinker.wire import ForwardBackward

LORA_ALPHA = 32
EVICTED_FILE = "farm_tinker_evicted.pt"  # beside STATE_FILE in an evicted model's folder: what a checkpoint omits
ATTN_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "feed_forward", "ffn", "experts")


@dataclass
class TinkerModel:
    """One Tinker model (a training run) on the executor."""

    model_id: str
    tenant: str
    rank: int
    seed: int
    targets: list[str]
    params: list
    optimizer: Any  # torch.optim.AdamW
    flags: dict = field(default_factory=dict)  # Tinker's train_attn / train_mlp / train_unembed
    steps: int = 0  # optimizer steps taken
    pending: int = 0  # forward_backward calls whose gradients wait for an optim_step
    tokens: int = 0  # non-padding tokens through forward/backward (the cost ledger's tokens)
    seconds: float = 0.0  # its token share of each grouped step's time plus its optimizer steps' time
    created: float = field(default_factory=time.time)


class Executor:
    """See the module docstring. `model` is a prepared base (farm.train.modelops.build_base)."""

    def __init__(self, model, device, *, pad_token_id: int = 0):
        import torch

        from farm.train.pack_lora import PackLoRA

        self.model, self.device = model, torch.device(device) if isinstance(device, str) else device
        self.pack = PackLoRA(model)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(model.config.vocab_size)
        cfg = model.config
        self.context = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
        self.models: dict[str, TinkerModel] = {}
        # the base's Linear layers and output head as loaded, before any LoRA wraps one (a wrapped head is
        # a PackLinear: every later model would lose train_unembed); targets are chosen from these
        self._linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        self._output = model.get_output_embeddings()
        model.eval()

    @classmethod
    def load(cls, source: str, *, quantization: str = "nf4", device: str = "cpu") -> Executor:
        """The base from a local folder, s3:// URL or hub id, prepared as the pack trainer prepares it."""
        from farm.modeling import load_tokenizer
        from farm.train.modelops import build_base

        model, _ = build_base({"source": source, "quant": {"mode": quantization}, "task": "causal_lm"}, device)
        tok = load_tokenizer(source)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return cls(model, device, pad_token_id=pad)

    # ---- models -------------------------------------------------------------------------------
    def targets(self, *, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
        """Full names of the Linear layers a LoRA with these Tinker flags adapts, in model order."""
        names = []
        for name, module in self._linears:
            parts = name.lower().split(".")
            if module is self._output:
                keep = train_unembed
            else:
                keep = ((train_attn and any(p in part for part in parts for p in ATTN_PARTS))
                        or (train_mlp and any(p in part for part in parts for p in MLP_PARTS)))
            if keep:
                names.append(name)
        return names

    def create(self, model_id: str, tenant: str, *, rank: int, seed: int, train_attn: bool = True,
               train_mlp: bool = True, train_unembed: bool = True) -> TinkerModel:
        """A new LoRA (B = 0) with its AdamW; a 400 when the flags select no layer of this base."""
        import torch
        from peft import LoraConfig

        if model_id in self.models:
            raise TinkerApiError(400, f"model_id {model_id!r} exists already", "model_seq_id")
        targets = self.targets(train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed)
        if not targets:
            raise bad("lora_config", f"train_attn={train_attn}, train_mlp={train_mlp}, train_unembed={train_unembed} "
                                     "select no Linear layer of this base")
        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, bias="none")
        params = self.pack.add_job(model_id, config, seed)
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        flags = {"train_attn": train_attn, "train_mlp": train_mlp, "train_unembed": train_unembed}
        m = TinkerModel(model_id, tenant, rank, seed, targets, params, optimizer, flags)
        self.models[model_id] = m
        return m

    def release(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        if model_id in self.pack.jobs:
            self.pack.remove_job(model_id)

    # ---- one grouped forward/backward ---------------------------------------------------------
    def check(self, req: ForwardBackward) -> None:
        """What needs the model: token ids within the vocabulary, lengths within the context (400s)."""
        if req.model_id not in self.models:
            raise TinkerApiError(404, f"model {req.model_id!r} not found", "model_id")
        for i, d in enumerate(req.data):
            n = int(d.tokens.size)
            if n > self.context:
                raise bad(f"data[{i}].model_input", f"{n} tokens is over the base's context of {self.context}")
            for where, ids in ((f"data[{i}].model_input", d.tokens),
                               (f"data[{i}].loss_fn_inputs.target_tokens", d.inputs["target_tokens"])):
                top = int(ids.max())
                if top >= self.vocab_size:
                    raise bad(where, f"token id {top} is outside the vocabulary (0..{self.vocab_size - 1})")

    def forward_backward(self, requests: list[ForwardBackward]) -> list[dict]:
        """One grouped forward (and one backward for those not forward_only) over the requests of
        different models. Per request: {"logprobs": [float32 per datum], "elementwise_loss": [...],
        "metrics": {"loss:sum": ...}} or {"error": ..., "status": ...} for that request alone."""
        import numpy as np
        import torch

        from farm.train.pack_step import collate_pack

        results: list[dict | None] = [None] * len(requests)
        live: dict[str, int] = {}
        for i, req in enumerate(requests):
            try:
                self.check(req)
                if req.model_id in live:
                    raise ValueError(f"two requests of model {req.model_id!r} in one group")  # the worker's bug
            except TinkerApiError as exc:
                results[i] = {"error": exc.message, "status": exc.status}
                continue
            live[req.model_id] = i
        if not live:
            return results  # type: ignore[return-value]
        micro, extra = {}, {}
        for model_id, i in live.items():
            data = requests[i].data
            width = max(d.tokens.size for d in data)
            ids = torch.full((len(data), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(data), width), dtype=torch.long)
            labels = torch.full((len(data), width), -100, dtype=torch.long)
            # the loss's per-position inputs, zero on padding: weights, or sampling logprobs and advantages
            floats = {k: torch.zeros((len(data), width)) for k in ("weights", "logprobs", "advantages")}
            for r, d in enumerate(data):
                n = d.tokens.size
                ids[r, :n] = torch.from_numpy(d.tokens)
                mask[r, :n] = 1
                labels[r, :n] = torch.from_numpy(d.inputs["target_tokens"].astype(np.int64))
                for k, t in floats.items():
                    given = d.inputs.get(k)
                    if given is not None:
                        t[r, :n] = torch.from_numpy(given.astype(np.float32))
                    elif k == "weights":
                        t[r, :n] = 1.0  # cross_entropy without weights: every position counts
            micro[model_id] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            extra[model_id] = floats
        batch, rows, widths = collate_pack(micro, self.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        train = any(not requests[i].forward_only for i in live.values())
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train), self.pack.rows(rows, widths=widths):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            labels = batch["labels"]
            nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                    reduction="none").view(labels.shape)
            total = None
            for model_id, i in live.items():
                r = rows[model_id]
                req = requests[i]
                inputs = {k: torch.nn.functional.pad(v, (0, labels.shape[1] - v.shape[1])).to(self.device)
                          for k, v in extra[model_id].items()}
                elementwise = _elementwise_loss(req.loss_fn, -nll[r], (labels[r] != -100).float(), inputs,
                                                req.loss_fn_config)
                loss = elementwise.sum()
                lp = (-nll[r]).detach().float().cpu().numpy()
                el = elementwise.detach().float().cpu().numpy()
                lengths = [d.tokens.size for d in req.data]
                results[i] = {"logprobs": [lp[k, :n].copy() for k, n in enumerate(lengths)],
                              "elementwise_loss": [el[k, :n].copy() for k, n in enumerate(lengths)],
                              "metrics": {"loss:sum": float(loss.detach())}}
                if not req.forward_only:
                    total = loss if total is None else total + loss
            if total is not None:
                total.backward()
        dt = time.perf_counter() - t0
        tokens = {m: int(batch["attention_mask"][rows[m]].sum()) for m in live}
        all_tokens = sum(tokens.values()) or 1
        for model_id, i in live.items():
            m = self.models[model_id]
            m.tokens += tokens[model_id]
            m.seconds += dt * tokens[model_id] / all_tokens
            if not requests[i].forward_only:
                m.pending += 1
        return results  # type: ignore[return-value]

    # ---- the optimizer ------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam) -> dict:
        """AdamW with the request's parameters (`adam`: farm.tinker.types.AdamParams) on the
        gradients accumulated since the last step; the gradients are then cleared."""
        import torch

        m = self.models.get(model_id)
        if m is None:
            raise TinkerApiError(404, f"model {model_id!r} not found", "model_id")
        t0 = time.perf_counter()
        for group in m.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        grads = [p.grad for p in m.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if adam.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grad_norm_(m.params, adam.grad_clip_norm)
        if grads and math.isfinite(norm):  # a non-finite norm (reported) would poison the weights for good
            m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.steps += 1
        m.pending = 0
        m.seconds += time.perf_counter() - t0
        return {"metrics": {"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate}}

    # ---- state (save_state / load_state) -------------------------------------------------------
    def save_state(self, model_id: str, folder) -> Path:
        """The model as a stock PEFT folder plus STATE_FILE (AdamW's moments and step count, the LoRA's
        Tinker flags, the steps taken), written into the local `folder`."""
        import torch

        from farm.tinker.state import STATE_FILE

        m = self.models[model_id]
        folder = self.pack.export_adapter(model_id, folder)
        torch.save({"rank": m.rank, "seed": m.seed, "flags": m.flags, "steps": m.steps,
                    "optimizer": m.optimizer.state_dict()}, Path(folder) / STATE_FILE)
        return Path(folder)

    @staticmethod
    def read_state(folder) -> dict:
        import torch

        from farm.tinker.state import STATE_FILE

        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)

    def load_state(self, model_id: str, folder, *, optimizer: bool) -> None:
        """A checkpoint's weights (and, with `optimizer`, AdamW's moments and step count) into a model
        of the same shape; a 400 when the checkpoint's LoRA does not fit it."""
        from farm.errors import TrainingError

        m = self.models[model_id]
        state = self.read_state(folder)
        if state["rank"] != m.rank or state["flags"] != m.flags:
            raise bad("path", f"the checkpoint's LoRA (rank {state['rank']}, {state['flags']}) is not this model's "
                              f"(rank {m.rank}, {m.flags})")
        try:
            self.pack.load_adapter(model_id, folder)
        except TrainingError as exc:
            raise bad("path", f"the checkpoint does not fit this base: {str(exc).splitlines()[0]}") from None
        if optimizer:
            m.optimizer.load_state_dict(state["optimizer"])
            m.steps = int(state["steps"])
        for p in m.params:
            p.grad = None
        m.pending = 0

    # ---- idle models leave memory (the worker decides when) ------------------------------------
    def evict(self, model_id: str, folder) -> bool:
        """Write the model's whole state (LoRA, AdamW, counters) to the local `folder` and drop it from
        memory; `restore` brings it back as it was. False, and nothing done, while gradients of a
        forward_backward wait for their optim_step (they are not state a checkpoint keeps)."""
        import torch

        m = self.models[model_id]
        if m.pending:
            return False
        folder = self.save_state(model_id, folder)
        torch.save({"tenant": m.tenant, "tokens": m.tokens, "seconds": m.seconds, "created": m.created},
                   Path(folder) / EVICTED_FILE)
        self.release(model_id)
        return True

    def restore(self, model_id: str, folder) -> TinkerModel:
        """An evicted model back in memory, its next step the one it would have taken."""
        import torch

        state = self.read_state(folder)
        extra = torch.load(Path(folder) / EVICTED_FILE, map_location="cpu", weights_only=True)
        m = self.create(model_id, extra["tenant"], rank=int(state["rank"]), seed=int(state["seed"]), **state["flags"])
        self.load_state(model_id, folder, optimizer=True)
        m.tokens, m.seconds, m.created = int(extra["tokens"]), float(extra["seconds"]), float(extra["created"])
        return m

    def info(self, model_id: str) -> dict:
        m = self.models[model_id]
        return {"rank": m.rank, "targets": len(m.targets), "steps": m.steps, "tokens": m.tokens}


def _elementwise_loss(loss_fn: str, logprobs, mask, inputs: dict, config: dict):
    """Each position's loss, Tinker's definitions (docs: tinker/losses): `cross_entropy` -logprob * weight;
    `importance_sampling` -ratio * advantage with ratio = exp(logprob - sampling logprob); `ppo`
    -min(ratio * A, clip(ratio, clip_low_threshold, clip_high_threshold) * A). Padding counts zero."""
    import torch

    if loss_fn == "cross_entropy":
        return -logprobs * inputs["weights"] * mask
    ratio = torch.exp(logprobs - inputs["logprobs"])
    adv = inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -(ratio * adv) * mask
    if loss_fn == "ppo":
        clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
        return -torch.minimum(ratio * adv, clipped * adv) * mask
    raise ValueError(f"no loss {loss_fn!r}")  # the wire refuses it before
