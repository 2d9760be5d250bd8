"""Training methods: the seam between *what* a job learns and the engine that trains it.

A method (the `Method` protocol; subclass `MethodBase` for its defaults) supplies:

  * `prepare`: a pass over a job's tokenized rows before training, run by the engine with *no*
    adapter on the base (the member's LoRA switched off): the reference policy, for free. SFT does
    nothing; DPO records each pair's reference log-probabilities here, once per example.
  * `micro_batch`: the collated micro-batch of some of its rows (right-padded `input_ids`,
    `attention_mask`, `labels`; extra tensors, such as DPO's reference log-probabilities, ride along);
  * `loss`: the job's scalar loss from its block of the grouped forward (its logits, and its
    micro-batch with `labels` padded to the pack's width), plus metrics to report (floats);
  * `evaluate`: its eval metrics on its eval rows (`eval_loss` drives early stopping);
  * `token_factor`: sequences a data row becomes in a forward (SFT 1, DPO 2: chosen and rejected),
    for the packer's memory estimate and `farm plan`.

The job's task picks the method's class with its name: `method("sft", task="seq_cls")` is
`ClassifierSFT` (cross-entropy of the classification head's pooled logits, eval accuracy), the rest
train causal LMs (`METHODS`). A seq_cls job's head is a whole trained module of its own
(farm.train.pack_lora holds it as PEFT's modules_to_save); the method only sees its logits.

The engine (farm.train.engine) owns everything else: the resident base, the adapters, one
forward/backward per pack step, accumulation, clipping, optimizer and LR schedule, the eval schedule,
early stopping, checkpoints, cost and progress. So a new method is a new class here, and it packs
with every other method's jobs on the same base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class Method(Protocol):
    name: str
    token_factor: int

    def prepare(self, model: Any, rows: dict[str, list], collate: Any, batch_size: int, device: Any) -> dict[str, list]:
        """The rows to train on (columns may be added), computed by the base alone (no adapter)."""
        ...

    def micro_batch(self, rows: dict[str, list], idx: list[int], collate: Any) -> dict:
        """The collated micro-batch of rows `idx` of a job's tokenized rows (column -> list)."""
        ...

    def loss(self, model: Any, logits: torch.Tensor, batch: dict) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """This job's scalar loss (and optionally metrics {name: float}) from its block of the grouped
        forward's logits and its micro-batch (`labels` padded to that block's width with -100)."""
        ...

    def evaluate(self, model: Any, rows: dict[str, list], collate: Any, batch_size: int, device: Any,
                 task: str) -> dict[str, float]:
        """Eval metrics (`eval_loss` at least) on the job's eval rows; the model is in eval mode."""
        ...


class MethodBase:
    """Defaults: rows unchanged, a micro-batch is the collated rows, SFT's evaluation."""

    name: ClassVar[str] = "base"
    token_factor: ClassVar[int] = 1

    def prepare(self, model, rows, collate, batch_size, device):
        return rows

    def micro_batch(self, rows, idx, collate):
        return collate([{k: rows[k][j] for k in ("input_ids", "attention_mask", "labels")} for j in idx])

    def evaluate(self, model, rows, collate, batch_size, device, task):
        from farm.train.modelops import evaluate

        return evaluate(model, rows, collate, batch_size, device, task)


class SFT(MethodBase):
    """Supervised fine-tuning: next-token cross-entropy on the label tokens (prompt tokens are -100)."""

    name = "sft"

    def loss(self, model, logits, batch):
        # The model's own loss (transformers' ForCausalLMLoss: shifted, float, mean over label
        # tokens): exactly `model(**batch).loss` of that job's micro-batch alone.
        return model.loss_function(logits=logits, labels=batch["labels"], vocab_size=model.config.vocab_size)


