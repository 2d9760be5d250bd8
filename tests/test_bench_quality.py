"""bench/quality.py's data split and baselines (no download: synthetic rows)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402


def _rows(n: int = 400) -> list[tuple[str, int]]:
    return [(f"review {i} {'great fun' if i % 2 else 'dull mess'}", i % 2) for i in range(n)]


def test_the_held_out_rows_are_balanced_seeded_and_disjoint_from_training():
    train, test = quality.split(_rows(), 200, seed=0)
    assert len(test) == 200 and sum(y for _, y in test) == 100
    assert not {t for t, _ in train} & {t for t, _ in test} and len(train) == 200
    assert quality.split(_rows(), 200, seed=0) == (train, test)
    assert quality.split(_rows(), 200, seed=1)[1] != test


def test_the_chat_rows_carry_the_label_as_the_only_answer():
    msgs = quality.messages("a gorgeous film", 1)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[-1]["content"] == "positive"
    assert quality.messages("a gorgeous film")[-1]["role"] == "user"


def test_bag_of_words_baselines_learn_a_separable_toy_task():
    train, test = quality.split(_rows(), 100, seed=0)
    got = quality.baselines(train, test)
    assert got["majority class"] == 0.5
    assert got["bag-of-words Naive Bayes"] == got["bag-of-words logistic regression"] == 1.0
