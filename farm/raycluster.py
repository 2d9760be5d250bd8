"""The one way farm processes reach Ray: `connect()`.

It joins the cluster at `address` (or RAY_ADDRESS) and hands the farm's settings to the Ray
processes started from this one (farm.settings.FORWARDED_ENV), or starts a private local Ray bound
to 127.0.0.1. A process already connected is left as it is.
"""

from __future__ import annotations

import os

from farm.errors import ClusterError
from farm.settings import Settings


def connect(address: str | None = None, *, namespace: str | None = None, settings: Settings | None = None,
            local_ok: bool = True) -> str | None:
    """Connect this process to Ray (no-op when already connected). Without an address (argument or
    RAY_ADDRESS) a local Ray is started when `local_ok`, else ClusterError. Returns the dashboard
    URL of the cluster joined (None when already connected or it has no dashboard)."""
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(log_to_driver=False, configure_logging=False, namespace=namespace)
    if address:
        env = (settings or Settings.resolve()).ray_env()
        try:
            ctx = ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING", **common)
        except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own variants
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        url = getattr(ctx, "dashboard_url", None)
        return f"http://{url}" if url and "://" not in url else url
    if not local_ok:
        raise ClusterError("no Ray cluster: set RAY_ADDRESS or start one with `farm up`")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **common)
    return None
