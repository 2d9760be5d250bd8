"""The training engine (farm.train.engine) in-process on the tiny NF4 Llama: a solo job is a pack of
one, and resume is bit-exact for solo and packed members.

Bit-exact here means bytes: the adapter_model.safetensors a member exports after an uninterrupted
run equals, byte for byte, the one it exports after being checkpointed mid-run, dropped with its
whole engine (a killed worker: the base is loaded again from disk) and resumed from that checkpoint.
The runs use dropout, gradient accumulation, several epochs, an eval cadence and early stopping's
best-weights bookkeeping, so every piece of state a checkpoint must carry is exercised.
The Ray wrapper (farm.train.pack_loop) adds run storage and the channel; tests/test_pack_e2e.py kills
a real pack worker and checks the resumed job there.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402

from farm.errors import TrainingError  # noqa: E402
from farm.train.engine import Engine  # noqa: E402
from farm.train.methods import MethodBase  # noqa: E402
from farm.train.modelops import build_base  # noqa: E402
from farm.train.spec import MemberSpec, OptimSpec  # noqa: E402

PAD, VOCAB = 0, 600


def _rows(seed: int, n: int) -> dict:
    """n tokenized rows (column -> list), loss on the second half of each."""
    g = torch.Generator().manual_seed(seed)
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g).tolist()
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * length)
        cols["labels"].append([-100] * (length // 2) + ids[length // 2:])
    return cols


def _spec(job_id: str, seed: int, *, steps: int = 6, r: int = 4, targets=("q_proj", "v_proj"), accum: int = 2,
          eval_every: int | None = 2, patience: int | None = 5, identity: dict | None = None) -> MemberSpec:
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=list(targets), task_type="CAUSAL_LM")
    optim = OptimSpec(optimizer="adamw", learning_rate=5e-3, weight_decay=0.01, max_grad_norm=1.0,
                      lr_scheduler="linear", warmup_ratio=0.1, batch_size=2, grad_accum=accum, seed=seed,
                      total_steps=steps, eval_every=eval_every, checkpoint_every=3, early_stopping_patience=patience)
    return MemberSpec(job_id=job_id, lora=lora, optim=optim, pad_token_id=PAD, identity=identity)


def _engine(path) -> Engine:
    model, footprint = build_base({"source": str(path), "revision": None, "task": "causal_lm",
                                   "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "auto"}}, "cpu")
    return Engine(model, torch.device("cpu"), footprint=footprint, base_source=str(path))


def _admit(engine: Engine, spec: MemberSpec, resume=None):
    seed = spec.optim.seed
    # 5 train rows at batch 2: 3 micro-batches an epoch, so 6 steps x accum 2 span 4 epochs
    return engine.admit(spec, _rows(seed, 5), _rows(seed + 1, 4), resume=resume)


def _train(engine: Engine, folder, *, kill_after: int | None = None) -> dict[str, tuple[dict, bytes]]:
    """Step until every member is done: {job: (final metrics, bytes of its exported adapter)}.
    Checkpoints go to folder/<job>/ckpt-<step> on each member's cadence; with `kill_after` the run
    stops (as a killed worker does: no goodbye) once a member reaches that step."""
    out: dict[str, tuple[dict, bytes]] = {}
    for _ in range(200):
        if not engine.members:
            return out
        for up in engine.step():
            assert up.failed is None, up.failed
            m = engine.members[up.job_id]
            if up.done:
                final = engine.finish(m)
                where = engine.write_checkpoint(m, _mkdir(folder / up.job_id / "final"), final=True)
                out[up.job_id] = (final, (where / "adapter_model.safetensors").read_bytes())
                engine.release(up.job_id)
            elif up.checkpoint_due:
                engine.write_checkpoint(m, _mkdir(folder / up.job_id / f"ckpt-{up.metrics['step']}"), final=False)
            if kill_after is not None and up.metrics and up.metrics["step"] >= kill_after:
                return out
    raise AssertionError("engine did not finish")


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def _curve(final: dict, history: list[dict]) -> list:
    timing = {"train_seconds", "step_seconds", "tokens_per_s", "attempt_resumed_from"}
    return [{k: v for k, v in h.items() if k not in timing} for h in history] + [final["eval_loss"]]


def _assert_resume_is_bit_exact(path, tmp_path, specs: list[MemberSpec]) -> None:
    whole = _engine(path)
    members = {s.job_id: _admit(whole, s) for s in specs}
    uninterrupted = _train(whole, tmp_path / "whole")
    histories = {j: m.state["history"] for j, m in members.items()}

    killed = _engine(path)
    for s in specs:
        _admit(killed, s)
    assert _train(killed, tmp_path / "killed", kill_after=4) == {}  # past the step-3 checkpoints, then gone
    del killed

    resumed = _engine(path)  # a new worker: the base loaded again, each member from its last checkpoint
    again = {s.job_id: _admit(resumed, s, resume=tmp_path / "killed" / s.job_id / "ckpt-3") for s in specs}
    assert {j: m.resumed_from for j, m in again.items()} == {s.job_id: 3 for s in specs}
    finished = _train(resumed, tmp_path / "resumed")

    for s in specs:
        final_a, bytes_a = uninterrupted[s.job_id]
        final_b, bytes_b = finished[s.job_id]
        assert bytes_a == bytes_b, f"{s.job_id}: the resumed adapter differs from the uninterrupted one"
        assert _curve(final_a, histories[s.job_id]) == _curve(final_b, again[s.job_id].state["history"])
        assert final_b["step"] == s.optim.total_steps
    # training moved the weights (equal bytes are not two untouched inits: PEFT starts B at zero)
    from safetensors.torch import load

    for s in specs:
        weights = load(uninterrupted[s.job_id][1])
        assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 1e-4


def test_a_solo_job_is_a_pack_of_one_and_resumes_bit_exact(tiny_llama, tmp_path):
    _assert_resume_is_bit_exact(tiny_llama, tmp_path, [_spec("solo", seed=7)])


def test_packed_jobs_resume_bit_exact(tiny_llama, tmp_path):
    # different ranks, targets and seeds on one base; the same accumulation, so they checkpoint together
    _assert_resume_is_bit_exact(tiny_llama, tmp_path, [
        _spec("a", seed=1, r=4, targets=("q_proj", "v_proj")),
        _spec("b", seed=2, r=8, targets=("q_proj", "k_proj", "o_proj"), patience=None),
    ])


def test_a_checkpoint_of_another_job_is_refused_and_the_pack_is_untouched(tiny_llama, tmp_path):
    engine = _engine(tiny_llama)
    mine = _spec("mine", seed=3, identity={"job_id": "mine", "customer": "acme"})
    _admit(engine, mine)
    _train(engine, tmp_path / "first")
    other = _engine(tiny_llama)
    _admit(other, _spec("keep", seed=4))
    thief = _spec("mine", seed=3, identity={"job_id": "mine", "customer": "globex"})
    with pytest.raises(TrainingError, match="holds a checkpoint of another job"):
        _admit(other, thief, resume=tmp_path / "first" / "mine" / "ckpt-3")
    assert sorted(other.members) == ["keep"] and sorted(other.pack.jobs) == ["keep"]
    assert "keep" in _train(other, tmp_path / "second")


def test_an_unknown_method_is_refused_by_name(tiny_llama):
    from dataclasses import replace

    engine = _engine(tiny_llama)
    with pytest.raises(ValueError, match="training method 'ppo'.*sft"):
        _admit(engine, replace(_spec("x", seed=1), method="ppo"))
    assert not engine.members and not engine.pack.jobs


class PerSequenceSFT(MethodBase):
    """The method example of docs/architecture.md: SFT whose loss weights every sequence equally."""

    name = "sft-per-sequence"

    def loss(self, model, logits, batch):
        import torch.nn.functional as F

        tgt = batch["labels"][:, 1:]
        tok = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        mask = (tgt != -100).float()
        return ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def test_a_method_supplies_the_loss_and_packs_beside_sft(tiny_llama, monkeypatch):
    from dataclasses import replace

    from farm.train import methods

    monkeypatch.setitem(methods.METHODS, "sft-per-sequence", PerSequenceSFT)
    engine = _engine(tiny_llama)
    custom = replace(_spec("custom", seed=7, accum=1, eval_every=None), method="sft-per-sequence")
    _admit(engine, custom)
    _admit(engine, _spec("plain", seed=10, accum=1, eval_every=None))
    # seed 7: the first micro-batch has 5 and 3 label tokens, so per-sequence and per-token means differ.
    # the step-1 loss of each member is its method's loss on its first micro-batch under the base alone
    # (LoRA B starts at zero, so the adapted model is the base); rows of unequal lengths make the two differ
    firsts = {}
    for j, m in engine.members.items():
        idx = m.batches[0]
        batch = m.collate([{k: m.train_rows[k][i] for k in m.train_rows} for i in idx])
        engine.model.eval()
        with torch.no_grad(), engine.pack.rows({}):
            logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        engine.model.train()
        firsts[j] = (float(PerSequenceSFT().loss(engine.model, logits, batch)),
                     float(methods.SFT().loss(engine.model, logits, batch)))
    ups = {u.job_id: u for u in engine.step()}
    assert ups["custom"].metrics["loss"] == pytest.approx(firsts["custom"][0], abs=2e-4)
    assert ups["plain"].metrics["loss"] == pytest.approx(firsts["plain"][1], abs=2e-4)
    assert abs(firsts["custom"][0] - firsts["custom"][1]) > 1e-3  # the methods do differ on these rows
