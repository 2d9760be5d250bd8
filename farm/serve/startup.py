"""Waiting for a Serve application to start, and stopping it at the first replica that cannot.

Ray Serve retries a replica whose constructor raises (up to 3 times per replica), and each try of a
base that cannot load can take minutes (the vLLM engine waits for its worker; a missing folder
read as a hub id waits for the hub). `wait_running` watches the application instead of
`serve.run`'s own wait: at the first start-up failure it deletes the application and raises one
line with the replica's own error, so `farm serve` ends in seconds without a crash loop.
"""

from __future__ import annotations

import re
import time

from farm.errors import FarmError

_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit)): (.+)$")
FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


class ServeStartError(FarmError):
    """A replica of the application could not start; the message is the replica's error, one line."""


def replica_error(message: str) -> str:
    """The one line that says why, from Serve's message about a failed replica (which ends with the
    replica's traceback): the last `SomeError: text` line, else the message's last line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _EXC_LINE.match(ln)
        if m:
            return f"{m[1]}: {m[2]}"
    return lines[-1] if lines else "no error message"


def startup_failure(app) -> tuple[str, str] | None:
    """(deployment, its error line) if a deployment of this application status failed to start a
    replica or failed outright; None while it is still starting or running."""
    for name, dep in app.deployments.items():
        status, trigger = str(getattr(dep.status, "value", dep.status)), str(getattr(dep.status_trigger, "value", dep.status_trigger))
        if status in FAILED or trigger == "REPLICA_STARTUP_FAILED" or "failed to start" in (dep.message or ""):
            return name, replica_error(dep.message or app.message or "")
    if str(getattr(app.status, "value", app.status)) in FAILED:
        return "application", replica_error(app.message or "")
    return None


def wait_running(name: str, bases: list[str], *, poll_s: float = 0.5) -> None:
    """Block until Serve application `name` is RUNNING; at the first replica that fails to start,
    delete the application and raise ServeStartError naming the bases and the replica's error."""
    from ray import serve

    while True:
        app = serve.status().applications.get(name)
        if app is not None:
            if str(getattr(app.status, "value", app.status)) == "RUNNING":
                return
            failed = startup_failure(app)
            if failed is not None:
                serve.delete(name)
                raise ServeStartError(
                    f"cannot serve {', '.join(bases)}: a replica failed to start ({failed[0]}): {failed[1]}"
                )
        time.sleep(poll_s)
