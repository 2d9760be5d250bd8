"""The engines a serving replica can hold, behind one interface (base.py).

    base.py         ServingEngine (typing.Protocol), choose() and create(): which engine, built how
    farm.py         the `farm` engine: farm/serve/engine.py's Engine (transformers + grouped LoRA)
    vllm.py         the `vllm` engine: vLLM's AsyncLLM in a child process of the vLLM environment
    vllm_support.py what vLLM cannot serve (checked from adapter_config.json before vLLM sees it)
    gate.py         LoRA admission gate: never more distinct adapters in flight than LoRA slots
    vllm_worker.py  the child process (runs in the vLLM environment)
"""
