"""`farm serve`: deploy the OpenAI-compatible inference service on the farm's Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from farm.cli._common import console


def serve_cmd(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="Serve config YAML (several bases); the flags below are the one-base shorthand.")] = None,
    base_model: Annotated[str, typer.Option("--base-model", help="Base model: local dir, s3:// URL or hub id.")] = "models/tiny-llama",
    replicas: Annotated[int, typer.Option(help="Model replicas (each holds the base once).")] = 1,
    max_adapters: Annotated[int, typer.Option("--max-adapters", help="Adapters held per replica (LRU).")] = 8,
    host: Annotated[str, typer.Option(help="Bind address. Non-loopback needs API keys.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    keys: Annotated[Path | None, typer.Option("--keys", help="API keys file (sha256 hashes); see docs/serving.md.")] = None,
    routing: Annotated[str, typer.Option(help="affinity (adapter-aware, default) or spread.")] = "affinity",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Rows per forward pass.")] = 32,
    quantization: Annotated[str, typer.Option(help="nf4 | fp4 | int8 | none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32: what the base computes in (auto: farm engine bf16 on GPU, fp32 on CPU; vllm bf16).")] = "auto",
    catalog: Annotated[str | None, typer.Option(help="Catalog URL (default FARM_CATALOG or $FARM_HOME/catalog).")] = None,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", help="GPUs per replica; > 0 loads the base on CUDA.")] = 0.0,
    engine: Annotated[str, typer.Option(help="farm | vllm | auto (vllm on GPU replicas when vLLM is installed, else farm).")] = "auto",
    lora_slots: Annotated[int | None, typer.Option("--lora-slots", help="vllm engine: adapters per batch (max_loras); default --max-adapters.")] = None,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", help="vllm engine: largest adapter rank served.")] = 16,
    tinker: Annotated[bool, typer.Option("--tinker", help="Also serve the Tinker training API (/api/v1/*) on the first base (docs/tinker.md).")] = False,
) -> None:
    """Serve adapters over HTTP (OpenAI API) on the Ray cluster at RAY_ADDRESS, the farm `farm up` started, or a local one; Ctrl-C stops."""
    from farm.errors import FarmError
    from farm.finetune.config import serve_extra
    from farm.finetune.policy import serve_policy
    from farm.manifest import resolve_local_path
    from farm.preflight import model_problem
    from farm.serve.auth import KeyStore
    from farm.serve.config import check_bind

    # Replicas (and the vLLM worker) run in other folders: every local path is made absolute here,
    # flags relative to the current folder, a config file's entries relative to the file.
    here = Path.cwd()
    catalog = resolve_local_path(catalog, here)

    if config is not None:
        from farm.serve.config_file import load_serve_config

        given = [p for p in ctx.params if p not in ("config", "catalog", "tinker")
                 and getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
        if given:
            raise typer.BadParameter(f"--config {config} sets the bases; drop {', '.join('--' + g.replace('_', '-') for g in given)} "
                                     "(only --catalog and --tinker may be added)", param_hint="--config")
        serve_file = load_serve_config(config)
        cfgs = serve_file.to_configs()
        policy_section, policy_source = serve_file.training_policy, str(config)
        if catalog:
            for c in cfgs:
                c.catalog_url = catalog
    else:
        policy_section, policy_source = None, "farm serve"
        base_model = resolve_local_path(base_model, here, model=True)
        keys = Path(resolve_local_path(str(keys), here)) if keys else None
        cfgs = [_one_base(base_model, catalog, quantization, replicas, max_adapters, routing, max_batch_size, keys, host,
                          port, gpus_per_replica, engine, lora_slots, max_lora_rank, dtype)]
    cfg = cfgs[0]
    # The OpenAI fine-tuning API on the same service: the package's policy defaults, then the file's.
    cfg.extra.update(serve_extra(cfg.served_name, serve_policy(cfg.base_model, policy_section, policy_source)))
    if tinker:
        from farm.tinker.config import mount

        mount(cfg)  # its pack worker holds the same base once more, for training
    store = KeyStore.load(cfg.keys_file)  # bad keys / non-loopback without keys fail before Ray starts
    check_bind(cfg.host, len(store))
    for c in cfgs:  # a base that cannot load fails here, not as replicas Serve restarts for minutes
        problem = model_problem(c.base_model, base_dir=config.resolve().parent if config else here)
        if problem:
            raise FarmError(f"cannot serve base {c.served_name!r}: {problem}")
    for c in cfgs:
        if c.engine == "vllm":
            from farm.serve.engines.base import choose

            choose(c.engine, c.gpus_per_replica, c.quantization)  # no vLLM env / NF4 on CPU: fail before Ray starts

    from farm.cluster import use_running_farm

    use_running_farm()  # the farm `farm up` started under FARM_HOME, unless RAY_ADDRESS names one
    from farm.raycluster import connect
    from farm.serve.app import deploy

    connect()  # RAY_ADDRESS (set by use_running_farm), else a private local Ray
    url = deploy(cfgs, store)
    bases = ", ".join(f"{c.served_name} ({c.replicas} replica(s))" for c in cfgs)
    console.print(f"serving {bases} and adapters from {cfg.catalog_url} at {url}/v1 ({len(store)} key(s)); Ctrl-C stops")
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        from farm.serve.proxy import still_running

        serve.delete("farm")
        console.print(still_running("farm"))


def _one_base(base_model, catalog, quantization, replicas, max_adapters, routing, max_batch_size, keys, host, port,
              gpus_per_replica, engine, lora_slots, max_lora_rank, dtype="auto"):
    """The flags' one-base config (the same ServeConfig a one-entry --config file builds)."""
    from farm.serve.config import ServeConfig

    return ServeConfig(
        base_model=base_model,
        catalog_url=catalog,
        quantization=quantization,
        dtype=dtype,
        replicas=replicas,
        max_adapters=max_adapters,
        routing=routing,
        max_batch_size=max_batch_size,
        keys_file=str(keys) if keys else None,
        host=host,
        port=port,
        gpus_per_replica=gpus_per_replica,
        engine=engine,
        lora_slots=lora_slots,
        max_lora_rank=max_lora_rank,
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("serve")(serve_cmd)
