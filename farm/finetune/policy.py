"""The operator's training policy for API jobs on one served base: defaults and limits.

A customer chooses only the hyperparameters OpenAI's API exposes (n_epochs, batch_size,
learning_rate_multiplier, each a number or "auto") plus suffix/seed/metadata; everything else a
job's manifest holds (base, quantization, LoRA, sequence length, priority, resources) comes from
here. `TrainingPolicy` is a standalone schema so a serve config file can embed one per base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from farm.manifest import LoraSpec, Manifest

MiB = 1024 * 1024


class TrainingPolicy(BaseModel):
    """Defaults and limits of API fine-tuning jobs on one base model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    base_model: str
    """What the trainer loads: a local model directory, an s3:// URL or a hub id."""
    revision: str | None = None
    """Hub revision when base_model is a hub id."""
    quantization: str = "nf4"
    """How the frozen base is loaded for training (nf4 = QLoRA)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """The LoRA adapter every API job trains (rank, alpha, target modules, ...)."""
    default_epochs: int = Field(3, ge=1)
    """n_epochs when the request says "auto" or nothing."""
    max_epochs: int = Field(10, ge=1)
    """Largest n_epochs a customer may ask for."""
    default_batch_size: int = Field(4, ge=1)
    """batch_size for "auto"."""
    max_batch_size: int = Field(64, ge=1)
    """Largest batch_size a customer may ask for."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    """The learning rate of learning_rate_multiplier 1 (and of "auto")."""
    max_learning_rate_multiplier: float = Field(10.0, gt=0)
    """Largest learning_rate_multiplier a customer may ask for."""
    max_seq_len: int = Field(512, ge=8)
    """Examples are truncated to this many tokens."""
    max_training_tokens: int = Field(2_000_000, ge=1)
    """Most tokens one job may train on: n_epochs x the tokens of the training file."""
    max_concurrent_jobs: int = Field(2, ge=1)
    """Jobs a customer may have queued or running at once (API and operator jobs alike)."""
    max_file_bytes: int = Field(16 * MiB, ge=1)
    """Largest file a customer may upload."""
    max_stored_bytes: int = Field(256 * MiB, ge=1)
    """Bytes a customer may keep in uploaded files (contents and file names)."""
    max_files: int = Field(1000, ge=1)
    """Files a customer may keep at once."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the training file held out for eval when no validation_file is given."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N steps (always at the end)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Checkpoint every N steps; the job's checkpoints list shows these steps."""
    priority: int = Field(0, ge=-100, le=100)
    """Queue priority of every API job."""
    gpus: int = Field(1, ge=0, le=8)
    """GPUs per API job's worker (CPU when the cluster has none)."""
    max_failures: int = Field(1, ge=0, le=100)
    """Worker restarts from the last checkpoint per job."""
    max_attempts: int = Field(3, ge=1, le=100)
    """Queue attempts before a job is failed."""

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> TrainingPolicy:
        problems = []
        if self.default_epochs > self.max_epochs:
            problems.append(f"default_epochs {self.default_epochs} is over max_epochs {self.max_epochs}")
        if self.default_batch_size > self.max_batch_size:
            problems.append(f"default_batch_size {self.default_batch_size} is over max_batch_size {self.max_batch_size}")
        if self.max_file_bytes > self.max_stored_bytes:
            problems.append(f"max_file_bytes {self.max_file_bytes} is over max_stored_bytes {self.max_stored_bytes}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def policy_from_manifest(manifest: Manifest, base_model: str | None = None, **overrides: Any) -> TrainingPolicy:
    """A policy whose defaults are those of an operator's manifest (the demo's with `farm serve --base-model`)."""
    t = manifest.training
    fields: dict[str, Any] = {
        "base_model": base_model or manifest.base_model,
        "revision": manifest.revision,
        "quantization": manifest.quantization,
        "lora": manifest.lora,
        "default_batch_size": t.batch_size,
        "learning_rate": t.learning_rate,
        "max_seq_len": t.max_seq_len,
        "eval_every": t.eval_every,
        "checkpoint_every": t.checkpoint_every,
        "gpus": manifest.resources.gpus,
        "max_failures": manifest.resources.max_failures,
    }
    if t.epochs:
        fields["default_epochs"] = max(1, round(t.epochs))
    fields["max_batch_size"] = max(64, t.batch_size)
    fields.update(overrides)
    return TrainingPolicy.model_validate(fields)


def demo_manifest_path() -> Path:
    return Path(__file__).resolve().parents[2] / "jobs" / "customer_x.yaml"


def default_policy(base_model: str, **overrides: Any) -> TrainingPolicy:
    """`farm serve --base-model X`: the shipped demo manifest's settings, training base X."""
    from farm.manifest import load_manifest

    if Path(base_model).is_dir():  # the trainer's tasks run elsewhere: a local base needs its full path
        base_model = str(Path(base_model).resolve())
    return policy_from_manifest(load_manifest(demo_manifest_path()), base_model, **overrides)
