"""Loading a base model and its tokenizer: the one code path for a local directory, an s3:// URL
or a hub id, on CPU or GPU, in any of the farm's quantization modes. Training and serving both
call it; neither sees a manifest (farm.train.builders turns a manifest into these arguments).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import ModelError
from farm.settings import farm_home, hub_offline

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is held in memory."""

    mode: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto | bf16 | fp16 | fp32


def device_kind() -> str:
    """'cuda' when a GPU is visible to this process, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    """The torch dtype for compute: auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def quantization_config(q: Quantization, device: str):
    """A transformers BitsAndBytesConfig for the mode, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    if q.mode == "none":
        return None
    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype, device),
        bnb_4bit_quant_storage="uint8",
    )


def _s3_cache_dir(url: str) -> Path:
    return farm_home() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]


def materialize(source: str) -> str:
    """Return something `from_pretrained` can open offline-or-online: a local dir as-is, an s3:// (or
    other fsspec URL) model folder downloaded once into $FARM_HOME/models, or a hub id unchanged.
    A revision only means something for a hub id: callers pass it to `from_pretrained` themselves."""
    if "://" in source and not source.startswith("file://"):
        import fsspec

        dest = _s3_cache_dir(source)
        done = dest / ".complete"
        if not done.exists():
            try:
                fs, root = fsspec.core.url_to_fs(source)
                files = [f for f in fs.find(root) if not f.endswith("/")]
            except Exception as exc:  # noqa: BLE001 - any storage failure is reported the same way
                raise ModelError(f"base_model {source!r}: cannot list the model folder: {exc}") from None
            if not any(f.endswith("config.json") for f in files):
                raise ModelError(f"base_model {source!r}: no config.json in that folder")
            # Download into a private folder and rename it into place: several jobs on one node may
            # materialize the same model at once, and none may read files another is still writing.
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
            try:
                for f in files:
                    rel = f[len(root.rstrip("/")) + 1 :]
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f, str(tmp / rel))
                (tmp / ".complete").touch()
                if dest.exists() and not done.exists():
                    shutil.rmtree(dest, ignore_errors=True)  # debris of an interrupted download
                try:
                    tmp.rename(dest)
                except OSError:
                    if not done.exists():  # not a finished copy by another process: a real error
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)
    if source.startswith("file://"):
        source = source[len("file://") :]
    p = Path(source)
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"base_model {source!r}: directory has no config.json (not a transformers model)")
        return str(p)
    if source.startswith(("/", ".", "~")):
        raise ModelError(f"base_model {source!r}: no such directory")
    return source  # a hub id


def _offline_hint(source: str, exc: Exception) -> ModelError:
    why = "the hub is disabled (HF_HUB_OFFLINE)" if hub_offline() else "it could not be fetched from the hub"
    return ModelError(
        f"base_model {source!r}: not a local directory or s3:// URL, and {why}. "
        f"Use a local model directory or an s3:// URL. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    )


def load_config(source: str, revision: str | None = None):
    """The model's transformers config (no weights)."""
    from transformers import AutoConfig

    path = materialize(source)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _offline_hint(source, exc) from None


def load_tokenizer(source: str, revision: str | None = None):
    """The model's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    path = materialize(source)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _offline_hint(source, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    source: str,
    *,
    revision: str | None = None,
    task: str = "causal_lm",
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    quant: Quantization = Quantization(),
    device: str | None = None,
) -> Any:
    """Load the frozen base in the requested quantization on `device` (default: cuda if present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or device_kind()
    path = materialize(source)
    kwargs: dict[str, Any] = dict(
        revision=revision,
        trust_remote_code=False,
        dtype=resolve_dtype(quant.compute_dtype, device) if quant.mode == "none" else None,
        quantization_config=quantization_config(quant, device),
        device_map={"": 0} if device == "cuda" else {"": "cpu"},
        use_safetensors=True,
    )
    if quant.mode != "none":
        # Non-quantized parts (norms, embeddings, heads) stay in the compute dtype.
        kwargs["dtype"] = resolve_dtype(quant.compute_dtype, device)
    if task == "seq_cls":
        cls = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
        if id2label:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    else:
        cls = AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if path == source and not Path(source).exists():
            raise _offline_hint(source, exc) from None
        raise ModelError(f"base_model {source!r}: cannot load: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if device == "cpu":
        # One CPU kernel for every 4-bit layer the farm loads: training, serving and the parity gate must
        # score the same tokens alike (the repacked AVX512-BF16 path moved SmolLM2's logprobs by 0.07).
        disable_cpu_repack(model)
    del torch
    return model


def disable_cpu_repack(model) -> int:
    """Keep bitsandbytes' 4-bit CPU layers on their fp32 dequantize path (load_base_model does this on CPU).

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit weight the first time it runs
    in eval mode without grad; afterwards backprop goes through a kernel without autograd support and
    gradients are silently wrong, and even inference computes in bf16 (logprobs off by ~0.07 nats on
    SmolLM2, beyond the publish gate's train/serve tolerance). Returns how many layers were switched."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def config_fingerprint(source: str, revision: str | None = None) -> str:
    """sha256 over the model folder's config and weight-file hashes (lineage: which base exactly)."""
    path = Path(materialize(source))
    h = hashlib.sha256()
    if not path.exists():  # hub id: the config and revision are what we can name
        h.update(f"{source}@{revision}".encode())
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
