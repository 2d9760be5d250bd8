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


# The package's defaults for `farm serve`: the training settings of the shipped demo manifest
# (jobs/customer_x.yaml), so the tiny random demo base learns out of the box. Part of the package, not
# read from jobs/ (which an installed wheel does not have); tests/test_finetune_policy.py keeps the two
# equal. An operator's serve config (`training_policy:`) overrides any of them.
PACKAGE_DEFAULTS: dict[str, Any] = {
    "quantization": "nf4",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
    "default_batch_size": 16,
    "max_batch_size": 64,
    "learning_rate": 3e-3,
    "max_seq_len": 64,
    "eval_every": 50,
    "checkpoint_every": 50,
    "gpus": 1,
    "max_failures": 1,
}


def default_policy(base_model: str, /, **overrides: Any) -> TrainingPolicy:
    """`farm serve`'s policy for base X: PACKAGE_DEFAULTS, then `overrides` (the operator's serve config
    `training_policy`; a key given replaces the default whole). Raises pydantic's ValidationError."""
    base_model = overrides.pop("base_model", None) or base_model
    if Path(base_model).is_dir():  # the trainer's tasks run elsewhere: a local base needs its full path
        base_model = str(Path(base_model).resolve())
    return TrainingPolicy.model_validate({**PACKAGE_DEFAULTS, **overrides, "base_model": base_model})


def serve_policy(base_model: str, section: dict[str, Any] | None, source: str) -> TrainingPolicy:
    """The policy of a serve config file: its `training_policy` section over PACKAGE_DEFAULTS, for the
    file's first base. Raises ServeConfigError listing every bad field with its YAML path."""
    from pydantic import ValidationError

    from farm.errors import ServeConfigError
    from farm.manifest import schema_problems

    try:
        return default_policy(base_model, **(section or {}))
    except ValidationError as exc:
        raise ServeConfigError(source, [f"training_policy.{p}" for p in schema_problems(exc, TrainingPolicy)]) from None
