"""OpenAI's logprob shapes from engine entries, with the tiny models' real byte-level tokenizer."""

from __future__ import annotations

import pytest

from farm.serve.logprobs import TokenText, _byte_decoder, chat_logprobs, completion_logprobs, prompt_first


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from farm.modeling import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def test_byte_table_covers_the_byte_level_alphabet_once_per_byte():
    from tokenizers import pre_tokenizers

    table = _byte_decoder()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["a"] == ord("a")


def test_token_bytes_join_back_into_the_text_even_across_a_split_character(tok):
    text = "café ☕ ok"
    ids = tok(text, add_special_tokens=False).input_ids
    text_of = TokenText(tok)
    assert b"".join(text_of(i)[1] for i in ids).decode() == text


def test_echo_shape_has_a_null_first_prompt_token_and_offsets_after_the_prompt(tok):
    prompt_ids = tok("Hello there", add_special_tokens=False).input_ids
    out_ids = tok(" friend", add_special_tokens=False).input_ids
    prompt = [prompt_first(prompt_ids[0])] + [[t, -1.0, [[t, -1.0], [0, -2.0]]] for t in prompt_ids[1:]]
    out = [[t, -0.5, [[1, -0.1]]] for t in out_ids]
    lp = completion_logprobs(TokenText(tok), out, prompt, len("Hello there"))
    n = len(prompt_ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [-1.0] * (n - 1) + [-0.5] * len(out_ids)
    assert "".join(lp["tokens"]) == "Hello there friend"
    assert lp["text_offset"][n] == len("Hello there") and lp["text_offset"][0] == 0
    # the chosen token is in its position's dict even when it is not among the alternatives
    assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(n, len(lp["tokens"])))


def test_chat_shape_lists_token_logprob_bytes_and_k_alternatives(tok):
    ids = tok("Hi!", add_special_tokens=False).input_ids
    out = [[t, -0.25, [[t, -0.25], [ids[0], -3.0]]] for t in ids]
    content = chat_logprobs(TokenText(tok), out)["content"]
    assert [c["logprob"] for c in content] == [-0.25] * len(ids)
    assert bytes(b for c in content for b in c["bytes"]).decode() == "Hi!"
    assert all(len(c["top_logprobs"]) == 2 and set(c["top_logprobs"][0]) == {"token", "logprob", "bytes"} for c in content)


def test_alternatives_that_share_a_text_keep_the_larger_logprob(tok):
    ids = tok("ab", add_special_tokens=False).input_ids
    same = [i for i in range(len(tok)) if TokenText(tok)(i)[0] == "\ufffd"][:2]
    assert len(same) == 2, "the byte-level vocabulary has several partial-character tokens"
    out = [[ids[0], -1.5, [[same[0], -1.0], [same[1], -1.2], [ids[0], -1.5]]]]
    top = completion_logprobs(TokenText(tok), out)["top_logprobs"][0]
    assert top["\ufffd"] == -1.0 and len(top) == 2
