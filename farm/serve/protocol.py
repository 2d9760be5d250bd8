"""Request and response models of the OpenAI API subset the farm serves (plus /v1/classify).

Unknown request fields are ignored (newer clients send more), but the ones that would change the
output and that the farm does not support (n > 1, best_of > 1, logprobs or echo with stream) are
refused. Log-probabilities: completions' `logprobs` (0..LOGPROBS_MAX alternatives per token) and
`echo`; chat's `logprobs: true` with `top_logprobs` (0..LOGPROBS_MAX); shapes in farm/serve/logprobs.py."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from farm.serve.logprobs import LOGPROBS_MAX
from farm.serve.sampling import SEED_MAX, SEED_MIN, TEMPERATURE_MAX, TEMPERATURE_MIN

MAX_STOPS, MAX_STOP_CHARS = 4, 64


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_MAX, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if 0 < v < TEMPERATURE_MIN:
            raise ValueError(f"must be 0 (greedy) or at least {TEMPERATURE_MIN}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


def _top_count(v):
    """An int in [0, LOGPROBS_MAX] (None passes), or a ValueError naming the range (pydantic adds the field)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= LOGPROBS_MAX:
        raise ValueError(f"{v!r} is not an integer in [0, {LOGPROBS_MAX}] (alternatives per token)")
    return v


class CompletionRequest(_Request):
    prompt: str | list[str]
    # 0 only with echo: score the prompt without generating (OpenAI allows it too)
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v):
        return _top_count(v)

    @model_validator(mode="after")
    def _echo_and_stream(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo: true (scoring the prompt)")
        if self.stream and (self.logprobs is not None or self.echo):
            raise ValueError("logprobs and echo: not available with stream: true")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: exactly one prompt per request")
            return v[0]
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(default=False, strict=True)
    top_logprobs: int | None = None

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top(cls, v):
        return _top_count(v)

    @model_validator(mode="after")
    def _needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.logprobs and self.stream:
            raise ValueError("logprobs: not available with stream: true")
        return self

    @property
    def top_count(self) -> int | None:
        """Alternatives per token for the engine, or None when no logprobs are asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    input: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int, n: int,
                    logprobs: dict | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        "usage": usage(prompt_tokens, n),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def chat_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int, n: int,
              logprobs: dict | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
             "logprobs": logprobs}
        ],
        "usage": usage(prompt_tokens, n),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def error_body(message: str, type_: str, code: int | str) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}
