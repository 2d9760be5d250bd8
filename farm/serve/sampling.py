"""Choosing the next token per row (greedy, temperature, top-k, top-p; a per-request seeded generator)
and finding stop strings in a row's text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bounds of every sampling field (the API refuses values outside them with a 400 naming the field).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch.Generator.manual_seed accepts
TEMPERATURE_MIN = 0.01  # below it (and above 0) logits / temperature overflow float32: 0 means greedy
TEMPERATURE_MAX = 2.0


def sampling_problems(temperature: float, top_p: float, seed: int | None, top_k: int = 0) -> list[str]:
    """What is wrong with these sampling settings (empty = fine), each naming the field. top_k 0 or -1
    is off (vLLM's and Tinker's -1)."""
    problems = []
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or not (
        temperature == 0 or TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX
    ):
        problems.append(f"temperature: {temperature!r} is not 0 (greedy) or in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(f"top_p: {top_p!r} is not in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX):
        problems.append(f"seed: {seed!r} is not an integer in [-2**63, 2**63 - 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        problems.append(f"top_k: {top_k!r} is not a whole number >= 1, or 0 / -1 (off)")
    return problems


@dataclass
class Sampler:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # the k most likely tokens only; 0 or -1: off
    _gen: object = field(default=None, repr=False)

    def problems(self) -> list[str]:
        return sampling_problems(self.temperature, self.top_p, self.seed, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self):
        import torch

        if self._gen is None:
            self._gen = torch.Generator()
            if self.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(self.seed)
        return self._gen

    def sample(self, logits) -> int:
        """One token id from a row's 1-D float logits."""
        import torch

        if self.greedy or self.top_k == 1:
            return int(logits.argmax())
        if 0 < self.top_k < logits.shape[-1]:  # vLLM's order: top-k, then temperature and top-p
            kth = logits.topk(self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = (cum - sorted_p) >= self.top_p
            sorted_p[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator()))


def find_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of text can be streamed now: hold back a possible stop-string prefix at the end and
    a trailing replacement char (an incomplete multi-byte character)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end
