"""`farm up` / `farm down`: the local Ray head and the scheduler actor.

`up` connects to the cluster at RAY_ADDRESS, or starts a single-node Ray head bound to 127.0.0.1
(`ray start --head --block` in its own process group, on free ports, with a temp dir of its own),
then starts the scheduler. What it started is recorded in $FARM_HOME/cluster.json, so `down` stops
exactly that: the scheduler actor, and the head only if `up` started it (its process group, then any
process still running under its private temp dir). Nobody else's Ray is touched.

Operator knobs (environment): FARM_SCHEDULER (actor name, default farm-scheduler),
FARM_RAY_NAMESPACE (default farm), FARM_RUNNER (module:function, default farm.train.run:run_job),
FARM_CPU_SLOTS (jobs at once on a cluster without GPUs, default 1), FARM_CUSTOMER_LIMIT (running
jobs per customer, default none), FARM_BACKOFF_S (first retry delay, default 10).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from farm.errors import ClusterError
from farm.settings import farm_home, logs_dir


@dataclass
class FarmInfo:
    address: str
    dashboard_url: str | None
    started_head: bool
    pid: int | None = None  # the `ray start --block` process (its process group is the head)
    temp_dir: str | None = None
    scheduler: str = "farm-scheduler"
    namespace: str = "farm"
    auth_mode: str | None = None  # RAY_AUTH_MODE the head was started with (clients must match)
    metrics_url: str | None = None  # the head's Prometheus endpoint (farm metrics are there too)


def state_file() -> Path:
    return farm_home() / "cluster.json"


def read_state() -> FarmInfo | None:
    try:
        return FarmInfo(**json.loads(state_file().read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"{state_file()} is unreadable ({exc}); remove it if no farm is running") from None


def _write_state(info: FarmInfo) -> None:
    state_file().parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(state_file())


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ClusterError(f"{name}={raw!r}: must be a whole number") from None
    if value < 1:
        raise ClusterError(f"{name}={raw!r}: must be at least 1")
    return value


def scheduler_config(*, pack_max: int | None = None):
    """The scheduler's config from the environment (see the module docstring); `pack_max` given here
    (`farm up --pack-max`) wins over FARM_PACK_MAX."""
    from farm.scheduler import DEFAULT_NAME, DEFAULT_NAMESPACE, DEFAULT_RUNNER, SchedulerConfig

    backoff = os.environ.get("FARM_BACKOFF_S")
    try:
        backoff_s = float(backoff) if backoff else 10.0
    except ValueError:
        raise ClusterError(f"FARM_BACKOFF_S={backoff!r}: must be a number of seconds") from None
    return SchedulerConfig(
        name=os.environ.get("FARM_SCHEDULER") or DEFAULT_NAME,
        namespace=os.environ.get("FARM_RAY_NAMESPACE") or DEFAULT_NAMESPACE,
        runner=os.environ.get("FARM_RUNNER") or DEFAULT_RUNNER,
        cpu_slots=_env_int("FARM_CPU_SLOTS", 1) or 1,
        per_customer_limit=_env_int("FARM_CUSTOMER_LIMIT", None),
        pack_max=pack_max if pack_max is not None else _env_int("FARM_PACK_MAX", None),
        backoff_base_s=backoff_s,
    )


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())


def _auth_mode(recorded: str | None = None) -> str:
    """Ray token auth: the user's RAY_AUTH_MODE if set, else what the head was started with, else
    token auth whenever a token exists (what `ray start` itself does)."""
    return os.environ.get("RAY_AUTH_MODE") or recorded or ("token" if _token_available() else "disabled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
            raise ClusterError(f"the local Ray head exited with code {proc.returncode}; {log}:\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    raise ClusterError(f"the local Ray head did not open port {port} within {timeout_s:.0f} s (log: {log})")


def _start_head(timeout_s: float = 90.0) -> FarmInfo:
    ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "metrics-export-port",
                                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                       "runtime-env-agent-port")}
    # Ray's unix sockets live under the temp dir; keep its path short and private to this FARM_HOME.
    tag = hashlib.sha256(str(farm_home()).encode()).hexdigest()[:10]
    temp_dir = Path(tempfile.gettempdir()) / f"farm-ray-{tag}"
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else sys.executable, *([] if ray_bin.exists() else ["-m", "ray.scripts.scripts"]),
           "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           # Like cluster.yaml's head: the scheduler and its driver tasks ask for a sliver of it.
           "--resources", json.dumps({"farm_head": 1}),
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = logs_dir() / "ray-head.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Decided once and passed explicitly: a token file appearing later must not split head and clients.
    auth = _auth_mode()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd(), env={**os.environ, "RAY_AUTH_MODE": auth})
    info = FarmInfo(address=f"127.0.0.1:{ports['port']}", dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
                    started_head=True, pid=proc.pid, temp_dir=str(temp_dir), auth_mode=auth,
                    metrics_url=f"http://127.0.0.1:{ports['metrics-export-port']}/metrics")
    _write_state(info)  # recorded before waiting, so `farm down` can clean up a half-started head
    _wait_port(ports["port"], proc, log, timeout_s)
    return info


def _use_auth(recorded: str | None = None) -> None:
    """Set RAY_AUTH_MODE for this process. Ray reads it when it is imported, so this runs first."""
    mode = _auth_mode(recorded)
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE", mode) != mode:
        return  # already connected under another mode (e.g. inside a test's Ray); leave it
    os.environ["RAY_AUTH_MODE"] = mode


def _connect(address: str, namespace: str) -> str | None:
    """Join the cluster at `address` (no-op if this process is already connected); the dashboard URL."""
    from farm.raycluster import connect

    return connect(address, namespace=namespace, local_ok=False)


def running() -> FarmInfo | None:
    """The farm recorded under this FARM_HOME if its head is still alive (or it uses RAY_ADDRESS)."""
    info = read_state()
    if info is None:
        return None
    if info.started_head and not _pid_alive(info.pid):
        return None
    return info


def use_running_farm() -> FarmInfo | None:
    """Point this process's Ray client at the farm started under FARM_HOME (`farm up`), if any and
    if RAY_ADDRESS does not already name a cluster. Call before Ray is imported/initialized."""
    info = running()
    if info is None or os.environ.get("RAY_ADDRESS"):
        return None
    os.environ["RAY_ADDRESS"] = info.address
    _use_auth(info.auth_mode)
    return info


def up(*, timeout_s: float = 90.0, pack_max: int | None = None) -> tuple[FarmInfo, bool]:
    """Make sure a farm is running: (info, started_something_now). `pack_max` applies to a scheduler
    started now; a running one keeps its own."""
    started = False
    address = os.environ.get("RAY_ADDRESS")
    info = running()
    if address and (info is None or info.address != address):
        if info is not None and info.started_head:
            raise ClusterError(
                f"RAY_ADDRESS={address} but this FARM_HOME ({farm_home()}) runs its own Ray head at "
                f"{info.address}; unset RAY_ADDRESS to use it, or `farm down` first"
            )
        info = FarmInfo(address=address, dashboard_url=None, started_head=False)
    _use_auth(info.auth_mode if info else None)
    if info is None:
        info = _start_head(timeout_s)
        started = True
    from farm import scheduler

    cfg = scheduler_config(pack_max=pack_max)
    info.scheduler, info.namespace = cfg.name, cfg.namespace
    url = _connect(info.address, cfg.namespace)
    info.dashboard_url = info.dashboard_url or url
    if scheduler.get(cfg.name, cfg.namespace) is None:
        scheduler.start(cfg, timeout_s=timeout_s)
        started = True
    _write_state(info)
    return info, started


def _processes_under(temp_dir: str) -> list[int]:
    """PIDs whose command line names our private temp dir (workers, raylet, GCS, agents)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def down(*, grace_s: float = 5.0) -> list[str]:
    """Stop what `up` started under this FARM_HOME; returns what was done, one line each."""
    info = read_state()
    if info is None:
        return ["no farm recorded under " + str(farm_home())]
    done = []
    if not info.started_head or _pid_alive(info.pid):
        try:
            _use_auth(info.auth_mode)
            _connect(info.address, info.namespace)
            from farm import scheduler

            if scheduler.stop(info.scheduler, info.namespace):
                done.append(f"stopped the scheduler actor {info.namespace}/{info.scheduler}")
        except ClusterError as exc:
            done.append(f"scheduler not reachable ({exc})")
    if info.started_head:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        # The queue lives in SQLite and checkpoints on disk, so a short grace period is enough;
        # Ray's own graceful stop of a head takes ~30 s here.
        def alive() -> list[int]:
            own = [p for p in _processes_under(info.temp_dir) if _pid_alive(p)] if info.temp_dir else []
            return own + ([info.pid] if _pid_alive(info.pid) and info.pid not in own else [])

        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(info.pid, sig)  # the head's process group (it was started in its own session)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in alive() if sig == signal.SIGKILL else []:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            while alive() and time.time() < deadline:
                time.sleep(0.25)
            if not alive():
                break
        done.append(f"stopped the local Ray head at {info.address} (pid {info.pid})")
        if info.temp_dir and not alive():
            # Private to this FARM_HOME (sockets, session logs); job logs stay under $FARM_HOME/logs.
            shutil.rmtree(info.temp_dir, ignore_errors=True)
    state_file().unlink(missing_ok=True)
    return done
