"""Preference tuning (DPO) as a method of the training engine, in-process on the tiny Llama.

The anchor is TRL's DPOTrainer (trl on the registry, a dev dependency only): the same LoRA, started from
the same weights, the same pairs, seed and hyperparameters give the same loss curve, the same reward
accuracy and the same held-out metrics. The rest: a DPO member packs beside an SFT member of another
tenant and each ends where its solo run ends; bad preference rows and manifests are refused naming the
file, row and field.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from peft import LoraConfig  # noqa: E402

from farm.errors import DataError, ManifestError  # noqa: E402
from farm.manifest import DatasetSpec, parse_manifest  # noqa: E402
from farm.modeling import load_tokenizer  # noqa: E402
from farm.train.data import check_data, load_prepared  # noqa: E402
from farm.train.engine import Engine  # noqa: E402
from farm.train.modelops import build_base  # noqa: E402
from farm.train.spec import MemberSpec, OptimSpec  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "data" / "customer_x_train.jsonl"


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Support answers as preference pairs: chosen the right answer, rejected another question's."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for r in rows[:n]:
        other = rng.choice([o for o in rows if o["completion"] != r["completion"]])
        out.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": other["completion"]})
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _engine(path, quant: str = "nf4") -> Engine:
    q = {"mode": quant, "double_quant": quant == "nf4", "compute_dtype": "fp32" if quant == "none" else "auto"}
    model, footprint = build_base({"source": str(path), "revision": None, "task": "causal_lm", "quant": q}, "cpu")
    return Engine(model, torch.device("cpu"), footprint=footprint, base_source=str(path))


def _spec(job_id: str, method: str, *, steps: int, lr: float = 2e-2, batch: int = 8, seed: int = 0,
          dropout: float = 0.0, options: dict | None = None) -> MemberSpec:
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    optim = OptimSpec(optimizer="adamw", learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler="linear",
                      warmup_ratio=0.0, batch_size=batch, grad_accum=1, seed=seed, total_steps=steps)
    return MemberSpec(job_id=job_id, lora=lora, optim=optim, pad_token_id=0, method=method, method_options=options)


def _run(engine: Engine) -> dict[str, list[dict]]:
    """Step until every member is done: {job: its per-step metrics, then its final metrics}."""
    out: dict[str, list[dict]] = {j: [] for j in engine.members}
    while engine.members:
        for up in engine.step():
            assert up.failed is None, up.failed
            out[up.job_id].append(up.metrics)
            if up.done:
                out[up.job_id].append(engine.finish(engine.members[up.job_id]))
                engine.release(up.job_id)
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl_dpo_trainer(tiny_llama, tmp_path, loss_type):
    """Same LoRA init (the engine's, exported as a PEFT folder and loaded into TRL), pairs, seed and
    settings: TRL's per-step loss and reward accuracy and its held-out metrics are the engine's."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    steps, lr, beta = 6, 2e-2, 0.1
    pairs = _pairs(16)
    tok = load_tokenizer(str(tiny_llama), None)
    spec = DatasetSpec(train=_write(tmp_path / "train.jsonl", pairs[:8]), eval=_write(tmp_path / "eval.jsonl", pairs[8:]))
    data = load_prepared(spec, tok, task="causal_lm", max_seq_len=128, seed=0, method="dpo")

    engine = _engine(tiny_llama, quant="none")  # TRL gets the plain fp32 base: no quantization in the way
    options = {"beta": beta, "loss_type": loss_type}
    member = engine.admit(_spec("d", "dpo", steps=steps, lr=lr, options=options), data.train, data.eval)
    engine.pack.export_adapter("d", tmp_path / "init", str(tiny_llama))  # A random, B zero: the common start
    farm = _run(engine)["d"]

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "init"), is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                     learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, max_steps=steps, beta=beta,
                     max_length=128, logging_steps=1, report_to=[], seed=0, weight_decay=0.0, max_grad_norm=1.0,
                     optim="adamw_torch", use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, fp16=False,
                     loss_type=[loss_type])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs[:8]),
                         eval_dataset=Dataset.from_list(pairs[8:]), processing_class=tok)
    trainer.train()
    trl = [h for h in trainer.state.log_history if "loss" in h]
    trl_eval = trainer.evaluate()

    start = math.log(2) if loss_type == "sigmoid" else (1 / (2 * beta)) ** 2  # the adapter starts at zero
    assert farm[0]["loss"] == pytest.approx(start, abs=1e-5) and trl[0]["loss"] == pytest.approx(start, abs=1e-5)
    assert [m["loss"] for m in farm[:steps]] == pytest.approx([h["loss"] for h in trl], abs=1e-4, rel=1e-5)
    assert [m["reward_accuracy"] for m in farm[:steps]] == [h["rewards/accuracies"] for h in trl]
    assert farm[steps - 1]["loss"] < start * 0.95  # it learned
    final = farm[-1]
    assert final["eval_loss"] == pytest.approx(trl_eval["eval_loss"], abs=1e-4, rel=1e-5)
    assert final["eval_reward_accuracy"] >= trl_eval["eval_rewards/accuracies"] - 1e-6
    assert final["eval_reward_margin"] == pytest.approx(trl_eval["eval_rewards/margins"], abs=1e-4)
    assert member.train_rows["ref_chosen_logps"]  # the reference was scored once, before training


