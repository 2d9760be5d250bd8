"""Ray Serve inference: one NF4 base per replica, LoRA adapters hot-loaded from the catalog,
mixed-adapter batches, an OpenAI-compatible API with per-customer keys.

    config.py    ServeConfig: every knob of a deployment (no heavy imports)
    protocol.py  pydantic request/response models of the OpenAI API
    auth.py      API keys (sha256-hashed) -> customer or admin
    limits.py    ApiError and the request limits (context length, max_tokens, body size)
    metrics.py   ray.util.metrics instruments
    sampling.py  per-row greedy / temperature / top-p sampling and stop strings
    lora.py      grouped LoRA and per-row dispatch of whole-module copies (modules_to_save)
    engine.py    base model + adapter slots (allow-listed) + the mixed-adapter batching decode loop (the `farm` engine)
    engines/     the engine interface a replica holds, `farm` and `vllm` implementations
    proxy.py     where Serve's HTTP proxy really listens; the keyless off-loopback refusal
    resolver.py  ref -> version with tenancy checks and a short TTL (freshness)
    server.py    the model deployment (replicas, multiplexed adapter LRU)
    app.py       the FastAPI ingress deployment and build_app/deploy
"""
