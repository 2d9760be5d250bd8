"""A pack's memory: sized by every member (farm.plan.pack_fits, PackChannel's admission), and an
out-of-memory step fails the one member with the largest micro-batch while the others step on
(farm.train.pack_step.pack_step_isolating_oom; the OOM is injected into the real tiny NF4 Llama's
forward, since this box has no GPU to run out of)."""

from __future__ import annotations

import pytest

from farm.manifest import parse_manifest
from farm.plan import PACK_MEMORY_SHARE, pack_estimate, pack_fits
from farm.train.pack_run import PackChannel

GB = 10**9


def _entry(job_id: str, job_bytes: int | None, base_bytes: int = 10 * GB) -> dict:
    return {"job_id": job_id, "memory": None if job_bytes is None else {"base_bytes": base_bytes, "job_bytes": job_bytes}}


def _gpu_pack(gpu_bytes: int = 40 * GB) -> PackChannel:
    ch = PackChannel("p", "pk-x", limit=8, explicit_limit=False, on_gpu=None)
    assert ch.offer(_entry("first", 5 * GB))
    ch.set_device(True)
    ch.set_estimate({"base_bytes": 10 * GB, "job_bytes": 5 * GB})
    ch.derive_limit(gpu_bytes)
    return ch


def test_pack_fits_counts_the_base_and_every_member():
    assert pack_fits(10 * GB, [5 * GB, 20 * GB], 40 * GB)  # 35 <= 36
    assert not pack_fits(10 * GB, [5 * GB, 20 * GB, 2 * GB], 40 * GB)  # 37 > 0.9 x 40
    assert PACK_MEMORY_SHARE == 0.9


def test_a_later_member_with_a_larger_batch_is_refused_when_it_does_not_fit():
    ch = _gpu_pack()
    # the first job's estimate alone would allow (36 - 10) // 5 = 5 jobs; sized by all members:
    assert ch.limit == 5
    assert ch.offer(_entry("big", 20 * GB))  # 10 + 5 + 20 = 35 GB <= 36
    assert not ch.offer(_entry("small", 2 * GB))  # 37 GB: refused, though the count limit has room
    assert ch.room() > 0 and "small" not in ch.members
    why = ch.take_refusals()
    assert len(why) == 1 and "small" in why[0] and str(2 * GB) in why[0] and str(40 * GB) in why[0]
    ch.finish({"job_id": "big", "ok": True})  # its bytes leave with it
    assert ch.offer(_entry("small", 2 * GB)) and ch.member_bytes == {"first": 5 * GB, "small": 2 * GB}
    ch.leave("small")
    assert ch.member_bytes == {"first": 5 * GB}


def test_a_gpu_pack_takes_one_job_until_its_memory_is_known():
    ch = PackChannel("p", "pk-x", limit=4, explicit_limit=True, on_gpu=None)
    assert ch.offer(_entry("first", GB))
    assert ch.room() == 0 and not ch.offer(_entry("second", GB))
    assert "not known yet" in ch.take_refusals()[0]
    ch.set_device(True)
    assert ch.room() == 0  # on a GPU: still waiting for the worker's report
    ch.derive_limit(80 * GB)
    assert ch.limit == 4  # explicit --pack-max stands, memory is checked on top
    assert ch.room() == 3 and ch.offer(_entry("second", GB))


def test_a_cpu_pack_is_limited_by_count_alone_as_before():
    ch = PackChannel("p", "pk-x", limit=2, explicit_limit=True, on_gpu=False)
    assert ch.offer(_entry("a", None)) and ch.offer(_entry("b", 10**15))
    assert not ch.offer(_entry("c", None)) and ch.take_refusals() == []


def test_each_members_estimate_grows_with_its_own_batch_and_sequence_length(tiny_llama):
    def est(bs: int, seq: int) -> dict:
        return pack_estimate(parse_manifest({"customer": "acme", "adapter": "bot", "base_model": str(tiny_llama),
                                             "dataset": {"train": "/data/t.jsonl"},
                                             "training": {"batch_size": bs, "max_seq_len": seq}}))

    small, big = est(1, 64), est(8, 256)
    assert small["base_bytes"] == big["base_bytes"] and big["job_bytes"] > small["job_bytes"]


# ---- one member's out-of-memory step --------------------------------------------------------------


torch = pytest.importorskip("torch")


def test_an_out_of_memory_step_fails_the_largest_member_alone_and_the_others_step_exactly_without_it(tiny_llama):
    from tests.test_pack_lora import PAD, W_TOL, Run, _max_diff, _three_jobs

    def pack_after_round_one():
        run = Run(tiny_llama)
        for j in _three_jobs():
            run.add(j)
        run.round()
        return run

    # reference: in round two b is simply not there
    ref = pack_after_round_one()
    ref.trainers["b"].failed = "left"
    ref.round()

    run = pack_after_round_one()
    real_forward = run.model.forward
    calls = []

    def forward(*args, **kwargs):  # the device "runs out" whenever b's 3 rows are in the batch
        rows = kwargs["input_ids"].shape[0]
        calls.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(*args, **kwargs)

    run.model.forward = forward
    from farm.train.pack_step import pack_step_isolating_oom

    micro = {j: run.jobs[j].micro(t.micro_total) for j, t in run.trainers.items()}
    res = pack_step_isolating_oom(run.model, run.pack, run.trainers, micro, PAD)
    assert calls == [6, 3]  # a + b + c failed, a + c ran
    assert res["b"].failed and res["b"].out_of_memory and "out of device memory" in res["b"].failed
    assert "3 rows" in res["b"].failed and run.trainers["b"].failed
    assert all(p.grad is None for p in run.pack.parameters("b"))
    for j in ("a", "c"):
        assert not res[j].failed and res[j].stepped
        assert _max_diff(run.pack.state_dict(j), ref.pack.state_dict(j)) == 0.0 <= W_TOL
    run.model.forward = real_forward
    run.round()  # the pack goes on without b


def test_a_lone_member_that_runs_out_of_memory_fails_and_nothing_is_left_to_step(tiny_llama):
    from tests.test_pack_lora import PAD, Run, _three_jobs

    run = Run(tiny_llama)
    run.add(_three_jobs()[0])

    def forward(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    run.model.forward = forward
    from farm.train.pack_step import pack_step_isolating_oom

    res = pack_step_isolating_oom(run.model, run.pack, run.trainers, {"a": run.jobs["a"].micro(0)}, PAD)
    assert list(res) == ["a"] and res["a"].out_of_memory and run.trainers["a"].failed
