"""The fine-tuning API as several replicas run it: two real app instances (two uvicorn servers, each
with its own queue connection and files store object, as two replicas have) on one FARM_HOME, real
HTTP, the official openai client, requests released together by a barrier. Quotas and
Idempotency-Keys must hold across them, on a local and on an S3 (SeaweedFS) files store."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable

import openai
import pytest

from farm.finetune.config import FinetuneConfig
from farm.finetune.policy import TrainingPolicy
from farm.finetune.routes import build
from farm.queue import open_store
from farm.serve.auth import KeyStore, Principal, hash_key
from tests.ports import free_port

MiB = 1024 * 1024
ROW = {"messages": [{"role": "user", "content": "How do I reset my sensor?"},
                    {"role": "assistant", "content": "Hold the button for ten seconds."}]}


def jsonl_of_size(size: int) -> bytes:
    """A valid chat JSONL file of exactly `size` bytes (the last line padded)."""
    line = (json.dumps(ROW) + "\n").encode()
    body = line * max(0, size // len(line) - 1)
    pad = size - len(body) - len(line)
    last = dict(ROW, messages=[dict(ROW["messages"][0], content=ROW["messages"][0]["content"] + "x" * pad),
                               ROW["messages"][1]])
    out = body + (json.dumps(last) + "\n").encode()
    assert len(out) == size
    return out


class Replica:
    """One app instance behind its own uvicorn server on a free port."""

    def __init__(self, cfg: FinetuneConfig, keys: KeyStore, catalog_url: str):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build(cfg, keys, catalog_url), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        ready = threading.Event()
        while not self.server.started and self.thread.is_alive():
            ready.wait(0.05)
        assert self.server.started, "uvicorn did not start"

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def replicas(request, farm_home, tiny_llama):
    files_url = (farm_home / "finetune").as_uri()
    if request.param == "s3":
        files_url = request.getfixturevalue("s3_env")
    policy = TrainingPolicy(base_model=str(tiny_llama), max_concurrent_jobs=2, max_file_bytes=1 * MiB,
                            max_stored_bytes=3 * MiB, max_files=4, max_training_tokens=10**9)
    cfg = FinetuneConfig(bases={"tiny-llama": policy}, files_url=files_url, queue_db=str(farm_home / "queue.db"),
                         scheduler_name="no-such-scheduler")
    keys = KeyStore({hash_key("acme-key"): Principal("acme")})
    both = [Replica(cfg, keys, (farm_home / "catalog").as_uri()) for _ in range(2)]
    yield type("Replicas", (), {"clients": [r.client("acme-key") for r in both],
                                "queue": open_store(farm_home / "queue.db")})
    for r in both:
        r.stop()


def together(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls in threads released by one barrier; each result or the exception it raised."""
    barrier = threading.Barrier(len(calls))
    out: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the test inspects what each call got
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def upload(c: openai.OpenAI, data: bytes):
    return c.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")


def test_concurrent_jobs_quota_holds_across_replicas(replicas):
    a, b = replicas.clients
    f = upload(a, jsonl_of_size(4096))
    a.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=0)  # one of the two slots taken
    got = together([lambda c=c, i=i: c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=i)
                    for i, c in enumerate([a, b, a, b], start=1)])
    made = [g for g in got if not isinstance(g, Exception)]
    refused = [g for g in got if isinstance(g, openai.RateLimitError)]
    assert len(made) == 1 and len(refused) == 3, got
    assert "concurrent jobs quota" in refused[0].message
    assert len([j for j in replicas.queue.list(customer="acme") if not j.done]) == 2
    assert len(a.fine_tuning.jobs.list().data) == 2  # and every queued job is visible


def test_stored_bytes_quota_holds_across_replicas(replicas):
    a, b = replicas.clients
    name_bytes = len(b"train.jsonl")
    data = jsonl_of_size(1 * MiB - 4096)
    upload(a, data)
    upload(b, data)  # ~2 MiB kept; room for one more
    got = together([lambda c=c: upload(c, data) for c in (a, b, a, b)])
    stored = [g for g in got if not isinstance(g, Exception)]
    refused = [g for g in got if isinstance(g, openai.RateLimitError)]
    assert len(stored) == 1 and len(refused) == 3, got
    assert "stored bytes quota" in refused[0].message
    kept = sum(f.bytes + name_bytes for f in a.files.list())
    assert kept <= 3 * MiB and len(a.files.list().data) == 3


def test_files_count_quota_holds_across_replicas(replicas):
    a, b = replicas.clients
    small = jsonl_of_size(2048)
    for c in (a, b, a):
        upload(c, small)  # 3 of 4
    got = together([lambda c=c: upload(c, small) for c in (a, b, a, b)])
    assert sum(not isinstance(g, Exception) for g in got) == 1, got
    assert all("files quota" in g.message for g in got if isinstance(g, Exception))
    assert len(b.files.list().data) == 4


def test_idempotency_key_gives_one_job_across_replicas(replicas):
    a, b = replicas.clients
    f = upload(a, jsonl_of_size(4096))
    got = together([lambda c=c: c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=5,
                                                          extra_headers={"Idempotency-Key": "create-once"})
                    for c in (a, b, a, b)])
    assert all(not isinstance(g, Exception) for g in got), got
    assert len({g.id for g in got}) == 1
    assert len(replicas.queue.list(customer="acme")) == 1
