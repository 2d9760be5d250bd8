"""`farm plan`: counts from a meta-device model equal PEFT's on the real one, the Llama-2-7B figure
from the QLoRA literature, adapter size equal to what PEFT writes, footprints per quantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from farm.errors import ManifestError
from farm.manifest import parse_manifest
from farm.plan import plan


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> Path:
    """A Llama-2-7B-shaped config.json and nothing else: plan must not need weights."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama-2-7b-config")
    LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    ).save_pretrained(d)
    assert [p.name for p in d.iterdir()] == ["config.json"]
    return d


def manifest(base: Path, **over):
    data = {
        "customer": "acme",
        "adapter": "bot",
        "base_model": str(base),
        "dataset": {"train": "/data/t.jsonl"},
    }
    data.update(over)
    return parse_manifest(data)


def peft_counts(m) -> tuple[int, int, object]:
    """PEFT's own count on the real (tiny) model, loaded with its weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from farm.train.builders import lora_config

    if m.task == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(m.base_model, num_labels=len(m.class_labels))
    else:
        model = AutoModelForCausalLM.from_pretrained(m.base_model)
    pm = get_peft_model(model, lora_config(m))
    return (*pm.get_nb_trainable_parameters(), pm)


def test_llama2_7b_r8_q_v_is_4194304(llama7b_dir):
    r = plan(manifest(llama7b_dir, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    # 32 layers x 2 modules x r*(4096+4096)
    assert r["params"]["trainable"] == 4_194_304 == 32 * 2 * 8 * (4096 + 4096)
    assert r["params"]["base"] == 6_738_415_616
    assert r["params"]["total"] == 6_738_415_616 + 4_194_304
    assert r["params"]["trainable_percent"] == pytest.approx(0.0622, abs=1e-4)
    assert r["adapter"]["data_bytes"] == 4_194_304 * 4
    assert r["adapter"]["tensors"] == 128


def test_llama2_7b_footprints(llama7b_dir):
    r = plan(manifest(llama7b_dir, lora={"target_modules": ["q_proj", "v_proj"]}))
    modes = {m["mode"]: m for m in r["footprint"]["modes"]}
    assert r["footprint"]["selected"] == "nf4-dq"
    # Every transformer-block Linear is quantized; embed_tokens, norms and lm_head are not.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert {m["linear_params"] for m in modes.values()} == {linear}
    other = 6_738_415_616 - linear
    assert other == 2 * 32000 * 4096 + (2 * 32 + 1) * 4096
    assert modes["fp32"]["total_bytes"] == 4 * 6_738_415_616
    assert modes["bf16"]["total_bytes"] == 2 * 6_738_415_616
    assert modes["nf4"]["bits_per_linear_param"] == modes["fp4"]["bits_per_linear_param"] == 4.5
    assert modes["nf4-dq"]["bits_per_linear_param"] == pytest.approx(4.127, abs=1e-3)
    assert modes["int8"]["bits_per_linear_param"] == pytest.approx(8.0, abs=0.01)
    for key in ("int8", "nf4", "nf4-dq"):
        assert modes[key]["other_bytes"] == 2 * other  # unquantized parts stay 16-bit
    assert 3.8e9 < modes["nf4-dq"]["total_bytes"] < modes["nf4"]["total_bytes"] < 4.2e9


@pytest.mark.parametrize(
    "arch, over",
    [
        ("llama", {}),
        # lora.bias all|lora_only is refused at validate (issue 9), so r and targets vary here
        ("llama", {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}),
        ("llama", {"task": "seq_cls", "labels": ["neg", "pos"]}),
        ("gpt2", {}),  # all-linear over Conv1D c_attn/c_fc/c_proj
        ("gpt2", {"task": "seq_cls", "labels": ["a", "b", "c"], "lora": {"target_modules": ["c_attn"]}}),
    ],
)
def test_counts_equal_peft_on_real_model(tiny_models, arch, over):
    m = manifest(tiny_models[arch], **over)
    r = plan(m)
    trainable, total, _ = peft_counts(m)
    assert (r["params"]["trainable"], r["params"]["total"]) == (trainable, total)
    if m.task == "seq_cls":
        assert "score" in r["lora"]["modules_to_save"]


def test_adapter_size_equals_saved_file(tiny_llama, tmp_path):
    m = manifest(tiny_llama, lora={"r": 4})
    r = plan(m)
    _, _, pm = peft_counts(m)
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size == r["adapter"]["file_bytes"]


def test_unknown_target_module_lists_modules(tiny_gpt2):
    with pytest.raises(ManifestError) as info:
        plan(manifest(tiny_gpt2, lora={"target_modules": ["q_proj"]}), source="job.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("lora.target_modules: ")
    assert problem.endswith("(linear modules in this model: c_attn, c_fc, c_proj)")


def test_plan_cli_table_and_json(llama7b_dir, tmp_path):
    from farm.cli import app

    f = tmp_path / "job.yaml"
    f.write_text(
        f"customer: acme\nadapter: bot\nbase_model: {llama7b_dir}\n"
        "lora: {r: 8, target_modules: [q_proj, v_proj]}\ndataset: {train: t.jsonl}\n"
    )
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(f)])
    assert res.exit_code == 0, res.output
    assert "4,194,304 (0.0622%)" in res.output
    for label in ("none, fp32", "none, bf16/fp16", "int8", "nf4 + dq", "fp4"):
        assert label in res.output
    assert "4.127" in res.output and "4.500" in res.output

    res = runner.invoke(app, ["plan", str(f), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["params"]["trainable"] == 4_194_304
    assert data["footprint"]["selected"] == "nf4-dq"


def test_plan_cli_bad_manifest_is_one_clear_error(tmp_path):
    from farm.cli import app

    f = tmp_path / "job.yaml"
    f.write_text("customer: acme\nadapter: bot\nbase_model: ./missing-model\ndataset: {train: t.jsonl}\n")
    res = CliRunner().invoke(app, ["plan", str(f)])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert "no such directory" in str(res.exception)
