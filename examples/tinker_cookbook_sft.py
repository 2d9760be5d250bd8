"""tinker-cookbook's supervised fine-tuning loop against a farm, on a base the farm serves.

Runs `tinker_cookbook.supervised.train.main`, the training loop that the cookbook's `recipes/sl_basic.py`
runs, from the installed tinker-cookbook unchanged. What this file sets is configuration only:

  base_url       the farm's Tinker API (`farm serve --tinker`); the key comes from TINKER_API_KEY (tml-...)
  model_name     the farm's served name of the base (`get_server_capabilities` lists them)
  tokenizer      the base's local folder, registered under that name with the cookbook's
                 `register_tokenizer` (the cookbook otherwise fetches it from the Hugging Face hub)
  renderer_name  `qwen3_instruct` by default: ChatML, the chat format of SmolLM2-Instruct
  dataset        `FromConversationFileBuilder` on a local JSONL of {"messages": [...]} (default: the
                 cookbook's own example_data/conversations.jsonl), the swap that sl_basic.py documents

Why not `python -m tinker_cookbook.recipes.sl_basic model_name=...`: sl_basic looks its renderer up in
the cookbook's model table (`model_info.get_recommended_renderer_name`), which knows only
meta-llama/Qwen/DeepSeek/... hub ids, whose weights no package registry carries; and its default data is
HuggingFaceH4/no_robots from the hub. `python -m tinker_cookbook.supervised.train` fails at start in 0.5.8
(`chz.nested_entrypoint` of an unannotated lambda). docs/tinker.md says more.

Run it with the cookbook's environment (`make cookbook-env`):

    TINKER_API_KEY=tml-... .venv-cookbook/bin/python examples/tinker_cookbook_sft.py \\
        --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --tokenizer models/smollm2-135m-instruct --log-path runs/cookbook-sft

The cookbook writes metrics.jsonl (train_mean_nll per step) and checkpoints.jsonl (tinker:// paths) under
--log-path; run it again with the same --log-path and it resumes from the last saved state.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="the farm's URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the farm's served name of the base")
    p.add_argument("--tokenizer", required=True, type=Path, help="the base's local folder (its tokenizer files)")
    p.add_argument("--log-path", required=True, type=Path)
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of {\"messages\": [...]} (default: the cookbook's example_data/conversations.jsonl)")
    p.add_argument("--renderer", default="qwen3_instruct")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["linear", "cosine", "constant"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--save-every", type=int, default=4, help="steps between saved states (0: only the final one)")
    args = p.parse_args(argv)

    import tinker_cookbook
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
    from tinker_cookbook.tokenizer_utils import register_tokenizer

    folder = args.tokenizer.resolve()
    if not (folder / "tokenizer_config.json").is_file():
        p.error(f"--tokenizer {str(args.tokenizer)!r}: no tokenizer_config.json there (give the base's local folder)")

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)

    register_tokenizer(args.model, tokenizer)
    data = args.data or Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=args.model, renderer_name=args.renderer,
                                            max_length=args.max_length, batch_size=args.batch_size,
                                            train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    config = train.Config(
        log_path=str(args.log_path), model_name=args.model, recipe_name="farm_cookbook_sft",
        renderer_name=args.renderer, base_url=args.base_url, lora_rank=args.rank,
        dataset_builder=FromConversationFileBuilder(common_config=common, file_path=str(data)),
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule, num_epochs=args.epochs,
        max_steps=args.max_steps, save_every=args.save_every, eval_every=0)
    asyncio.run(train.main(config))


if __name__ == "__main__":
    main()
