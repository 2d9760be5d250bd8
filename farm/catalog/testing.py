"""Test and benchmark helper: tiny fake adapter folders, written without torch.

Shared by the catalog tests and bench/catalog.py. (The SeaweedFS launcher lives with the test
fixtures: tests/fixtures/seaweedfs.py.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_dummy_adapter(folder: Path, *, seed: int = 0, rank: int = 4, dim: int = 16, extra: bool = False) -> Path:
    """A small but well-formed PEFT LoRA adapter folder (config + safetensors), without torch.

    Weights are deterministic in `seed`; `extra=True` adds a README.md and a fake loss_curve.png.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny-llama",
        "lora_dropout": 0.0, "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors, blobs, offset = {}, [], 0
    for i, (name, shape) in enumerate([("lora_A", (rank, dim)), ("lora_B", (dim, rank))]):
        n = shape[0] * shape[1]
        data = struct.pack(f"<{n}f", *(((seed * 31 + i * 7 + j) % 97) / 97.0 for j in range(n)))
        key = f"base_model.model.layers.0.self_attn.q_proj.{name}.weight"
        tensors[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header = json.dumps(tensors).encode()
    header += b" " * (-len(header) % 8)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"".join(blobs))
    if extra:
        (folder / "README.md").write_text(f"dummy adapter seed {seed}\n")
        (folder / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    return folder
