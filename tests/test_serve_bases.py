"""Routing an adapter version to its served base from its lineage (farm/serve/bases.py), no Ray."""

from __future__ import annotations

import pytest

from farm.serve.auth import Principal
from farm.serve.bases import ServedBase, base_of
from farm.serve.limits import ApiError

LLAMA = ServedBase("tiny-llama", "/srv/models/tiny-llama", "a" * 64)
GPT2 = ServedBase("tiny-gpt2", "s3://bucket/models/tiny-gpt2", "b" * 64)
BASES = [LLAMA, GPT2]


def trained(source: str, sha: str) -> dict:
    return {"base_model": {"source": source, "revision": None, "sha256": sha}}


def imported(name: str | None) -> dict:
    return {"source": "import", "peft": {"base_model_name_or_path": name} if name else {}}


def test_trained_adapters_go_by_fingerprint_whatever_the_source_path():
    assert base_of("a/x@v1", trained("/home/alice/tiny-llama", "a" * 64), BASES) is LLAMA
    assert base_of("a/x@v1", trained("models/other-name", "b" * 64), BASES) is GPT2


def test_same_name_other_fingerprint_is_refused_naming_both():
    with pytest.raises(ApiError) as e:
        base_of("a/x@v2", trained("/srv/models/tiny-llama", "c" * 64), BASES)
    assert e.value.status == 422
    msg = e.value.message
    assert "a/x@v2" in msg and "cccccccccccc" in msg and "different fingerprint" in msg
    assert "tiny-llama (fingerprint aaaaaaaaaaaa)" in msg and "tiny-gpt2" in msg
    with pytest.raises(ApiError, match="not served here.*Served bases: tiny-llama"):
        base_of("a/x@v1", trained("meta-llama/Llama-3-8B", "d" * 64), BASES)


def test_imported_adapters_match_name_source_or_folder_name():
    assert base_of("a/y@v1", imported("tiny-llama"), BASES) is LLAMA
    assert base_of("a/y@v1", imported("/srv/models/tiny-llama"), BASES) is LLAMA
    assert base_of("a/y@v1", imported("/elsewhere/tiny-gpt2/"), BASES) is GPT2
    with pytest.raises(ApiError) as e:
        base_of("a/y@v1", imported("Qwen/Qwen2.5-0.5B"), BASES)
    assert e.value.status == 422 and "Qwen/Qwen2.5-0.5B" in e.value.message and "tiny-gpt2" in e.value.message


def test_no_recorded_base_is_served_only_when_there_is_one_base():
    assert base_of("a/z@v1", imported(None), [LLAMA]) is LLAMA
    with pytest.raises(ApiError, match="records no base model"):
        base_of("a/z@v1", imported(None), BASES)
    with pytest.raises(ApiError, match="not served"):  # one base does not make a named other base right
        base_of("a/z@v1", imported("tiny-gpt2"), [LLAMA])


def test_resolver_routes_bare_bases_and_versions_and_lists_parents(tmp_path):
    from farm.catalog import Catalog
    from farm.catalog.testing import write_dummy_adapter
    from farm.serve.resolver import Resolver

    cat = Catalog(tmp_path.as_uri())
    d = write_dummy_adapter(tmp_path / "src")  # base_model_name_or_path: tiny-llama
    cat.publish("acme", "ok", d)
    cat.publish("acme", "trained", d, trained("/x/tiny-gpt2", "b" * 64))
    cat.publish("acme", "stranger", d, trained("/x/mistral", "e" * 64))
    r = Resolver(tmp_path.as_uri(), BASES)
    admin = Principal(None, admin=True)
    assert r.resolve(admin, "tiny-gpt2").base == "tiny-gpt2" and r.resolve(admin, "tiny-gpt2").version is None
    assert r.resolve(admin, "acme/ok").base == "tiny-llama"
    assert r.resolve(admin, "acme/trained@v1").base == "tiny-gpt2"
    with pytest.raises(ApiError) as e:
        r.resolve(admin, "acme/stranger")
    assert e.value.status == 422 and "/x/mistral" in e.value.message
    models = {m["id"]: m for m in r.models(admin)}
    assert {"tiny-llama", "tiny-gpt2"} <= set(models)
    assert models["acme/ok"]["parent"] == "tiny-llama" and models["acme/trained"]["parent"] == "tiny-gpt2"
    assert models["acme/stranger"]["parent"] is None
