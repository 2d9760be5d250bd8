"""The serve config file (`farm serve --config`): schema, error quality, relative paths, the CLI
shorthand building the same config, and every shipped example loading. No Ray, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from farm.errors import ServeConfigError
from farm.serve.config_file import load_serve_config, parse_serve_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("serve*.yaml"))


def test_examples_exist():
    assert EXAMPLES, "no shipped serve config examples under examples/"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_loads(path):
    sc = load_serve_config(path)
    cfgs = sc.to_configs()
    assert [c.served_name for c in cfgs] == [b.name for b in sc.bases]
    for c in cfgs:  # relative model folders are relative to the file, not the cwd
        assert c.base_model.startswith(str(path.parent.resolve().parent)) or "://" in c.base_model


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub" / "models" / "a").mkdir(parents=True)
    f = tmp_path / "sub" / "serve.yaml"
    f.write_text("keys: keys.yaml\nbases:\n  - name: a\n    model: models/a\n    replicas: 2\n"
                 "  - name: hub\n    model: Qwen/Qwen2.5-0.5B\n    engine: vllm\n    quantization: none\n")
    a, hub = load_serve_config(f).to_configs()
    assert a.base_model == str(tmp_path / "sub" / "models" / "a") and a.replicas == 2
    assert a.keys_file == str(tmp_path / "sub" / "keys.yaml") == hub.keys_file
    assert hub.base_model == "Qwen/Qwen2.5-0.5B" and hub.engine == "vllm" and hub.served_name == "hub"


def test_every_problem_at_once_with_path_value_and_allowed():
    data = {"port": 0, "hots": "x", "bases": [
        {"name": "a/b", "model": "m", "engine": "tgi", "replicas": 0},
        {"name": "ok", "model": "m", "max_adapter": 3, "dtype": "fp8"},
        {"model": "m"},
    ]}
    with pytest.raises(ServeConfigError) as e:
        parse_serve_config(data, source="s.yaml")
    text = str(e.value)
    for want in ("port:", "(got 0)", "hots: unknown key 'hots'; did you mean 'host'?",
                 "bases.0.name:", "'a/b'", "bases.0.engine: must be one of 'auto', 'farm', 'vllm'", "'tgi'",
                 "bases.0.replicas:", "bases.1.max_adapter: unknown key 'max_adapter'; did you mean 'max_adapters'?",
                 "bases.1.dtype: must be one of 'auto', 'bf16', 'fp16', 'fp32'", "'fp8'",
                 "bases.2.name: required field is missing"):
        assert want in text, (want, text)
    assert e.value.source == "s.yaml" and len(e.value.problems) >= 7


def test_duplicate_names_empty_bases_and_bad_files(tmp_path):
    with pytest.raises(ServeConfigError, match="repeated: a"):
        parse_serve_config({"bases": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]})
    with pytest.raises(ServeConfigError, match="bases"):
        parse_serve_config({"bases": []})
    with pytest.raises(ServeConfigError, match="file not found"):
        load_serve_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("bases: [\n")
    with pytest.raises(ServeConfigError, match="invalid YAML"):
        load_serve_config(tmp_path / "bad.yaml")


def test_flags_build_the_same_config_as_a_one_base_file(tmp_path):
    from farm.cli.serve import _one_base

    (tmp_path / "m").mkdir()
    f = tmp_path / "s.yaml"
    f.write_text("port: 9000\nbases:\n  - name: m\n    model: m\n    replicas: 2\n    max_adapters: 3\n"
                 "    dtype: fp32\n")
    from_file = load_serve_config(f).to_configs()[0]
    from_flags = _one_base(str(tmp_path / "m"), None, "nf4", 2, 3, "affinity", 32, None, "127.0.0.1", 9000, 0.0,
                           "auto", None, 16, "fp32")
    assert from_file.to_dict() == from_flags.to_dict() and from_file.dtype == "fp32"


def test_cli_refuses_config_with_base_flags_and_reports_file_errors(tmp_path):
    from farm.cli import app

    f = tmp_path / "s.yaml"
    f.write_text("bases:\n  - name: m\n    model: m\n    engine: tgi\n")
    r = CliRunner().invoke(app, ["serve", "--config", str(f)])
    assert r.exit_code != 0 and "bases.0.engine" in (r.output + str(r.exception))
    r = CliRunner().invoke(app, ["serve", "--config", str(f), "--replicas", "2"])
    assert r.exit_code != 0 and "--replicas" in r.output
    r = CliRunner().invoke(app, ["validate", str(EXAMPLES[0])])
    assert r.exit_code == 0 and "serve config" in r.output and "tiny-llama" in r.output
    r = CliRunner().invoke(app, ["validate", str(f)])
    assert r.exit_code == 1 and "bases.0.engine" in r.output


def test_training_policy_section_overrides_the_package_defaults(tmp_path):
    from farm.finetune.policy import PACKAGE_DEFAULTS, serve_policy

    (tmp_path / "m").mkdir()
    (tmp_path / "train-copy").mkdir()
    f = tmp_path / "s.yaml"
    f.write_text("bases:\n  - name: m\n    model: m\n"
                 "training_policy:\n  base_model: train-copy\n  max_epochs: 4\n  max_concurrent_jobs: 1\n")
    sc = load_serve_config(f)
    policy = serve_policy(sc.bases[0].model, sc.training_policy, str(f))
    assert (policy.max_epochs, policy.max_concurrent_jobs) == (4, 1)
    assert policy.base_model == str(tmp_path / "train-copy")  # relative to the file, like the bases
    assert policy.learning_rate == PACKAGE_DEFAULTS["learning_rate"]  # what the file leaves out
    without = serve_policy(sc.bases[0].model, None, str(f))
    assert without.base_model == str(tmp_path / "m") and without.max_epochs == 10


def test_bad_training_policy_is_reported_with_its_yaml_path_by_validate_and_serve(tmp_path):
    from farm.cli import app

    (tmp_path / "m").mkdir()
    f = tmp_path / "s.yaml"
    f.write_text("bases:\n  - name: m\n    model: m\n"
                 "training_policy:\n  max_epochs: 0\n  lora: {r: 0}\n  max_epoch: 3\n")
    r = CliRunner().invoke(app, ["validate", str(f)])
    assert r.exit_code == 1
    for want in ("training_policy.max_epochs:", "(got 0)", "training_policy.lora.r:",
                 "training_policy.max_epoch: unknown key 'max_epoch'"):
        assert want in r.output, (want, r.output)
    r = CliRunner().invoke(app, ["serve", "--config", str(f)])
    assert r.exit_code != 0 and "training_policy.max_epochs" in (r.output + str(r.exception))


def test_config_file_module_stays_light():
    code = "import sys, farm.serve.config_file; print(any(m in sys.modules for m in ('torch', 'ray', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
