"""`farm plan`: what a job will cost, before any compute. The base model is built on the meta device
from its config (no weights are read or allocated), PEFT wraps it with the job's LoraConfig, and the
counts come from PEFT itself, so they are the ones training will print.

Footprint arithmetic (bitsandbytes, as transformers loads it):
- Only Linear/Conv1D weights are quantized; embeddings, norms, biases and the output head
  (lm_head, plus any tied or last module: transformers' `get_keys_to_not_convert`) stay in the
  compute dtype, counted here at 16 bits.
- int8 (LLM.int8): 1 byte per weight + one fp32 scale per output row.
- nf4/fp4: 4 bits per weight + one fp32 absmax per block of 64 = 4.5 bits.
  With double quant the absmax are themselves 8-bit, with one fp32 constant per 256 of them:
  4 + 8/64 + 32/(64*256) = 4.127 bits (QLoRA paper, section 3).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING, Any

from farm.errors import ManifestError, ModelError

if TYPE_CHECKING:
    from farm.manifest import Manifest

BLOCK = 64  # bitsandbytes 4-bit blocksize
DQ_BLOCK = 256  # blocksize of the second-level (double) quantization of absmax
ADAPTER_DTYPE_BYTES = 4  # PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype) and saves them so

MODES = [  # (key, label, manifest quantization, double_quant)
    ("fp32", "none, fp32", "none", None),
    ("bf16", "none, bf16/fp16", "none", None),
    ("int8", "int8", "int8", None),
    ("nf4", "nf4", "nf4", False),
    ("nf4-dq", "nf4 + dq", "nf4", True),
    ("fp4", "fp4", "fp4", False),
    ("fp4-dq", "fp4 + dq", "fp4", True),
]


def _meta_model(config, task: str, num_labels: int | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "seq_cls":
        config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelError(
            f"cannot build a {task} model for architecture {getattr(config, 'model_type', '?')!r}: {exc}"
        ) from None


def _quantized_modules(model) -> list[tuple[str, int, int]]:
    """(name, weight numel, output rows) of every module bitsandbytes would quantize."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = get_keys_to_not_convert(model)
    except ImportError:  # older/newer transformers: same rule, written out
        skip = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]

        def should_convert_module(name, patterns):  # noqa: ANN001
            return not any(name == p or name.startswith(p + ".") or name.endswith(p) for p in patterns)

    out = []
    for name, module in model.named_modules():
        if not (isinstance(module, Conv1D) or type(module) is nn.Linear):
            continue
        if not should_convert_module(name, skip):
            continue
        w = module.weight
        rows = w.shape[1] if isinstance(module, Conv1D) else w.shape[0]  # Conv1D stores (in, out)
        out.append((name, w.numel(), rows))
    return out


def _footprints(total_params: int, quantized: list[tuple[str, int, int]]) -> list[dict]:
    q_params = sum(n for _, n, _ in quantized)
    rest = total_params - q_params
    rows = []
    for key, label, _, _ in MODES:
        if key == "fp32":
            q_bytes, rest_bytes = q_params * 4, rest * 4
        elif key == "bf16":
            q_bytes, rest_bytes = q_params * 2, rest * 2
        elif key == "int8":
            q_bytes, rest_bytes = sum(n + 4 * r for _, n, r in quantized), rest * 2
        else:
            double = key.endswith("-dq")
            q_bytes = 0
            for _, n, _ in quantized:
                blocks = math.ceil(n / BLOCK)
                absmax = blocks + 4 * math.ceil(blocks / DQ_BLOCK) if double else 4 * blocks
                q_bytes += math.ceil(n / 2) + absmax
            rest_bytes = rest * 2
        rows.append(
            {
                "mode": key,
                "label": label,
                "linear_params": q_params,
                "bits_per_linear_param": round(8 * q_bytes / q_params, 3) if q_params else None,
                "linear_bytes": q_bytes,
                "other_bytes": rest_bytes,
                "total_bytes": q_bytes + rest_bytes,
            }
        )
    return rows


