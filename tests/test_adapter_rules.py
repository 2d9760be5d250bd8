"""The allow-list's config rules, without a model: initializers that rewrite the shared base are
refused by name (PEFT's own list, read from the installed LoraConfig), the harmless ones pass, and
the inert config the replica loads from has every initializer off."""

from __future__ import annotations

import json

import pytest

from farm.catalog import Catalog
from farm.catalog.adapter_rules import ALLOWED_INIT, INITIALIZER_OPTIONS, check_config, inert_config
from farm.catalog.testing import write_dummy_adapter
from farm.errors import CatalogError
from tests.serve_helpers import peft_initializers

SAVED = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none",
         "init_lora_weights": True, "loftq_config": {}, "eva_config": None, "corda_config": None,
         "lora_ga_config": None, "kasa_config": None}  # as PEFT 0.21's save_pretrained writes them


def _option(override: dict) -> str:
    """The option a refusal must name: the initializer's config if one is set, else init_lora_weights."""
    return next((k for k in override if k != "init_lora_weights"), "init_lora_weights")


@pytest.mark.parametrize("override", peft_initializers(), ids=lambda o: json.dumps(o))
def test_every_peft_initializer_is_refused_naming_the_option(override):
    problems = check_config({**SAVED, **override})
    assert problems, override
    named = " ".join(problems)
    assert _option(override) in named and "shared base" in named
    if "init_lora_weights" in override:
        assert "only true, false or 'gaussian' are accepted" in named


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_harmless_initializers_and_peft_defaults_pass(init):
    assert check_config({**SAVED, "init_lora_weights": init}) == []
    assert check_config({k: v for k, v in SAVED.items() if k not in INITIALIZER_OPTIONS + ("init_lora_weights",)}) == []


@pytest.mark.parametrize("init", [1, 0, "True", "GAUSSIAN", "olora ", None, ["pissa"]])
def test_look_alike_init_values_are_refused(init):
    assert any("init_lora_weights" in p for p in check_config({**SAVED, "init_lora_weights": init}))


def test_inert_config_switches_every_initializer_off():
    cfg = inert_config({**SAVED, "init_lora_weights": "olora", "kasa_config": {}, "loftq_config": {"loftq_bits": 4},
                        "runtime_config": {"ephemeral_gpu_offload": True}})
    assert cfg["init_lora_weights"] is False
    assert not set(cfg) & {*INITIALIZER_OPTIONS, "runtime_config"}
    assert {k: cfg[k] for k in ("r", "lora_alpha", "target_modules")} == {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert False in ALLOWED_INIT  # the inert value is itself one the allow-list accepts


@pytest.mark.parametrize("override", [{"init_lora_weights": "olora"}, {"kasa_config": {}}], ids=["olora", "kasa"])
def test_import_and_publish_refuse_initializers_and_write_nothing(tmp_path, override):
    folder = write_dummy_adapter(tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **override}))
    cat = Catalog((tmp_path / "catalog").as_uri())
    for attempt in (lambda: cat.import_adapter(folder, "acme/bot"), lambda: cat.publish("acme", "bot", folder, {})):
        with pytest.raises(CatalogError, match=f"adapter refused: {_option(override)}"):
            attempt()
    assert cat.list() == [] and cat.store.children("acme/bot") == []
