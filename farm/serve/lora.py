"""Grouped LoRA for mixed-adapter batches (the Punica/S-LoRA idea, on plain torch).

PEFT's `adapter_names` path loops over the distinct adapters in every LoRA layer (a gather, two small
matmuls and a scatter each), and PeftModel's forward walks every module to register hooks: with 32
adapters on a small model that is most of a decode step. Here each LoRA-wrapped linear layer gets a
slot-indexed stack of its adapters' weights (ranks zero-padded to the layer's largest), and one
forward computes the base output once and the LoRA delta of every row with two `bmm`s over the rows'
gathered A/B. PEFT's loaded adapters stay the source of truth: `add`/`remove` copy them in and out
of the stacks when the engine attaches or detaches one.

Whole-module copies (`modules_to_save`, e.g. a trained lm_head or classification head) are
dispatched per row too: PEFT's ModulesToSaveWrapper applies its *active* adapter's copy to every row
of a forward, so each wrapper's forward is replaced by one that runs row i through names[i]'s own
copy, or through the base module when that adapter has none ('__base__' included). Which copy a row
gets depends only on its own name, never on which adapter PEFT considers active, so attaching,
detaching or evicting other adapters cannot change it.

Only the serving engine installs this; outside `batch(...)` (and without `adapter_names`) the layers
run PEFT's own forward. The LoRA arithmetic itself (the rows' gather, the batched delta, the
one-adapter delta) is farm/grouped_lora.py's, shared with packed training; this module is the
serving plumbing around it: the per-layer stacks kept in step with PEFT, and the forward patches.
"""

from __future__ import annotations

import contextlib

from farm.grouped_lora import add_stacked, gather_rows, lora_delta


class _Stack:
    """One layer's adapters: At (S, in, r) and Bt (S, r, out) so that x @ At[i] @ Bt[i] is LoRA i."""

    def __init__(self, layer, capacity: int):
        import torch

        a = next(iter(layer.lora_A.values())).weight
        self.dtype, self.device = a.dtype, a.device
        self.n_in = a.shape[1]
        self.n_out = next(iter(layer.lora_B.values())).weight.shape[0]
        self.rank = 1
        self.At = torch.zeros(capacity, self.n_in, self.rank, dtype=self.dtype, device=self.device)
        self.Bt = torch.zeros(capacity, self.rank, self.n_out, dtype=self.dtype, device=self.device)
        self.scale = torch.zeros(capacity, dtype=self.dtype, device=self.device)
        self.present: set[int] = set()
        self.gathered = None  # (batch version, At[rows], Bt[rows], scale[rows]) reused across steps

    def resize(self, capacity: int, rank: int) -> None:
        import torch

        cap0, _, r0 = self.At.shape
        capacity, rank = max(capacity, cap0), max(rank, r0)
        if (capacity, rank) == (cap0, r0):
            return
        At = torch.zeros(capacity, self.n_in, rank, dtype=self.dtype, device=self.device)
        Bt = torch.zeros(capacity, rank, self.n_out, dtype=self.dtype, device=self.device)
        scale = torch.zeros(capacity, dtype=self.dtype, device=self.device)
        At[:cap0, :, :r0], Bt[:cap0, :r0, :], scale[:cap0] = self.At, self.Bt, self.scale
        self.At, self.Bt, self.scale, self.rank = At, Bt, scale, rank
        self.gathered = None

    def put(self, i: int, A, B, scaling: float) -> None:
        r = A.shape[0]
        self.resize(i + 1, r)
        self.At[i].zero_()
        self.Bt[i].zero_()
        self.At[i, :, :r] = A.t()
        self.Bt[i, :r, :] = B.t()
        self.scale[i] = scaling
        self.present.add(i)
        self.gathered = None

    def clear(self, i: int) -> None:
        if i in self.present:
            self.At[i].zero_()
            self.Bt[i].zero_()
            self.scale[i] = 0
            self.present.discard(i)
            self.gathered = None


class _Batch:
    """What the patched layers read during one `GroupedLoRA.batch(...)`."""

    active = False  # inside GroupedLoRA.batch(...)
    rows = None  # LongTensor (B,) of slot indices
    uniform: str | None = None  # every row uses this one adapter: PEFT's own modules, no gather
    base_only = False  # no row uses an adapter
    version = 0  # bumped whenever the rows change, so stacks know when to re-gather
    names: list[str] | None = None  # adapter name per row (module-copy dispatch)


