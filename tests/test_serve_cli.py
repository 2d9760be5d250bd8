"""`farm serve` refusals and the key store, without starting Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from farm.errors import FarmError
from farm.serve.auth import KeyStore, hash_key
from farm.serve.config import ServeConfig, check_bind, is_loopback


def test_no_keys_refuses_non_loopback_before_starting_anything():
    from typer.testing import CliRunner

    from farm.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--base-model", "x"])
    assert result.exit_code != 0 and "without API keys" in str(result.exception)
    check_bind("127.0.0.1", 0)
    check_bind("0.0.0.0", 1)
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_cli_module_stays_light():
    code = "import sys, farm.cli.serve; print(any(m in sys.modules for m in ('torch', 'ray', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_keystore_file_env_and_lookup(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - sha256: {hash_key('k1')}\n    customer: acme\n  - sha256: {hash_key('k2')}\n    role: admin\n")
    store = KeyStore.load(f, env=f"{hash_key('k3')}=customer:globex")
    assert store.authenticate("Bearer k1").customer == "acme"
    assert store.authenticate("Bearer k2").admin
    assert store.authenticate("Bearer k3").customer == "globex"
    assert store.authenticate("Bearer nope") is None and store.authenticate(None) is None
    assert KeyStore().authenticate(None).admin  # no keys: loopback-only dev mode
    f.write_text("keys:\n  - sha256: plaintext-key\n    customer: acme\n")
    with pytest.raises(FarmError, match="not a sha256"):
        KeyStore.load(f, env="")
    with pytest.raises(FarmError, match="customer:<name>"):
        KeyStore.load(None, env=f"{hash_key('x')}=root")


def test_config_checks_all_at_once():
    with pytest.raises(FarmError) as e:
        ServeConfig(base_model="m", replicas=0, routing="random")
    assert "replicas" in str(e.value) and "routing" in str(e.value)


def _cli(args, cwd, **env):
    """`farm serve ...` as a user runs it (a subprocess in `cwd`); (exit code, stdout + stderr)."""
    import os
    from pathlib import Path

    proc = subprocess.run([str(Path(sys.executable).parent / "farm"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "", **env}, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_base_that_cannot_load_fails_before_ray_starts_with_one_line(tmp_path):
    """Missing folder (relative, as the README writes it), a folder without weights, and a hub id
    with the hub offline: exit 2 with one line naming the base and the cause, no Ray, no traceback."""
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "config.json").write_text("{}")
    cases = {
        "models/tiny-lama": f"no such model folder in {tmp_path / 'models'}",
        "models/broken": f"{tmp_path / 'models' / 'broken'}: no weights (*.safetensors)",
        "some-org/some-model": "HF_HUB_OFFLINE is set",
    }
    for base, cause in cases.items():
        rc, out = _cli(["serve", "--base-model", base], tmp_path, HF_HUB_OFFLINE="1")
        assert rc == 2, out
        assert "cannot serve base" in out and cause in out, out
        assert "Traceback" not in out and "Started Serve" not in out and "Ray" not in out, out


def test_relative_flags_are_made_absolute_before_deploying(tmp_path, monkeypatch):
    """Replicas and the vLLM worker run in other folders: what deploy receives holds absolute paths
    (base, keys file, catalog), each relative to the folder `farm serve` ran in."""
    from tests.serve_helpers import serve_cli_deploys

    (tmp_path / "keys.yaml").write_text(f"keys:\n  - sha256: {hash_key('k1')}\n    customer: acme\n")
    model, seen = serve_cli_deploys(tmp_path, monkeypatch, "--keys", "keys.yaml", "--catalog", "cat",
                                    "--engine", "vllm", "--quantization", "none")
    (cfg,) = seen
    assert cfg.base_model == str(model) and cfg.keys_file == str(tmp_path / "keys.yaml")
    assert cfg.catalog_url == str(tmp_path / "cat") and cfg.engine == "vllm"


def test_a_failed_replica_is_reported_as_its_own_error_line():
    """Serve's status after a replica constructor raised: startup_failure finds it and keeps the
    replica's own error line (not Serve's wrapper or the traceback)."""
    from types import SimpleNamespace as NS

    from farm.serve.startup import replica_error, startup_failure

    message = ("Deployment 'AdapterServer' in application 'farm' failed to start 3 replicas, retrying. "
               "The last error was:\nray::ServeReplica:farm:AdapterServer.initialize_and_get_metadata()\n"
               "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
               "farm.errors.ModelError: base_model '/m': no weights in the folder\n")
    assert replica_error(message) == "ModelError: base_model '/m': no weights in the folder"
    assert replica_error("") == "no error message"
    starting = NS(status="DEPLOYING", message="", deployments={"AdapterServer": NS(
        status="UPDATING", status_trigger="CONFIG_UPDATE_STARTED", message="")})
    assert startup_failure(starting) is None
    failed = NS(status="DEPLOYING", message="", deployments={"AdapterServer": NS(
        status="UPDATING", status_trigger="REPLICA_STARTUP_FAILED", message=message)})
    assert startup_failure(failed) == ("AdapterServer", "ModelError: base_model '/m': no weights in the folder")
    gone = NS(status="DEPLOY_FAILED", message="RuntimeError: boom", deployments={})
    assert startup_failure(gone) == ("application", "RuntimeError: boom")
