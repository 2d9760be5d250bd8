"""Helpers for the serving tests (no tests here): tiny LoRA adapters made with stock PEFT, and stock
PEFT's greedy output as the reference the server must reproduce."""

from __future__ import annotations

from pathlib import Path


def make_adapter(base: Path, dest: Path, seed: int, *, task: str = "causal_lm", num_labels: int = 3,
                 modules_to_save: list[str] | None = None) -> Path:
    """A LoRA adapter with random (non-zero) B, so it really changes the base's output; with
    `modules_to_save` (e.g. ["lm_head"]) also a perturbed whole copy of those modules."""
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    torch.manual_seed(seed)
    if task == "seq_cls":
        model = load_base_model(str(base), task="seq_cls", num_labels=num_labels, device="cpu")
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                         init_lora_weights=False)
    else:
        model = load_base_model(str(base), device="cpu")
        targets = ["q_proj", "v_proj", "o_proj", "up_proj"] if seed % 2 else ["q_proj", "k_proj", "down_proj"]
        cfg = LoraConfig(r=4 + seed % 5, lora_alpha=32, target_modules=targets, init_lora_weights=False,
                         modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(40.0)  # random init is too gentle to change a greedy argmax reliably
            elif ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * p.std() * 3)  # a copy that really differs from the base module
    peft_model.save_pretrained(dest)
    return dest


def stock_greedy(base: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> str:
    """What stock transformers + PEFT generate greedily on the NF4 base (decoded, special tokens dropped)."""
    import torch
    from peft import PeftModel

    from farm.modeling import load_base_model, load_tokenizer

    tok = load_tokenizer(str(base))
    model = load_base_model(str(base), device="cpu")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def stock_logprobs(base: Path, adapter_dir: Path | None, ids: list[int], quant=None):
    """Stock transformers (+ PEFT) log-softmax of the logits at every position of `ids`, one forward
    without padding or cache: row t is the distribution of token t + 1. NF4 base unless `quant`."""
    import torch
    from peft import PeftModel

    from farm.modeling import load_base_model

    model = load_base_model(str(base), device="cpu", **({"quant": quant} if quant is not None else {}))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.inference_mode():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_entries(entries: list, lp, start: int, atol: float) -> None:
    """Engine entries [token, logprob, [[alt, logprob], ...]] for tokens start, start + 1, ... of the
    sequence `lp` (stock_logprobs) was computed on: each logprob, and the alternatives are the top k."""
    import torch

    assert entries, "no logprob entries"
    for n, (tok, got, alts) in enumerate(entries):
        row = lp[start + n - 1]
        assert abs(got - float(row[tok])) <= atol, (start + n, got, float(row[tok]))
        if alts:
            top = torch.topk(row, len(alts))
            want = dict(zip(top.indices.tolist(), top.values.tolist()))
            assert [v for _, v in alts] == sorted((v for _, v in alts), reverse=True)
            for alt, v in alts:  # the same set, up to near-ties at the k-th place
                assert abs(v - float(row[alt])) <= atol
                assert alt in want or abs(v - min(want.values())) <= atol
