"""The training policy schema and the chat format's `weight: 0` in training data (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from farm.finetune.policy import TrainingPolicy, default_policy, policy_from_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_default_policy_has_the_demo_manifests_training_settings(tmp_path):
    from farm.manifest import load_manifest

    p = default_policy(str(tmp_path))
    assert p.base_model == str(tmp_path.resolve())
    assert (p.default_batch_size, p.learning_rate, p.max_seq_len) == (16, 3e-3, 64)
    assert p.lora.r == 16 and p.lora.modules_to_save == ["lm_head"]
    assert p.checkpoint_every == 50 and p.gpus == 1
    # the package's defaults and the shipped demo manifest do not drift apart
    demo = policy_from_manifest(load_manifest(ROOT / "jobs" / "customer_x.yaml"), str(tmp_path.resolve()))
    assert p == demo


def test_default_policy_needs_no_checkout_as_in_an_installed_wheel(tmp_path):
    import shutil

    shutil.copytree(ROOT / "farm", tmp_path / "site" / "farm", ignore=shutil.ignore_patterns("__pycache__"))
    code = (f"import farm.finetune.policy as p; assert p.__file__.startswith({str(tmp_path)!r}); "
            "print(p.default_policy('org/base', max_epochs=4).max_epochs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "4"


def test_policy_is_a_standalone_schema_a_serve_config_can_embed():
    class ServeFile(BaseModel):
        training_policy: dict[str, TrainingPolicy]

    doc = ServeFile.model_validate({"training_policy": {"tiny": {"base_model": "/m", "max_epochs": 5}}})
    assert doc.training_policy["tiny"].max_epochs == 5
    for name, field in TrainingPolicy.model_fields.items():
        assert field.description, f"TrainingPolicy.{name} has no docstring"


def test_policy_reports_every_bad_field():
    with pytest.raises(ValidationError) as exc:
        TrainingPolicy(base_model="/m", max_epochs=0, nonsense=1)
    text = str(exc.value)
    assert "max_epochs" in text and "nonsense" in text
    with pytest.raises(ValidationError, match="default_epochs 3 is over max_epochs 2"):
        TrainingPolicy(base_model="/m", max_epochs=2)


def test_policy_and_validation_import_nothing_heavy():
    code = ("import sys, farm.finetune.policy, farm.finetune.validate, farm.finetune.hyper; "
            "print(','.join(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_chat_weight_zero_turn_is_not_trained(tmp_path, tiny_llama):
    from farm.manifest import DatasetSpec
    from farm.modeling import load_tokenizer
    from farm.train.data import IGNORE_INDEX, prepare_data

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there.", "weight": 0},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye now."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    tok = load_tokenizer(str(tiny_llama))
    spec = DatasetSpec(train=str(path), eval=str(path), format="chat")
    row = prepare_data(spec, task="causal_lm", tokenizer=tok, max_seq_len=256, seed=0).train[0]
    trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert "Goodbye now." in trained and "Hello there." not in trained
    # without the weight both turns are trained
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    path.write_text(json.dumps({"messages": plain}) + "\n")
    row = prepare_data(spec, task="causal_lm", tokenizer=tok, max_seq_len=256, seed=0).train[0]
    trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert "Goodbye now." in trained and "Hello there." in trained


def test_chat_weight_must_be_zero_or_one(tmp_path, tiny_llama):
    from farm.errors import DataError
    from farm.manifest import DatasetSpec
    from farm.modeling import load_tokenizer
    from farm.train.data import prepare_data

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b", "weight": 0.5}]}) + "\n")
    spec = DatasetSpec(train=str(path), eval=str(path), format="chat")
    with pytest.raises(DataError, match="weight must be 0 or 1"):
        prepare_data(spec, task="causal_lm", tokenizer=load_tokenizer(str(tiny_llama)), max_seq_len=64, seed=0)