def test_a_dpo_member_packs_beside_an_sft_member_and_ends_as_alone(tiny_llama, tmp_path):
    """One grouped forward for a DPO job and another tenant's SFT job on the NF4 base: each member's
    losses and adapter are those of its solo run (to float tolerance: the batch shapes differ)."""
    tok = load_tokenizer(str(tiny_llama), None)
    pref = load_prepared(DatasetSpec(train=_write(tmp_path / "p.jsonl", _pairs(24))), tok, task="causal_lm",
                         max_seq_len=64, seed=0, method="dpo")
    sft = load_prepared(DatasetSpec(train=str(DEMO)), tok, task="causal_lm", max_seq_len=64, seed=0)
    specs = {"dpo": (_spec("dpo", "dpo", steps=4, batch=4, dropout=0.1, options={"beta": 0.2}), pref),
             "sft": (_spec("sft", "sft", steps=4, batch=4, lr=5e-3, seed=3), sft)}

    def adapters(engine: Engine) -> dict:
        return {j: {k: v.clone() for k, v in engine.pack.state_dict(j).items()} for j in engine.members}

    solo = {}
    for j, (spec, data) in specs.items():
        e = _engine(tiny_llama)
        e.admit(spec, data.train, data.eval)
        got = {}
        while e.members:
            got.setdefault("weights", adapters(e)[j])
            for up in e.step():
                got.setdefault("losses", []).append(up.metrics["loss"])
                if up.done:
                    got["weights"] = adapters(e)[j]
                    got["final"] = e.finish(e.members[j])
                    e.release(j)
        solo[j] = got

    packed = _engine(tiny_llama)
    for spec, data in specs.values():
        packed.admit(spec, data.train, data.eval)
    losses: dict[str, list] = {j: [] for j in specs}
    weights, finals = {}, {}
    while packed.members:
        ups = packed.step()
        assert {u.job_id for u in ups} == set(packed.members)  # one grouped step stepped both
        for up in ups:
            losses[up.job_id].append(up.metrics["loss"])
            assert up.metrics["pack_jobs"] == 2
            if up.done:
                weights[up.job_id] = adapters(packed)[up.job_id]
                finals[up.job_id] = packed.finish(packed.members[up.job_id])
        for up in ups:
            if up.done:
                packed.release(up.job_id)

    assert losses["dpo"][0] == pytest.approx(math.log(2), abs=1e-6)
    for j in specs:
        assert losses[j] == pytest.approx(solo[j]["losses"], abs=1e-4), j
        for k, v in weights[j].items():
            torch.testing.assert_close(v, solo[j]["weights"][k], atol=1e-4, rtol=1e-3)
        assert finals[j]["eval_loss"] == pytest.approx(solo[j]["final"]["eval_loss"], abs=1e-4)
    assert {"eval_reward_accuracy", "eval_reward_margin", "eval_reward_chosen", "eval_reward_rejected"} <= set(finals["dpo"])
    assert "eval_reward_accuracy" not in finals["sft"]
    # DPO's members cost two sequences a row: a step's tokens count both sides of each pair
    assert finals["dpo"]["tokens"] > 0


