"""The catalog on S3 (AWS or any S3-compatible server) through s3fs's client.

Conditional writes do the hard part: exclusive create is `PutObject` with `If-None-Match: *`, and
compare-and-swap is `PutObject` with `If-Match: <etag>`; a losing writer gets 412 PreconditionFailed.
Listings go straight to `ListObjectsV2` (never s3fs's listing cache), so a version published by
another process is seen on the next call. The endpoint comes from the standard AWS_ENDPOINT_URL.
"""

from __future__ import annotations

from pathlib import Path

from farm.catalog.store import Entry, Store
from farm.errors import CatalogError

# Objects up to this size go up in one PutObject; bigger ones use s3fs's multipart upload.
SINGLE_PUT_MAX = 64 * 2**20
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _is_conflict(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc
    resp = getattr(cause, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _CONFLICT_CODES or status in ("412", "409")


class S3Store(Store):
    """A catalog under `s3://bucket/prefix`."""

    def __init__(self, url: str):
        import s3fs

        rest = url.split("://", 1)[1].strip("/")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise CatalogError(f"catalog URL {url!r} names no bucket; expected s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        # Own instance, no listing cache: another process's writes must show up on the next call.
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        self.requests = 0
        self._hooked = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _count(self, **_kwargs) -> None:
        self.requests += 1

    async def _client(self):
        client = await self.fs.get_s3(self.bucket)
        if not self._hooked:
            # Count real HTTP requests (retries included) rather than method calls.
            client.meta.events.register("before-send.s3", self._count)
            self._hooked = True
        return client

    async def _connect(self) -> None:
        await self.fs.set_session()
        await self._client()

    def connect(self) -> None:
        self._run(self._connect)  # no request: ~0.1-0.15 s of botocore set-up on the 2-core box

    def _run(self, coro_fn, *args):
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, coro_fn, *args)
        except (FileNotFoundError, CatalogError):
            raise
        except Exception as exc:
            if _is_conflict(exc):
                raise _Conflict() from exc
            endpoint = getattr(getattr(self.fs, "s3", None), "_endpoint", None)
            where = getattr(endpoint, "host", "S3")
            raise CatalogError(f"catalog {self.url} ({where}): {type(exc).__name__}: {exc}") from exc

    async def _call(self, method: str, **kw):
        await self.fs.set_session()
        await self._client()
        return await self.fs._call_s3(method, Bucket=self.bucket, **kw)

    async def _get(self, key: str):
        try:
            resp = await self._call("get_object", Key=self._key(key))
        except FileNotFoundError:
            return None
        try:
            data = await resp["Body"].read()
        finally:
            resp["Body"].close()
        return data, resp["ETag"]

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        return self._run(self._get, key)

    async def _head(self, key: str) -> bool:
        try:
            await self._call("head_object", Key=self._key(key))
            return True
        except FileNotFoundError:
            return False

    def exists(self, key: str) -> bool:
        return self._run(self._head, key)

    async def _put(self, key: str, data: bytes, cond: dict) -> None:
        try:
            await self._call("put_object", Key=self._key(key), Body=data, **cond)
        except FileNotFoundError:
            raise CatalogError(f"catalog {self.url}: bucket {self.bucket!r} does not exist") from None

    def write(self, key: str, data: bytes) -> None:
        self._run(self._put, key, data, {})

    def _put_if(self, key: str, data: bytes, cond: dict) -> bool:
        try:
            self._run(self._put, key, data, cond)
            return True
        except _Conflict:
            return False

    def create(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, {"IfNoneMatch": "*"})

    def swap(self, key: str, data: bytes, tag: str | None) -> bool:
        return self._put_if(key, data, {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag})

    def upload(self, key: str, src: Path) -> None:
        if src.stat().st_size <= SINGLE_PUT_MAX:
            self.write(key, src.read_bytes())
        else:
            self._run(self._put_file, src, key)

    async def _put_file(self, src: Path, key: str) -> None:
        await self._client()
        await self.fs._put_file(str(src), f"{self.bucket}/{self._key(key)}")

    async def _download(self, key: str, dst: Path) -> None:
        resp = await self._call("get_object", Key=self._key(key))
        body = resp["Body"]
        try:
            with open(dst, "wb") as f:
                while chunk := await body.read(4 * 2**20):
                    f.write(chunk)
        finally:
            body.close()

    def download(self, key: str, dst: Path) -> None:
        self._run(self._download, key, dst)

    async def _list(self, prefix: str, delimiter: bool) -> tuple[list[str], list[Entry]]:
        full = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        dirs: list[str] = []
        files: list[Entry] = []
        token = None
        while True:
            kw = {"Prefix": full, **({"Delimiter": "/"} if delimiter else {})}
            if token:
                kw["ContinuationToken"] = token
            try:
                resp = await self._call("list_objects_v2", **kw)
            except FileNotFoundError:
                raise CatalogError(f"catalog {self.url}: bucket {self.bucket!r} does not exist") from None
            dirs += [p["Prefix"][len(full) :].rstrip("/") for p in resp.get("CommonPrefixes", [])]
            files += [Entry(o["Key"][len(full) :], o["Size"]) for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return dirs, files
            token = resp["NextContinuationToken"]

    def children(self, prefix: str) -> list[str]:
        dirs, files = self._run(self._list, prefix, True)
        names = set(dirs) | {e.key for e in files}
        return sorted(n for n in names if n and not n.startswith("."))

    def walk(self, prefix: str) -> list[Entry]:
        _, files = self._run(self._list, prefix, False)
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        return sorted(Entry(base + e.key, e.size) for e in files)

    async def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            objs = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            await self._call("delete_objects", Delete={"Objects": objs, "Quiet": True})

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._run(self._delete, keys)


class _Conflict(Exception):
    """A conditional write lost (412/409)."""
