"""Two Ray nodes on one box (issue 6): a head `A` (farm_head, where the queue and scheduler live) and a
second node `B` joined with `ray start --address`, both advertising `farm_train`. Jobs go through the
real `farm up` / `farm submit`, queue and scheduler, with the base model, data, catalog and Ray Train
storage on the SeaweedFS S3 server, so no job depends on a node-local path. The test shows jobs on
both nodes, an adapter trained on B served by a Serve replica pinned to A, and the fault case: B
stopped (its process group killed) while a job trains there, the job resumes on A from its last S3
checkpoint and publishes once.

The nodes are this test's own (not the session's single-node `ray_cluster`), with private temp dirs
and ports, and are stopped by process group and temp dir: nobody else's Ray is touched. Ray-side
steps this process cannot do (it may already be connected to the session's cluster) run in small
driver subprocesses: `python -c "from tests.test_multinode import ...; ..."`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.ports import free_ports
from tests.test_s3_e2e import s3fs_for, tiny_manifest, upload_inputs
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FARM, RAY = str(BIN / "farm"), str(BIN / "ray")

pytestmark = [pytest.mark.ray, pytest.mark.s3]
# The fault job must still be training on B when the test (a poll behind its progress) kills B: on a fast
# box the tiny model trains ~25 steps a second, and a 24-step job had finished on B before the kill.
FAULT_STEPS = 150


# ---- driver subprocesses (run with `python -c`; they connect to the two-node cluster) -----------------


def _connect(address: str):
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
    return ray


def nodes_main(address: str, timeout_s: float = 90.0) -> None:
    """Wait until both nodes are alive; print {"a": node id, "b": node id}."""
    ray = _connect(address)
    deadline = time.time() + timeout_s
    while True:
        ids = {name[-1]: n["NodeID"] for n in ray.nodes() if n["Alive"]
               for name in ("node_a", "node_b") if n["Resources"].get(name)}
        if len(ids) == 2 or time.time() > deadline:
            print(json.dumps(ids), flush=True)
            return
        time.sleep(0.3)


def hold_main(address: str) -> None:
    """Hold node A's training slot until stdin closes, so the next job must train on node B."""
    ray = _connect(address)

    @ray.remote(num_cpus=0, resources={"farm_train": 1, "node_a": 0.001})
    class Holder:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    holder = Holder.remote()
    print(json.dumps({"held_on": ray.get(holder.node.remote(), timeout=60)}), flush=True)
    sys.stdin.read()


def serve_start_main(address: str, port: str) -> None:
    """Start Serve's controller and its one HTTP proxy (on the head) while the cluster is idle: Serve
    gives the proxy 60 s to start (HTTP_PROXY_TIMEOUT) and kills it after, which a worker process
    starting on a 2-core node busy with training can miss (it did on CI). Prints {"started": true}."""
    _connect(address)
    from ray import serve

    # Two nodes share one host: one HTTP proxy (on the head), not one per node on the same port.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(port)})
    print(json.dumps({"started": True}), flush=True)


def serve_main(address: str, config: str) -> None:
    """Deploy farm.serve's app (ingress + AdapterServer) with its replica pinned to node A; print where
    the replicas run. Mirrors farm.serve.app.build_app, plus the `node_a` resource."""
    ray = _connect(address)
    from ray import serve
    from ray.util.state import list_actors

    from farm.serve.app import Ingress
    from farm.serve.auth import KeyStore
    from farm.serve.config import ServeConfig
    from farm.serve.server import AdapterServer
    from farm.settings import Settings

    cfg = ServeConfig(**json.loads(config))
    env = Settings.resolve().ray_env()  # what farm.serve.app.deploy forwards
    pin = {"resources": {"node_a": 0.001}, "runtime_env": {"env_vars": env}}
    server = serve.deployment(AdapterServer).options(
        name="AdapterServer", num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica, **pin})
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, **pin})
    app = ingress.bind(cfg.to_dict(), KeyStore().entries(), server.bind(cfg.to_dict()))
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})  # started already
    serve.run(app, name="farm-mn", route_prefix="/", blocking=False)
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                if "AdapterServer" in (a.class_name or "")]
    print(json.dumps({"replica_nodes": [a.node_id for a in replicas]}), flush=True)
    del ray


def _driver(fn: str, *args: str, env: dict, **popen) -> subprocess.Popen:
    code = f"import sys; from tests.test_multinode import {fn}; {fn}(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, **popen)