class GroupedLoRA:
    """Patches the LoRA linear layers of a PeftModel for grouped mixed-adapter forwards.

    Usage: `g.add(name)` after PEFT's load_adapter, `g.remove(name)` before delete_adapter, and
    `with g.batch(names): base_model(...)` (call the underlying transformers model, not the
    PeftModel, so PEFT's per-forward hook setup is skipped too). `g.supports(names)` is False when
    an adapter uses something the grouped path does not implement (DoRA or another variant, LoRA
    bias, non-linear LoRA layers); then run PEFT's own `adapter_names` forward instead.
    """

    def __init__(self, peft_model):
        self.model = peft_model
        self.index: dict[str, int] = {}  # adapter name -> slot index (0 = no adapter)
        self.free: list[int] = []
        self.unsupported: set[str] = set()
        self.stacks: dict[object, _Stack] = {}
        self.ctx = _Batch()
        self._last_names: list[str] | None = None

    # ---- adapters -----------------------------------------------------------------------
    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def add(self, name: str) -> None:
        """Copy adapter `name` (already loaded into the PeftModel) into the stacks."""
        import torch

        i = self.free.pop() if self.free else len(self.index) + 1
        self.index[name] = i
        capacity = max(8, 1 << i.bit_length())  # every stack must take any row index
        with torch.no_grad():
            for stack in self.stacks.values():
                stack.resize(capacity, 0)
            for layer in self._lora_layers():
                if name not in layer.lora_A and name not in getattr(layer, "lora_embedding_A", {}):
                    continue
                if not self._vanilla(layer, name):
                    self.unsupported.add(name)
                    continue
                stack = self.stacks.get(layer)
                if stack is None:
                    stack = self.stacks[layer] = _Stack(layer, capacity)
                    self._patch(layer, stack)
                stack.put(i, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        self._patch_copies()
        self._last_names = None

    def _patch_copies(self) -> None:
        patch_module_copies(self.model, self.ctx)

    def remove(self, name: str) -> None:
        i = self.index.pop(name, None)
        if i is None:
            return
        for stack in self.stacks.values():
            stack.clear(i)
        self.free.append(i)
        self.unsupported.discard(name)
        self._last_names = None

    @staticmethod
    def _vanilla(layer, name: str) -> bool:
        import torch

        return (
            name in layer.lora_A
            and type(layer.lora_A[name]) is torch.nn.Linear
            and type(layer.lora_B[name]) is torch.nn.Linear
            and name not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "use_dora", {}).get(name, False)
            and not getattr(layer, "lora_bias", {}).get(name, False)
            and not getattr(layer, "merged", False)
        )

    def supports(self, names: list[str]) -> bool:
        # An unsupported adapter may have wrapped layers we did not patch: those would apply PEFT's
        # active adapter to every row, so the grouped path is off while any such adapter is resident.
        return not self.unsupported and all(n in self.index or n == "__base__" for n in names)

    # ---- forward --------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self, names: list[str]):
        """Run forwards inside this block with row i using adapter names[i] ('__base__' = none)."""
        import torch

        ctx = self.ctx
        if names != self._last_names:
            self._last_names = list(names)
            ctx.version += 1
            distinct = set(names)
            ctx.base_only = distinct <= {"__base__"}
            ctx.uniform = next(iter(distinct)) if len(distinct) == 1 and not ctx.base_only else None
            ctx.rows = torch.tensor([self.index.get(n, 0) for n in names], dtype=torch.long)
            ctx.names = list(names)
        ctx.active = True
        try:
            yield
        finally:
            ctx.active = False

    def _patch(self, layer, stack: _Stack) -> None:
        orig = layer.forward  # PEFT's bound forward, used outside a batch
        ctx = self.ctx

        def forward(x, *args, **kwargs):
            if not ctx.active or kwargs.get("adapter_names") is not None:
                return orig(x, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            if ctx.base_only or not stack.present:
                return result
            if ctx.uniform is not None:
                name = ctx.uniform
                if name not in layer.lora_A:
                    return result
                # one adapter for all rows: exactly PEFT's own computation (F.linear twice, scaled)
                delta = lora_delta(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                return result + delta.to(result.dtype)
            g = stack.gathered
            if g is None or g[0] != ctx.version:
                g = stack.gathered = (ctx.version, *gather_rows(stack.At, stack.Bt, stack.scale, ctx.rows))
            _, At, Bt, scale = g
            return add_stacked(result, x, At, Bt, scale)

        layer.forward = forward


def patch_module_copies(model, ctx: _Batch | None = None) -> None:
    """Per-row dispatch on every module-copy wrapper of a PeftModel not yet patched (PEFT creates a
    wrapper with the first adapter that saves that module; later adapters add their copy to it).
    Call after every load_adapter. Rows come from `adapter_names` or, inside `GroupedLoRA.batch`, ctx."""
    from peft.utils.other import ModulesToSaveWrapper

    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and not getattr(m, "_farm_per_row", False):
            _patch_copy(m, ctx)
            m._farm_per_row = True


def _patch_copy(wrapper, ctx: _Batch | None) -> None:
    """Replace a ModulesToSaveWrapper's forward: row i runs through its own adapter's copy of the
    module if it has one, else through the base module; never through the active adapter's."""
    import torch

    orig = wrapper.forward

    def pick(name: str):
        copies = wrapper.modules_to_save
        return copies[name] if name in copies else wrapper.original_module

    def forward(x, *args, **kwargs):
        names = kwargs.pop("adapter_names", None)  # PEFT's mixed-batch path passes them
        if names is None and ctx is not None and ctx.active:
            names = ctx.names
        if names is None:
            return orig(x, *args, **kwargs)
        if len(names) != x.shape[0]:
            raise RuntimeError(f"{len(names)} adapter names for a batch of {x.shape[0]} rows")
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return pick(distinct[0])(x, *args, **kwargs)
        out = None
        for name in distinct:
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            y = pick(name)(x[idx], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out

    wrapper.forward = forward
