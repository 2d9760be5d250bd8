"""`make demo`: submit a customer's job to the farm (starting one if none runs), wait for the
adapter, then generate from it with stock PEFT on the NF4 base.

    python -m farm.demo jobs/customer_x.yaml
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


def generate(ref: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy generations from the published adapter on the NF4 base, loaded with stock PEFT."""
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
    outs = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(ids[0, enc.input_ids.shape[1] :], skip_special_tokens=True))
    return outs


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    manifest_path = Path(args[0] if args else "jobs/customer_x.yaml")
    from farm.cluster import running

    farm_was_up = running() is not None or bool(os.environ.get("RAY_ADDRESS"))
    print(_farm("validate", str(manifest_path)), end="", flush=True)
    submitted = json.loads(_farm("submit", str(manifest_path), "--json"))
    job_id = submitted[0]["id"]
    try:
        _farm("submit", str(manifest_path), "--wait", capture=False)  # same content: same job, now watched
        job = json.loads(_farm("status", job_id, "--json"))
        ref = job["adapter_ref"]
        shown = json.loads(_farm("adapters", "show", ref, "--json"))
        print(f"\njob {job_id}: {job['state']}, {job['attempts']} attempt(s), {job['tokens']} tokens")
        print(f"published adapter: {shown['ref']}")
        print(f"catalog location:  {shown['uri']}")
        print(f"eval metrics:      {json.dumps(shown.get('metrics', {}))}")

        from farm.manifest import load_manifest

        m = load_manifest(manifest_path)
        eval_file = m.dataset.eval or m.dataset.train
        rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines()[:3]]
        prompts = [r.get(m.dataset.prompt_column) or r.get(m.dataset.text_column, "")[:40] for r in rows]
        print("\ngenerations (greedy, the adapter on the NF4 base, loaded with stock PEFT):")
        for prompt, out in zip(prompts, generate(ref, prompts), strict=True):
            print(f"  {prompt!r}\n    -> {out.strip()!r}")
    finally:
        if not farm_was_up:
            _farm("down")  # leave the machine as we found it


if __name__ == "__main__":
    main()
