"""The job manifest: a typed schema, loaded from YAML, with every error reported at once.

Imports nothing heavy (no torch/ray/transformers) so `farm validate` is instant. Each field's
docstring is its user-facing documentation (docs/manifest.md is checked against it).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.errors import ManifestError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_RULE = "1-63 characters: lowercase letters, digits, '-', '_', '.'; starting with a letter or digit; no '..'"
URL_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "file://", "memory://")


def check_name(value: str) -> str:
    """Validate a customer/adapter name; shared with the catalog's ref parser."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", "..") or ".." in value:
        raise ValueError(f"must be {NAME_RULE}")
    return value


def is_url(value: str) -> bool:
    return "://" in value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class LoraSpec(_Section):
    r: int = Field(8, ge=1, le=1024)
    """LoRA rank: the inner dimension of the two adapter matrices."""
    alpha: float = Field(16, gt=0)
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]; [c_attn] on GPT-2), or 'all-linear'."""
    bias: Literal["none"] = "none"
    """Biases are not trained: 'all'/'lora_only' would write biases of the shared base, which the server refuses."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (seq_cls adds the head itself)."""

    @field_validator("bias", mode="before")
    @classmethod
    def _no_bias_training(cls, v: Any) -> Any:
        if v in ("all", "lora_only"):
            raise ValueError(
                f"{v!r} trains biases of the base model, which every tenant shares; the server refuses such "
                "adapters (docs/serving.md). Use 'none'"
            )
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        # Checked before pydantic's union so a wrong string reads as one clear line, not "must be a list".
        if isinstance(v, str) and v != "all-linear":
            raise ValueError("must be a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'")
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


DatasetFormat = Literal["auto", "text", "prompt_completion", "chat", "classification", "preference"]