class ClassifierSFT(MethodBase):
    """Supervised fine-tuning of a sequence classifier (task seq_cls): rows carry one class id each
    (`labels`, a 1-D tensor once collated); the loss is the model's own classification loss of the
    head's pooled logits (the last non-pad token's), so `model(**batch).loss` of the micro-batch alone;
    eval reports `eval_loss` and `eval_accuracy`."""

    name = "sft"

    def loss(self, model, logits, batch):
        return model.loss_function(labels=batch["labels"], pooled_logits=logits, config=model.config)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of the log-probabilities of its label tokens (each given the ones before it)."""
    import torch

    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(dim=1)


@dataclass(frozen=True)
class DPO(MethodBase):
    """Direct Preference Optimization (Rafailov et al. 2023) on pairs of responses to one prompt.

    Rows carry the chosen sequence (`input_ids`, `labels`: the response tokens, the prompt -100) and
    the rejected one (`rejected_input_ids`, `rejected_labels`). The reference policy is the base
    with the member's adapter off: `prepare` scores every pair once before training (the engine runs
    it with no adapter applied) and stores `ref_chosen_logps` / `ref_rejected_logps`; a micro-batch
    is its pairs' chosen rows, then their rejected rows (2 x rows sequences in the grouped forward).

    Loss (the log-ratios are summed over response tokens, as TRL's DPOTrainer does):
      sigmoid: -(1 - eps) log s(beta d) - eps log s(-beta d), d = (pi_c - ref_c) - (pi_r - ref_r);
               eps = label_smoothing (conservative DPO), 0 by default; ln 2 while the adapter is zero.
      ipo:     (d' - 1 / (2 beta))^2, d' the same difference with each log-ratio averaged per token.
    Metrics: reward_chosen / reward_rejected (beta x log-ratio), reward_accuracy (chosen > rejected),
    reward_margin, as TRL's rewards/* metrics.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"

    name: ClassVar[str] = "dpo"
    token_factor: ClassVar[int] = 2
    LOSS_TYPES: ClassVar[tuple[str, ...]] = ("sigmoid", "ipo")

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.loss_type not in self.LOSS_TYPES:
            raise ValueError(f"dpo.loss_type {self.loss_type!r}: allowed {', '.join(self.LOSS_TYPES)}")

    def _pairs(self, rows, idx, collate) -> dict:
        chosen = [{"input_ids": rows["input_ids"][j], "attention_mask": [1] * len(rows["input_ids"][j]),
                   "labels": rows["labels"][j]} for j in idx]
        rejected = [{"input_ids": rows["rejected_input_ids"][j], "attention_mask": [1] * len(rows["rejected_input_ids"][j]),
                     "labels": rows["rejected_labels"][j]} for j in idx]
        return collate(chosen + rejected)

    def prepare(self, model, rows, collate, batch_size, device):
        import torch

        if "ref_chosen_logps" in rows:
            return rows
        chosen, rejected = [], []
        was_training = model.training
        model.eval()
        n = len(rows["input_ids"])
        with torch.no_grad():
            for i in range(0, n, batch_size):
                b = {k: v.to(device) for k, v in self._pairs(rows, list(range(i, min(n, i + batch_size))), collate).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                c, r = sequence_logps(logits, b["labels"]).chunk(2)
                chosen += c.tolist()
                rejected += r.tolist()
        model.train(was_training)
        return {**rows, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def micro_batch(self, rows, idx, collate):
        import torch

        batch = self._pairs(rows, idx, collate)
        batch["ref_chosen_logps"] = torch.tensor([rows["ref_chosen_logps"][j] for j in idx], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([rows["ref_rejected_logps"][j] for j in idx], dtype=torch.float32)
        return batch

    def loss(self, model, logits, batch):
        import torch.nn.functional as F

        logps = sequence_logps(logits, batch["labels"])
        chosen, rejected = logps.chunk(2)
        chosen_ratio = chosen - batch["ref_chosen_logps"]
        rejected_ratio = rejected - batch["ref_rejected_logps"]
        if self.loss_type == "ipo":
            n_tok = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            n_c, n_r = n_tok.chunk(2)
            per_pair = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * self.beta)) ** 2
        else:
            d = self.beta * (chosen_ratio - rejected_ratio)
            per_pair = -(1 - self.label_smoothing) * F.logsigmoid(d) - self.label_smoothing * F.logsigmoid(-d)
        r_c, r_r = (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()
        metrics = {"reward_chosen": float(r_c.mean()), "reward_rejected": float(r_r.mean()),
                   "reward_accuracy": float((r_c > r_r).float().mean()), "reward_margin": float((r_c - r_r).mean())}
        return per_pair.mean(), metrics

    def evaluate(self, model, rows, collate, batch_size, device, task):
        import torch

        model.eval()
        n = len(rows["input_ids"])
        sums: dict[str, float] = {}
        with torch.no_grad():
            for i in range(0, n, batch_size):
                idx = list(range(i, min(n, i + batch_size)))
                b = {k: v.to(device) for k, v in self.micro_batch(rows, idx, collate).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                loss, metrics = self.loss(model, logits, b)
                for k, v in {"loss": float(loss), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
        model.train()
        return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}


METHODS: dict[str, type] = {"sft": SFT, "dpo": DPO}
"""Methods of causal-LM jobs, by name."""
TASK_METHODS: dict[str, dict[str, type]] = {"causal_lm": METHODS, "seq_cls": {"sft": ClassifierSFT}}
"""Each task's methods, by name (a task's head decides what a loss can be)."""


def method(name: str, options: dict | None = None, task: str = "causal_lm") -> Method:
    """The method `name` for a job of `task` with its options (DPO: beta, label_smoothing, loss_type)."""
    known = TASK_METHODS.get(task)
    if known is None:
        raise ValueError(f"task {task!r}: the engine trains {sorted(TASK_METHODS)}")
    try:
        cls = known[name]
    except KeyError:
        raise ValueError(f"training method {name!r}: the engine knows {sorted(known)} for task {task}") from None
    return cls(**(options or {}))
