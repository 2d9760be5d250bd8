"""Choosing the next token per row (greedy, temperature, top-p; a per-request seeded generator)
and finding stop strings in a row's text."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampler:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    _gen: object = field(default=None, repr=False)

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

        if self.greedy:
            return int(logits.argmax())
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
