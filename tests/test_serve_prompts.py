"""The ingress's prompt handling (farm/serve/prompts.py) with the tiny model's real tokenizer: an
oversized prompt is refused by its character count before any template or tokenizer runs, and what
is tokenized is tokenized off the event loop's thread, to the same ids as before."""

from __future__ import annotations

import asyncio
import threading

import pytest

from farm.serve import prompts
from farm.serve.limits import ApiError
from farm.serve.protocol import ChatMessage


class Recording:
    """The real tokenizer, noting on which thread each template render / tokenize ran."""

    def __init__(self, tok):
        self.tok, self.threads = tok, []

    def __call__(self, *a, **kw):
        self.threads.append(threading.get_ident())
        return self.tok(*a, **kw)

    def apply_chat_template(self, *a, **kw):
        self.threads.append(threading.get_ident())
        return self.tok.apply_chat_template(*a, **kw)

    def get_vocab(self):
        return self.tok.get_vocab()


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from farm.modeling import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def test_a_256_kib_prompt_is_refused_by_its_length_before_any_tokenizing(tok):
    rec = Recording(tok)
    limit = prompts.PromptLimit(512, prompts.longest_token(tok))
    for kw, what in (({"prompt": "x" * 256 * 1024}, "prompt"),
                     ({"messages": [{"role": "user", "content": "y" * 256 * 1024}]}, "messages")):
        with pytest.raises(ApiError) as e:
            asyncio.run(prompts.prompt_ids(rec, limit, **kw))
        assert e.value.status == 400 and str(limit.max_chars) in e.value.message and what in e.value.message
    assert rec.threads == []  # neither the chat template nor the tokenizer ran


def test_the_character_limit_never_refuses_a_prompt_whose_tokens_fit(tok):
    # the densest text there is: the vocabulary's longest token, repeated
    longest = max(list(tok.get_vocab()) + list(tok.all_special_tokens), key=len)
    limit = prompts.PromptLimit(64, prompts.longest_token(tok))
    text = longest * 63
    assert len(text) == limit.max_chars
    limit.check(len(text))  # at the limit: passes, and the token check decides
    assert len(tok(text + " ").input_ids) >= 63


def test_prompts_are_rendered_and_tokenized_off_the_event_loop_to_the_same_ids(tok):
    rec = Recording(tok)
    limit = prompts.PromptLimit(512, prompts.longest_token(tok))
    messages = prompts.chat_messages([ChatMessage(role="user", content="Where is my order?")])

    async def main():
        loop_thread = threading.get_ident()
        ids = await prompts.prompt_ids(rec, limit, prompt="Hello there")
        chat = await prompts.prompt_ids(rec, limit, messages=messages)
        cls = await prompts.classify_ids(rec, limit, "word " * 2000)
        return loop_thread, ids, chat, cls

    loop_thread, ids, chat, cls = asyncio.run(main())
    assert rec.threads and loop_thread not in rec.threads
    assert ids == tok("Hello there").input_ids
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == tok(text, add_special_tokens=False).input_ids
    assert len(cls) == 512  # classify truncates to the context, as before


def test_non_text_chat_content_is_a_400(tok):
    with pytest.raises(ApiError, match="only text content parts") as e:
        prompts.chat_messages([ChatMessage(role="user", content=[{"type": "image_url", "image_url": {}}])])
    assert e.value.status == 400
