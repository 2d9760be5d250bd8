"""`farm adapters ...` end to end through the CLI, including a real stock-PEFT adapter: saved by
plain PEFT, imported, fetched back and loaded with stock `PeftModel.from_pretrained`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from farm.catalog import Catalog
from farm.catalog.testing import write_dummy_adapter
from farm.cli import app
from farm.errors import FarmError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def farm(*args: str) -> str:
    """Run `farm ...` in-process; returns stdout, raises the FarmError the real CLI would print."""
    result = runner.invoke(app, list(args), catch_exceptions=True)
    if isinstance(result.exception, FarmError):
        raise result.exception
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.fixture
def src(tmp_path) -> Path:
    return write_dummy_adapter(tmp_path / "adapter", extra=True)


def test_import_list_show_fetch_alias_delete_gc(farm_home, src, tmp_path):
    assert "imported acme/bot@v1" in farm("adapters", "import", str(src), "acme/bot")
    assert json.loads(farm("adapters", "import", str(src), "acme/bot", "--json"))["version"] == 2
    farm("adapters", "import", str(src), "other/bot")
    listed = json.loads(farm("adapters", "list", "--customer", "acme", "--json"))
    assert [v["ref"] for v in listed] == ["acme/bot@v2"]
    assert "other/bot@v1" in farm("adapters", "list")
    shown = json.loads(farm("adapters", "show", "acme/bot@v1", "--json"))
    assert {"ref", "version", "uri", "metrics", "id", "files"} <= set(shown)
    assert shown["uri"] == (farm_home / "catalog" / "acme" / "bot" / "v1").as_uri()
    assert "adapter_model.safetensors" in farm("adapters", "show", "acme/bot")

    assert "acme/bot@prod -> acme/bot@v1" in farm("adapters", "alias", "acme/bot@v1", "prod", "--expect", "none")
    assert json.loads(farm("adapters", "show", "acme/bot@prod", "--json"))["aliases"] == ["prod"]
    with pytest.raises(FarmError, match="alias acme/bot@prod is v1, expected v2; not moved"):
        farm("adapters", "alias", "acme/bot@v2", "prod", "--expect", "v2")
    with pytest.raises(FarmError, match="--expect 'two': expected vN"):
        farm("adapters", "alias", "acme/bot@v2", "prod", "--expect", "two")

    out = json.loads(farm("adapters", "fetch", "acme/bot@prod", str(tmp_path / "got"), "--json"))
    assert out["ref"] == "acme/bot@v1" and (tmp_path / "got" / "adapter_config.json").exists()
    cached = json.loads(farm("adapters", "fetch", "acme/bot", "--json"))["path"]
    assert str(farm_home) in cached

    with pytest.raises(FarmError, match="target of alias"):
        farm("adapters", "delete", "acme/bot@v1")
    assert "deleted acme/bot@v1 and alias(es) prod" in farm("adapters", "delete", "acme/bot@v1", "--force")
    with pytest.raises(FarmError, match=r"no adapter acme/bot@v1: deleted at"):
        farm("adapters", "show", "acme/bot@v1")
    assert json.loads(farm("adapters", "gc", "--grace", "0", "--json")) == {
        "removed_incomplete": [], "finished_deletes": [], "repaired_latest": []}
    farm("adapters", "alias", "acme/bot@v2", "canary")
    assert "removed alias acme/bot@canary (was v2)" in farm("adapters", "alias", "acme/bot", "canary", "--remove")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "acme/../etc"], "bad adapter ref 'acme/../etc'"),
        (["show", "Acme/bot"], "character(s) 'A' not allowed"),
        (["show", "s3://bucket/x"], "URL schemes are not allowed"),
        (["show", "acme/nope"], "no adapter acme/nope: no published version"),
        (["fetch", "acme/%2e%2e"], "percent-encoding is not allowed"),
        (["delete", "acme/bot"], "name the version to delete"),
        (["import", "/does/not/exist", "acme/bot"], "does not exist or is not a directory"),
        (["import", ".", "acme/bot@v3"], "the version is assigned"),
        (["alias", "acme/bot@v1", "latest"], "bad alias 'latest'"),
        (["gc", "--grace", "-5"], "grace period must be >= 0"),
        (["list", "--customer", "../x"], "bad customer name '../x'"),
    ],
)
def test_cli_errors_are_clear(farm_home, src, args, message):
    Catalog().publish("acme", "bot", src, {})
    with pytest.raises(FarmError) as exc:
        farm("adapters", *args)
    assert message in str(exc.value)


def test_real_cli_prints_one_line_and_exits_2(farm_home, tmp_path):
    bad = tmp_path / "pickled"
    write_dummy_adapter(bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04.")
    proc = subprocess.run([sys.executable, "-c", "from farm.cli import main; main()", "adapters", "import",
                           str(bad), "acme/bot"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FARM_HOME": str(farm_home), "COLUMNS": "300"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "refusing pickle weight file(s) adapter_model.bin" in proc.stderr


def test_real_cli_refuses_a_symlinked_file_naming_it(farm_home, tmp_path):
    folder = write_dummy_adapter(tmp_path / "linked")
    (tmp_path / "secret").write_text("host file")
    (folder / "README.md").symlink_to(tmp_path / "secret")
    proc = subprocess.run([sys.executable, "-c", "from farm.cli import main; main()", "adapters", "import",
                           str(folder), "acme/bot"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FARM_HOME": str(farm_home), "COLUMNS": "300"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "README.md is a symbolic link" in proc.stderr and Catalog().list() == []


@pytest.mark.s3
def test_cli_on_s3_catalog(s3_env, monkeypatch, src, tmp_path, farm_home):
    monkeypatch.setenv("FARM_CATALOG", s3_env)
    farm("adapters", "import", str(src), "acme/bot")
    assert json.loads(farm("adapters", "show", "acme/bot", "--json"))["uri"] == f"{s3_env}/acme/bot/v1"
    assert [v["ref"] for v in json.loads(farm("adapters", "list", "--json"))] == ["acme/bot@v1"]
    farm("adapters", "fetch", "acme/bot", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors").read_bytes()


def _tiny_base(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_stock_peft_adapter_imports_fetches_and_loads(farm_home, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # non-zero B, so the comparison means something
    model = get_peft_model(_tiny_base(seed=0), lora).eval()
    model.save_pretrained(tmp_path / "saved")
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(FarmError, match=r"refusing pickle weight file\(s\) adapter_model.bin"):
        farm("adapters", "import", str(pickled), "acme/tiny")

    v = json.loads(farm("adapters", "import", str(tmp_path / "saved"), "acme/tiny", "--json"))
    peft_info = v["metadata"]["peft"]
    assert peft_info["r"] == 4 and sorted(peft_info["target_modules"]) == ["q_proj", "v_proj"]
    assert peft_info["params"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    farm("adapters", "fetch", "acme/tiny@v1", str(tmp_path / "fetched"))

    loaded = PeftModel.from_pretrained(_tiny_base(seed=0), tmp_path / "fetched")  # a clean base
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    want = dict(model.named_parameters())[key]
    got = dict(loaded.named_parameters())[key]
    assert torch.equal(want, got) and want.abs().sum() > 0
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
