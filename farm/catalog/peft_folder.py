"""Check an adapter folder before it is published: a PEFT LoRA adapter with safetensors weights only.

No torch/peft import: the config is JSON and a safetensors header is 8 bytes of length plus JSON,
which is also how a pickle renamed to `.safetensors` is caught.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path
from typing import Any

from farm.catalog.adapter_rules import check_config, check_tensors, refusal
from farm.catalog.layout import FARM_JSON
from farm.catalog.refs import check_file_name
from farm.errors import CatalogError, RefError

# Extensions of pickle-based weight formats; loading them can run arbitrary code.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill"}
CONFIG = "adapter_config.json"
MAX_HEADER = 100 * 2**20


def scan_folder(src: Path) -> dict[str, Path]:
    """Every file to publish, keyed by its '/'-joined name; refuses unsafe names, pickle files and
    anything but plain files and folders (a symlink would publish whatever it points at on this host)."""
    src = Path(src)
    if not src.is_dir():
        raise CatalogError(f"adapter folder {str(src)!r} does not exist or is not a directory")
    found: dict[str, Path] = {}
    pickles = []
    for p in sorted(src.rglob("*")):  # rglob lists a symlinked folder but does not descend into it
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise CatalogError(
                f"{src}: {p.relative_to(src).as_posix()} is a symbolic link (to {str(p.readlink())!r}); an adapter "
                "folder must hold plain files only, or the link's target on this machine would be published. "
                "Import a copy with the links replaced by their files (cp -rL)"
            )
        if stat.S_ISDIR(mode):
            continue
        name = p.relative_to(src).as_posix()
        if not stat.S_ISREG(mode):
            raise CatalogError(f"{src}: {name} is not a regular file (a device, pipe or socket); refusing to publish it")
        if p.suffix.lower() in PICKLE_SUFFIXES:
            pickles.append(name)
            continue
        if any(part.startswith(".") for part in name.split("/")):
            continue  # editor/OS droppings (.DS_Store, .ipynb_checkpoints) are not part of an adapter
        try:
            check_file_name(name)
        except RefError as exc:
            raise CatalogError(f"{src}: {exc}") from None
        if name == FARM_JSON:
            raise CatalogError(f"{src}: contains {FARM_JSON}, a name the catalog reserves for its own record")
        found[name] = p
    if pickles:
        raise CatalogError(
            f"{src}: refusing pickle weight file(s) {', '.join(pickles)}: only safetensors weights are "
            "accepted (they cannot run code when loaded); re-save with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    return found


def safetensors_summary(path: Path) -> dict[str, Any]:
    """Tensor count, parameter count and dtypes from a safetensors header; CatalogError if not one."""
    summary, _ = _read_header(path)
    return summary


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor data read); CatalogError if not one."""
    return _read_header(Path(path))[1]


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} is impossible for a {path.stat().st_size}-byte file")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        params = 0
        for v in tensors.values():
            count = 1
            for d in v["shape"]:
                count *= int(d)
            params += count
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: not a valid safetensors file ({exc})") from None
    shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    return {"tensors": len(tensors), "params": params, "dtypes": sorted({v["dtype"] for v in tensors.values()})}, shapes


def describe_adapter(src: Path, files: dict[str, Path]) -> dict[str, Any]:
    """Validate a PEFT LoRA adapter folder and return what can be said about it (for metadata)."""
    if CONFIG not in files:
        raise CatalogError(f"{src}: no {CONFIG}; expected a PEFT adapter folder as save_pretrained writes it")
    try:
        config = json.loads(files[CONFIG].read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{src / CONFIG}: invalid JSON ({exc})") from None
    # the allow-list (adapter_rules.py) that the serving replica applies again, with shapes, at attach
    problems = check_config(config)
    if problems:
        raise CatalogError(refusal(str(src / CONFIG), problems))
    weights = sorted(n for n in files if n.endswith(".safetensors"))
    if not weights:
        raise CatalogError(f"{src}: no .safetensors weights (expected adapter_model.safetensors)")
    headers = {n: _read_header(files[n]) for n in weights}
    summaries = {n: h[0] for n, h in headers.items()}
    problems = check_tensors(config, {k: v for _, shapes in headers.values() for k, v in shapes.items()})
    if problems:
        raise CatalogError(refusal(str(src), problems))
    keys = ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "task_type", "modules_to_save")
    info = {k: config.get(k) for k in keys if config.get(k) is not None}
    if isinstance(info.get("target_modules"), (set, tuple)):
        info["target_modules"] = sorted(info["target_modules"])
    info["peft_version"] = config.get("peft_version")
    info["weights"] = summaries
    info["params"] = sum(s["params"] for s in summaries.values())
    return {k: v for k, v in info.items() if v is not None}
