"""Serve's HTTP proxy is one per Ray cluster: the first `serve.start` picks its host and port, and a
later one with other options silently reuses it. So a keyless `farm serve --host 127.0.0.1` on a
cluster whose proxy an earlier run started on 0.0.0.0 would be reachable from the network. This
module asks the cluster what its proxy really listens on, refuses that case, and says what keeps
running when `farm serve` stops.
"""

from __future__ import annotations

from farm.errors import FarmError
from farm.serve.config import is_loopback


def running_proxy() -> tuple[str, int] | None:
    """(host, port) of the Serve HTTP proxy on the connected Ray cluster, or None if Serve is not running."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    http = ray.get(controller.get_http_config.remote(), timeout=30)
    return str(http.host), int(http.port)


def check_existing(existing: tuple[str, int] | None, host: str, port: int, n_keys: int) -> tuple[str, int]:
    """Where the app will really be reachable; FarmError when that is off loopback without keys."""
    if existing is None:
        return host, port
    ex_host, ex_port = existing
    if not n_keys and not is_loopback(ex_host):
        raise FarmError(
            f"refusing to serve without API keys: Serve's HTTP proxy on this Ray cluster already listens on "
            f"{ex_host}:{ex_port} (started by an earlier deployment), so every adapter would be reachable from "
            f"the network whatever --host says. Pass --keys FILE, or stop Serve on this cluster first "
            f"(`serve shutdown`, or `farm down` for a local farm)."
        )
    return ex_host, ex_port


def still_running(app: str) -> str:
    """After `serve.delete(app)`: one line on what is still up on the cluster (for Ctrl-C)."""
    import os

    from ray import serve

    if not os.environ.get("RAY_ADDRESS"):
        return f"stopped app {app!r}; nothing else keeps running (the local Ray instance and its Serve end with this process)"
    parts = []
    try:
        proxy = running_proxy()
        others = sorted(a for a in serve.status().applications if a != app)
    except Exception:  # noqa: BLE001 - a best-effort report on the way out
        proxy, others = None, []
    if proxy:
        apps = f", serving {', '.join(others)}" if others else ", no apps"
        parts.append(f"Serve's HTTP proxy on {proxy[0]}:{proxy[1]}{apps} (`serve shutdown` stops it)")
    parts.append(f"the Ray cluster at {os.environ['RAY_ADDRESS']} (`farm down` stops a farm `farm up` started)")
    return f"stopped app {app!r}; still running: " + "; ".join(parts)