class DatasetSpec(_Section):
    train: str
    """Training data: a .jsonl/.json, .parquet or .csv file; a local path (relative to the manifest) or an s3:// URL."""
    eval: str | None = None
    """Evaluation data, same forms as train. Leave out to split eval_fraction off train."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of train held out for evaluation (seeded) when no eval file is given."""
    format: DatasetFormat = "auto"
    """text | prompt_completion | chat | classification | preference, or auto (guessed from the columns)."""
    text_column: str = "text"
    """Column with plain text (format text and classification)."""
    prompt_column: str = "prompt"
    """Column with the prompt (format prompt_completion; preference: a string or chat messages)."""
    completion_column: str = "completion"
    """Column with the completion; loss is computed on these tokens only."""
    chosen_column: str = "chosen"
    """Column with the preferred response (format preference): a string or [{role: assistant, content}]."""
    rejected_column: str = "rejected"
    """Column with the dispreferred response (format preference), same forms as chosen."""
    messages_column: str = "messages"
    """Column with chat messages [{role, content}, ...]; loss on assistant turns only."""
    label_column: str = "label"
    """Column with the class label (format classification): a string from labels or an int id."""

    @field_validator("train", "eval")
    @classmethod
    def _path_like(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must be a file path or URL, not empty")
        suffix = v.rsplit("?", 1)[0].lower()
        if not suffix.endswith((".jsonl", ".json", ".parquet", ".csv")):
            raise ValueError("must end in .jsonl, .json, .parquet or .csv")
        return v


class TrainingSpec(_Section):
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data. Give epochs or max_steps (max_steps wins if both)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    """Peak learning rate."""
    batch_size: int = Field(4, ge=1, le=4096)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1, le=1024)
    """Micro-batches per optimizer step."""
    max_seq_len: int = Field(512, ge=8, le=131072)
    """Longer sequences are truncated to this many tokens."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of steps spent warming the learning rate up from zero."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit", "sgd"] = "auto"
    """auto = paged 8-bit AdamW on CUDA, AdamW on CPU."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    seed: int = 0
    """Seed for weights of the adapter, data order and the eval split."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N steps (always at the end)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Checkpoint every N steps (adapter, optimizer, scheduler, RNG and data position)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better eval loss."""
    packing: bool = False
    """Pack several short examples into one sequence (causal_lm only)."""

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class DPOSpec(_Section):
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference (the base): larger keeps it closer."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Share of preference labels assumed flipped (conservative DPO); 0 is plain DPO. Loss type sigmoid only."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (the DPO paper's loss) or ipo (Azar et al. 2023: squared, per-token averaged log-ratios)."""


class ResourcesSpec(_Section):
    gpus: int = Field(1, ge=0, le=8)
    """GPUs for the job's worker. On a cluster without GPUs the job runs on CPU and says so."""
    max_failures: int = Field(0, ge=0, le=100)
    """Times Ray Train restarts a failed worker from the last checkpoint."""
    pack: bool = True
    """Train in a pack with other compatible jobs (one shared base on one slot); false = a dedicated slot, alone."""


class Manifest(_Section):
    customer: str
    """The customer (tenant) that owns the adapter."""
    adapter: str
    """The adapter's name; published as customer/adapter@vN."""
    base_model: str
    """A local model directory (relative to the manifest), an s3:// URL, or a Hugging Face hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when base_model is a hub id."""
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    """How the frozen base is loaded: nf4 (QLoRA), fp4, int8, or none (compute dtype)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA's double quantization)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU."""
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    """causal_lm (text generation) or seq_cls (sequence classification)."""
    num_labels: int | None = Field(None, ge=2, le=100000)
    """Number of classes (seq_cls). Implied by labels when those are given."""
    labels: list[str] | None = None
    """Class names (seq_cls); label ids follow this order."""
    priority: int = Field(0, ge=-100, le=100)
    """Queue priority: higher runs first; equal priorities share fairly across customers."""
    method: Literal["sft", "dpo"] = "sft"
    """sft (supervised: learn the completions) or dpo (preference tuning on prompt/chosen/rejected rows)."""
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    """Preference tuning settings (method dpo only)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """The LoRA adapter."""
    dataset: DatasetSpec
    """Training and evaluation data."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimization settings."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """What the job's Ray Train worker gets."""
    alias: str | None = None
    """An alias (customer/adapter@ALIAS, e.g. prod) moved to the version this job publishes, as alias_policy allows."""
    alias_policy: Literal["always", "if_better"] = "always"
    """always: move the alias to each new version; if_better: only when the new version's eval loss on this job's eval data is not worse than the version the alias points at (a job event says why, either way)."""

    _check_customer = field_validator("customer", "adapter")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        if v is not None:
            check_name(v)
            if v == "latest" or re.fullmatch(r"v[0-9]+", v):
                raise ValueError(f"{v!r} is reserved (latest and vN name versions); choose another alias")
        return v

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a model directory, an s3:// URL or a hub id, not empty")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Manifest:
        problems = []
        if self.task == "seq_cls":
            if self.labels is not None:
                if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                    problems.append("labels: must be at least 2 distinct class names")
                elif self.num_labels is not None and self.num_labels != len(self.labels):
                    problems.append(
                        f"num_labels: {self.num_labels} does not match the {len(self.labels)} labels given"
                    )
            elif self.num_labels is None:
                problems.append("num_labels: task seq_cls needs num_labels or labels")
            if self.training.packing:
                problems.append("training.packing: only allowed with task causal_lm")
            if self.dataset.format not in ("auto", "classification"):
                problems.append(
                    f"dataset.format: {self.dataset.format!r} cannot train task seq_cls; use classification"
                )
        else:
            if self.labels is not None or self.num_labels is not None:
                problems.append("labels/num_labels: only allowed with task seq_cls")
            if self.dataset.format == "classification":
                problems.append("dataset.format: classification needs task seq_cls")
        if self.method == "dpo":
            if self.task != "causal_lm":
                problems.append("method: dpo trains task causal_lm only")
            if self.dataset.format not in ("auto", "preference"):
                problems.append(f"dataset.format: {self.dataset.format!r} cannot train method dpo; use preference "
                                "(columns prompt, chosen, rejected)")
            if self.training.packing:
                problems.append("training.packing: not with method dpo (each pair is scored as whole sequences)")
            if self.lora.modules_to_save:
                problems.append("lora.modules_to_save: not with method dpo (the reference is the base with the "
                                "adapter off; a fully trained module would have no reference)")
            if self.dpo.label_smoothing and self.dpo.loss_type != "sigmoid":
                problems.append("dpo.label_smoothing: only with loss_type sigmoid")
        else:
            if self.dpo != DPOSpec():  # the defaults ride along in every dumped manifest
                problems.append("dpo: only with method: dpo")
            if self.dataset.format == "preference":
                problems.append("dataset.format: preference needs method: dpo")
        if problems:
            raise ValueError("\n".join(problems))  # split back into one problem each in parse_manifest
        return self

    # ---- derived values (no heavy imports) ----
    @property
    def name(self) -> str:
        return f"{self.customer}/{self.adapter}"

    @property
    def method_options(self) -> dict:
        """The training method's settings as the engine takes them (farm.train.methods.method)."""
        return self.dpo.model_dump() if self.method == "dpo" else {}

    @property
    def class_labels(self) -> list[str] | None:
        if self.task != "seq_cls":
            return None
        return list(self.labels) if self.labels else [str(i) for i in range(self.num_labels or 0)]

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the manifest (idempotent submits, lineage)."""
        doc = self.model_dump(mode="json")
        if doc["resources"].get("pack") is True:
            del doc["resources"]["pack"]  # the default: manifests from before the field keep their hash
        for key, default in (("alias", None), ("alias_policy", "always"), ("method", "sft")):
            if doc.get(key) == default:
                del doc[key]  # likewise
        if "method" not in doc:
            del doc["dpo"]  # only a dpo job has (and may set) these
        for key, default in (("chosen_column", "chosen"), ("rejected_column", "rejected")):
            if doc["dataset"].get(key) == default:
                del doc["dataset"][key]
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def summary(self) -> str:
        t = self.training
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch{'s' if t.epochs != 1 else ''}"
        targets = self.lora.target_modules if isinstance(self.lora.target_modules, str) else ",".join(self.lora.target_modules)
        method = f" by {self.method}" if self.method != "sft" else ""
        return (
            f"{self.name}: {self.task}{method} on {self.base_model} ({self.quantization}), "
            f"LoRA r={self.lora.r} on {targets}, {length}"
        )


# ---------------------------------------------------------------------------------------------
# Loading and error formatting


def _all_field_paths(model: Any = None, prefix: str = "") -> dict[str, str]:
    """{field name: its dotted YAML path} over every section, for suggestions across sections."""
    model = model or Manifest
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_all_field_paths(ann, f"{prefix}{name}."))
        else:
            out.setdefault(name, f"{prefix}{name}")
    return out


def _suggest(bad: str, allowed: list[str], here: str = "", root: Any = None) -> str:
    close = difflib.get_close_matches(bad, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if not close:  # e.g. learning_rate at the top level: it belongs in training
        paths = _all_field_paths(root)
        other = difflib.get_close_matches(bad, list(paths), n=1, cutoff=0.75)
        if other and paths[other[0]] != f"{here}{other[0]}":
            hint = f"; did you mean {paths[other[0]]!r} (in another section)?"
    return f"unknown key {bad!r}{hint} (allowed: {', '.join(sorted(allowed))})"


def _fields_at(loc: tuple, root: Any = None) -> list[str]:
    """The allowed keys of the schema section at a YAML location (list indexes step into the item type)."""
    model: Any = root or Manifest
    for part in loc:
        if isinstance(part, int):
            continue  # list item: `model` is already the item's section (set below)
        info = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if info is None:
            return []
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        if getattr(ann, "__origin__", None) is list and args:
            ann = args[0]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(model.model_fields)


def _format_error(err: dict, root: Any = None) -> str:
    loc = err["loc"]
    path = ".".join(str(p) for p in loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        here = "".join(f"{p}." for p in loc[:-1])
        return f"{path}: " + _suggest(str(loc[-1]), _fields_at(loc[:-1], root), here, root)
    if kind == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    msg = msg.replace("Input should be", "must be")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be a mapping of keys (a YAML section)"
    if kind.startswith("literal_error"):
        msg = "must be one of " + msg.removeprefix("must be ").replace(" or ", ", ")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    if not path:
        return f"{msg}"
    return f"{path}: {msg}{shown}"


def _clean_paths(errors: list[dict]) -> list[dict]:
    """Drop pydantic's union branch names from locations (e.g. 'list[str]') so paths read as YAML."""
    out = []
    seen = set()
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("literal"))))
        key = (loc, e["type"])
        # A union field reports one error per branch; keep one line per location.
        if loc in {s[0] for s in seen} and e["type"] not in ("extra_forbidden",):
            continue
        seen.add(key)
        out.append({**e, "loc": loc})
    return out