def _driver_json(proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{out}"
    return json.loads(out.strip().splitlines()[-1])


# ---- the two nodes ------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path

    def kill(self, grace_s: float = 0.0) -> None:
        """Stop this node's processes: its process group, then anything still running under its temp
        dir (raylet workers, agents). grace_s=0 is a crash: SIGKILL at once."""
        from farm.cluster import _pid_alive, _processes_under

        for sig, wait_s in (((signal.SIGTERM, grace_s),) if grace_s else ()) + ((signal.SIGKILL, 10.0),):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in _processes_under(str(self.temp_dir)) if sig == signal.SIGKILL else []:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            while time.time() < deadline and (self.proc.poll() is None
                                              or any(_pid_alive(p) for p in _processes_under(str(self.temp_dir)))):
                time.sleep(0.2)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _start_node(name: str, root: Path, args: list[str], env: dict) -> Node:
    temp_dir = root / name  # short: Ray's unix sockets live under it
    ports = dict(zip(("node-manager-port", "object-manager-port", "metrics-export-port",
                      "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"),
                     free_ports(6)))
    cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--num-cpus", "2", "--num-gpus", "0",
           f"--object-store-memory={150 * 1024 * 1024}", "--min-worker-port=0", "--max-worker-port=0",
           *[f"--{k}={v}" for k, v in ports.items()], *args]
    log = open(root / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=REPO, env=env)
    log.close()
    return Node(name, proc, temp_dir)


