"""A local autoscaling Ray cluster with the farm's scheduler on it, run as its own process by
tests/test_autoscale.py (it needs a Ray of its own, not the test session's).

The cluster is Ray's fake multi-node autoscaler (`ray.cluster_utils.AutoscalingCluster`'s provider,
`fake_multinode`): a head advertising `farm_head` and a node type `farm-train` advertising
`farm_train: 1`, 0..2 nodes. AutoscalingCluster itself is not used because its start() runs
`ray stop --force` (which kills every Ray on the machine, other sessions' too) and the example.yaml
it builds on is not in the Ray wheel; this starts the same config with Ray's own Node class, bound to
127.0.0.1, under a private temp dir whose processes are stopped by PID at the end.

Prints one JSON line with what the test checks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's id for the head


def config(gcs_address: str) -> dict:
    return {
        "cluster_name": "farm-autoscale-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,  # 3 s: a withdrawn request lets the idle node go quickly
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "farm_head": 1}, "node_config": {}, "max_workers": 0},
            "farm-train": {"resources": {"CPU": 1, "farm_train": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "docker": {}, "auth": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def on_train_node(manifest, *, job_id: str, on_progress=None):
    """A runner whose work runs where a training worker would: a task asking for `farm_train: 1`.
    Records that node's id, then publishes once (tests.queue_runners' marker)."""
    import ray

    from tests.queue_runners import _publish, _trace

    node = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id())
                   .options(num_cpus=1, resources={"farm_train": 1}).remote())
    _trace("nodes.log", node)
    if on_progress:
        on_progress({"step": 1, "total_steps": 1})
    return _publish(manifest, job_id)


def _wait(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def main(farm_home: str) -> None:
    os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                      # Ray resolves 127.0.0.1 to the machine's address unless told it is one machine:
                      # every process here (the fake nodes too) then stays on loopback.
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", FARM_HOME=farm_home)
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from farm import scheduler
    from farm.cluster import _processes_under
    from farm.queue import SQLiteStore
    from tests.ports import free_ports
    from tests.queue_runners import make_manifest

    temp_dir = tempfile.mkdtemp(prefix="farm-as-", dir="/tmp")  # short: Ray's unix sockets live here
    port = free_ports(1)[0]
    cfg_path = Path(farm_home) / "autoscaling.json"
    cfg_path.write_text(json.dumps(config(f"127.0.0.1:{port}")))
    head = None
    out: dict = {}
    try:
        head = Node(RayParams(gcs_server_port=port, node_ip_address="127.0.0.1", num_cpus=2, num_gpus=0,
                              resources={"farm_head": 1}, include_dashboard=False, temp_dir=temp_dir,
                              autoscaling_config=str(cfg_path), min_worker_port=0, max_worker_port=0,
                              object_store_memory=150 * 1024 * 1024,
                              env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_NODE_ID}),
                    head=True, shutdown_at_exit=False, spawn_reaper=False)
        ray.init(address=head.address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
        from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
        from ray.experimental.internal_kv import _internal_kv_get

        def request() -> list:
            raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
            return json.loads(raw) if raw else []

        def train_nodes() -> list[str]:
            return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("farm_train")]

        db = str(Path(farm_home) / "queue.db")
        store = SQLiteStore(db)
        out["train_nodes_before"] = train_nodes()
        scheduler.start(scheduler.SchedulerConfig(
            name="farm-autoscale-test", runner="tests.autoscale_driver:on_train_node", db=db,
            env={"FARM_HOME": farm_home, "FARM_AUTOSCALING_CONFIG": str(cfg_path),
                 "PYTHONPATH": os.environ.get("PYTHONPATH", "")}))
        job_id = store.submit(make_manifest("acme", "grow")).job_id
        scheduler.wake("farm-autoscale-test")
        out["request_while_waiting"] = _wait(request, 60, "a request to the autoscaler")
        job = _wait(lambda: store.get(job_id).done and store.get(job_id), 180, "the job to finish")
        out["state"], out["adapter_ref"] = job.state.value, job.adapter_ref
        out["events"] = [e.reason for e in store.events(job_id)]
        out["request_after"] = _wait(lambda: request() == [] and "empty", 30, "the request withdrawn")
        home = Path(farm_home)
        out["ran_on"] = (home / "nodes.log").read_text().split() if (home / "nodes.log").exists() else []
        out["published"] = (home / "publish.log").read_text().split() if (home / "publish.log").exists() else []
        out["head_node"] = HEAD_NODE_ID
        out["train_nodes_after_drain"] = _wait(lambda: not train_nodes() and "none", 60, "the idle node to go")
        scheduler.stop("farm-autoscale-test")
    finally:
        print(json.dumps(out), flush=True)
        try:
            ray.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # this cluster's processes only, by PID
                for pid in _processes_under(temp_dir):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])
