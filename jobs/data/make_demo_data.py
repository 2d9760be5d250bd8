"""Regenerate the demo datasets under jobs/data/ (seeded, so the files are reproducible).

customer_x: a support assistant for an invented product, as prompt/completion pairs (causal LM).
customer_y: short product reviews labelled positive/negative/neutral (sequence classification).
preference/: customer_x's questions as preference pairs (method dpo): chosen the right answer, rejected
the answer to another question about the same device. In a folder of its own: the tiny models'
tokenizer is trained on the files directly under jobs/data/ (farm/tiny.py), and stays as it was.

    python jobs/data/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

PRODUCTS = ["router", "thermostat", "doorbell", "speaker", "camera", "lamp", "plug", "sensor"]
COLORS = ["red", "blue", "green", "white", "amber"]
ACTIONS = {
    "reset": "hold the {p} button for ten seconds until the light blinks {c}.",
    "pair": "open the farm app, tap add device and choose {p}; the light turns {c} when paired.",
    "update": "the {p} updates itself at night; a {c} light means an update is running.",
    "return": "you can return the {p} within thirty days; print the label from your account page.",
    "charge": "plug the {p} into the wall for two hours; the light stays {c} while charging.",
}


def support_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        p, c = rng.choice(PRODUCTS), rng.choice(COLORS)
        action = rng.choice(list(ACTIONS))
        rows.append(
            {
                "prompt": f"Customer: How do I {action} my {c} {p}?\nAgent:",
                "completion": " To " + action + " it, " + ACTIONS[action].format(p=p, c=c),
            }
        )
    return rows


GOOD = ["love", "great", "works perfectly", "excellent", "fantastic", "very happy with"]
BAD = ["hate", "broken", "stopped working", "terrible", "awful", "very unhappy with"]
MEH = ["okay", "average", "fine I guess", "nothing special", "does the job", "so-so"]


def review_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative", "neutral"])
        words = {"positive": GOOD, "negative": BAD, "neutral": MEH}[label]
        p = rng.choice(PRODUCTS)
        rows.append({"text": f"The {p} is {rng.choice(words)}. {rng.choice(words).capitalize()}.", "label": label})
    return rows


def preference_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        p, c = rng.choice(PRODUCTS), rng.choice(COLORS)
        action, wrong = rng.sample(list(ACTIONS), 2)
        rows.append(
            {
                "prompt": f"Customer: How do I {action} my {c} {p}?\nAgent:",
                "chosen": " To " + action + " it, " + ACTIONS[action].format(p=p, c=c),
                "rejected": " To " + wrong + " it, " + ACTIONS[wrong].format(p=p, c=c),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(1234)
    write_jsonl(HERE / "customer_x_train.jsonl", support_rows(rng, 480))
    write_jsonl(HERE / "customer_x_eval.jsonl", support_rows(rng, 48))
    write_jsonl(HERE / "customer_y_reviews.jsonl", review_rows(rng, 360))
    prefs = random.Random(2024)  # its own stream: the files above stay byte for byte as they were
    (HERE / "preference").mkdir(exist_ok=True)
    write_jsonl(HERE / "preference" / "customer_x_prefs_train.jsonl", preference_rows(prefs, 240))
    write_jsonl(HERE / "preference" / "customer_x_prefs_eval.jsonl", preference_rows(prefs, 24))


if __name__ == "__main__":
    main()
