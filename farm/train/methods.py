"""Training methods: the seam between *what* a job learns and the engine that trains it.

A method supplies two things (the `Method` protocol): how a job's micro-batch is built from the
indices of its rows, and how that job's loss is computed from the model's output over its own rows
of a grouped forward. The engine (farm.train.engine) owns everything else: the resident base, the
adapters, one forward/backward per pack step, accumulation, clipping, optimizer and LR schedule,
the eval schedule, early stopping, checkpoints, cost and progress. So a new method (preference
tuning, a client-driven loss) is a new class here, and it packs with every other method's jobs.

The micro-batch a method builds must hold right-padded `input_ids`, `attention_mask` and `labels`
(farm.train.pack_step.collate_pack pads every member's block to the pack's width); the loss gets
the logits and labels of exactly that block, padded wider with masked positions and -100 labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Method(Protocol):
    name: str

    def micro_batch(self, rows: dict[str, list], idx: list[int], collate: Any) -> dict:
        """The collated micro-batch of rows `idx` of a job's tokenized rows (column -> list)."""
        ...

    def loss(self, model: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This job's scalar loss from its block of the grouped forward's logits and labels."""
        ...


class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the label tokens (prompt tokens are -100)."""

    name = "sft"

    def micro_batch(self, rows: dict[str, list], idx: list[int], collate: Any) -> dict:
        return collate([{k: rows[k][j] for k in rows} for j in idx])

    def loss(self, model: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The model's own loss (transformers' ForCausalLMLoss: shifted, float, mean over label
        # tokens): exactly `model(**batch).loss` of that job's micro-batch alone.
        return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)


METHODS: dict[str, Method] = {"sft": SFT()}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"training method {name!r}: the engine knows {sorted(METHODS)}") from None
