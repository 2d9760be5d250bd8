"""Packed LoRA: one frozen (NF4 or plain) base model carrying the trainable adapters of several jobs.

`PackLoRA(model)` takes a transformers model (quantized and prepared as the single-job loop does);
`add_job(job_id, lora_config, seed)` wraps each module the job targets in a `PackLinear` (once per
module, shared by every job that targets it) and gives the job its own leaf `lora_A`/`lora_B`
parameters there, initialised like PEFT's (A kaiming-uniform, B zeros) from a generator seeded by
the job's seed alone, so a job's start does not depend on which other jobs share the pack. Before a
forward, `with pack.rows({job_id: rows, ...}):` says which batch rows belong to which job; each
`PackLinear` then runs its base layer once for all rows and adds every job's delta to that job's
rows only (`farm.grouped_lora.add_segments`, PEFT's own arithmetic per block). A module a job does
not target adds nothing to its rows. Plain autograd: a job's A/B get gradients only from its rows.

`remove_job` releases a job (its parameters leave every layer; a layer no job targets any more is
unwrapped). `export_adapter` writes one job's adapter as a plain PEFT folder (adapter_config.json
from PEFT's LoraConfig, adapter_model.safetensors with PEFT's key names) that stock
`PeftModel.from_pretrained` loads; `load_adapter` reads one back (resume from a checkpoint).

What packs: vanilla LoRA on Linear layers (bitsandbytes Linear4bit/Linear8bitLt are Linear
subclasses), any rank/alpha/dropout/targets/rslora per job. What runs alone (add_job refuses it,
naming the field): DoRA, trained biases (`bias` other than none, `lora_bias`), `modules_to_save`
(a whole trained module cannot be shared by rows of several jobs), rank/alpha patterns and
non-Linear targets (GPT-2's Conv1D on an unquantized base).

Dropout is per job and counter-seeded (the pack step passes a seed per job and micro-batch): the
mask of a job's rows depends on that job's seed, step and its own batch width only, never on the
other jobs of the pack; the same seed gives the same mask in a gradient-checkpointing recompute.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from farm.errors import TrainingError
from farm.grouped_lora import Segment, add_segments

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class PackRows:
    """What every PackLinear of one model reads during a forward (set by `PackLoRA.rows`)."""

    active: bool = False
    rows: dict[str, Any] = field(default_factory=dict)  # job id -> slice or LongTensor of batch rows
    widths: dict[str, int] = field(default_factory=dict)  # job id -> its own padded width (dropout masks)
    dropout_seeds: dict[str, int] = field(default_factory=dict)  # job id -> seed of this forward's masks


class JobAdapter(torch.nn.Module):
    """One job's LoRA on one layer: leaf A (r, in), B (out, r), its scaling and dropout rate."""

    def __init__(self, A, B, scaling: float, dropout: float):
        super().__init__()
        self.lora_A = torch.nn.Parameter(A)
        self.lora_B = torch.nn.Parameter(B)
        self.scaling = scaling
        self.dropout = dropout


