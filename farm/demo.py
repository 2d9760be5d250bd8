"""`make demo`: train a customer's adapter through the farm, then generate from it with stock PEFT.

    python -m farm.demo jobs/customer_x.yaml
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _farm(*args: str) -> str:
    """Run the `farm` CLI exactly as a user would; stream its progress, return its stdout."""
    exe = Path(sys.executable).with_name("farm")
    proc = subprocess.run([str(exe), *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"`farm {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc.stdout


def generate(ref: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy generations from the published adapter on the NF4 base, loaded with stock PEFT."""
    import torch
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
    print(f"$ farm validate {manifest_path}", flush=True)
    print(_farm("validate", str(manifest_path)), end="", flush=True)
    print(f"$ farm train {manifest_path} --json", flush=True)
    published = json.loads(_farm("train", str(manifest_path), "--json"))
    ref = published["ref"]
    print(f"\npublished adapter: {ref}")
    print(f"catalog location:  {published['uri']}")
    print(f"eval metrics:      {json.dumps(published.get('metrics', {}))}")

    from farm.manifest import load_manifest

    m = load_manifest(manifest_path)
    eval_file = m.dataset.eval or m.dataset.train
    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines()[:3]]
    prompts = [r.get(m.dataset.prompt_column) or r.get(m.dataset.text_column, "")[:40] for r in rows]
    print("\ngenerations (greedy, adapter on the NF4 base, loaded with stock PEFT):")
    for prompt, out in zip(prompts, generate(ref, prompts), strict=True):
        print(f"  {prompt!r}\n    -> {out.strip()!r}")


if __name__ == "__main__":
    main()