@pytest.fixture
def two_nodes(s3_server, farm_home, tiny_llama):
    """Head A {farm_head, farm_train, node_a} + node B {farm_train, node_b}, 2 CPUs each; FARM_* on S3."""
    import socket

    from farm.cluster import _auth_mode

    prefix = s3_server.url("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # What cluster.yaml's ~/farm.env gives every node (S3 access stands in for the instance profile).
    env.update(s3_server.env, FARM_HOME=str(farm_home), FARM_CATALOG=f"{prefix}/catalog",
               FARM_STORAGE=f"{prefix}/runs", RAY_AUTH_MODE=_auth_mode(), FARM_BACKOFF_S="1",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TOKENIZERS_PARALLELISM="false")
    root = Path(tempfile.mkdtemp(prefix="fmn-", dir="/tmp"))
    port, dash, client = free_ports(3)
    head_env = {**env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    nodes = [_start_node("a", root, ["--head", f"--port={port}", f"--ray-client-server-port={client}",
                                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                     f"--dashboard-port={dash}",
                                     "--resources", json.dumps({"farm_head": 1, "farm_train": 1, "node_a": 1})],
                         head_env)]
    try:
        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert nodes[0].proc.poll() is None and time.time() < deadline, (root / "a.log").read_text()[-3000:]
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        nodes.append(_start_node("b", root, [f"--address={address}",
                                             "--resources", json.dumps({"farm_train": 1, "node_b": 1})], env))
        ids = _driver_json(_driver("nodes_main", address, env=env), timeout=120)
        assert set(ids) == {"a", "b"}, ids
        env["RAY_ADDRESS"] = address
        inputs = upload_inputs(s3_server, prefix, tiny_llama)
        yield {"env": env, "address": address, "ids": ids, "nodes": dict(zip("ab", nodes)), "inputs": inputs,
               "prefix": prefix, "root": root}
    finally:
        for node in reversed(nodes):
            node.kill(grace_s=2.0)
        shutil.rmtree(root, ignore_errors=True)


# ---- the test -----------------------------------------------------------------------------------------


def _wait(pred, timeout: float, what: str, every: float = 0.3):
    return wait_for(pred, timeout, what, every)


def test_two_nodes_jobs_serving_and_node_loss(two_nodes, s3_server, farm_home, tmp_path, monkeypatch):
    from farm.catalog import Catalog
    from farm.queue import JobState, SQLiteStore

    env, ids, inputs = two_nodes["env"], two_nodes["ids"], two_nodes["inputs"]

    def farm(*args: str, timeout: int = 180) -> str:
        proc = subprocess.run([FARM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        assert proc.returncode == 0, f"farm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def manifest(name: str, **kw) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_manifest(inputs, **kw)))
        return str(path)

    store = SQLiteStore(farm_home / "queue.db")

    def job(job_id: str):
        return store.get(job_id)

    def log_of(job_id: str) -> str:
        p = farm_home / "logs" / "jobs" / f"{job_id}.log"
        return p.read_text()[-3000:] if p.exists() else "(no log)"

    def finished(job_id: str, timeout: float):
        j = _wait(lambda: job(job_id).done and job(job_id), timeout, f"job {job_id}")
        assert j.state is JobState.SUCCEEDED, f"{j.state}: {j.last_error}\n{log_of(job_id)}"
        return j

    port = free_ports(1)[0]
    assert _driver_json(_driver("serve_start_main", two_nodes["address"], str(port), env=env), timeout=120)["started"]
    # The scheduler on the two-node cluster: pinned to the head (farm_head), 2 training slots.
    farm("up")
    one = manifest("one", customer="acme", adapter="left", steps=4, checkpoint_every=2)
    two = manifest("two", customer="globex", adapter="right", steps=4, checkpoint_every=2)
    first = [j["id"] for j in json.loads(farm("submit", one, two, "--json"))]
    # generous: under `make test` the other xdist worker's Ray Train runs share the two cores
    jobs = [finished(j, 420) for j in first]
    where = {j.id: j.progress["node_id"] for j in jobs}
    assert set(where.values()) == {ids["a"], ids["b"]}, f"jobs should land on both nodes: {where} vs {ids}"
    for j in jobs:
        assert j.adapter_ref.endswith("@v1") and j.accelerator_seconds > 0
        assert j.tokens == j.progress["tokens"] > 0  # one attempt: its cost is the job's cumulative count

    # Fault: hold A's training slot so the next job trains on B, then lose B mid-job.
    holder = _driver("hold_main", two_nodes["address"], env=env, stdin=subprocess.PIPE)
    assert json.loads(holder.stdout.readline())["held_on"] == ids["a"]
    (fault,) = [j["id"] for j in json.loads(farm("submit", manifest(
        "fault", customer="acme", adapter="fault", steps=FAULT_STEPS, checkpoint_every=3, max_failures=1), "--json"))]

    # Meanwhile, serve the adapter trained on B from a replica pinned to A (Serve's proxy started above).
    on_b = next(j for j in jobs if where[j.id] == ids["b"])
    cfg = {"base_model": inputs["base_model"], "catalog_url": env["FARM_CATALOG"], "replicas": 1,
           "max_adapters": 2, "port": port, "resolve_ttl_s": 1.0}
    server = _driver("serve_main", two_nodes["address"], json.dumps(cfg), env=env)

    running_on_b = _wait(lambda: (p := job(fault).progress).get("node_id") == ids["b"] and p.get("step", 0) >= 4 and p,
                         180, "the fault job to checkpoint on node B")
    two_nodes["nodes"]["b"].kill()  # node B dies (raylet, workers: SIGKILL) ...
    holder.kill()  # ... and A's training slot frees up (the holder actor dies with its driver)
    holder.wait(30)

    # The replica on A serves B's adapter after B is gone.
    served = _driver_json(server, timeout=240)
    assert served["replica_nodes"] == [ids["a"]], served
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": on_b.adapter_ref.split("@")[0], "prompt": "Hello", "max_tokens": 4,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == on_b.adapter_ref

    done = finished(fault, 240)
    assert done.progress["node_id"] == ids["a"], "resumed on the surviving node"
    resumed = done.progress["attempt_resumed_from"]
    assert resumed is not None and resumed % 3 == 0 and 3 <= resumed < FAULT_STEPS, done.progress  # a checkpoint from B
    assert running_on_b["step"] >= 4 and done.progress["step"] == FAULT_STEPS and done.attempts == 1

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    catalog = Catalog(env["FARM_CATALOG"])
    versions = catalog.versions("acme", "fault")
    assert [v.ref for v in versions] == ["acme/fault@v1"] and done.adapter_ref == "acme/fault@v1"  # once
    assert versions[0].metadata["job_id"] == fault and versions[0].metadata["steps"] == FAULT_STEPS
    # Cost: every step the job ran, the steps redone after the restart included, counted once.
    assert done.tokens >= versions[0].metadata["tokens_trained"] > 0
    assert [h["step"] for h in versions[0].metadata["metrics_history"] if "loss" in h] == list(range(1, FAULT_STEPS + 1))
    fs = s3fs_for(s3_server)
    runs = two_nodes["prefix"].removeprefix("s3://") + "/runs"
    # The run lives on S3: a job alone as Ray Train run farm-<id>; a packed job (the default) keeps its
    # own checkpoints under farm-pack-jobs/<id>/ beside its pack's run (farm.train.pack_loop).
    if done.pack:
        assert fs.exists(f"{runs}/farm-pack-jobs/{fault}/LATEST"), done.pack
        assert fs.exists(f"{runs}/farm-pack-{done.pack}")
    else:
        assert fs.exists(f"{runs}/farm-{fault}/checkpoint_manager_snapshot.json")
    assert not (farm_home / "runs").exists() and not (farm_home / "catalog").exists()
