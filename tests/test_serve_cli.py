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