@pytest.mark.parametrize(("row", "column", "message"), [
    ({"prompt": "Q:", "chosen": " a"}, "rejected", "must be a string or a list of one assistant message"),
    ({"prompt": "Q:", "chosen": " a", "rejected": "  "}, "rejected", "must not be empty"),
    ({"prompt": "Q:", "chosen": " same", "rejected": " same"}, "rejected", "is the same as 'chosen'"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "prompt", "must not be empty"),
    ({"prompt": [{"role": "tool", "content": "x"}], "chosen": " a", "rejected": " b"}, "prompt", "role must be one of"),
    ({"prompt": "Q:", "chosen": [{"role": "user", "content": "a"}], "rejected": " b"}, "chosen",
     "list of one assistant message"),
    ({"prompt": "word " * 80, "chosen": " a", "rejected": " b"}, "prompt",
     "leaves no room for the response within max_seq_len=32"),
])
def test_bad_preference_rows_name_file_row_and_column(tiny_llama, tmp_path, row, column, message):
    rows = _pairs(3) + [row]
    path = _write(tmp_path / "prefs.jsonl", rows)
    tok = load_tokenizer(str(tiny_llama), None)
    with pytest.raises(DataError) as err:
        check_data(DatasetSpec(train=path, eval=path), task="causal_lm", tokenizer=tok, max_seq_len=32, seed=0,
                   method="dpo")
    text = str(err.value)
    assert path in text and "line 4" in text and f"column {column!r}" in text and message in text, text


def test_chat_prompts_and_conversational_responses_tokenize_like_trl(tiny_llama, tmp_path):
    """TRL's conversational form: the prompt as messages, each response one assistant message; the
    response tokens start after the template's generation prompt."""
    row = {"prompt": [{"role": "user", "content": "How do I reset my red sensor?"}],
           "chosen": [{"role": "assistant", "content": "Hold the button."}],
           "rejected": [{"role": "assistant", "content": "Buy a new one."}]}
    path = _write(tmp_path / "chat.jsonl", [row, row])
    tok = load_tokenizer(str(tiny_llama), None)
    d = load_prepared(DatasetSpec(train=path, eval=path), tok, task="causal_lm", max_seq_len=256, seed=0, method="dpo")
    prompt = list(tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                          add_generation_prompt=True)["input_ids"])
    ids, labels = d.train["input_ids"][0], d.train["labels"][0]
    assert ids[:len(prompt)] == prompt and all(t == -100 for t in labels[:len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):] and tok.decode(ids[len(prompt):]).startswith("Hold")
    assert d.train["rejected_input_ids"][0][:len(prompt)] == prompt


def test_method_and_data_must_agree(tiny_llama, tmp_path):
    prefs = _write(tmp_path / "prefs.jsonl", _pairs(4))
    tok = load_tokenizer(str(tiny_llama), None)
    with pytest.raises(DataError, match="preference rows .* train with method: dpo"):
        check_data(DatasetSpec(train=prefs), task="causal_lm", tokenizer=tok, max_seq_len=64, seed=0)
    with pytest.raises(DataError, match="method dpo trains on preference rows.*format prompt_completion"):
        check_data(DatasetSpec(train=str(DEMO)), task="causal_lm", tokenizer=tok, max_seq_len=64, seed=0, method="dpo")


def _manifest(**extra) -> dict:
    return {"customer": "acme", "adapter": "prefs", "base_model": "m", "dataset": {"train": "p.jsonl"}, **extra}


@pytest.mark.parametrize(("extra", "message"), [
    ({"method": "dpo", "training": {"packing": True}}, "training.packing: not with method dpo"),
    ({"dpo": {"beta": 0.2}}, "dpo: only with method: dpo"),
    ({"method": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
    ({"method": "dpo", "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}}, "only with loss_type sigmoid"),
    ({"method": "dpo", "task": "seq_cls", "num_labels": 2}, "method: dpo trains task causal_lm only"),
    ({"method": "ppo"}, "method"),
    ({"dataset": {"train": "p.jsonl", "format": "preference"}}, "preference needs method: dpo"),
])
def test_bad_dpo_manifests_are_refused(extra, message):
    with pytest.raises(ManifestError, match=message.replace(".", r"\.")) as err:
        parse_manifest(_manifest(**extra), "job.yaml")
    assert "job.yaml" in str(err.value)


def test_a_dpo_manifest_parses_with_its_settings():
    sft = parse_manifest(_manifest(), "a.yaml")
    dpo = parse_manifest(_manifest(method="dpo", dpo={"beta": 0.3}), "b.yaml")
    assert sft.method_options == {}
    assert dpo.method_options == {"beta": 0.3, "label_smoothing": 0.0, "loss_type": "sigmoid"}
    assert dpo.content_hash() != parse_manifest(_manifest(method="dpo"), "c.yaml").content_hash()
    assert "by dpo" in dpo.summary()