def _safetensors_header_bytes(state: dict) -> int:
    """Size of the safetensors header for these tensors: 8-byte length + JSON padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in state.items():
        size = t.numel() * ADAPTER_DTYPE_BYTES
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    n = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + n + (-n % 8)


def _manifest_mode(m: Manifest) -> str:
    if m.quantization == "none":
        return "bf16"
    if m.quantization == "int8":
        return "int8"
    return m.quantization + ("-dq" if m.double_quant else "")


def plan(manifest: Manifest, source: str = "<manifest>") -> dict:
    """Parameter counts, adapter size and base footprints for a manifest; loads no weights."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    from farm.modeling import load_config
    from farm.train.builders import lora_config

    config = load_config(manifest.base_model, manifest.revision)
    labels = manifest.class_labels
    model = _meta_model(config, manifest.task, len(labels) if labels else None)
    base_params = sum(p.numel() for p in model.parameters())
    quantized = _quantized_modules(model)

    lc = lora_config(manifest)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside PEFT
            peft_model = get_peft_model(model, lc)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, _, _ in quantized})
        raise ManifestError(
            source,
            [f"lora.target_modules: {exc} (linear modules in this model: {', '.join(linear)})"],
        ) from None
    trainable, all_params = peft_model.get_nb_trainable_parameters()
    state = get_peft_model_state_dict(peft_model)
    data_bytes = sum(t.numel() for t in state.values()) * ADAPTER_DTYPE_BYTES
    header_bytes = _safetensors_header_bytes(state)

    from farm.train.methods import METHODS

    t = manifest.training
    seqs = t.batch_size * t.grad_accum * METHODS[manifest.method].token_factor
    return {
        "manifest": source,
        "base_model": manifest.base_model,
        "model_type": getattr(config, "model_type", None),
        "task": manifest.task,
        "work": {
            "method": manifest.method,
            "sequences_per_step": seqs,
            "max_tokens_per_step": seqs * t.max_seq_len,
            "note": "sequences a step runs through the model: batch x grad_accum, twice that for dpo (each "
                    "pair's chosen and rejected responses); tokens at most max_seq_len each",
        },
        "lora": {
            "r": manifest.lora.r,
            "alpha": manifest.lora.alpha,
            "target_modules": sorted(peft_model.peft_config["default"].target_modules)
            if not isinstance(peft_model.peft_config["default"].target_modules, str)
            else peft_model.peft_config["default"].target_modules,
            "modules_to_save": sorted(peft_model.peft_config["default"].modules_to_save or []),
        },
        "params": {
            "base": base_params,
            "total": all_params,
            "trainable": trainable,
            "trainable_percent": 100 * trainable / all_params,
        },
        "adapter": {
            "tensors": len(state),
            "dtype": "fp32",
            "data_bytes": data_bytes,
            "safetensors_header_bytes": header_bytes,
            "file_bytes": data_bytes + header_bytes,
            "note": "adapter_model.safetensors: trainable params x 4 bytes (fp32) + a header computed from "
            "the tensor names and shapes; adapter_config.json adds ~1 KB",
        },
        "footprint": {
            "selected": _manifest_mode(manifest),
            "modes": _footprints(base_params, quantized),
            "note": "base weights only (no activations, optimizer or KV cache); bitsandbytes quantizes "
            "Linear/Conv1D weights only: embeddings, norms, biases and the output head stay in the "
            "compute dtype (counted at 16 bits; 32 in the fp32 row); dq = double quant",
        },
    }


def human_bytes(n: float) -> str:
    """Bytes in decimal units (kB, MB, GB), as disk and GPU sizes are usually quoted."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


# ---- packed training: how many jobs fit one GPU (farm.train.pack_run) ------------------------------

PACK_MAX_CAP = 16  # jobs per pack at most, whatever the memory says
PACK_MEMORY_SHARE = 0.9  # of the GPU's memory; the rest is CUDA context and allocator slack


def pack_estimate(manifest: Manifest) -> dict:
    """Bytes of the resident base and bytes each further job adds: its adapter in fp32 with gradient
    and AdamW's two moments (16 bytes a trainable parameter) plus its activations, estimated as
    batch x seq x hidden x layers x 4 bytes x 8 tensors per layer (with gradient checkpointing, as the
    GPU path runs) plus the fp32 logits and their gradient; a row is two sequences for DPO (chosen and
    rejected: the method's token_factor). Rough by design: it sizes the default limit, it does not
    promise a fit."""
    from farm.modeling import load_config
    from farm.train.methods import METHODS

    doc = plan(manifest)
    base = next(r["total_bytes"] for r in doc["footprint"]["modes"] if r["mode"] == doc["footprint"]["selected"])
    config = load_config(manifest.base_model, manifest.revision)
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    t = manifest.training
    tokens = t.batch_size * t.max_seq_len * METHODS[manifest.method].token_factor
    activations = tokens * hidden * layers * 4 * 8 + tokens * vocab * 4 * 2
    return {"base_bytes": int(base), "job_bytes": int(doc["params"]["trainable"] * 16 + activations)}


def pack_fits(base_bytes: int, member_bytes: list[int], gpu_bytes: int) -> bool:
    """Whether a pack's resident base and every member's own estimate (pack_estimate's job_bytes,
    each from that member's batch size, sequence length and LoRA) fit a GPU of `gpu_bytes`. A pack is
    sized by all its members: a later member with a larger batch needs more than the first one did."""
    return base_bytes + sum(member_bytes) <= PACK_MEMORY_SHARE * gpu_bytes


def pack_capacity(base_bytes: int, job_bytes: int, gpu_bytes: int) -> int:
    """Jobs per pack on a GPU of `gpu_bytes`: what fits beside the base, 1..PACK_MAX_CAP."""
    free = PACK_MEMORY_SHARE * gpu_bytes - base_bytes
    return max(1, min(PACK_MAX_CAP, int(free // max(1, job_bytes))))
