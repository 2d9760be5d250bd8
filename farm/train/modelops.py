"""The model-side helpers of training: the prepared base (and a whole PEFT model on it, the reference
the tests and benches compare the engine with), the optimizer, evaluation and per-token logprobs for
the parity gate.

farm.train.engine calls these (every job trains there: packs and packs of one); so do
bench/gpu_bench.py, bench/solo_engine.py and the tests. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

from farm.train.step import to_device as _to_device


def make_optimizer(name: str, params, lr: float, weight_decay: float, device: str):
    import torch

    if name == "auto":
        name = "paged_adamw_8bit" if device == "cuda" else "adamw"
    if name in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay), name
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9), name
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def build_base(model_cfg: dict, device: str):
    """The frozen quantized base, prepared for k-bit training (packs share it). Returns (model, footprint)."""
    from peft import prepare_model_for_kbit_training

    from farm.modeling import Quantization, load_base_model

    quant = Quantization(**model_cfg["quant"])
    base = load_base_model(
        model_cfg["source"],
        revision=model_cfg.get("revision"),
        task=model_cfg["task"],
        num_labels=model_cfg.get("num_labels"),
        id2label=model_cfg.get("id2label"),
        quant=quant,
        device=device,
    )
    footprint = base.get_memory_footprint()
    if quant.mode != "none":
        # Gradient checkpointing trades compute for memory; worth it on GPU, only slows CPU runs.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=device == "cuda")
    return base, footprint


def build_model(model_cfg: dict, lora_config, device: str):
    """Quantized base + PEFT LoRA, ready to train (the stock-PEFT reference). Returns (peft_model, info)."""
    base, footprint = build_base(model_cfg, device)
    return peft_model(base, footprint, lora_config, device)


def peft_model(base, footprint: int, lora_config, device: str):
    """PEFT's LoRA on a prepared base (build_base). Returns (peft_model, info)."""
    from peft import get_peft_model

    from farm.modeling import disable_cpu_repack

    model = get_peft_model(base, lora_config)
    if device == "cpu":
        disable_cpu_repack(model)
    trainable, total = model.get_nb_trainable_parameters()
    return model, {"params_trainable": trainable, "params_total": total, "base_footprint_bytes": footprint}


def evaluate(model, rows: dict, collate, batch_size: int, device, task: str) -> dict:
    """Mean eval loss (token-weighted for causal LM), the share of answer tokens predicted exactly
    (greedy, causal LM: OpenAI's mean token accuracy) and accuracy for classification."""
    import torch

    model.eval()
    total_loss, total_weight, correct, seen = 0.0, 0, 0, 0
    n = len(rows["input_ids"])
    with torch.no_grad():
        for i in range(0, n, batch_size):
            feats = [{k: rows[k][j] for k in rows} for j in range(i, min(n, i + batch_size))]
            batch = _to_device(collate(feats), device)
            out = model(**batch)
            if task == "seq_cls":
                w = batch["labels"].shape[0]
                pred = out.logits.argmax(-1)
                correct += int((pred == batch["labels"]).sum())
                seen += w
            else:
                target = batch["labels"][:, 1:]
                scored = target != -100
                w = int(scored.sum())
                correct += int(((out.logits[:, :-1].argmax(-1) == target) & scored).sum())
                seen += w
            total_loss += float(out.loss) * w
            total_weight += w
    model.train()
    metrics = {"eval_loss": total_loss / max(total_weight, 1)}
    key = "eval_accuracy" if task == "seq_cls" else "eval_mean_token_accuracy"
    metrics[key] = correct / max(seen, 1)
    return metrics


def token_logprobs(model, rows: dict, count: int, device) -> list[dict]:
    """Per-token logprobs of the first `count` rows as the trained model scores them (each token given
    the ones before it, as an echo request does): the training side of the train/serve parity check."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for j in range(min(count, len(rows["input_ids"]))):
            ids = list(rows["input_ids"][j])
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
            out.append({"input_ids": ids, "logprobs": [float(v) for v in lp]})
    model.train()
    return out
