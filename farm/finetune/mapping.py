"""A fine-tuning job <-> the farm's queue: create (policy, files, quotas, idempotency -> a manifest
submitted like `farm submit` does), and the OpenAI job object, events and checkpoints rendered from
the queue record, its event log and progress, and the published version's metrics.

Job ids are `ftjob-<queue job id>`; the queue id already names the customer (`acme-1a2b3c4d`).

The queue row is the truth: the API's record of a queued job is written with it, in the submit's
transaction (`submit_checked`, which also checks the concurrent-jobs quota and the Idempotency-Key
there), so a create that fails anywhere leaves no job or one visible job. Only a job that fails
validation, and so never reaches the queue, keeps its record in the files store.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Any

from farm.errors import IdempotencyMismatch, JobNotFound, ManifestError, QueueError, QuotaExceeded
from farm.finetune import files as files_api
from farm.finetune.config import FinetuneConfig
from farm.finetune.errors import ApiError, bad_request, not_found, quota
from farm.finetune.hyper import hyperparameters_of, resolve
from farm.finetune.policy import TrainingPolicy
from farm.finetune.store import FinetuneStore
from farm.rows import json_lines
from farm.serve.auth import Principal

PREFIX = "ftjob-"
RESULT_PREFIX = "file-results-"  # + queue id: a job's metrics CSV, rendered on read
SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
OPERATOR_ONLY = ("priority", "base_model", "dataset", "resources", "training", "lora", "customer", "adapter")
STATUS = {"queued": "queued", "retrying": "queued", "running": "running", "succeeded": "succeeded",
          "failed": "failed", "cancelled": "cancelled"}


API_ALIAS = "current"
"""The alias an API job moves to its version when that is not worse (customer/adapter@current)."""

PREFLIGHT_PARAM = {"dataset.train": "training_file", "dataset.eval": "validation_file"}


def preflight(manifest) -> tuple[str, str] | None:
    """The submit-time checks `farm submit` runs (farm.preflight: data files, model folder, s3://
    objects), at create time: None, or (param, message) naming every problem found."""
    from farm.preflight import check

    problems = check(manifest).problems
    if not problems:
        return None
    first = problems[0].split(":", 1)[0]
    return PREFLIGHT_PARAM.get(first, "model"), "; ".join(problems)


class Jobs:
    def __init__(self, cfg: FinetuneConfig, store: FinetuneStore, queue, catalog):
        self.cfg, self.store, self.queue, self.catalog = cfg, store, queue, catalog
        self._tokenizers: dict[str, Any] = {}

    # ---- ids and ownership ----------------------------------------------------------------------
    def _load(self, principal: Principal, job_id: str) -> dict:
        """The caller's job record; another customer's is 404 like a missing one."""
        qid = job_id[len(PREFIX):] if job_id.startswith(PREFIX) else ""
        customer = qid.rsplit("-", 1)[0] if "-" in qid else ""
        record = None
        if customer and principal.may_use(customer):
            record = self._record(customer, qid)
        if record is None:
            raise not_found("fine-tuning job", job_id)
        return record

    def _record(self, customer: str, qid: str) -> dict | None:
        """The API record of a job: the queue's (written with the job), else the files store's (a job
        that failed validation, or one created by an older version)."""
        record = self.queue.client_record(qid)
        if record is not None:
            return {**record, "queue_id": qid} if record.get("customer") == customer else None
        try:
            return self.store.job(customer, qid)
        except ApiError:
            return None

    def _queue_job(self, record: dict):
        if record.get("final"):
            return None
        try:
            return self.queue.get(record["queue_id"])
        except JobNotFound:
            return None

    # ---- create ---------------------------------------------------------------------------------
    def create(self, principal: Principal, body: dict, *, idempotency_key: str | None, retry_count: int) -> dict:
        customer = files_api.owner_of(principal)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        key = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
        # A fast answer for a repeat; the authoritative check is in the submit's transaction.
        again = self._repeat(customer, key, digest, retry_count)
        if again is not None:
            return self.render(again)
        record = self._create(customer, body, digest, key)
        self._wake()
        return self.render(record)

    def _repeat(self, customer: str, key: str | None, digest: str, retry_count: int) -> dict | None:
        """The job an earlier delivery of this request created: same Idempotency-Key, or a client
        retry (x-stainless-retry-count > 0) of the same body within the retry window."""
        if key:
            seen = self.queue.idempotent(customer, key)
            if seen is None:
                old = self.store.idempotent(customer, key)  # kept by an older version
                seen = (old["queue_id"], old.get("request_sha256")) if old else None
            if seen is not None:
                if seen[1] != digest:
                    raise _key_reused()
                return self._record(customer, seen[0])
            return None
        if retry_count > 0:
            cutoff = time.time() - self.cfg.retry_window_s
            same = [r for r in self.records(Principal(customer=customer))
                    if r.get("request_sha256") == digest and r.get("created_at", 0) >= cutoff]
            if same:
                return max(same, key=lambda r: r["created_at"])
        return None

    def _policy(self, model: Any) -> TrainingPolicy:
        if not isinstance(model, str) or not model:
            raise bad_request("model is required: the served name of an offered base", "model")
        policy = self.cfg.bases.get(model)
        if policy is None:
            offered = ", ".join(sorted(self.cfg.bases)) or "none"
            raise bad_request(f"model {model!r} is not a base offered for fine-tuning (offered: {offered})",
                              "model", code="model_not_found")
        return policy

    def _file(self, principal: Principal, file_id: Any, param: str) -> dict:
        if not isinstance(file_id, str) or not file_id:
            raise bad_request(f"{param} must be a file id from POST /v1/files", param)
        meta = files_api.find(self.store, Principal(customer=principal.customer), file_id, param)
        if meta.get("purpose") != "fine-tune":
            raise bad_request(f"{param} {file_id!r} has purpose {meta.get('purpose')!r}; upload it with "
                              "purpose=fine-tune", param)
        return meta

    def _create(self, customer: str, body: dict, digest: str, key: str | None) -> dict:
        principal = Principal(customer=customer)
        for name in OPERATOR_ONLY:
            if name in body:
                raise bad_request(f"{name} is set by the operator's training policy, not by the request", name)
        policy = self._policy(body.get("model"))
        hp_in, where, method = hyperparameters_of(body)
        hp = resolve(hp_in, where, policy, method)
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not SUFFIX_RE.fullmatch(suffix.lower())):
            raise bad_request("suffix must be 1-40 characters: letters, digits, '-' or '_', starting with a "
                              f"letter or digit (got {suffix!r})", "suffix")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
            raise bad_request(f"seed must be an integer 0..2147483647 (got {seed!r})", "seed")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= 16
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in metadata.items())
        ):
            raise bad_request("metadata must be at most 16 string pairs (keys <= 64, values <= 512 chars)", "metadata")
        train = self._file(principal, body.get("training_file"), "training_file")
        valid = None
        if body.get("validation_file") is not None:
            valid = self._file(principal, body["validation_file"], "validation_file")
        active = [j for j in self.queue.list(customer=customer) if not j.done]
        if len(active) >= policy.max_concurrent_jobs:  # early, before tokenizing; enforced at submit
            raise _over_quota(customer, len(active), policy.max_concurrent_jobs)

        tag = secrets.token_hex(4)
        qid = f"{customer}-{tag}"
        suffix_part = (suffix or "job").lower().replace("_", "-")
        adapter = f"ft-{suffix_part}-{tag}"
        record = {
            "queue_id": qid, "customer": customer, "model": body["model"], "adapter": adapter,
            "created_at": time.time(), "request_sha256": digest, "hyperparameters": hp,
            "training_file": train["id"], "validation_file": valid["id"] if valid else None,
            "suffix": suffix, "seed": seed if seed is not None else 0, "metadata": metadata,
            "checkpoint_every": policy.checkpoint_every, "idempotency_key": key, "method": method,
        }
        # validating_files: the files were checked at upload; a bad one fails the job here, by name.
        for param, meta in (("training_file", train), ("validation_file", valid)):
            if meta is not None and meta.get("status") != "processed":
                return self._failed(record, "invalid_" + param, param,
                                    f"{param} {meta['id']} ({meta['filename']}) is not usable: {meta.get('status_details')}")
        want = "preference" if method == "dpo" else None
        for param, meta in (("training_file", train), ("validation_file", valid)):
            if meta is None:
                continue
            if want and meta.get("format") != want:
                raise bad_request(f"{param} {meta['id']} ({meta['filename']}) is {meta.get('format')} (line 1 set its "
                                  "format); method dpo trains on preference lines: {\"input\": {\"messages\": [...]}, "
                                  "\"preferred_output\": [...], \"non_preferred_output\": [...]}", param,
                                  code="invalid_" + param)
            if not want and meta.get("format") == "preference":
                raise bad_request(f"{param} {meta['id']} ({meta['filename']}) holds preference lines (line 1 has "
                                  "'input'/'preferred_output'); they train with method {\"type\": \"dpo\"}, not "
                                  f"{method}", param, code="invalid_" + param)
        if valid is not None and valid.get("format") != train.get("format"):
            return self._failed(record, "invalid_validation_file", "validation_file",
                                f"validation_file {valid['id']} is {valid.get('format')} but training_file "
                                f"{train['id']} is {train.get('format')}: both must have one format")
        manifest = self._manifest(record, policy, train, valid)
        refused = preflight(manifest)  # before anything reads the base (the tokenizer below)
        if refused is not None:
            param, message = refused
            return self._failed(record, "invalid_" + param, param, message)
        tokens = self._count_tokens(policy, customer, train["id"])
        if hp["n_epochs"] * tokens > policy.max_training_tokens:
            raise bad_request(
                f"{where}.n_epochs={hp['n_epochs']} x {tokens} tokens in training_file {train['id']} = "
                f"{hp['n_epochs'] * tokens} tokens, over the policy's max_training_tokens of "
                f"{policy.max_training_tokens}", f"{where}.n_epochs", code="too_many_tokens")
        stored = {k: v for k, v in record.items() if k != "queue_id"}  # the queue names the job
        try:
            submitted = self.queue.submit_checked(manifest, max_attempts=policy.max_attempts,
                                                  max_active=policy.max_concurrent_jobs,
                                                  idempotency=(key, digest) if key else None, record=stored)
        except QuotaExceeded as exc:
            raise _over_quota(customer, exc.active, exc.limit) from None
        except IdempotencyMismatch:
            raise _key_reused() from None
        found = self._record(customer, submitted.job_id)
        if found is None:  # pragma: no cover - a key's job is written in the same transaction
            raise ApiError(500, f"the job {submitted.job_id} of this Idempotency-Key has no record")
        return found

    def _failed(self, record: dict, code: str, param: str, message: str) -> dict:
        """A job that fails validation: no queue row, its record in the files store; with a key, the
        first writer of the key wins (a racing replica's repeat answers with that job)."""
        record["final"] = {"status": "failed", "error": {"code": code, "message": message, "param": param},
                           "finished_at": time.time()}
        self.store.put_job(record["customer"], record)
        key = record.get("idempotency_key")
        if key:
            winner, sha = self.queue.remember(record["customer"], key, record["request_sha256"], record["queue_id"])
            if sha != record["request_sha256"]:
                raise _key_reused()
            if winner != record["queue_id"]:
                return self._record(record["customer"], winner) or record
        return record

    def check_unused(self, meta: dict) -> None:
        """Refuse (409) to delete a file that a queued or running job still reads."""
        customer = meta["customer"]
        url = self.store.file_url(customer, meta["id"])
        for job in self.queue.list(customer=customer):
            data = job.manifest.get("dataset") or {}
            if not job.done and url in (data.get("train"), data.get("eval")):
                raise ApiError(409, f"file {meta['id']} is the data of job {PREFIX}{job.id}, which is "
                               f"{job.state.value}: delete it after the job ends (or cancel the job)",
                               param="file_id", code="file_in_use")

    def _manifest(self, record: dict, policy: TrainingPolicy, train: dict, valid: dict | None):
        from farm.manifest import Manifest, parse_manifest

        c = record["customer"]
        hp = record["hyperparameters"]
        doc = {
            "customer": c, "adapter": record["adapter"], "base_model": policy.base_model,
            "revision": policy.revision, "quantization": policy.quantization, "task": "causal_lm",
            "priority": policy.priority, "lora": policy.lora.model_dump(mode="json"),
            "dataset": {
                "train": self.store.file_url(c, train["id"]),
                "eval": self.store.file_url(c, valid["id"]) if valid else None,
                "eval_fraction": policy.eval_fraction, "format": train["format"],
            },
            "training": {
                "epochs": float(hp["n_epochs"]), "batch_size": hp["batch_size"],
                "learning_rate": policy.learning_rate * hp["learning_rate_multiplier"],
                "max_seq_len": policy.max_seq_len, "seed": record["seed"],
                "eval_every": policy.eval_every, "checkpoint_every": policy.checkpoint_every,
            },
            "resources": {"gpus": policy.gpus, "max_failures": policy.max_failures},
            # API jobs never move the customer's alias to a version that scores worse (farm.train.gate)
            "alias": API_ALIAS, "alias_policy": "if_better",
        }
        if record.get("method") == "dpo":
            doc.update(method="dpo", dpo={"beta": hp["beta"]})
            # DPO trains LoRA on the training engine, whose reference is the base with the adapter off:
            # modules trained in full (the tiny demo policy's lm_head) are left out of a DPO job
            doc["lora"]["modules_to_save"] = None
        try:
            manifest: Manifest = parse_manifest(doc, source=f"fine-tuning job for {c}")
        except ManifestError as exc:  # a policy/request combination the manifest refuses
            raise bad_request("; ".join(exc.problems)) from None
        return manifest

    def _count_tokens(self, policy: TrainingPolicy, customer: str, file_id: str) -> int:
        """Tokens the job trains on per epoch (each example capped at max_seq_len), with the base's tokenizer."""
        from farm.modeling import load_tokenizer

        tok = self._tokenizers.get(policy.base_model)
        if tok is None:
            tok = self._tokenizers[policy.base_model] = load_tokenizer(policy.base_model, policy.revision)
        texts = []
        for _, obj in json_lines(self.store.file_bytes(customer, file_id)):  # checked at upload: no RowError
            if "messages" in obj:
                texts.append("\n".join(m["content"] for m in obj["messages"]))
            elif "input" in obj:  # a preference pair trains two sequences: prompt + each response
                prompt = "\n".join(m["content"] for m in obj["input"]["messages"])
                texts += [prompt + obj[k][0]["content"] for k in ("preferred_output", "non_preferred_output")]
            else:
                texts.append(obj["prompt"] + obj["completion"])
        # No truncation argument: it would make the shared tokenizer mutate its settings per call,
        # which fails ("Already borrowed") when two creates tokenize at once; min() below caps instead.
        ids = tok(texts)["input_ids"] if texts else []
        return sum(min(len(x) + 8, policy.max_seq_len) for x in ids)  # + template/eos tokens

    def _wake(self) -> None:
        try:
            import ray

            if not ray.is_initialized():  # outside Ray (tests, tools): the scheduler polls the queue
                return
            from farm import scheduler

            name, ns = self.cfg.scheduler_name, self.cfg.scheduler_namespace
            if name is None:
                from farm.cluster import read_state

                info = read_state()
                if info is None:
                    return
                name, ns = info.scheduler, info.namespace
            scheduler.wake(name, ns or scheduler.DEFAULT_NAMESPACE)
        except Exception:  # noqa: BLE001 - waking is a nudge; the scheduler polls anyway
            pass

    # ---- read -----------------------------------------------------------------------------------
    def get(self, principal: Principal, job_id: str) -> dict:
        return self.render(self._load(principal, job_id))

    def records(self, principal: Principal) -> list[dict]:
        customer = None if principal.admin else files_api.owner_of(principal)
        recs = {qid: {**r, "queue_id": qid} for qid, r in self.queue.client_records(customer).items()}
        for c in self.store.customers() if principal.admin else [customer]:
            for r in self.store.jobs(c):
                recs.setdefault(r["queue_id"], r)
        recs = list(recs.values())
        return sorted(recs, key=lambda r: (r["created_at"], r["queue_id"]), reverse=True)  # newest first

    def cancel(self, principal: Principal, job_id: str) -> dict:
        record = self._load(principal, job_id)
        job = self._queue_job(record)
        if job is None or job.done:
            status = record.get("final", {}).get("status") or (STATUS[job.state.value] if job else "failed")
            raise bad_request(f"job {job_id} is already {status}; there is nothing to cancel", code="job_not_cancellable")
        try:
            self.queue.request_cancel(job.id, "cancelled through the fine-tuning API")
        except QueueError as exc:
            raise bad_request(str(exc), code="job_not_cancellable") from None
        self._wake()
        return self.render(record)

    def _version(self, job):
        if job is None or job.state.value != "succeeded" or not job.adapter_ref:
            return None
        try:
            return self.catalog.resolve(job.adapter_ref)
        except Exception:  # noqa: BLE001 - a catalog hiccup must not hide the job
            return None

    def render(self, record: dict) -> dict:
        job = self._queue_job(record)
        final = record.get("final") or {}
        status = final.get("status") or (STATUS[job.state.value] if job else "failed")
        error = final.get("error")
        if status == "failed" and error is None:
            msg = (job.last_error if job else None) or "the job's queue record is gone"
            error = {"code": "training_failed", "message": msg, "param": None}
        fin = final.get("finished_at") or (job.finished_at if job and job.done else None)
        hp = record["hyperparameters"]
        method = record.get("method", "supervised")
        result_files = []
        trained_tokens = None
        if status == "succeeded":
            trained_tokens = int(job.tokens)
            rf = self._result_file(record, job)
            result_files = [rf] if rf else []
        estimated = None
        if job is not None and status == "running":
            p = job.progress
            step, total = p.get("step") or 0, p.get("total_steps") or 0
            if step > 0 and total and job.started_at:
                estimated = int(time.time() + (time.time() - job.started_at) / step * max(0, total - step))
        return {
            "id": PREFIX + record["queue_id"], "object": "fine_tuning.job", "created_at": int(record["created_at"]),
            "finished_at": int(fin) if fin else None, "model": record["model"],
            "fine_tuned_model": job.adapter_ref if status == "succeeded" else None,
            "organization_id": record["customer"], "status": status, "error": error,
            "hyperparameters": {k: v for k, v in hp.items() if k != "beta"}, "result_files": result_files,
            "trained_tokens": trained_tokens,
            "training_file": record["training_file"], "validation_file": record["validation_file"],
            "seed": record["seed"], "estimated_finish": estimated, "integrations": [],
            "metadata": record.get("metadata"), "user_provided_suffix": record.get("suffix"),
            "method": {"type": method, method: {"hyperparameters": hp}},
        }

    def _history(self, job) -> list[dict]:
        v = self._version(job)
        if v is not None:
            return list((v.metadata or {}).get("metrics_history") or [])
        p = dict(job.progress) if job is not None else {}
        return [p] if p.get("step") else []

    def _result_file(self, record: dict, job) -> str | None:
        """The id of a succeeded job's metrics CSV (None without metrics). Rendered on read: a GET
        writes nothing."""
        return RESULT_PREFIX + record["queue_id"] if self._history(job) else None

    def result_file(self, principal: Principal, file_id: str) -> tuple[dict, bytes] | None:
        """(file object, CSV bytes) of a job's result file, or None when file_id names none the caller may see."""
        if not file_id.startswith(RESULT_PREFIX):
            return None
        try:
            record = self._load(principal, PREFIX + file_id[len(RESULT_PREFIX):])
        except ApiError:
            return None
        job = self._queue_job(record)
        if job is None or job.state.value != "succeeded":
            return None
        history = self._history(job)
        if not history:
            return None
        lines = ["step,train_loss,valid_loss,tokens"]
        for h in history:
            cells = [h.get("step"), h.get("loss"), h.get("eval_loss"), h.get("tokens")]
            lines.append(",".join("" if c is None else f"{c:g}" if isinstance(c, float) else str(c) for c in cells))
        data = ("\n".join(lines) + "\n").encode()
        name = f"{PREFIX}{record['queue_id']}-metrics.csv"
        return files_api.result_meta(record["customer"], file_id, name, data, job.finished_at or time.time()), data

    def events(self, principal: Principal, job_id: str) -> list[dict]:
        """Newest first: the queue's state changes (messages) and per-step metrics."""
        record = self._load(principal, job_id)
        job = self._queue_job(record)
        out: list[dict] = []
        ident = PREFIX + record["queue_id"]
        out.append(_event(ident, 0, record["created_at"], "info", f"created fine-tuning job on {record['model']}"))
        if record.get("final"):
            err = record["final"]["error"]
            out.append(_event(ident, 1, record["final"]["finished_at"], "error", err["message"]))
        if job is not None:
            for i, e in enumerate(self.queue.events(job.id), start=1):
                level = "error" if e.to_state == "failed" else "warn" if e.to_state == "retrying" else "info"
                out.append(_event(ident, i, e.at, level, f"{e.to_state}: {e.reason}"))
            base = job.started_at or record["created_at"]
            for h in self._history(job):
                if h.get("step") is None:
                    continue
                data = {"step": h["step"], "train_loss": h.get("loss"), "valid_loss": h.get("eval_loss"),
                        "total_steps": h.get("total_steps")}
                msg = f"step {h['step']}/{h.get('total_steps')}" + (
                    f": train loss {h['loss']:.4f}" if isinstance(h.get("loss"), (int, float)) else "") + (
                    f", eval loss {h['eval_loss']:.4f}" if isinstance(h.get("eval_loss"), (int, float)) else "")
                seq = 10_000 + int(h["step"]) * 2 + (1 if h.get("final") else 0)
                out.append(_event(ident, seq, base + float(h.get("train_seconds") or 0), "info", msg, "metrics", data))
        return sorted(out, key=lambda e: (e["created_at"], e["_seq"]), reverse=True)

    def checkpoints(self, principal: Principal, job_id: str) -> list[dict]:
        """The saved steps (every checkpoint_every, and the final one) with their metrics, newest first.
        Only the final checkpoint is published and callable (as fine_tuned_model)."""
        record = self._load(principal, job_id)
        job = self._queue_job(record)
        if job is None or self._version(job) is None:
            return []
        every = record.get("checkpoint_every")
        history = self._history(job)
        by_step: dict[int, dict] = {}
        for h in history:
            if h.get("step") is None:
                continue
            by_step.setdefault(int(h["step"]), {}).update({k: v for k, v in h.items() if v is not None})
        last = max(by_step) if by_step else 0
        out = []
        for step, h in sorted(by_step.items(), reverse=True):
            if step != last and not (every and step % every == 0):
                continue
            name = job.adapter_ref if step == last else f"{job.adapter_ref}:ckpt-step-{step}"
            out.append({
                "id": f"ftckpt-{record['queue_id']}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int((job.finished_at if step == last else job.started_at) or record["created_at"]),
                "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": PREFIX + record["queue_id"],
                "step_number": step,
                "metrics": {"step": float(step), "train_loss": h.get("loss"), "valid_loss": h.get("eval_loss"),
                            "full_valid_loss": h.get("eval_loss") if step == last else None,
                            "full_valid_mean_token_accuracy": h.get("eval_mean_token_accuracy") if step == last else None},
            })
        return out


def _event(job_id: str, seq: int, at: float, level: str, message: str, type_: str = "message", data=None) -> dict:
    return {"id": f"ftevent-{job_id[len(PREFIX):]}-{seq}", "object": "fine_tuning.job.event",
            "created_at": int(at), "level": level, "message": message, "type": type_, "data": data, "_seq": seq}


def _over_quota(customer: str, active: int, limit: int) -> ApiError:
    return quota(f"concurrent jobs quota: {customer} has {active} jobs queued or running, the limit "
                 f"is {limit}; wait for one to finish or cancel one")


def _key_reused() -> ApiError:
    return bad_request("this Idempotency-Key was used with a different request body", code="idempotency_key_reused")
