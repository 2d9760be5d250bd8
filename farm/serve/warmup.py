"""Replica warm-up: pay at start what the first adapter load would otherwise pay.

On a fresh replica the first attach imports PEFT and the allow-list's modules and wraps the base in
a PeftModel (PeftModel.from_pretrained, whose state_dict() call also converts every CPU-packed 4-bit
weight back); later attaches only load their tensors into that wrapper. On the 2-core dev box that
first load took ~0.5-1 s against ~12 ms for the others: the cold-load p99. `build_wrapper` does it
at start instead, with a zero adapter: rank 1 on one linear layer, B all zeros, so the delta is
exactly zero. It runs a forward through grouped LoRA with the zero adapter (one row alone, one beside
a base row), then deletes it. The base's outputs are unchanged (tested bit for bit) and the first
real adapter goes through the same load_adapter path as every later one.
"""

from __future__ import annotations

WARMUP = "__warmup__"  # the zero adapter's name; never a slot name (those are s0, s1, ...)


def first_linear(model) -> str:
    """Path of the first linear layer of the model that is not its output head: the zero adapter's
    one target (a layer real adapters usually wrap too, so the warm-up adds no wrapper of its own)."""
    import torch

    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # bnb's Linear4bit is a Linear
            return name
    raise RuntimeError("the base model has no linear layer to warm the LoRA path up on")


def build_wrapper(base, input_ids: list[int]):
    """(PeftModel over `base` holding no adapter, its GroupedLoRA): what the engine's first causal
    attach would build. Call before the engine serves anything or attaches an adapter."""
    import torch
    from peft import LoraConfig, PeftModel

    import farm.catalog.adapter_rules  # noqa: F401 - what inspect_adapter imports on the first load
    import farm.catalog.peft_folder  # noqa: F401
    from farm.serve.engine import BASE
    from farm.serve.lora import GroupedLoRA

    cfg = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=[first_linear(base)], inference_mode=True)
    peft = PeftModel(base, cfg, adapter_name=WARMUP).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if f"lora_B.{WARMUP}." in name:
                p.zero_()
    grouped = GroupedLoRA(peft)
    grouped.add(WARMUP)
    ids = torch.tensor([input_ids, input_ids], device=base.device)
    with torch.inference_mode():
        with grouped.batch([WARMUP]):
            base(input_ids=ids[:1])
        with grouped.batch([WARMUP, BASE]):
            base(input_ids=ids)
    grouped.remove(WARMUP)
    peft.delete_adapter(WARMUP)
    return peft, grouped
