"""`make demo`: submit customers' jobs to the farm (starting one if none runs), wait for each
adapter, then show before/after with stock PEFT on the NF4 base: the base's greedy answers and eval
loss beside the adapter's.

    python -m farm.demo jobs/customer_x.yaml jobs/customer_x_smollm2.yaml
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _farm(*args: str, capture: bool = True) -> str:
    """Run the `farm` CLI exactly as a user would; its progress goes to the terminal."""
    exe = Path(sys.executable).with_name("farm")
    print(f"$ farm {' '.join(args)}", flush=True)
    proc = subprocess.run([str(exe), *args], stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"`farm {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def before_after(ref: str, rows: list[dict], prompt_col: str, completion_col: str, max_new_tokens: int = 32):
    """Greedy answers and the mean completion-token loss over `rows`, of the base (the adapter switched
    off) and of the published adapter, on the NF4 base loaded with stock PEFT."""
    import logging
    import warnings

    # Keep the demo's output to what matters: library notices (bitsandbytes' optional CPU kernel
    # hub, transformers' load bars and deprecations) are not the demo's business.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from peft import PeftModel

    from farm.catalog import Catalog
    from farm.modeling import Quantization, load_base_model, load_tokenizer

    catalog = Catalog()
    version = catalog.resolve(ref)
    path = catalog.fetch(version)
    manifest = version.metadata["manifest"]
    tok = load_tokenizer(manifest["base_model"], manifest.get("revision"))
    base = load_base_model(manifest["base_model"], revision=manifest.get("revision"), quant=Quantization())
    model = PeftModel.from_pretrained(base, path).eval()

    def answers() -> list[str]:
        outs = []
        for row in rows[:3]:
            enc = tok(row[prompt_col], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            outs.append(tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
        return outs

    def loss() -> float:
        total, count = 0.0, 0
        for row in rows:
            prompt = tok(row[prompt_col])["input_ids"]
            ids = tok(row[prompt_col] + row[completion_col])["input_ids"] + [tok.eos_token_id]
            labels = [-100] * len(prompt) + ids[len(prompt):]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            n = sum(1 for x in labels[1:] if x != -100)
            total, count = total + float(out.loss) * n, count + n
        return total / max(count, 1)

    with model.disable_adapter():
        before = (answers(), loss())
    return before, (answers(), loss())


def run_job(manifest_path: Path) -> None:
    """One job the way a customer runs it, then its before/after."""
    print(_farm("validate", str(manifest_path)), end="", flush=True)
    submitted = json.loads(_farm("submit", str(manifest_path), "--json"))
    job_id = submitted[0]["id"]
    _farm("submit", str(manifest_path), "--wait", capture=False)  # same content: same job, now watched
    job = json.loads(_farm("status", job_id, "--json"))
    ref = job["adapter_ref"]
    shown = json.loads(_farm("adapters", "show", ref, "--json"))
    print(f"\njob {job_id}: {job['state']}, {job['attempts']} attempt(s), {job['tokens']} tokens")
    print(f"published adapter: {shown['ref']}")
    print(f"catalog location:  {shown['uri']}")
    print(f"eval metrics:      {json.dumps(shown.get('metrics', {}))}")

    from farm.manifest import load_manifest
    from farm.rows import json_lines

    m = load_manifest(manifest_path)
    eval_file = m.dataset.eval or m.dataset.train
    rows = [obj for _, obj in json_lines(Path(eval_file).read_bytes())]
    prompt_col, completion_col = m.dataset.prompt_column, m.dataset.completion_column
    if not all(isinstance(r.get(prompt_col), str) and isinstance(r.get(completion_col), str) for r in rows):
        print("(before/after needs prompt/completion rows; this job's eval data has none)")
        return
    (base_out, base_loss), (ada_out, ada_loss) = before_after(ref, rows, prompt_col, completion_col)
    print(f"\nbefore/after on the {len(rows)} rows of {eval_file} (NF4 base, stock PEFT; greedy answers;"
          " loss on the completion tokens):")
    print(f"  eval loss: base {base_loss:.3f} -> adapter {ada_loss:.3f}")
    for row, b, a in zip(rows, base_out, ada_out, strict=False):
        print(f"  {row[prompt_col]!r}\n    expected {row[completion_col].strip()!r}\n    base     {b!r}\n    adapter  {a!r}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    from farm.cluster import running

    farm_was_up = running() is not None or bool(os.environ.get("RAY_ADDRESS"))
    try:
        for path in args or ["jobs/customer_x.yaml"]:
            print(f"\n==== {path}", flush=True)
            run_job(Path(path))
    finally:
        if not farm_was_up:
            _farm("down")  # leave the machine as we found it


if __name__ == "__main__":
    main()
