"""The compatibility key of packed training (farm.pack_key) and the queue's claim by key."""

from __future__ import annotations

from farm.manifest import Manifest
from farm.pack_key import alone_reason, pack_key
from farm.queue import SQLiteStore


def _m(**over) -> Manifest:
    doc = {"customer": "acme", "adapter": "bot", "base_model": "/models/tiny", "dataset": {"train": "t.jsonl"}}
    for k, v in over.items():
        section, _, field = k.partition("__")
        if field:
            doc.setdefault(section, {})[field] = v
        else:
            doc[k] = v
    return Manifest.model_validate(doc)


def test_jobs_on_the_same_loaded_base_share_a_key_whatever_their_lora():
    a = _m()
    b = _m(customer="globex", lora__r=16, lora__alpha=4, lora__dropout=0.0, lora__target_modules=["q_proj"],
           training__learning_rate=1e-3, training__seed=7)
    assert pack_key(a) is not None and pack_key(a) == pack_key(b)


def test_a_different_base_load_changes_the_key():
    k = pack_key(_m())
    for over in ({"base_model": "/models/other"}, {"revision": "v2"}, {"quantization": "int8"},
                 {"double_quant": False}, {"compute_dtype": "bf16"}, {"resources__gpus": 2}):
        assert pack_key(_m(**over)) != k, over


def test_what_runs_alone_says_why_and_has_no_key():
    cases = {
        "resources.pack is false": _m(resources__pack=False),
        "task seq_cls": _m(task="seq_cls", num_labels=2),
        "modules_to_save": _m(lora__modules_to_save=["lm_head"]),
    }
    for why, m in cases.items():
        assert why in alone_reason(m) and pack_key(m) is None


def test_the_default_pack_field_keeps_old_manifest_hashes():
    m = _m()
    doc = m.model_dump(mode="json")
    del doc["resources"]["pack"]
    del doc["alias"], doc["alias_policy"], doc["method"], doc["dpo"]  # later fields, also left out at their defaults
    del doc["dataset"]["chosen_column"], doc["dataset"]["rejected_column"]
    import hashlib
    import json

    old = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m.content_hash() == old
    assert _m(resources__pack=False).content_hash() != old


def test_claim_by_key_takes_the_next_compatible_job_in_priority_order(tmp_path):
    store = SQLiteStore(tmp_path / "q.db")
    other = store.submit(_m(customer="c1", adapter="x", base_model="/models/other"), priority=50).job_id
    low = store.submit(_m(customer="c2", adapter="y"), priority=0).job_id
    high = store.submit(_m(customer="c3", adapter="z"), priority=10).job_id
    alone = store.submit(_m(customer="c4", adapter="w", resources__pack=False), priority=90).job_id
    key = store.get(low).pack_key
    assert store.get(alone).pack_key is None
    got = [store.claim_next("o", lease_ttl=30, pack_key=key).id for _ in range(2)]
    assert got == [high, low]
    assert store.claim_next("o", lease_ttl=30, pack_key=key) is None
    # the unfiltered claim still goes by priority across keys
    assert store.claim_next("o", lease_ttl=30).id == alone
    job = store.claim_next("o", lease_ttl=30)
    assert job.id == other
    assert store.set_pack(job.id, job.lease_id, "p1", "joined pack p1")
    assert store.get(job.id).pack == "p1" and store.get(job.id).to_dict()["pack"] == "p1"
    assert store.events(job.id)[-1].reason == "joined pack p1"
    assert not store.set_pack(job.id, "not-the-lease", "p2", "joined pack p2")
