"""Every knob of a serving deployment, as one dataclass. No heavy imports: the CLI builds it."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from farm.errors import FarmError

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; 0.0.0.0 and real interfaces are not."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, n_keys: int) -> None:
    """Without API keys anyone who can reach the port could call every adapter: loopback only."""
    if not n_keys and not is_loopback(host):
        raise FarmError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could call every "
            "adapter. Pass --keys FILE (or set FARM_SERVE_KEYS), or bind to 127.0.0.1."
        )


DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ServeConfig:
    base_model: str
    """Base model: local directory, s3:// URL or hub id. Loaded once per replica (NF4)."""
    catalog_url: str | None = None
    """Adapter catalog URL; None = FARM_CATALOG or $FARM_HOME/catalog."""
    quantization: str = "nf4"
    """nf4 | fp4 | int8 | none (the vllm engine: nf4 = vLLM's bitsandbytes, CUDA only, or none)."""
    dtype: str = "auto"
    """auto | bf16 | fp16 | fp32: what the base computes in. auto: the farm engine bf16 on GPUs that
    support it (fp16 on older ones) and fp32 on CPU; the vllm engine bf16 (vLLM's --dtype)."""
    engine: str = "auto"
    """farm | vllm | auto (vllm on GPU replicas when a vLLM environment is installed, farm otherwise)."""
    lora_slots: int | None = None
    """vllm engine: adapters in one batch (vLLM's max_loras; the admission gate's slots). None = max_adapters."""
    max_lora_rank: int = 16
    """vllm engine: the largest adapter rank served (rounded up to a rank vLLM accepts); higher -> 422."""
    served_name: str | None = None
    """The name clients use for the base model; default: the base model folder's name."""
    replicas: int = 1
    """Model replicas; each holds the base once."""
    max_adapters: int = 8
    """Adapters held per replica (LRU)."""
    routing: str = "affinity"
    """affinity: send an adapter's requests to replicas holding it (Serve multiplexing); spread: any replica."""
    max_batch_size: int = 32
    """Most requests (rows) in one forward pass."""
    max_wait_ms: float = 5.0
    """How long the batcher waits for more requests after the first one."""
    max_waiting: int = 64
    """Requests queued per replica beyond which new ones get 503 + Retry-After."""
    max_tokens_cap: int = 256
    """Upper bound for max_tokens (and the default when a request omits it)."""
    max_body_bytes: int = 256 * 1024
    """Largest accepted request body."""
    resolve_ttl_s: float = 1.0
    """How long a 'customer/adapter' -> version resolution is reused (bounds time-to-fresh)."""
    keys_file: str | None = None
    """API keys file (sha256 hashes); FARM_SERVE_KEYS adds more. No keys = loopback only."""
    host: str = "127.0.0.1"
    port: int = 8000
    fused: bool | None = None
    """Run the HTTP ingress inside each model replica (one Ray hop less per request). None = fused
    unless routing=affinity with several replicas, which needs a separate ingress to route by adapter."""
    cpus_per_replica: float = 1.0
    """Ray CPUs reserved per model replica (also its torch thread count, at least 1)."""
    gpus_per_replica: float = 0.0
    """Ray GPUs per model replica; > 0 loads the base on that GPU (CUDA), 0 keeps it on CPU."""
    replica_resources: dict = field(default_factory=dict)
    """Extra Ray resources per replica, e.g. {"farm_serve": 1} to place replicas on serving nodes."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.replicas < 1:
            problems.append(f"replicas must be >= 1, got {self.replicas}")
        if self.gpus_per_replica < 0:
            problems.append(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if self.max_adapters < 1:
            problems.append(f"max_adapters must be >= 1, got {self.max_adapters}")
        if self.routing not in ("affinity", "spread"):
            problems.append(f"routing must be 'affinity' or 'spread', got {self.routing!r}")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.engine not in ("auto", "farm", "vllm"):
            problems.append(f"engine must be auto|farm|vllm, got {self.engine!r}")
        if self.lora_slots is not None and self.lora_slots < 1:
            problems.append(f"lora_slots must be >= 1, got {self.lora_slots}")
        if not 1 <= self.max_lora_rank <= 512:
            problems.append(f"max_lora_rank must be in 1..512, got {self.max_lora_rank}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be {'|'.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in ("nf4", "fp4", "int8", "none"):
            problems.append(f"quantization must be nf4|fp4|int8|none, got {self.quantization!r}")
        if problems:
            raise FarmError("serve config: " + "; ".join(problems))
        if self.fused is None:
            self.fused = self.replicas == 1 or self.routing == "spread"
        if self.served_name is None:
            self.served_name = Path(self.base_model.rstrip("/")).name or self.base_model

    def to_dict(self) -> dict:
        return asdict(self)
