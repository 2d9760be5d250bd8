"""Packed LoRA: one frozen (NF4 or plain) base model carrying the trainable adapters of several jobs.

`PackLoRA(model)` takes a transformers model (quantized and prepared by farm.train.modelops.build_base);
`add_job(job_id, lora_config, seed)` wraps each module the job targets in a `PackLinear` (once per
module, shared by every job that targets it) and gives the job its own leaf `lora_A`/`lora_B`
parameters there, initialised like PEFT's (A kaiming-uniform, B zeros) from a generator seeded by
the job's seed alone, so a job's start does not depend on which other jobs share the pack. Before a
forward, `with pack.rows({job_id: rows, ...}):` says which batch rows belong to which job; each
`PackLinear` then runs its base layer once for all rows and adds every job's delta to that job's
rows only (`farm.grouped_lora.add_segments`, PEFT's own arithmetic per block). A module a job does
not target adds nothing to its rows. Plain autograd: a job's A/B get gradients only from its rows.

Whole trained modules (PEFT's `modules_to_save`; a seq_cls job's classification head, which PEFT
adds itself as `classifier`/`score` for task type SEQ_CLS) are held the way PEFT's
ModulesToSaveWrapper holds them: the module is wrapped in a `PackSaved`, and each job that saves it
gets its own full copy (a deep copy of the base's module, trainable), which runs on that job's rows
only; rows of other jobs go through the frozen original. Matching follows PEFT: a module whose name
ends with an entry of modules_to_save, and LoRA never targets a module inside one.

`remove_job` releases a job (its parameters leave every layer; a layer no job uses any more is
unwrapped). `export_adapter` writes one job's adapter as a plain PEFT folder (adapter_config.json as
PEFT saves it: targets resolved, seq_cls heads named in modules_to_save, fan_in_fan_out for GPT-2's
Conv1D; adapter_model.safetensors with PEFT's key names, a saved module's tensors as
`base_model.model.<module>.<param>`) that stock `PeftModel.from_pretrained` loads; `load_adapter`
reads one back (resume from a checkpoint, an alias's baseline version).

What it holds: LoRA on Linear layers (bitsandbytes Linear4bit/Linear8bitLt are Linear subclasses)
and on transformers' Conv1D (GPT-2 on an unquantized base), any rank/alpha/dropout/targets/rslora
per job, and modules_to_save. What it refuses (add_job names the field): DoRA, trained biases
(`bias` other than none, `lora_bias`), rank/alpha patterns, other init schemes, target_parameters,
and other module types as targets (Embedding, Conv2d). The manifest can ask for none of these.

Dropout is per job and counter-seeded (the pack step passes a seed per job and micro-batch): the
mask of a job's rows depends on that job's seed, step and its own batch width only, never on the
other jobs of the pack; the same seed gives the same mask in a gradient-checkpointing recompute.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from farm.errors import TrainingError
from farm.grouped_lora import Segment, add_segments

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
SEQ_CLS_HEADS = ("classifier", "score")  # what PEFT adds to modules_to_save for task type SEQ_CLS


def _is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _features(module) -> tuple[int, int]:
    """(in, out) features of a Linear or of transformers' Conv1D (weight stored (in, out)), as PEFT reads them."""
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return module.in_features, module.out_features


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
        self._in, self._out = _features(base_layer)
        self.adapters = torch.nn.ModuleDict()  # slot key -> JobAdapter
        self.key_of: dict[str, str] = {}  # job id -> slot key (ModuleDict keys cannot hold '.')

    # Code around a Linear sometimes reads these (dtype checks, shape inference).
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

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


class PackSaved(torch.nn.Module):
    """A frozen base module plus a trained full copy of it for every job of the pack that saves it
    (modules_to_save): each job's rows go through its own copy, other rows through the original."""

    def __init__(self, original, name: str, ctx: PackRows):
        super().__init__()
        self.original = original
        self.name, self.ctx = name, ctx
        self.copies = torch.nn.ModuleDict()  # slot key -> the job's copy
        self.key_of: dict[str, str] = {}

    @property
    def weight(self):  # code around a head sometimes reads it (dtype checks)
        return self.original.weight

    def copy_of(self, job_id: str):
        key = self.key_of.get(job_id)
        return None if key is None else self.copies[key]

    def forward(self, x, *args, **kwargs):
        ctx = self.ctx
        if not ctx.active:
            raise TrainingError(
                f"pack: {self.name} ran outside `with pack.rows(...)`: the rows of each job must be known"
            )
        own = [(rows, self.copy_of(j)) for j, rows in ctx.rows.items() if j in self.key_of]
        if len(own) == 1 and _covers(own[0][0], x.shape[0]):  # a pack of one: every row is its own
            return own[0][1](x, *args, **kwargs)
        result = self.original(x, *args, **kwargs)
        if not own:
            return result
        result = result.clone()
        for rows, module in own:
            if not isinstance(rows, slice) and rows.device != x.device:
                rows = rows.to(x.device)
            result[rows] = module(x[rows], *args, **kwargs)
        return result


