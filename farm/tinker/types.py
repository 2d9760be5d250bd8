"""The JSON bodies of the Tinker API the farm answers, as pydantic models (tinker 0.38's field names).

Requests tolerate fields the farm does not read (a newer SDK may add some); what the farm reads is
typed and checked, and `parse` turns any problem into a 400 naming the field and the value.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.tinker.errors import TinkerApiError, bad


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


class LoraConfig(_Body):
    rank: int = Field(ge=1, le=256)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Body):
    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class CreateSession(_Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRef(_Body):
    session_id: str


class CreateModel(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = OptimizerConfig()
    user_metadata: dict[str, Any] | None = None

    @field_validator("optimizer_config")
    @classmethod
    def _adamw(cls, v: OptimizerConfig) -> OptimizerConfig:
        if v.type != "adamw":
            raise ValueError(f"{v.type!r}: the farm's optimizer is adamw")
        return v


class ModelRef(_Body):
    model_id: str


class AdamParams(_Body):
    """Tinker's AdamParams and its defaults (torch AdamW: decoupled weight decay, bias correction)."""

    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)


class OptimStep(_Body):
    model_id: str
    seq_id: int = Field(ge=1)
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(_Body):
    model_id: str
    path: str
    seq_id: int = Field(ge=1)
    overwrite: bool = False
    ttl_seconds: int | None = None


class SaveWeightsForSampler(_Body):
    """Named (`path`: a catalog version that stays) or ephemeral (`sampling_session_seq_id`: a snapshot for
    a sampling client; see farm.tinker.samplers)."""

    model_id: str
    seq_id: int = Field(ge=1)
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: str | None = None


class LoadWeights(_Body):
    """Create-by-load (session_id + model_seq_id: the load is the new model's seq 0) or the legacy
    load into an existing model (model_id + seq_id)."""

    path: str
    optimizer: bool = False
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    model_id: str | None = None
    seq_id: int | None = Field(None, ge=1)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    model_path: str | None = None
    base_model: str | None = None


class EncodedChunk(_Body):
    tokens: list[int] = Field(min_length=1)
    type: str = "encoded_text"


class Prompt(_Body):
    chunks: list[EncodedChunk] = Field(min_length=1)


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0): off
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None


class Sample(_Body):
    sampling_session_id: str | None = None
    seq_id: int = 0
    num_samples: int = Field(1, ge=1, le=16)
    prompt: Prompt
    sampling_params: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Any | None = None
    prompt_alt_tokens_k: int = 0
    base_model: str | None = None
    model_path: str | None = None


class SetTtl(_Body):
    ttl_seconds: int | None = None


class Page(_Body):
    """The query of RestClient's list calls (list_training_runs, list_user_checkpoints)."""

    limit: int = Field(20, ge=1, le=1000)
    offset: int = Field(0, ge=0)
    access_scope: Literal["owned", "accessible"] = "owned"
    project_id: str | None = None


class WeightsInfo(_Body):
    tinker_path: str


class BillingWindow(_Body):
    starting_on: datetime
    ending_before: datetime


class RetrieveFuture(_Body):
    request_id: str
    allow_metadata_only: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(model: type[BaseModel], raw: bytes):
    """A JSON body as `model`: a 400 naming the first bad field and the value it had."""
    try:
        doc = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise TinkerApiError(400, f"body: not JSON ({exc})", "body") from None
    if not isinstance(doc, dict):
        raise TinkerApiError(400, f"body: a JSON object is expected, got {type(doc).__name__}", "body")
    return validate(model, doc)


def validate(model: type[BaseModel], doc: dict):
    """A decoded body (or query parameters) as `model`: a 400 naming the first bad field and its value."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"])) or "body"
        value = e.get("input")
        shown = "missing" if e["type"] == "missing" else f"{value!r}"[:80]
        raise bad(where, f"{shown}: {e['msg']}") from None
