"""The math of grouped LoRA: one base output for a batch, each row's own adapter delta added to it.

Row i of a batch uses slot `rows[i]` (an adapter, or none); its delta is PEFT's vanilla LoRA,
`scaling · B(A(x_i))`, with A of shape (r, in) and B of shape (out, r); ranks may differ per slot.
Two ways to compute the same thing, for the two callers:

- stacked (serving, `farm.serve.lora`): every slot's A/B zero-padded to the largest rank and
  stacked, At (S, in, R) and Bt (S, R, out); the rows' slices are gathered once per batch and
  every row's delta is one pair of `bmm`s. Zero padding adds exact zeros, so the result is the
  unpadded LoRA. No autograd needed; the gather is reused across decode steps.
- segmented (packed training, `farm.train.pack_lora`): per slot its own (leaf) A and B, the rows
  of each slot taken as one block and the delta computed with the same `F.linear` calls as PEFT,
  so a slot's rows see exactly PEFT's arithmetic and gradients reach only that slot's A/B.

torch only; nothing here knows about PEFT modules, jobs or the serving plumbing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Rows = Any  # a slice (a contiguous block of rows) or a 1-D LongTensor of row indices


@dataclass
class Segment:
    """The rows of one slot and the adapter they use."""

    rows: Rows
    A: Any  # (r, in)
    B: Any  # (out, r)
    scaling: float
    dropout: Callable[[Any], Any] | None = None  # applied to those rows' x before A (training)


def lora_delta(x, A, B, scaling: float):
    """PEFT's vanilla LoRA update for x (..., in): `lora_B(lora_A(x)) * scaling`, in A's dtype."""
    import torch.nn.functional as F

    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling


def add_segments(result, x, segments: Iterable[Segment]):
    """result + each segment's delta on its own rows (out of place; autograd-safe).

    `result` is the base layer's output for all rows of x (batch dimension first). Rows in no
    segment get no delta. For one segment covering every row this is exactly PEFT's
    `result.clone() + lora_B(lora_A(dropout(x))) * scaling`."""
    out = None
    for seg in segments:
        xs = x[seg.rows]
        if seg.dropout is not None:
            xs = seg.dropout(xs)
        delta = lora_delta(xs, seg.A, seg.B, seg.scaling).to(result.dtype)
        if out is None:
            out = result.clone()  # in-place adds on a copy: PEFT clones 4-bit outputs for autograd too
        if isinstance(seg.rows, slice):
            out[seg.rows] += delta
        else:
            out.index_add_(0, seg.rows, delta)
    return result if out is None else out


def stack_adapters(As: Sequence[Any | None], Bs: Sequence[Any | None], scalings: Sequence[float], rank: int | None = None):
    """Stack per-slot A (r_i, in) / B (out, r_i) into At (S, in, R), Bt (S, R, out), scale (S,).

    A slot with A None (e.g. slot 0, "no adapter") is all zeros. R is the largest rank unless given."""
    import torch

    ref = next(a for a in As if a is not None)
    R = rank or max(a.shape[0] for a in As if a is not None)
    n_in = ref.shape[1]
    n_out = next(b for b in Bs if b is not None).shape[0]
    S = len(As)
    At = torch.zeros(S, n_in, R, dtype=ref.dtype, device=ref.device)
    Bt = torch.zeros(S, R, n_out, dtype=ref.dtype, device=ref.device)
    scale = torch.zeros(S, dtype=ref.dtype, device=ref.device)
    for i, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        if A is None:
            continue
        r = A.shape[0]
        At[i, :, :r] = A.t()
        Bt[i, :r, :] = B.t()
        scale[i] = s
    return At, Bt, scale


def gather_rows(At, Bt, scale, rows):
    """Each row's slice of the stacks: (At[rows], Bt[rows], scale[rows]); cache it while rows stay."""
    rows = rows.to(At.device)
    return At[rows], Bt[rows], scale[rows]


def add_stacked(result, x, At_rows, Bt_rows, scale_rows):
    """result + every row's delta from gathered stacks: two batched matmuls for the whole batch.

    x is (n, ..., in) with n rows; At_rows (n, in, R), Bt_rows (n, R, out), scale_rows (n,)."""
    n = x.shape[0]
    h = x.reshape(n, -1, x.shape[-1]).to(At_rows.dtype)
    delta = (h @ At_rows @ Bt_rows) * scale_rows.view(n, 1, 1)
    return result + delta.view(result.shape).to(result.dtype)


def segments_of(rows) -> dict[int, Rows]:
    """Group a per-row slot index (list or LongTensor) into {slot: rows}; a slot whose rows form
    one contiguous block gets a slice (cheaper than an index)."""
    import torch

    idx = rows.tolist() if hasattr(rows, "tolist") else list(rows)
    where: dict[int, list[int]] = {}
    for i, s in enumerate(idx):
        where.setdefault(int(s), []).append(i)
    out: dict[int, Rows] = {}
    for s, r in where.items():
        if r[-1] - r[0] + 1 == len(r):
            out[s] = slice(r[0], r[-1] + 1)
        else:
            out[s] = torch.tensor(r, dtype=torch.long)
    return out


def add_grouped_lora(result, x, rows, As: Sequence[Any | None], Bs: Sequence[Any | None], scalings: Sequence[float]):
    """result + each row's delta, row i using slot rows[i] of the per-slot As/Bs/scalings (ranks
    may differ; a slot whose A is None adds nothing). Segmented, so it is differentiable in A/B."""
    segs = []
    for s, r in segments_of(rows).items():
        if As[s] is not None:
            if not isinstance(r, slice):
                r = r.to(x.device)
            segs.append(Segment(r, As[s], Bs[s], scalings[s]))
    return add_segments(result, x, segs)
