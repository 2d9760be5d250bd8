"""The serve config file (`farm serve --config FILE`): host, port, keys and the bases to serve.

Parse-only (pydantic + YAML, no torch/ray): `farm validate` and `farm serve` check a file before
anything starts, with the manifest's error quality (every problem at once, YAML path, value, what
is allowed). `to_configs` turns it into one ServeConfig per base (the runtime dataclass); relative
paths are relative to the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.errors import ServeConfigError
from farm.manifest import read_yaml, resolve_local_path, schema_problems
from farm.serve.config import ServeConfig

BASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class BaseSpec(_Section):
    name: str
    """The name clients use for the bare base (`model: <name>`); also names its Serve deployment."""
    model: str
    """Base model: local directory (relative to this file), s3:// URL or hub id."""
    engine: Literal["auto", "farm", "vllm"] = "auto"
    """farm (transformers + grouped LoRA), vllm (vLLM's AsyncLLM), auto (vllm on GPU replicas with a vLLM env)."""
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """Base precision (the vllm engine: nf4 on CUDA only, or none)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """What the base computes in; auto: farm engine bf16 on GPU (fp16 on older GPUs), fp32 on CPU; vllm engine bf16."""
    replicas: int = Field(1, ge=1)
    """Model replicas of this base; each holds the base once."""
    max_adapters: int = Field(8, ge=1)
    """Adapters held per replica (LRU)."""
    routing: Literal["affinity", "spread"] = "affinity"
    """affinity: an adapter's requests go to replicas holding it; spread: any replica of this base."""
    max_batch_size: int = Field(32, ge=1)
    """Rows per forward pass."""
    max_waiting: int = Field(64, ge=1)
    """Requests queued per replica beyond which new ones get 503 + Retry-After."""
    lora_slots: int | None = Field(None, ge=1)
    """vllm engine: adapters per batch (vLLM's max_loras); default max_adapters."""
    max_lora_rank: int = Field(16, ge=1, le=512)
    """vllm engine: the largest adapter rank served."""
    cpus_per_replica: float = Field(1.0, ge=0)
    """Ray CPUs reserved per replica (also its torch thread count, at least 1)."""
    gpus_per_replica: float = Field(0.0, ge=0)
    """Ray GPUs per replica; > 0 loads the base on CUDA."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not BASE_NAME_RE.fullmatch(v):
            raise ValueError("must be 1-64 characters: letters, digits, '.', '_', '-' (no '/': that is an adapter ref)")
        return v


class ServeFile(_Section):
    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy binds; non-loopback needs keys."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    keys: str | None = None
    """API keys file (relative to this file); FARM_SERVE_KEYS adds keys. No keys = loopback only."""
    catalog: str | None = None
    """Adapter catalog URL or folder; default FARM_CATALOG or $FARM_HOME/catalog."""
    max_tokens_cap: int = Field(256, ge=1)
    """Upper bound for max_tokens (and the default when a request omits it)."""
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    """Largest accepted request body."""
    resolve_ttl_s: float = Field(1.0, ge=0)
    """How long a customer/adapter -> version resolution is reused."""
    bases: list[BaseSpec] = Field(min_length=1)
    """The base models served, each with its own replicas; adapters go to the base they were trained on."""
    training_policy: dict[str, Any] | None = None
    """The OpenAI fine-tuning API's policy for jobs on the first base (fields of TrainingPolicy, docs/api.md),
    over the package defaults; checked by farm.finetune.policy.serve_policy (serve does not import finetune)."""

    @model_validator(mode="after")
    def _unique(self) -> ServeFile:
        names = [b.name for b in self.bases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"bases: names must be unique; repeated: {', '.join(dup)}")
        return self

    def to_configs(self) -> list[ServeConfig]:
        """One ServeConfig per base; the service-wide keys (host, port, keys, catalog, limits) in each."""
        shared = dict(host=self.host, port=self.port, keys_file=self.keys, catalog_url=self.catalog,
                      max_tokens_cap=self.max_tokens_cap, max_body_bytes=self.max_body_bytes,
                      resolve_ttl_s=self.resolve_ttl_s)
        return [ServeConfig(base_model=b.model, served_name=b.name, **shared,
                            **b.model_dump(exclude={"name", "model"})) for b in self.bases]


def parse_serve_config(data: Any, source: str = "<serve config>", base_dir: Path | None = None) -> ServeFile:
    """Validate a mapping as a serve config; ServeConfigError lists every problem."""
    if not isinstance(data, dict):
        raise ServeConfigError(source, [f"the serve config must be a YAML mapping of keys, got {type(data).__name__}"])
    if base_dir is not None:
        data = dict(data)
        for key in ("keys", "catalog"):
            data[key] = resolve_local_path(data.get(key), base_dir)
        policy = data.get("training_policy")
        if isinstance(policy, dict) and isinstance(policy.get("base_model"), str):
            data["training_policy"] = {**policy, "base_model": resolve_local_path(policy["base_model"], base_dir, model=True)}
        if isinstance(data.get("bases"), list):
            data["bases"] = [{**b, "model": resolve_local_path(b.get("model"), base_dir, model=True)}
                             if isinstance(b, dict) else b for b in data["bases"]]
    try:
        return ServeFile.model_validate(data)
    except ValidationError as exc:
        raise ServeConfigError(source, schema_problems(exc, ServeFile)) from None


def load_serve_config(path: str | Path) -> ServeFile:
    """Load and validate a serve config YAML file; relative paths inside it are relative to the file."""
    data = read_yaml(path, ServeConfigError)
    return parse_serve_config(data, source=str(path), base_dir=Path(path).resolve().parent)


def is_serve_config(data: Any) -> bool:
    """A YAML mapping that looks like a serve config (has `bases`), for `farm validate`."""
    return isinstance(data, dict) and "bases" in data