def resolve_local_path(value: Any, base_dir: Path, *, model: bool = False) -> Any:
    """A local path made absolute, relative to the config file's folder (`base_dir`); URLs, and for a
    `model` hub ids (a relative name that is no folder there, e.g. "meta-llama/Llama-2-7b-hf"), untouched."""
    if not isinstance(value, str) or not value or is_url(value):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base_dir / p).resolve()
    if model and not candidate.exists() and not value.startswith((".", "/")):
        return value  # a hub id
    return str(candidate)


def _resolve_paths(data: dict, base_dir: Path) -> dict:
    """Make local paths absolute, relative to the manifest's folder (URLs and hub ids untouched)."""
    out = dict(data)
    if "base_model" in out:
        out["base_model"] = resolve_local_path(out["base_model"], base_dir, model=True)
    ds = out.get("dataset")
    if isinstance(ds, dict):
        ds = dict(ds)
        for key in ("train", "eval"):
            if key in ds:
                ds[key] = resolve_local_path(ds[key], base_dir)
        out["dataset"] = ds
    return out


def schema_problems(exc: ValidationError, root: Any = None) -> list[str]:
    """Every error of a pydantic validation as one line each: YAML path, what is wrong, the value.
    `root` is the schema validated (default Manifest); other config files (serve config) reuse this."""
    return [line for e in _clean_paths(exc.errors()) for line in _format_error(e, root).split("\n")]


def read_yaml(path: str | Path, error: type[ManifestError] = ManifestError) -> Any:
    """The parsed YAML of a config file; a missing/unreadable/invalid/empty file raises `error`."""
    p = Path(path)
    if not p.exists():
        raise error(str(path), ["file not found"])
    if p.is_dir():
        raise error(str(path), ["is a directory, expected a YAML file"])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(str(path), [f"cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(str(path), [f"{where}invalid YAML: {problem}"]) from None
    if data is None:
        raise error(str(path), ["the file is empty"])
    return data


def parse_manifest(data: Any, source: str = "<manifest>", base_dir: Path | None = None) -> Manifest:
    """Validate a mapping as a manifest; raise ManifestError listing every problem."""
    if not isinstance(data, dict):
        raise ManifestError(source, [f"the manifest must be a YAML mapping of keys, got {type(data).__name__}"])
    if base_dir is not None:
        data = _resolve_paths(data, base_dir)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, schema_problems(exc)) from None


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate a YAML manifest file. Relative paths inside it are relative to the file."""
    data = read_yaml(path)
    return parse_manifest(data, source=str(path), base_dir=Path(path).resolve().parent)
