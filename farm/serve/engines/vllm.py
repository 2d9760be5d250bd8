"""The `vllm` engine: vLLM's AsyncLLM in a child process of the vLLM environment, spoken to over a
loopback port (vllm_worker.py). The replica stays in farm's own environment; why: docs/serving.md.

Adapters: attach checks what vLLM cannot serve (vllm_support.py) and refuses it with a 4xx naming
the reason, copies the fetched, verified version folder into this engine's own directory (vLLM
re-reads it after evicting it from its CPU cache, so it stays until detach), and registers it as
LoRARequest(lora_name=<version id>, lora_int_id=<counter, unique on this replica>). Generation goes
through the worker's admission gate (gate.py): at most `lora_slots` (= vLLM's max_loras) distinct
adapters are ever in flight. At most `max_registered` adapters (vLLM's sized LoRA capacity less the
base's identity adapter) are registered at once: attach waits for a dropped adapter's last request
rather than let vLLM evict on its own. The worker's port is loopback-only and answers only calls
carrying this replica's random token. vLLM's own metrics are mirrored into Ray's as farm_serve_vllm_* gauges.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from farm.serve import metrics
from farm.serve.engine import inspect_adapter
from farm.serve.engines.base import GenJob, Slot
from farm.serve.engines.vllm_support import unsupported, vllm_rank
from farm.serve.engines.vllm_worker import TOKEN_ENV, registrable
from farm.serve.limits import ApiError
from farm.serve.logprobs import LOGPROBS_MAX

FARM_PACKAGE = Path(__file__).resolve().parents[2]  # .../farm
# Put on the worker's PYTHONPATH: every process of the vLLM environment started under it (the worker,
# vLLM's engine core and its workers) gets SIGKILL when its parent dies. Ray kills a replica's
# direct children only; vLLM's engine core outlived a killed worker without this.
SITECUSTOMIZE = """import ctypes, signal
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except Exception:
    pass