class PackLinear(torch.nn.Module):
    """A frozen base Linear (or Linear4bit) plus the LoRA of every job of the pack that targets it."""

    def __init__(self, base_layer, name: str, layer_id: int, ctx: PackRows):
        super().__init__()
        self.base_layer = base_layer
        self.name, self.layer_id, self.ctx = name, layer_id, ctx
        self.adapters = torch.nn.ModuleDict()  # slot key -> JobAdapter
        self.key_of: dict[str, str] = {}  # job id -> slot key (ModuleDict keys cannot hold '.')

    # Code around a Linear sometimes reads these (dtype checks, shape inference).
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter(self, job_id: str):
        key = self.key_of.get(job_id)
        return None if key is None else self.adapters[key]

    def _dropout(self, job_id: str, p: float, width: int | None):
        seed = self.ctx.dropout_seeds.get(job_id)
        if seed is None:
            raise TrainingError(f"pack: training forward without a dropout seed for job {job_id!r}")
        # layer_id in the seed: each layer draws its own mask, as PEFT's per-layer nn.Dropout does
        mixed = (int(seed) * 0x9E3779B1 + self.layer_id * 1_000_003 + 17) % (2**63 - 1)

        def drop(xs):
            shape = list(xs.shape)
            own = width if (width and xs.dim() == 3 and width <= shape[1]) else None
            if own is not None:
                shape[1] = own  # the job's own width: the mask does not depend on the pack's width
            g = torch.Generator(device=xs.device).manual_seed(mixed)
            keep = torch.rand(shape, generator=g, device=xs.device) >= p
            if own is not None and own < xs.shape[1]:
                pad = torch.ones(shape[0], xs.shape[1] - own, shape[2], dtype=keep.dtype, device=xs.device)
                keep = torch.cat([keep, pad], dim=1)  # padded positions never reach a loss
            return xs * keep.to(xs.dtype) / (1.0 - p)

        return drop

    def forward(self, x, *args, **kwargs):
        ctx = self.ctx
        if not ctx.active:
            raise TrainingError(
                f"pack: {self.name} ran outside `with pack.rows(...)`: the rows of each job must be known"
            )
        result = self.base_layer(x, *args, **kwargs)
        segs = []
        for job_id, rows in ctx.rows.items():
            ad = self.adapter(job_id)
            if ad is None:
                continue  # this job does not target this module
            if not isinstance(rows, slice) and rows.device != x.device:
                rows = rows.to(x.device)
            drop = None
            if self.training and ad.dropout > 0:
                drop = self._dropout(job_id, ad.dropout, ctx.widths.get(job_id))
            segs.append(Segment(rows, ad.lora_A, ad.lora_B, ad.scaling, drop))
        return add_segments(result, x, segs)


@dataclass
class PackedJob:
    """A job's place in the pack: its config, the modules it targets and its parameters."""

    job_id: str
    config: Any  # peft.LoraConfig
    seed: int
    targets: list[str]  # full module names, in model order
    key: str  # slot key inside every PackLinear


