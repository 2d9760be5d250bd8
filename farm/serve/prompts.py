"""A request's prompt to token ids, for the ingress: the length check that needs no tokenizer first,
then the chat template and the tokenizer off the event loop.

Rendering a template and tokenizing a 256 KiB prompt takes ~200 ms of CPU; on the ingress's event
loop that stalled every other request of the replica. So:
  1. the prompt's characters are counted (microseconds) and a prompt that cannot fit the context is
     refused with a 400 naming the limit. The limit is exact, not a guess: no token of the vocabulary
     is longer than `longest_token` characters, so a prompt of more than
     (context_length - 1) x longest_token characters has more tokens than the context holds;
  2. what passes is rendered and tokenized on one worker thread per base (fast tokenizers are not
     safe to call from several threads at once: "Already borrowed"), and the token count is then
     checked exactly as before (farm.serve.limits.check_context).
No heavy imports: the tokenizer is handed in.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from farm.serve.limits import ApiError


def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token as stored (bytes-as-characters for byte-level
    BPE, '▁'-prefixed pieces for SentencePiece): never fewer than the text one token can cover."""
    vocab = tokenizer.get_vocab()
    added = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
    return max([len(t) for t in vocab] + [len(t) for t in added] + [1])


@dataclass
class PromptLimit:
    """One base's prompt length limit in characters, and its tokenizer's own thread."""

    context_length: int
    longest_token: int
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="farm-tokenize"))

    @property
    def max_chars(self) -> int:
        return max(1, self.context_length - 1) * self.longest_token

    def check(self, chars: int, what: str = "prompt") -> None:
        """400 when `chars` characters cannot fit the context, whatever they tokenize to."""
        if chars > self.max_chars:
            tokens = max(1, self.context_length - 1)
            raise ApiError(400, f"{what} has {chars} characters, over this model's limit of {self.max_chars} "
                                f"(at most {tokens} prompt tokens in a context of {self.context_length} x at most "
                                f"{self.longest_token} characters per token); shorten it")


def chat_messages(messages) -> list[dict]:
    """The request's messages as the chat template takes them (400 for non-text content)."""
    try:
        return [{"role": m.role, "content": m.text()} for m in messages]
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def _render_and_tokenize(tokenizer, prompt: str | None, messages: list[dict] | None) -> list[int]:
    if messages is None:
        return tokenizer(prompt).input_ids
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ValueError as exc:
        raise ApiError(400, f"messages: {exc}") from None
    return tokenizer(text, add_special_tokens=False).input_ids


async def prompt_ids(tokenizer, limit: PromptLimit, *, prompt: str | None = None,
                     messages: list[dict] | None = None) -> list[int]:
    """Token ids of a completion `prompt` or chat `messages`: characters checked on the loop, the
    template and tokenizer run on the base's tokenizer thread."""
    if messages is not None:
        limit.check(sum(len(m["content"]) for m in messages), "messages")
    else:
        limit.check(len(prompt), "prompt")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(limit.pool, _render_and_tokenize, tokenizer, prompt, messages)


async def classify_ids(tokenizer, limit: PromptLimit, text: str) -> list[int]:
    """Token ids of a /v1/classify input, truncated to the context (long inputs are allowed there),
    tokenized on the base's tokenizer thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        limit.pool, lambda: tokenizer(text, truncation=True, max_length=limit.context_length).input_ids)
