"""Tiny base models built from a config, for the demo, the tests and CPU benchmarks.

There is no model hub here, so the farm builds its own small models deterministically: a byte-level
BPE tokenizer trained with `tokenizers` on the demo data (with a chat template), and Llama- and
GPT-2-architecture models with seeded random weights. They are saved with `save_pretrained`, so
the farm loads them with exactly the code that loads a hub model.

    python -m farm.tiny models/ jobs/data/*.jsonl
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

# Assistant turns are wrapped in {% generation %} so the data pipeline can mask loss to them
# (transformers' return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>"]

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_GPT2 = dict(n_embd=128, n_layer=2, n_head=4, n_positions=512)


def _texts(files: Iterable[Path]) -> Iterator[str]:
    """Every string value in the jsonl corpus files (prompts, completions, messages, text)."""

    def walk(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from walk(x)
        elif isinstance(v, list):
            for x in v:
                yield from walk(x)

    for f in files:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield from walk(json.loads(line))


def build_tokenizer(corpus: list[Path], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on the corpus and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_texts(corpus)) + ["The quick brown fox jumps over the lazy dog."], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, tokenizer, seed: int = 0):
    """A seeded random-weight model of the given architecture ('llama' or 'gpt2')."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # round up: friendlier matrix shapes
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, **ids))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, **ids))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; allowed: llama, gpt2")
    return model.eval()


def build_all(out: Path, corpus: list[Path]) -> dict[str, Path]:
    """Build models/tiny-llama and models/tiny-gpt2 (same tokenizer). Returns their paths."""
    tokenizer = build_tokenizer(corpus)
    paths = {}
    for arch in ("llama", "gpt2"):
        dest = Path(out) / f"tiny-{arch}"
        dest.mkdir(parents=True, exist_ok=True)
        build_model(arch, tokenizer).save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)
        paths[arch] = dest
    return paths


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.exit("usage: python -m farm.tiny OUT_DIR CORPUS.jsonl [CORPUS.jsonl ...]")
    for arch, path in build_all(Path(args[0]), [Path(a) for a in args[1:]]).items():
        print(f"built tiny-{arch} at {path}")


if __name__ == "__main__":
    main()
