"""farm.grouped_lora: the stacked (serving) and segmented (training) forms give every row its own
slot's LoRA delta, and match PEFT's per-adapter arithmetic row by row."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from farm.grouped_lora import (  # noqa: E402
    add_grouped_lora,
    add_stacked,
    gather_rows,
    lora_delta,
    segments_of,
    stack_adapters,
)

N_IN, N_OUT = 12, 10


def _slots():
    g = torch.Generator().manual_seed(0)
    # slot 0 = no adapter; ranks differ per slot
    As = [None] + [torch.randn(r, N_IN, generator=g) for r in (2, 5, 3)]
    Bs = [None] + [torch.randn(N_OUT, r, generator=g) for r in (2, 5, 3)]
    return As, Bs, [0.0, 2.0, 0.5, 1.25]


def _naive(result, x, rows, As, Bs, scalings):
    """Row by row, PEFT's lora_B(lora_A(x)) * scaling."""
    out = result.clone()
    for i, s in enumerate(rows.tolist()):
        if As[s] is not None:
            out[i] = out[i] + (x[i] @ As[s].t() @ Bs[s].t()) * scalings[s]
    return out


def test_stacked_and_segmented_forms_equal_the_per_row_lora():
    As, Bs, sc = _slots()
    x = torch.randn(7, 4, N_IN)
    result = torch.randn(7, 4, N_OUT)
    rows = torch.tensor([1, 0, 2, 2, 3, 1, 2])  # slot 1 and 2 not contiguous, slot 0 adds nothing
    want = _naive(result, x, rows, As, Bs, sc)
    seg = add_grouped_lora(result, x, rows, As, Bs, sc)
    At, Bt, scale = stack_adapters(As, Bs, sc)
    assert At.shape == (4, N_IN, 5) and Bt.shape == (4, 5, N_OUT)  # zero-padded to the largest rank
    stacked = add_stacked(result, x, *gather_rows(At, Bt, scale, rows))
    torch.testing.assert_close(seg, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(seg[1], result[1]) and torch.equal(stacked[1], result[1])  # "no adapter" row
    # farm.serve.lora's inline expression on the same stacks, for the drop-in claim
    n = x.shape[0]
    serve = result + ((x.reshape(n, -1, N_IN) @ At[rows] @ Bt[rows]) * scale[rows].view(n, 1, 1)).view(result.shape)
    assert torch.equal(stacked, serve)


def test_segmented_form_sends_gradients_only_to_each_rows_slot():
    As, Bs, sc = _slots()
    As = [None] + [a.clone().requires_grad_() for a in As[1:]]
    Bs = [None] + [b.clone().requires_grad_() for b in Bs[1:]]
    x = torch.randn(5, 3, N_IN)
    rows = torch.tensor([1, 1, 3, 3, 3])
    out = add_grouped_lora(torch.zeros(5, 3, N_OUT), x, rows, As, Bs, sc)
    out[:2].sum().backward()  # rows of slot 1 only
    assert As[1].grad is not None and float(As[1].grad.abs().sum()) > 0
    assert As[2].grad is None  # slot 2 has no rows: not even in the graph
    assert bool((As[3].grad == 0).all()) and bool((Bs[3].grad == 0).all())


def test_segments_of_uses_slices_for_contiguous_blocks():
    segs = segments_of([2, 2, 0, 1, 1, 1, 0])
    assert segs[2] == slice(0, 2) and segs[1] == slice(3, 6)
    assert segs[0].tolist() == [2, 6]


def test_lora_delta_is_peft_arithmetic():
    g = torch.Generator().manual_seed(1)
    A, B, x = torch.randn(4, N_IN, generator=g), torch.randn(N_OUT, 4, generator=g), torch.randn(3, N_IN, generator=g)
    a, b = torch.nn.Linear(N_IN, 4, bias=False), torch.nn.Linear(4, N_OUT, bias=False)
    with torch.no_grad():
        a.weight.copy_(A)
        b.weight.copy_(B)
    assert torch.equal(lora_delta(x, A, B, 0.5), b(a(x)) * 0.5)