def _covers(rows, n: int) -> bool:
    """Whether `rows` (a slice or index tensor) is every row of a batch of n."""
    if not isinstance(rows, slice):
        return False
    start, stop, step = rows.indices(n)
    return start == 0 and stop == n and step == 1


@dataclass
class PackedJob:
    """A job's place in the pack: its config, the modules it adapts or saves and its parameters."""

    job_id: str
    config: Any  # peft.LoraConfig, as PEFT would save it (farm.train.pack_lora.as_peft_saves)
    seed: int
    targets: list[str]  # full module names of its LoRA, in model order
    key: str  # slot key inside every PackLinear / PackSaved
    saved: list[str] = field(default_factory=list)  # full names of the modules it trains whole, in model order


def as_peft_saves(config):
    """A copy of a LoraConfig as PEFT's model for its task leaves it (and saves it): task type SEQ_CLS
    adds the classification heads' names to modules_to_save (PeftModelForSequenceClassification)."""
    cfg = copy.deepcopy(config)
    if getattr(cfg, "task_type", None) == "SEQ_CLS":  # TaskType is a str Enum
        mts = list(cfg.modules_to_save or [])
        cfg.modules_to_save = mts + [h for h in SEQ_CLS_HEADS if h not in mts]
    return cfg


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
        self.saved: dict[str, PackSaved] = {}  # module name -> PackSaved
        self._next_key = 0
        # Names and modules as the base has them (PEFT matches targets on these), fixed before wrapping.
        self._modules: list[tuple[str, Any]] = list(model.named_modules())
        self._index = {name: i for i, (name, _) in enumerate(self._modules)}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._output_name = next((n for n, m in self._modules if out_emb is not None and m is out_emb), None)
        # The bitsandbytes AVX512-BF16 trap: a 4-bit CPU layer that ever runs in eval mode without grad
        # repacks its weight and later backprops wrongly. Every quantized layer of a pack trains.
        disable_cpu_repack(model)

    # ---- which modules a job adapts and saves --------------------------------------------
    def _resolve_saved(self, config) -> tuple[list[str], list[str]]:
        """The modules a job trains whole (PEFT's rule: the name ends with an entry of modules_to_save;
        the outermost match), and why any of them cannot be held."""
        wanted = list(config.modules_to_save or [])
        names, problems = [], []
        for name, module in self._modules:
            if not name or not any(name.endswith(t) for t in wanted):
                continue
            if any(name.startswith(n + ".") for n in names):
                continue  # inside a module already saved whole
            if any(not p.is_floating_point() for p in module.parameters()):
                problems.append(f"lora.modules_to_save: {name} is quantized; only unquantized modules train whole")
                continue
            names.append(name)
        return names, problems

    def _resolve_targets(self, config) -> tuple[list[str], list[str]]:
        from peft.tuners.tuners_utils import check_target_module_exists

        tm = config.target_modules
        saved = [re.compile(rf"(^|.*\.){m}($|\..*)") for m in (config.modules_to_save or [])]

        def in_saved(name: str) -> bool:  # PEFT never puts LoRA on (or inside) a module saved whole
            return any(r.match(name) for r in saved)

        if isinstance(tm, str) and tm.lower() == "all-linear":
            names = [n for n, m in self._modules if (isinstance(m, torch.nn.Linear) or _is_conv1d(m))
                     and n != self._output_name and not in_saved(n)]
            return names, []
        matched, problems = [], []
        for name, module in self._modules:
            if not name or in_saved(name) or not check_target_module_exists(config, name):  # excluded: falsy
                continue
            if not (isinstance(module, torch.nn.Linear) or _is_conv1d(module)):
                problems.append(
                    f"lora.target_modules: {name} is a {type(module).__name__}; the engine adapts Linear layers only "
                    f"(and GPT-2's Conv1D)"
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
            config = as_peft_saves(config)
            problems += self._resolve_targets(config)[1] + self._resolve_saved(config)[1]
        return problems

    def _clashes(self, job_id: str, targets: list[str], saved: list[str]) -> list[str]:
        """A module one job adapts while another trains it whole cannot hold both."""
        out = [f"{n}: job {job_id!r} adapts it, another job of the pack trains it whole (modules_to_save)"
               for n in targets if n in self.saved]
        out += [f"{n}: job {job_id!r} trains it whole (modules_to_save), another job of the pack adapts it"
                for n in saved if n in self.layers]
        return out

    def add_job(self, job_id: str, config, seed: int) -> list:
        """Admit a job: wrap the modules it targets and saves, create its parameters; returns them in
        model order (for its optimizer, in the order PEFT's model lists them)."""
        problems = [f"job {job_id!r} is already in this pack"] if job_id in self.jobs else []
        problems += self.problems(config)
        if problems:
            raise TrainingError(f"job {job_id!r} cannot join the pack:\n" + "\n".join(f"  - {p}" for p in problems))
        config = as_peft_saves(config)
        targets, _ = self._resolve_targets(config)
        saved, _ = self._resolve_saved(config)
        problems = self._clashes(job_id, targets, saved)
        if problems:
            raise TrainingError(f"job {job_id!r} cannot join the pack:\n" + "\n".join(f"  - {p}" for p in problems))
        if any(_is_conv1d(self._modules[self._index[n]][1]) for n in targets):
            config.fan_in_fan_out = True  # as PEFT sets (and saves) it for a Conv1D target
        key = f"job{self._next_key}"
        self._next_key += 1
        r, alpha = int(config.r), float(config.lora_alpha)
        scaling = alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r
        # PEFT builds lora_A = nn.Linear(in, r), lora_B = nn.Linear(r, out) (each drawing nn.Linear's
        # default init), then re-initialises A and zeros B, module by module in model order. The same
        # draws from a generator of the job's own seed: PEFT's adapter after torch.manual_seed(seed).
        g = torch.Generator().manual_seed(int(seed))
        for name in targets:
            base = self._modules[self._index[name]][1]
            n_in, n_out = _features(base)
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
        for name in saved:  # PEFT's ModulesToSaveWrapper: a deep copy of the module, trainable
            holder = self._wrap_saved(name)
            own = copy.deepcopy(holder.original)
            own.requires_grad_(True)
            own.train(holder.training)
            holder.copies[key] = own
            holder.key_of[job_id] = key
        self.jobs[job_id] = PackedJob(job_id, config, int(seed), targets, key, saved)
        return self.parameters(job_id)

    def remove_job(self, job_id: str) -> None:
        """Release a job: its parameters leave every layer; layers no job uses are unwrapped."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            raise TrainingError(f"job {job_id!r} is not in this pack (jobs: {sorted(self.jobs)})")
        for name in job.targets:
            layer = self.layers[name]
            del layer.adapters[layer.key_of.pop(job_id)]
            if not layer.key_of:
                self._unwrap(name)
        for name in job.saved:
            holder = self.saved[name]
            del holder.copies[holder.key_of.pop(job_id)]
            if not holder.key_of:
                self._unwrap_saved(name)

    def _named_parameters(self, job_id: str) -> list[tuple[str, Any]]:
        """(PEFT's saved key, parameter) of the job, in model order (A before B in a module)."""
        job = self._job(job_id)
        out = []
        for name in job.targets:
            ad = self.layers[name].adapter(job_id)
            out.append((self._index[name], [(f"{PREFIX}{name}.lora_A.weight", ad.lora_A),
                                            (f"{PREFIX}{name}.lora_B.weight", ad.lora_B)]))
        for name in job.saved:
            own = self.saved[name].copy_of(job_id)
            out.append((self._index[name], [(f"{PREFIX}{name}.{k}", p) for k, p in own.named_parameters()]))
        return [kp for _, kps in sorted(out, key=lambda t: t[0]) for kp in kps]

    def parameters(self, job_id: str) -> list:
        """The job's trainable parameters (A, B per targeted module; a saved module's own; in model order)."""
        return [p for _, p in self._named_parameters(job_id)]

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

    def _wrap_saved(self, name: str) -> PackSaved:
        holder = self.saved.get(name)
        if holder is None:
            parent, child = self._parent(name)
            original = getattr(parent, child)
            holder = PackSaved(original, name, self.ctx)
            holder.train(original.training)
            setattr(parent, child, holder)
            self.saved[name] = holder
        return holder

    def _unwrap_saved(self, name: str) -> None:
        holder = self.saved.pop(name)
        parent, child = self._parent(name)
        setattr(parent, child, holder.original)

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
        """The job's weights under PEFT's saved key names (what get_peft_model_state_dict gives: LoRA's
        `<module>.lora_A.weight`, a saved module's `<module>.<param>`)."""
        return {k: p.detach().cpu().contiguous() for k, p in self._named_parameters(job_id)}

    def set_weights(self, job_id: str, weights: dict, where: str = "weights") -> None:
        """Copy a state dict under PEFT's key names (state_dict's) into the job's parameters; the
        tensors must match the job's modules and shapes exactly."""
        own = dict(self._named_parameters(job_id))
        problems = [f"missing {k}" for k in own if k not in weights]
        problems += [f"unexpected {k}" for k in weights if k not in own]
        problems += [
            f"{k}: shape {tuple(weights[k].shape)}, the job has {tuple(v.shape)}"
            for k, v in own.items() if k in weights and weights[k].shape != v.shape
        ]
        if problems:
            raise TrainingError(f"{where}: does not fit job {job_id!r}:\n" + "\n".join(f"  - {p}" for p in problems[:20]))
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(weights[k])

    def peft_config(self, job_id: str, base_model_name_or_path: str | None = None, revision: str | None = None):
        """The job's LoraConfig as PEFT saves it (targets resolved, task heads in modules_to_save, inference mode)."""
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
        """Load a job's weights from a PEFT folder written by export_adapter (resume) or by PEFT; the
        folder's tensors must match the job's modules and shapes exactly."""
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / ADAPTER_WEIGHTS
        if not path.exists():
            raise TrainingError(f"{folder}: no {ADAPTER_WEIGHTS} (not an adapter folder)")
        self.set_weights(job_id, load_file(str(path)), where=str(path))


def read_adapter_config(folder) -> dict:
    """adapter_config.json of a PEFT folder as a dict (for lineage and tests)."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