def _problems_of(config) -> list[str]:
    """Why a LoraConfig cannot share a pack (empty: it can)."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        return [f"lora config: a peft.LoraConfig is needed, got {type(config).__name__}"]
    p = []
    if getattr(config, "use_dora", False):
        p.append("lora.use_dora: DoRA adapters run alone (not packed)")
    if config.bias != "none":
        p.append(f"lora.bias: {config.bias!r} trains base biases shared by every job; packs need 'none'")
    if getattr(config, "lora_bias", False):
        p.append("lora.lora_bias: LoRA biases are not packed; use false")
    if config.modules_to_save:
        p.append(f"lora.modules_to_save: {list(config.modules_to_save)}: jobs training whole modules run alone")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        p.append("lora.rank_pattern/alpha_pattern: per-module ranks are not packed")
    if config.init_lora_weights not in (True, "gaussian"):
        p.append(f"lora.init_lora_weights: {config.init_lora_weights!r}: packs support true or 'gaussian'")
    if getattr(config, "target_parameters", None):
        p.append("lora.target_parameters: not packed")
    if not 0 <= float(config.lora_dropout) < 1:
        p.append(f"lora.lora_dropout: {config.lora_dropout}: must be in [0, 1)")
    return p


class PackLoRA:
    """The jobs of one pack on one model; see the module docstring."""

    def __init__(self, model):
        from farm.modeling import disable_cpu_repack

        self.model = model
        self.ctx = PackRows()
        self.jobs: dict[str, PackedJob] = {}
        self.layers: dict[str, Any] = {}  # module name -> PackLinear
        self._next_key = 0
        # Names and modules as the base has them (PEFT matches targets on these), fixed before wrapping.
        self._modules: list[tuple[str, Any]] = list(model.named_modules())
        self._index = {name: i for i, (name, _) in enumerate(self._modules)}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._output_name = next((n for n, m in self._modules if out_emb is not None and m is out_emb), None)
        # The bitsandbytes AVX512-BF16 trap: a 4-bit CPU layer that ever runs in eval mode without grad
        # repacks its weight and later backprops wrongly. Every quantized layer of a pack trains.
        disable_cpu_repack(model)

    # ---- which modules a job targets -----------------------------------------------------
    def _resolve_targets(self, config) -> tuple[list[str], list[str]]:
        from peft.tuners.tuners_utils import check_target_module_exists

        tm = config.target_modules
        if isinstance(tm, str) and tm.lower() == "all-linear":
            names = [n for n, m in self._modules if isinstance(m, torch.nn.Linear) and n != self._output_name]
            return names, []
        matched, problems = [], []
        for name, module in self._modules:
            if not name or not check_target_module_exists(config, name):  # an excluded module is falsy too
                continue
            if not isinstance(module, torch.nn.Linear):
                problems.append(
                    f"lora.target_modules: {name} is a {type(module).__name__}; packs adapt Linear layers only"
                )
                continue
            matched.append(name)
        if not matched and not problems:
            problems.append(f"lora.target_modules: {tm!r} matches no module of the base model")
        return matched, problems

    # ---- admission and release -----------------------------------------------------------
    def problems(self, config) -> list[str]:
        """Why a job with this LoraConfig cannot be held here (empty: it can); changes nothing."""
        problems = _problems_of(config)
        if not problems:
            problems += self._resolve_targets(config)[1]
        return problems

    def add_job(self, job_id: str, config, seed: int) -> list:
        """Admit a job: wrap the modules it targets, create its parameters; returns them (for its optimizer)."""

        problems = [f"job {job_id!r} is already in this pack"] if job_id in self.jobs else []
        problems += self.problems(config)
        if problems:
            raise TrainingError(f"job {job_id!r} cannot join the pack:\n" + "\n".join(f"  - {p}" for p in problems))
        targets, _ = self._resolve_targets(config)
        key = f"job{self._next_key}"
        self._next_key += 1
        r, alpha = int(config.r), float(config.lora_alpha)
        scaling = alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r
        # PEFT builds lora_A = nn.Linear(in, r), lora_B = nn.Linear(r, out) (each drawing nn.Linear's
        # default init), then re-initialises A and zeros B, module by module in model order. The same
        # draws from a generator of the job's own seed: PEFT's adapter after torch.manual_seed(seed).
        g = torch.Generator().manual_seed(int(seed))
        params = []
        for name in targets:
            base = self._modules[self._index[name]][1]
            n_in, n_out = base.in_features, base.out_features
            A = torch.empty(r, n_in)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            B = torch.empty(n_out, r)
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
            if config.init_lora_weights == "gaussian":
                torch.nn.init.normal_(A, std=1 / r, generator=g)
            else:
                torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            B.zero_()
            layer = self._wrap(name)
            device = layer.base_layer.weight.device
            ad = JobAdapter(A.to(device), B.to(device), scaling, float(config.lora_dropout))
            ad.train(layer.training)
            layer.adapters[key] = ad
            layer.key_of[job_id] = key
            params += [ad.lora_A, ad.lora_B]
        self.jobs[job_id] = PackedJob(job_id, copy.deepcopy(config), int(seed), targets, key)
        return params

    def remove_job(self, job_id: str) -> None:
        """Release a job: its parameters leave every layer; layers no job targets are unwrapped."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            raise TrainingError(f"job {job_id!r} is not in this pack (jobs: {sorted(self.jobs)})")
        for name in job.targets:
            layer = self.layers[name]
            del layer.adapters[layer.key_of.pop(job_id)]
            if not layer.key_of:
                self._unwrap(name)

    def parameters(self, job_id: str) -> list:
        """The job's trainable parameters (A, B per targeted module, in model order)."""
        job = self._job(job_id)
        out = []
        for name in job.targets:
            ad = self.layers[name].adapter(job_id)
            out += [ad.lora_A, ad.lora_B]
        return out

    def _job(self, job_id: str) -> PackedJob:
        if job_id not in self.jobs:
            raise TrainingError(f"job {job_id!r} is not in this pack (jobs: {sorted(self.jobs)})")
        return self.jobs[job_id]

    def _parent(self, name: str):
        parent_name, _, child = name.rpartition(".")
        return self.model.get_submodule(parent_name) if parent_name else self.model, child

    def _wrap(self, name: str):
        layer = self.layers.get(name)
        if layer is None:
            parent, child = self._parent(name)
            base = getattr(parent, child)
            layer = PackLinear(base, name, self._index[name], self.ctx)
            layer.train(base.training)
            setattr(parent, child, layer)
            self.layers[name] = layer
        return layer

    def _unwrap(self, name: str) -> None:
        layer = self.layers.pop(name)
        parent, child = self._parent(name)
        setattr(parent, child, layer.base_layer)

    # ---- forwards -------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, rows: dict[str, Any], widths: dict[str, int] | None = None, dropout_seeds: dict[str, int] | None = None):
        """Forwards (and backwards: a checkpoint recompute reads this too) inside the block see
        `rows[job_id]` (a slice or LongTensor of batch rows) as that job's rows. Rows of no job get
        no LoRA delta. Training forwards of jobs with dropout need a seed per job."""
        unknown = sorted(set(rows) - set(self.jobs))
        if unknown:
            raise TrainingError(f"pack: rows given for jobs not in the pack: {unknown}")
        ctx = self.ctx
        if ctx.active:
            raise TrainingError("pack: rows(...) blocks do not nest")
        ctx.rows, ctx.widths, ctx.dropout_seeds = dict(rows), dict(widths or {}), dict(dropout_seeds or {})
        ctx.active = True
        try:
            yield ctx
        finally:
            ctx.active = False
            ctx.rows, ctx.widths, ctx.dropout_seeds = {}, {}, {}

    # ---- PEFT folders ----------------------------------------------------------------------
    def state_dict(self, job_id: str) -> dict:
        """The job's weights under PEFT's saved key names (what get_peft_model_state_dict gives)."""
        job = self._job(job_id)
        sd = {}
        for name in job.targets:
            ad = self.layers[name].adapter(job_id)
            sd[f"base_model.model.{name}.lora_A.weight"] = ad.lora_A.detach().cpu().contiguous()
            sd[f"base_model.model.{name}.lora_B.weight"] = ad.lora_B.detach().cpu().contiguous()
        return sd

    def peft_config(self, job_id: str, base_model_name_or_path: str | None = None, revision: str | None = None):
        """The job's LoraConfig as PEFT saves it (targets resolved, inference mode)."""
        job = self._job(job_id)
        cfg = copy.deepcopy(job.config)
        if isinstance(cfg.target_modules, str):  # all-linear: save the modules it meant on this base
            cfg.target_modules = set(job.targets)
        cfg.base_model_name_or_path = base_model_name_or_path
        cfg.revision = revision
        cfg.inference_mode = True
        return cfg

    def export_adapter(self, job_id: str, folder, base_model_name_or_path: str | None = None, revision: str | None = None) -> Path:
        """Write the job's adapter as a plain PEFT folder (safetensors) and return its path."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_config(job_id, base_model_name_or_path, revision).save_pretrained(str(folder))
        save_file(self.state_dict(job_id), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return folder

    def load_adapter(self, job_id: str, folder) -> None:
        """Load a job's weights from a PEFT folder written by export_adapter (resume); the folder's
        tensors must match the job's modules and shapes exactly."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / ADAPTER_WEIGHTS
        if not path.exists():
            raise TrainingError(f"{folder}: no {ADAPTER_WEIGHTS} (not an adapter folder)")
        weights = load_file(str(path))
        want = self.state_dict(job_id)
        problems = [f"missing {k}" for k in want if k not in weights]
        problems += [f"unexpected {k}" for k in weights if k not in want]
        problems += [
            f"{k}: shape {tuple(weights[k].shape)}, the job has {tuple(v.shape)}"
            for k, v in want.items() if k in weights and weights[k].shape != v.shape
        ]
        if problems:
            raise TrainingError(f"{path}: does not fit job {job_id!r}:\n" + "\n".join(f"  - {p}" for p in problems[:20]))
        job = self.jobs[job_id]
        with torch.no_grad():
            for name in job.targets:
                ad = self.layers[name].adapter(job_id)
                ad.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
                ad.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])


def read_adapter_config(folder) -> dict:
    """adapter_config.json of a PEFT folder as a dict (for lineage and tests)."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