"""
# ServeConfig.dtype -> vLLM's --dtype. auto is bf16 (as vLLM serves on GPUs); on a CPU without
# AVX512-BF16 vLLM's bf16 kernels round differently from torch's, so exact comparisons use fp32.
VLLM_DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}


class VllmEngine:
    kind = "vllm"

    def __init__(self, base_model: str, *, python: str, quantization: str = "none", dtype: str = "auto",
                 device: str = "cpu", lora_slots: int = 8, max_adapters: int = 8, max_lora_rank: int = 16,
                 max_batch_size: int = 32, max_waiting: int = 64, threads: int | None = None,
                 start_timeout_s: float = 900.0):
        import httpx

        from farm.modeling import load_config, materialize

        path = materialize(base_model)
        mc = load_config(base_model)
        self.base_model = base_model
        self.context_length = int(getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None) or 2048)
        self.lora_slots = max(1, min(lora_slots, max_adapters))
        self.max_lora_rank = vllm_rank(max_lora_rank)
        self.dir = Path(tempfile.mkdtemp(prefix="farm-vllm-"))
        worker_cfg = {
            "model": str(path), "dtype": VLLM_DTYPES[dtype], "enforce_eager": device == "cpu",
            "quantization": "bitsandbytes" if quantization == "nf4" else None,
            "max_loras": self.lora_slots, "max_cpu_loras": max(max_adapters, self.lora_slots),
            "max_lora_rank": self.max_lora_rank, "max_num_seqs": max_batch_size,
            "max_held": max_batch_size + max_waiting, "max_model_len": self.context_length,
            "max_logprobs": LOGPROBS_MAX,
        }
        env = dict(os.environ)
        if device == "cpu":
            env.update({k: env.get(k, v) for k, v in CPU_ENV.items()})
            if threads:
                env.setdefault("OMP_NUM_THREADS", str(threads))
        # The worker imports only farm's stdlib gate: its path holds a link to the farm package and
        # nothing else (the main environment's site-packages would shadow vLLM's pinned libraries).
        (self.dir / "path").mkdir()
        (self.dir / "path" / "farm").symlink_to(FARM_PACKAGE, target_is_directory=True)
        (self.dir / "path" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = str(self.dir / "path")
        # the worker answers only calls that carry this replica's own secret (vllm_worker.py)
        self._auth = {"Authorization": "Bearer " + secrets.token_urlsafe(32)}
        env[TOKEN_ENV] = self._auth["Authorization"][7:]
        # At most this many adapters registered with vLLM at once (LRU + dropped ones still finishing
        # requests); attach waits for room rather than let vLLM evict one on its own.
        self.max_registered = registrable(worker_cfg)
        ready = self.dir / "port"
        self.log_path = self.dir / "vllm.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "farm.serve.engines.vllm_worker", "--config", json.dumps(worker_cfg),
                 "--ready-file", str(ready)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(self.dir),
                start_new_session=True,  # its own process group: close() ends vLLM's engine core with it
            )
        deadline = time.monotonic() + start_timeout_s
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.close()
                raise RuntimeError(f"the vLLM engine did not start (python {python}); its log ends:\n{tail}")
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{ready.read_text().strip()}"
        self._http = httpx.Client(timeout=300, headers=self._auth)
        self._aclients: dict[int, object] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.slots: dict[str, Slot] = {}
        self._lora_id: dict[str, int] = {}  # slot name -> lora_int_id
        self._in_use: collections.Counter[str] = collections.Counter()
        self._doomed: set[str] = set()
        self._registered = 0  # adapters vLLM holds or is being given (reserved before the add)
        self._in_vllm: set[int] = set()  # lora_int_ids registered (seq_cls slots never are)
        self._room = threading.Condition(self._lock)
        self.counters = collections.Counter()
        threading.Thread(target=self._mirror_metrics, name="farm-vllm-metrics", daemon=True).start()

    # ---- adapters -------------------------------------------------------------------------
    def attach(self, path: Path, labels: list[str] | None = None, *, name: str | None = None) -> Slot:
        task, num_labels = inspect_adapter(Path(path))
        lid = next(self._ids)
        slot = Slot(name=f"v{lid}", task=task, num_labels=num_labels)
        if task == "causal_lm":
            why = unsupported(Path(path), self.max_lora_rank)
            if why:
                raise ApiError(422, "this adapter cannot be served by the vLLM engine: " + "; ".join(why)
                               + ". Serve it on a replica with --engine farm.", "adapter_error")
            self._reserve_registration()
            dest = self.dir / f"lora-{lid}"
            try:
                shutil.copytree(path, dest)  # stays put while vLLM may re-read it
                r = self._http.post(f"{self.url}/adapters", json={"name": name or slot.name, "id": lid, "path": str(dest)})
            except BaseException:
                self._unregistered()
                raise
            if r.status_code != 200:
                shutil.rmtree(dest, ignore_errors=True)
                self._unregistered()
                e = _error_of(r)
                raise ApiError(503 if r.status_code == 503 else 422, e["message"], e.get("type", "adapter_error"),
                               e.get("retry_after"))
        with self._lock:
            self.slots[slot.name] = slot
            self._lora_id[slot.name] = lid
            if task == "causal_lm":
                self._in_vllm.add(lid)
            self.counters["loads"] += 1
        return slot

    def _reserve_registration(self, wait_s: float = 120.0) -> None:
        """Take one of vLLM's adapter places, waiting while every place is held. The places beyond the
        LRU belong to dropped adapters whose queued requests still finish; each frees its place after
        its last request (_reap), so the wait ends as the gate drains. Raises 503 after `wait_s`."""
        with self._room:
            if self._registered >= self.max_registered:
                self.counters["registration_waits"] += 1
            if not self._room.wait_for(lambda: self._registered < self.max_registered, wait_s):
                raise ApiError(503, f"all {self.max_registered} of this replica's vLLM adapter places are held by "
                                    "adapters still finishing requests; retry", "overloaded", 1.0)
            self._registered += 1
            self.counters["peak_registered"] = max(self.counters["peak_registered"], self._registered)

    def _unregistered(self) -> None:
        with self._room:
            self._registered -= 1
            self._room.notify_all()

    def detach(self, name: str) -> None:
        with self._lock:
            self._doomed.add(name)
        self._reap()

    def _reap(self) -> None:
        with self._lock:
            gone = [n for n in self._doomed if not self._in_use[n]]
            for n in gone:
                self._doomed.discard(n)
                self.slots.pop(n, None)
                lid = self._lora_id.pop(n, None)
                self.counters["evictions"] += 1
                gone[gone.index(n)] = (n, lid)
        for _name, lid in gone:
            if lid is None:
                continue
            try:
                self._http.delete(f"{self.url}/adapters/{lid}")
            except Exception:  # noqa: BLE001 - the worker is gone: nothing left to drop
                pass
            shutil.rmtree(self.dir / f"lora-{lid}", ignore_errors=True)
            with self._lock:
                was_registered = lid in self._in_vllm
                self._in_vllm.discard(lid)
            if was_registered:
                self._unregistered()  # only now: vLLM has dropped it, its place is free

    # ---- generation -----------------------------------------------------------------------
    def _aclient(self):
        import httpx

        loop = id(asyncio.get_running_loop())
        if loop not in self._aclients:
            self._aclients[loop] = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), headers=self._auth,
                                                     limits=httpx.Limits(max_connections=1000))
        return self._aclients[loop]

    async def generate(self, job: GenJob):
        if job.prompt_logprobs is not None:
            # vLLM 0.32 computes prompt logprobs with the per-request LoRA mapping (one row per request,
            # not per prompt token): on CPU its engine dies, on GPU an lm_head LoRA's delta is dropped
            # (vllm-project/vllm#29955, #51594). Every request here carries a LoRA (the base's identity).
            raise ApiError(400, "echo with logprobs (prompt logprobs) is not served by the vllm engine: vLLM "
                                "computes them wrongly with LoRA; use a replica with --engine farm, or leave out echo")
        job.submitted = time.perf_counter()
        with self._lock:
            lid = None
            if job.slot is not None:
                if job.slot not in self.slots:
                    raise ApiError(503, "adapter was unloaded while the request waited; retry", "overloaded", 0.1)
                lid = self._lora_id[job.slot]
                if self.slots[job.slot].task != "causal_lm":
                    raise ApiError(400, "a seq_cls adapter cannot generate text; use /v1/classify")
            self._in_use[job.slot] += 1
        body = {"prompt_ids": job.prompt_ids, "max_tokens": job.max_tokens, "temperature": job.sampler.temperature,
                "top_p": job.sampler.top_p, "seed": job.sampler.seed, "stops": job.stops, "lora_id": lid,
                "top_k": max(0, job.sampler.top_k), "stop_token_ids": job.stop_token_ids,
                "ignore_eos": job.ignore_eos, "keep_stop_token": job.keep_stop_token,
                "stream": job.stream, "request_id": uuid.uuid4().hex, "tenant": job.tenant,
                "logprobs": job.logprobs}
        try:
            async with self._aclient().stream("POST", f"{self.url}/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if "error" in event:
                        e = event["error"]
                        yield {"error": ApiError(e["status"], e["message"], e["type"], e.get("retry_after"))}
                        return
                    if job.first_token_at is None:
                        job.first_token_at = time.perf_counter()
                        metrics.get("ttft").observe(job.first_token_at - job.submitted, tags={"adapter": job.tag})
                    if "done" in event:
                        self._finished(job, event["done"])
                    yield event
                    if "done" in event:
                        return
            yield {"error": ApiError(500, "the vLLM engine ended a request without a result", "server_error")}
        except Exception as exc:  # noqa: BLE001 - transport trouble with the worker
            import httpx

            if not isinstance(exc, httpx.HTTPError):
                raise
            alive = self.proc.poll() is None
            yield {"error": ApiError(503 if alive else 500, f"vLLM engine unavailable: {type(exc).__name__}: {exc}"
                                     + ("" if alive else f" (worker exited with {self.proc.returncode})"),
                                     "server_error", 1.0 if alive else None)}
        finally:
            with self._lock:
                self._in_use[job.slot] -= 1
                doomed = bool(self._doomed)
            if doomed:
                threading.Thread(target=self._reap, daemon=True).start()

    def _finished(self, job: GenJob, done: dict) -> None:
        n = done["completion_tokens"]
        self.counters["rows"] += 1
        if n:  # Ray counters refuse 0
            metrics.get("tokens").inc(n, tags={"adapter": job.tag})
        elapsed = max(time.perf_counter() - job.submitted, 1e-9)
        metrics.get("tokens_per_s").observe(n / elapsed, tags={"adapter": job.tag})

    def classify(self, slot_name: str, input_ids: list[int]) -> dict:
        raise ApiError(400, "classification (seq_cls) adapters are served by the farm engine; this replica "
                            "runs the vllm engine (farm serve --engine farm)")

    # ---- state ----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counters plus the worker's admission gate (gate_*), for /admin/cache and the tests."""
        out = dict(self.counters)
        out["max_registered"], out["registered"] = self.max_registered, self._registered
        try:
            state = self._http.get(f"{self.url}/state", timeout=10).json()
            out.update({f"gate_{k}": v for k, v in state["gate"].items()})
            out["vllm_loras"] = len(state["vllm_loras"])
        except Exception:  # noqa: BLE001 - stats must not fail the admin route
            out["worker_alive"] = int(self.proc.poll() is None)
        return out

    def engine_metrics(self) -> dict[str, float]:
        """vLLM's Prometheus metrics (vllm:*), summed over label sets; histograms as _sum/_count."""
        text = self._http.get(f"{self.url}/metrics", timeout=10).text
        return parse_metrics(text)

    def _mirror_metrics(self, every_s: float = 5.0) -> None:
        gauges: dict[str, object] = {}
        while self.proc.poll() is None:
            time.sleep(every_s)
            try:
                import ray

                if not ray.is_initialized():
                    continue
                from ray.util.metrics import Gauge

                for name, value in self.engine_metrics().items():
                    g = gauges.get(name)
                    if g is None:
                        g = gauges[name] = Gauge(f"farm_serve_vllm_{name}", f"vLLM engine metric vllm:{name}")
                    g.set(value)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                continue

    def close(self) -> None:
        """End the worker and vLLM's processes under it (one process group), then drop the adapters' folders."""
        import signal

        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of vLLM's is left in the group
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

    def __del__(self):
        self.close()


def _error_of(r) -> dict:
    try:
        return r.json()["error"]
    except Exception:  # noqa: BLE001
        return {"message": f"vLLM worker answered {r.status_code}: {r.text[:300]}"}


_LINE = re.compile(r"^vllm:([A-Za-z0-9_]+)(?:\{[^}]*\})?\s+([-+0-9.eEinfINFNa]+)")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1).endswith(("_bucket", "_created")):
            continue
        try:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        except ValueError:
            continue
    return out
