"""The interface a serving replica holds, and the choice between the `farm` and `vllm` engines.

The replica (farm/serve/server.py) only calls what `ServingEngine` names; it never knows which
engine it has. No heavy imports here: choosing an engine must not load torch or vLLM.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from farm.errors import FarmError
from farm.settings import Settings

if TYPE_CHECKING:
    from farm.serve.sampling import Sampler

ENGINES = ("auto", "farm", "vllm")
REPO = Path(__file__).resolve().parents[3]


@dataclass
class Slot:
    """An attached adapter: `name` is its PEFT adapter name on this replica (unique per load)."""

    name: str
    task: str  # causal_lm | seq_cls
    num_labels: int | None = None
    labels: list[str] | None = None


@dataclass
class GenJob:
    """One generation request as every engine takes it; the engine fills in the fields below "filled in"."""

    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    stops: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # sampling one of these ends the row ("stop")
    keep_stop_token: bool = False  # the token that ended the row (EOS or a stop id) is in the output (Tinker's)
    ignore_eos: bool = False  # EOS does not end the row (Tinker's `stop: []`)
    slot: str | None = None
    tag: str = "base"  # metrics label
    tenant: str = ""  # who asked (the API key's customer): batches are fair across tenants (fair.py)
    stream: bool = False
    logprobs: int | None = None  # alternatives per completion token (None: no logprobs); farm/serve/logprobs.py
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    # filled in by the engine
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    cancelled: bool = False
    out_ids: list[int] = field(default_factory=list)
    out_logprobs: list[list] = field(default_factory=list)  # one entry per out_ids token (with logprobs)
    prompt_entries: list[list] | None = None
    sent: int = 0  # characters of text already streamed

    def emit(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's loop is gone (client went away)
            self.cancelled = True


@runtime_checkable
class ServingEngine(Protocol):
    """One replica's model. Blocking methods are called from a worker thread, async ones on the replica's loop."""

    stats: Mapping[str, int]  # loads / evictions / rows ... for /admin/cache and tests

    def attach(self, path: Path, labels: list[str] | None = None, *, name: str | None = None) -> Slot:
        """Make the adapter folder servable under a fresh slot (`name`: its immutable version id).
        Raises ApiError (4xx) for an adapter this engine cannot serve."""

    def detach(self, name: str) -> None:
        """Drop a slot once no queued or running request uses it."""

    def generate(self, job: GenJob) -> AsyncIterator[dict]:
        """Run one request: yields {'delta': text} (streaming only), then one {'done': {...}} or {'error': ApiError}."""

    def classify(self, slot_name: str, input_ids: list[int]) -> dict:
        """Label and probabilities from a seq_cls adapter."""


def vllm_python() -> str | None:
    """The Python of an environment with vLLM: FARM_VLLM_PYTHON, the checkout's .venv-vllm
    (`make vllm-env`), or this interpreter if it can import vllm. None if there is none."""
    env = Settings.resolve().vllm_python
    if env:
        return env if Path(env).exists() else None
    local = REPO / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def choose(engine: str, gpus_per_replica: float, quantization: str) -> str:
    """'farm' or 'vllm' for a replica. auto: vllm on GPU replicas when vLLM is installed, farm otherwise."""
    if engine not in ENGINES:
        raise FarmError(f"serve config: engine must be one of {'|'.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        engine = "vllm" if gpus_per_replica and vllm_python() else "farm"
    if engine == "vllm":
        problems = []
        if quantization not in ("nf4", "none"):
            problems.append(f"the vllm engine takes quantization nf4 or none, got {quantization!r}")
        elif quantization == "nf4" and not gpus_per_replica:
            problems.append("vLLM's NF4 (bitsandbytes) path is CUDA-only: on CPU replicas use "
                            "--quantization none with --engine vllm, or --engine farm for NF4")
        if vllm_python() is None:
            problems.append("no vLLM environment: run `make vllm-env` (CPU) or set FARM_VLLM_PYTHON "
                            "to the python of an environment with vLLM installed")
        if problems:
            raise FarmError("serve config: " + "; ".join(problems))
    return engine


def create(cfg) -> ServingEngine:
    """The engine for a ServeConfig (called inside the replica)."""
    device = "cuda" if cfg.gpus_per_replica else "cpu"
    kind = choose(cfg.engine, cfg.gpus_per_replica, cfg.quantization)
    if kind == "vllm":
        from farm.serve.engines.vllm import VllmEngine

        return VllmEngine(
            cfg.base_model,
            python=vllm_python(),
            quantization=cfg.quantization,
            dtype=cfg.dtype,
            device=device,
            lora_slots=cfg.lora_slots or cfg.max_adapters,
            max_adapters=cfg.max_adapters,
            max_lora_rank=cfg.max_lora_rank,
            max_batch_size=cfg.max_batch_size,
            max_waiting=cfg.max_waiting,
            threads=max(1, int(cfg.cpus_per_replica)),
        )
    from farm.serve.engines.farm import FarmEngine

    return FarmEngine(
        cfg.base_model,
        quantization=cfg.quantization,
        dtype=cfg.dtype,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_waiting=cfg.max_waiting,
        threads=max(1, int(cfg.cpus_per_replica)),
        device=device,
    )
