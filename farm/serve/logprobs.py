"""Log-probabilities in the API: what the engines compute per token, and OpenAI's response shapes.

Both engines report a token as an entry `[token_id, logprob, [[alt_id, alt_logprob], ...]]`: the
log-softmax of the model's raw logits at that position (before temperature or top-p; vLLM's
`raw_logprobs` mode), with the k most likely tokens of that position, most likely first. A list of
entries is plain JSON, so it crosses Ray and the vLLM worker's HTTP unchanged. Prompt entries
(echo) start with `[first_id, None, []]`: the first prompt token has no context to be predicted from.

The ingress renders entries with the base's tokenizer. No heavy imports at module level.
"""

from __future__ import annotations

from functools import lru_cache

# Top alternatives per token, both routes: OpenAI's chat cap (top_logprobs <= 20) and vLLM's default
# max_logprobs. Legacy completions capped `logprobs` at 5; the farm accepts up to 20 there too.
LOGPROBS_MAX = 20

Entry = list  # [token_id, logprob, [[alt_id, alt_logprob], ...]]


def entries(logits, token_ids, k: int) -> list[Entry]:
    """One entry per row of `logits` (2-D, positions x vocab) for the token that followed there."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(token_ids, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0].cpu().tolist()
    if k:
        top = lp.topk(k, dim=-1)
        alts = [[[i, v] for i, v in zip(ii, vv)] for ii, vv in zip(top.indices.cpu().tolist(), top.values.cpu().tolist())]
    else:
        alts = [[] for _ in chosen]
    return [[int(t), float(c), a] for t, c, a in zip(ids.cpu().tolist(), chosen, alts)]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (the inverse of its bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """A token id's text and exact UTF-8 bytes under one tokenizer (cached per id).

    Byte-level BPE tokens (GPT-2, Llama 3, SmolLM) map back to their exact bytes, so a token that
    holds part of a multi-byte character still has its true bytes (its text shows U+FFFD there);
    other tokenizers fall back to decoding the one id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tok.convert_ids_to_tokens(int(token_id))
            table = _byte_decoder()
            if isinstance(piece, str) and piece and all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
                if token_id in getattr(self.tok, "all_special_ids", ()):
                    raw = piece.encode()
                hit = (raw.decode("utf-8", errors="replace"), raw)
            else:
                text = self.tok.decode([int(token_id)], skip_special_tokens=False)
                hit = (text, text.encode())
            self._cache[token_id] = hit
        return hit


def completion_logprobs(text_of: TokenText, out: list[Entry], prompt: list[Entry] | None = None,
                        prompt_chars: int = 0) -> dict:
    """Legacy completions' `choices[].logprobs`: tokens, token_logprobs, top_logprobs (a dict per token
    of its alternatives plus the token itself, so up to logprobs + 1 keys) and text_offset. With
    echo, the prompt's entries come first (the first one's logprob and top_logprobs are null) and
    the completion's offsets start after the echoed prompt's `prompt_chars` characters. Offsets add
    up the tokens' texts, as vLLM's do."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = 0
    for i, (tok, lp, alts) in enumerate(list(prompt or []) + list(out)):
        if prompt and i == len(prompt):
            pos = prompt_chars
        text = text_of(tok)[0]
        tokens.append(text)
        lps.append(lp)
        if lp is None:  # the prompt's first token
            tops.append(None)
        else:
            top = {text_of(a)[0]: v for a, v in alts}
            top.setdefault(text, lp)
            tops.append(top)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_first(first_id: int) -> Entry:
    """The entry of a prompt's first token: no logprob, no alternatives."""
    return [int(first_id), None, []]


def chat_logprobs(text_of: TokenText, out: list[Entry]) -> dict:
    """Chat's `choices[].logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for tok, lp, alts in out:
        text, raw = text_of(tok)
        content.append({
            "token": text, "logprob": lp, "bytes": list(raw),
            "top_logprobs": [{"token": text_of(a)[0], "logprob": v, "bytes": list(text_of(a)[1])} for a, v in alts],
        })
    return {"content": content}
