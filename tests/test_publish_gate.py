"""The publish gate (farm.train.gate): OpenAI-named eval metrics, the alias policy and train/serve
parity, on real local Ray Train with the tiny Llama; one short run on the real SmolLM2 base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.catalog import Catalog
from farm.catalog.metadata import AdapterVersion
from farm.errors import TrainingError
from farm.manifest import parse_manifest
from farm.parity import serving_logprobs
from farm.train.gate import PARITY_TOLERANCE, decide
from farm.train.run import run_job

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data"


def _version(n: int, loss: float | None, eval_sha: str = "e", **metrics) -> AdapterVersion:
    m = {"full_valid_loss": loss, **metrics} if loss is not None else metrics
    return AdapterVersion("acme", "bot", n, f"mem://{n}", "", {}, metadata={
        "metrics": m, "datasets": {"eval": {"sha256": eval_sha}}})


def test_if_better_keeps_the_alias_when_the_new_version_scores_worse_on_the_same_rows():
    d = decide("if_better", "prod", _version(2, 1.5, baseline_eval_loss=1.2), _version(1, 9.9))
    assert not d.move and "stays on v1" in d.reason and "1.5000 vs 1.2000" in d.reason


def test_if_better_moves_the_alias_when_the_new_version_is_not_worse():
    assert decide("if_better", "prod", _version(2, 1.2, baseline_eval_loss=1.2), _version(1, 0.1)).move


def test_if_better_without_a_comparable_loss_keeps_the_alias_and_says_why():
    d = decide("if_better", "prod", _version(2, 0.5, eval_sha="new"), _version(1, 0.9, eval_sha="old"))
    assert not d.move and "no comparable eval loss" in d.reason
    # the same eval file: the recorded figures compare
    assert decide("if_better", "prod", _version(2, 0.5), _version(1, 0.9)).move


def test_always_and_an_unset_alias_move_whatever_the_losses():
    assert decide("always", "prod", _version(2, 9.0), _version(1, 0.1)).move
    assert decide("if_better", "prod", _version(1, 9.0), None).move


def test_an_alias_named_like_a_version_is_refused_in_the_manifest():
    from farm.errors import ManifestError

    with pytest.raises(ManifestError, match="alias: 'v3' is reserved"):
        parse_manifest({"customer": "a", "adapter": "b", "base_model": "m", "dataset": {"train": "t.jsonl"},
                        "alias": "v3"})


def _manifest(base: Path, **training) -> dict:
    return {
        "customer": "acme", "adapter": "bot", "base_model": str(base),
        "alias": "prod", "alias_policy": "if_better",
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "dataset": {"train": str(DATA / "customer_x_train.jsonl"), "eval": str(DATA / "customer_x_eval.jsonl"),
                    "format": "prompt_completion"},
        "training": {"max_steps": 20, "learning_rate": 3e-3, "batch_size": 16, "max_seq_len": 64, **training},
        "resources": {"gpus": 0},
    }


@pytest.mark.ray
def test_the_gate_refuses_to_move_the_alias_to_a_deliberately_worse_version(ray_cluster, farm_home, tiny_llama):
    events: list[dict] = []
    good = run_job(parse_manifest(_manifest(tiny_llama)), job_id="job-good", on_progress=events.append,
                   check_parity=serving_logprobs)
    m = good.metadata["metrics"]
    assert {"train_loss", "valid_loss", "full_valid_loss", "full_valid_mean_token_accuracy"} <= set(m)
    assert 0.0 <= m["full_valid_mean_token_accuracy"] <= 1.0
    parity = good.metadata["parity"]
    assert parity["ok"] and parity["tokens"] > 0 and parity["max_abs_logprob_diff"] <= PARITY_TOLERANCE
    cat = Catalog()
    assert cat.aliases(good.ref) == {"prod": 1}

    # The same job barely trained: a version whose eval loss is worse than v1's on the same rows. Its
    # first attempt meets a server that scores every token 0.5 nats lower: the parity gate refuses it.
    def skewed(base, quant, folder, rows):
        return [[v - 0.5 for v in got] for got in serving_logprobs(base, quant, folder, rows)]

    worse_manifest = parse_manifest(_manifest(tiny_llama, max_steps=1, learning_rate=1e-7))
    events.clear()
    with pytest.raises(TrainingError, match="not published: train/serve parity: max \\|logprob difference\\| 5.00e-01"):
        run_job(worse_manifest, job_id="job-worse", on_progress=events.append, check_parity=skewed)
    assert [v.version for v in cat.versions("acme", "bot")] == [1], "a refused version is not published"
    assert any(e.get("event") == "gate" and e["message"].startswith("not published") for e in events)

    # The retry of the same job (the scheduler's next attempt) meets an honest server: published as v2,
    # but the alias stays on the better v1.
    events.clear()
    worse = run_job(worse_manifest, job_id="job-worse", on_progress=events.append, check_parity=serving_logprobs)
    assert worse.version == 2, "the worse version is still published, addressable as @v2"
    wm = worse.metadata["metrics"]
    assert "baseline_eval_loss" in wm, wm
    assert wm["full_valid_loss"] > wm["baseline_eval_loss"] == pytest.approx(m["full_valid_loss"], rel=1e-4)
    assert cat.aliases(worse.ref) == {"prod": 1}, "the alias stays on the better version"
    assert cat.resolve("acme/bot@prod").version == 1
    said = [e["message"] for e in events if e.get("event") == "gate"]
    assert any("alias acme/bot@prod stays on v1: v2 is worse" in s for s in said), said


@pytest.mark.ray
def test_a_short_job_on_the_real_smollm2_base_passes_the_gate(ray_cluster, farm_home, real_model, tmp_path):
    reviews = [("a gorgeous, witty, seductive movie.", "positive"), ("the plot is nothing but boilerplate clichés.", "negative"),
               ("an utterly charming and hilarious film.", "positive"), ("it's a mess: loud, dull and far too long.", "negative")]
    rows = [{"messages": [{"role": "system", "content": "Classify the movie review as positive or negative."},
                          {"role": "user", "content": text}, {"role": "assistant", "content": label}]}
            for text, label in reviews]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    doc = _manifest(real_model, max_steps=2, learning_rate=1e-3, batch_size=2, max_seq_len=64)
    doc["dataset"] = {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "format": "chat"}
    version = run_job(parse_manifest(doc), job_id="job-real", check_parity=serving_logprobs)
    m = version.metadata["metrics"]
    assert m["full_valid_loss"] > 0 and 0.0 <= m["full_valid_mean_token_accuracy"] <= 1.0
    assert version.metadata["parity"]["ok"] and version.metadata["parity"]["tokens"] > 40
    assert Catalog().aliases(version.ref) == {"prod": 1}
