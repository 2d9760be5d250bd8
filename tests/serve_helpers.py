"""Shared setup of the serving tests (no tests here): adapters for any tiny base, API keys, deploying
an app and waiting for it to answer, and publishing a new version under live traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.waiting import wait_for

KEYS = {"acme": "acme-secret-key", "globex": "globex-secret-key", "admin": "admin-secret-key"}
PROMPT = "Hello there, how are"


def write_keys_file(home: Path) -> Path:
    """keys.yaml with KEYS: acme and globex as customers, admin as the admin role."""
    from farm.serve.auth import hash_key

    keys_file = home / "keys.yaml"
    keys_file.write_text(
        "keys:\n"
        f"  - sha256: {hash_key(KEYS['acme'])}\n    customer: acme\n"
        f"  - sha256: {hash_key(KEYS['globex'])}\n    customer: globex\n"
        f"  - sha256: {hash_key(KEYS['admin'])}\n    role: admin\n"
    )
    return keys_file


@dataclass
class Switch:
    """What publish_under_traffic saw: (sent, received, model) per answer, and when things happened."""

    seen: list[tuple[float, float, str]]
    publishing: float  # publish() called
    published: float  # publish() returned
    first_new: float  # first answer from the new version received


def publish_under_traffic(make_client: Callable[[], object], model: str, new_ref: str, publish: Callable[[], None],
                          *, warm: int, after: int, timeout: float) -> Switch:
    """Two threads send greedy completions to `model` while `publish()` puts a new version up. Waits on
    events, not a clock: `warm` answers first, then an answer from `new_ref` to a request sent after the
    publish returned, then `after` more answers to requests sent after that first new answer."""
    stop = threading.Event()
    seen: list[tuple[float, float, str]] = []

    def traffic():
        c = make_client()
        while not stop.is_set():
            sent = time.monotonic()
            r = c.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
            seen.append((sent, time.monotonic(), r.model))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) >= warm, timeout=timeout, what=f"traffic on {model}")
        publishing = time.monotonic()
        publish()
        published = time.monotonic()
        wait_for(lambda: any(m == new_ref and s > published for s, _, m in list(seen)), timeout=timeout,
                 what=f"a {new_ref} answer to a request sent after the publish")
        first_new = min(rcv for s, rcv, m in list(seen) if m == new_ref)
        wait_for(lambda: sum(s > first_new for s, _, _ in list(seen)) >= after, timeout=timeout,
                 what=f"requests sent after the first {new_ref} answer")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout)
    return Switch(list(seen), publishing, published, first_new)

# LoRA targets per tiny architecture (farm/tiny.py): Llama's projections, GPT-2's fused Conv1D layers.
TARGETS = {"llama": [["q_proj", "v_proj", "o_proj", "up_proj"], ["q_proj", "k_proj", "down_proj"]],
           "gpt2": [["c_attn"], ["c_attn", "c_proj"]]}


def make_lora(base: Path, dest: Path, seed: int, arch: str) -> Path:
    """A LoRA adapter made with stock PEFT on `base`, with a large random B so greedy output changes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    torch.manual_seed(seed)
    model = load_base_model(str(base), device="cpu")
    cfg = LoraConfig(r=4 + seed % 3, lora_alpha=32, target_modules=TARGETS[arch][seed % 2], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(40.0)
    peft_model.save_pretrained(dest)
    return dest


def wait_healthy(base_url: str, timeout: float = 180) -> None:
    def healthy():
        try:
            return httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=timeout, what="the deployment's /healthz", every=0.5)


def peft_initializers() -> list[dict]:
    """adapter_config.json overrides naming each initializer the installed PEFT offers (read from
    LoraConfig's annotation, so a new PEFT's additions are covered), plus lora_ga and KaSA, which
    the annotation does not list, and each initializer's own config."""
    import typing

    from peft import LoraConfig

    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    names = [v for arg in typing.get_args(hint) for v in typing.get_args(arg) if isinstance(v, str)]
    assert len(names) >= 8, f"no initializer names in LoraConfig's annotation {hint}"
    names = [("pissa_niter_4" if "[" in n else n) for n in names if n != "gaussian"]
    out = [{"init_lora_weights": n} for n in dict.fromkeys(names + ["lora_ga"])]
    out += [{"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
            {"eva_config": {"rho": 2.0}}, {"corda_config": {"corda_method": "kpm"}}, {"lora_ga_config": {}},
            {"kasa_config": {}}]
    return out


def with_config(src: Path, dest: Path, **overrides) -> Path:
    """A copy of adapter folder `src` whose adapter_config.json has `overrides` applied."""
    import json
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**cfg, **overrides}))
    return dest


def serve_cli_deploys(tmp_path: Path, monkeypatch, *args: str) -> tuple[Path, list]:
    """Run `farm serve --base-model models/m *args` in tmp_path (an empty model folder there) up to the
    point it deploys, without Ray: returns the model folder and the ServeConfigs deploy received."""
    from typer.testing import CliRunner

    import farm.cluster
    import farm.raycluster
    import farm.serve.app
    from farm.cli import app

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    seen: list = []

    class Deployed(Exception):
        pass

    def fake_deploy(cfgs, store):
        seen.extend(cfgs)
        raise Deployed

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(farm.cluster, "use_running_farm", lambda: None)
    monkeypatch.setattr(farm.raycluster, "connect", lambda *a, **k: None)
    monkeypatch.setattr(farm.serve.app, "deploy", fake_deploy)
    result = CliRunner().invoke(app, ["serve", "--base-model", "models/m", *args])
    assert isinstance(result.exception, Deployed), result.output
    return model, seen
