"""The catalog's guarantees (issue 3), each one test run on a local directory AND a real S3 server
(SeaweedFS over HTTP): immutable versions under racing publishers, atomic visibility when a
publisher is killed, verified reads, read-your-write, latest/pins/aliases, tenancy, safe formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pytest

from farm.catalog import Catalog
from farm.catalog.testing import write_dummy_adapter
from farm.errors import AdapterNotFound, CatalogError, IntegrityError, RefError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def url(request, tmp_path, farm_home) -> str:
    """A fresh, empty catalog URL on each backend."""
    if request.param == "local":
        return (tmp_path / "catalog").as_uri()
    return request.getfixturevalue("s3_env")


@pytest.fixture
def src(tmp_path) -> Path:
    return write_dummy_adapter(tmp_path / "adapter", seed=1, extra=True)


def _raw(url: str, key: str) -> fsspec.AbstractFileSystem:
    """Direct storage access, behind the catalog's back."""
    fs, root = fsspec.core.url_to_fs(f"{url}/{key}", skip_instance_cache=True, use_listings_cache=False)
    return fs, root


def _run_py(code: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_publish_resolve_fetch_roundtrip(url, src, tmp_path):
    cat = Catalog(url)
    v = cat.publish("acme", "support", src, {"metrics": {"eval_loss": 0.5}, "job_id": "j1"})
    assert (v.ref, v.version, v.uri) == ("acme/support@v1", 1, f"{url}/acme/support/v1")
    assert set(v.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png"}
    assert v.metadata["peft"]["r"] == 4 and v.metadata["job_id"] == "j1"
    shown = v.to_json()
    assert {"ref", "version", "uri", "metrics", "id"} <= set(shown) and shown["metrics"] == {"eval_loss": 0.5}
    again = Catalog(url).resolve("acme/support")
    assert again.id == v.id and again.files == v.files
    out = cat.fetch("acme/support@v1", tmp_path / "out")
    for name in v.files:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((out / "farm.json").read_text())["version"] == 1


def test_connect_sends_no_request_and_ping_one(url, src, tmp_path):
    """A serving replica connects its catalog at start (sets the client up, asks nothing) and pings it
    (one read of a key no catalog holds)."""
    publisher = Catalog(url)
    publisher.publish("acme", "bot", src, {})
    cat = Catalog(url)
    cat.connect()
    assert cat.store.requests == 0
    assert cat.ping() is False and cat.store.requests <= 1
    v = cat.resolve("acme/bot")
    assert (cat.fetch(v, tmp_path / "out") / "adapter_config.json").exists()


def test_racing_publishers_get_distinct_versions(url, tmp_path):
    n = 4
    srcs = [write_dummy_adapter(tmp_path / f"s{i}", seed=i) for i in range(n)]
    barrier, results, errors = threading.Barrier(n), {}, []

    def publisher(i):
        cat = Catalog(url)  # one client per publisher, as separate jobs would have
        barrier.wait()
        try:
            results[i] = cat.publish("acme", "racy", srcs[i], {"publisher": i})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(v.version for v in results.values()) == list(range(1, n + 1))
    cat = Catalog(url)
    for i, v in results.items():  # nobody overwrote anybody: each version holds its publisher's files
        stored = cat.resolve(v.ref)
        assert stored.metadata["publisher"] == i and stored.files == v.files
    assert cat.resolve("acme/racy").version == n


def test_racing_publisher_processes(url, tmp_path):
    code = (
        "import sys; from farm.catalog import Catalog; from farm.catalog.testing import write_dummy_adapter;"
        "i = int(sys.argv[1]); src = write_dummy_adapter(sys.argv[2] + f'/p{i}', seed=i);"
        "print(Catalog(sys.argv[3]).publish('acme', 'procs', src, {'proc': i}).version)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(tmp_path), url], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    versions = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    assert versions == [1, 2, 3]
    assert {v.metadata["proc"] for v in Catalog(url).versions("acme", "procs")} == {0, 1, 2}


KILL_BEFORE_FARM_JSON = """
import os, signal, sys
from farm.catalog import Catalog
cat = Catalog(sys.argv[1])
create = cat.store.create
def create_then_die(key, data):
    if key.endswith("/farm.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # weights are uploaded, the metadata not yet
    return create(key, data)
cat.store.create = create_then_die
cat.publish("acme", "support", sys.argv[2], {}, idempotency_key=sys.argv[3] if len(sys.argv) > 3 else None)
"""


def test_killed_publisher_leaves_nothing_visible(url, src, tmp_path):
    cat = Catalog(url)
    cat.publish("acme", "support", src, {})
    proc = _run_py(f"import sys; sys.argv[1:] = {[url, str(src)]!r}\n" + KILL_BEFORE_FARM_JSON, check=False)
    assert proc.returncode == -9, proc.stderr
    fs, root = _raw(url, "acme/support/v2")
    assert fs.exists(f"{root}/adapter_model.safetensors")  # the debris is really there
    assert cat.resolve("acme/support").version == 1
    assert [v.version for v in cat.versions("acme", "support")] == [1]
    assert [v.ref for v in cat.list()] == ["acme/support@v1"]
    with pytest.raises(AdapterNotFound, match="acme/support@v2: not published"):
        cat.fetch("acme/support@v2", tmp_path / "nope")
    assert cat.publish("acme", "support", src, {}).version == 3  # not blocked by the debris
    assert cat.gc(grace_seconds=3600)["removed_incomplete"] == []  # too young
    assert cat.gc(grace_seconds=0)["removed_incomplete"] == ["acme/support@v2"]
    assert not fs.exists(f"{root}/adapter_model.safetensors")
    assert [v.version for v in cat.versions("acme", "support")] == [1, 3]


def test_idempotent_publish_survives_a_killed_attempt(url, src):
    cat = Catalog(url)
    proc = _run_py(f"import sys; sys.argv[1:] = {[url, str(src), 'job-7']!r}\n" + KILL_BEFORE_FARM_JSON, check=False)
    assert proc.returncode == -9
    first = cat.publish("acme", "support", src, {"try": 2}, idempotency_key="job-7")
    again = cat.publish("acme", "support", src, {"try": 3}, idempotency_key="job-7")
    assert first.id == again.id and first.version == 2 and again.metadata == first.metadata
    assert [v.version for v in cat.versions("acme", "support")] == [2]  # published exactly once
    assert cat.publish("acme", "support", src, {}, idempotency_key="job-8").version == 3


@pytest.mark.parametrize("damage", ["changed", "truncated", "missing"])
def test_tampered_file_is_an_integrity_error(url, src, tmp_path, damage):
    cat = Catalog(url)
    v = cat.publish("acme", "support", src, {})
    fs, root = _raw(url, "acme/support/v1/adapter_model.safetensors")
    data = fs.cat_file(root)
    if damage == "missing":
        fs.rm_file(root)
    else:
        fs.pipe_file(root, data[:-8] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=r"acme/support@v1: file adapter_model\.safetensors"):
        cat.fetch(v, tmp_path / "dest")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        cat.fetch("acme/support")  # the cache path verifies too
    assert not (tmp_path / "dest").exists()  # nothing half-verified left behind
    assert not list((tmp_path / "farm_home").glob("cache/adapters/acme/support/v1-*"))


def test_fetch_cache_reuses_a_verified_copy(url, src):
    cat = Catalog(url)
    cat.publish("acme", "support", src, {})
    first = cat.fetch("acme/support")
    before = cat.store.requests
    assert cat.fetch("acme/support") == first
    assert cat.store.requests - before <= 2  # just the resolve, no downloads
    assert first.name.startswith("v1-") and (first / "adapter_model.safetensors").exists()
    # Each reuse marks the folder used (farm gc removes fetched folders by last use).
    import os

    from farm.catalog.fetch import VERIFIED

    os.utime(first / VERIFIED, (1_000_000, 1_000_000))
    cat.fetch("acme/support")
    assert (first / VERIFIED).stat().st_mtime > 1_000_000


def test_read_your_write_across_processes(url, src):
    mine = Catalog(url)
    mine.publish("acme", "support", src, {})
    assert mine.resolve("acme/support").version == 1
    assert [v.ref for v in mine.list("acme")] == ["acme/support@v1"]
    other = Catalog(url)  # another instance in this process...
    assert other.publish("acme", "support", src, {}).version == 2
    assert mine.resolve("acme/support").version == 2
    code = (f"from farm.catalog import Catalog; print(Catalog({url!r}).publish('acme', 'support', "
            f"{str(src)!r}, {{}}).version)")
    assert _run_py(code).stdout.strip() == "3"  # ...and another process
    assert mine.resolve("acme/support").version == 3
    assert [v.ref for v in mine.list("acme")] == ["acme/support@v3"]
    assert [v.version for v in mine.versions("acme", "support")] == [1, 2, 3]


def test_latest_and_pins(url, src):
    cat = Catalog(url)
    for i in range(3):
        cat.publish("acme", "support", src, {"i": i})
    assert cat.resolve("acme/support").version == 3
    assert cat.resolve("acme/support@latest").version == 3
    assert cat.resolve("acme/support@v1").metadata["i"] == 0
    with pytest.raises(AdapterNotFound, match="no adapter acme/support@v4"):
        cat.resolve("acme/support@v4")
    with pytest.raises(AdapterNotFound, match="no adapter acme/other"):
        cat.resolve("acme/other")


def test_lagging_latest_pointer_is_probed_and_repaired(url, src, monkeypatch):
    cat = Catalog(url)
    cat.publish("acme", "support", src, {})
    import farm.catalog.publish as publish_mod

    monkeypatch.setattr(publish_mod, "advance_latest", lambda *a: None)  # died after farm.json
    cat.publish("acme", "support", src, {})
    monkeypatch.undo()
    assert cat.resolve("acme/support").version == 2  # one extra probe finds it
    assert cat.gc(grace_seconds=0)["repaired_latest"] == ["acme/support"]
    before = cat.store.requests
    assert cat.resolve("acme/support").version == 2
    assert cat.store.requests - before == 2


def test_resolve_cost_does_not_grow_with_the_catalog(url, src):
    cat = Catalog(url)
    cat.publish("acme", "support", src, {})

    def cost(ref):
        before = cat.store.requests
        cat.resolve(ref)
        return cat.store.requests - before

    small = (cost("acme/support"), cost("acme/support@v1"))
    for c in range(4):
        for a in range(5):
            cat.publish(f"c{c}", f"a{a}", src, {})
    cat.publish("acme", "support", src, {})
    cat.set_alias("acme/support@v1", "prod")
    assert (cost("acme/support"), cost("acme/support@v2")) == small == (2, 1)
    assert cost("acme/support@prod") == 2


def test_aliases_move_with_compare_and_swap(url, src):
    cat = Catalog(url)
    for _ in range(3):
        cat.publish("acme", "support", src, {})
    assert cat.set_alias("acme/support@v1", "prod", expect=None) is None
    assert cat.resolve("acme/support@prod").version == 1
    assert cat.set_alias("acme/support@v2", "prod", expect=1) == 1
    with pytest.raises(CatalogError, match="alias acme/support@prod is v2, expected v1; not moved"):
        cat.set_alias("acme/support@v3", "prod", expect=1)
    assert cat.resolve("acme/support@prod").version == 2
    with pytest.raises(RefError, match="bad alias 'v9'"):
        cat.set_alias("acme/support@v3", "v9")

    barrier, wins, losses = threading.Barrier(4), [], []

    def mover(target):
        c = Catalog(url)
        barrier.wait()
        try:
            c.set_alias(f"acme/support@v{target}", "prod", expect=2)
            wins.append(target)
        except CatalogError:
            losses.append(target)

    threads = [threading.Thread(target=mover, args=(t,)) for t in (1, 3, 1, 3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and len(losses) == 3  # exactly one checked move wins the race
    assert cat.resolve("acme/support@prod").version == wins[0]
    assert cat.aliases("acme/support") == {"prod": wins[0]}
    assert cat.remove_alias("acme/support", "prod") == wins[0]
    with pytest.raises(AdapterNotFound, match="no alias 'prod'"):
        cat.resolve("acme/support@prod")


def test_delete_is_recorded_and_respects_aliases(url, src):
    cat = Catalog(url)
    for _ in range(3):
        cat.publish("acme", "support", src, {})
    cat.set_alias("acme/support@v3", "prod")
    with pytest.raises(CatalogError, match="acme/support@v3 is the target of alias.*prod.*--force"):
        cat.delete("acme/support@v3")
    assert cat.resolve("acme/support@v3").version == 3  # refused: nothing lost
    with pytest.raises(CatalogError, match="name the version"):
        cat.delete("acme/support")
    record = cat.delete("acme/support@v3", force=True)
    assert record["aliases_removed"] == ["prod"] and record["by"]
    assert cat.resolve("acme/support").version == 2  # latest moved back
    with pytest.raises(AdapterNotFound, match=r"acme/support@v3: deleted at .* by "):
        cat.resolve("acme/support@v3")
    with pytest.raises(AdapterNotFound):
        cat.resolve("acme/support@prod")
    fs, root = _raw(url, "acme/support/v3/.deleted")
    assert json.loads(fs.cat_file(root))["ref"] == "acme/support@v3"
    cat.delete("acme/support@v1")
    assert cat.publish("acme", "support", src, {}).version == 4  # numbers are never reused
    assert [v.version for v in cat.versions("acme", "support")] == [2, 4]


class _Spy:
    """Wraps a store and records every key it is asked about."""

    def __init__(self, store):
        self.store, self.keys = store, []

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):
            if args and isinstance(args[0], str):
                self.keys.append(args[0])
            return attr(*args, **kw)

        return call


def test_tenancy(url, src, tmp_path):
    admin = Catalog(url)
    admin.publish("alpha", "bot", src, {})
    admin.publish("beta", "bot", src, {})
    admin.publish("beta", "secret", src, {})
    scoped = Catalog(url, customer="alpha")
    assert [v.ref for v in scoped.list()] == ["alpha/bot@v1"]
    with pytest.raises(AdapterNotFound) as real_miss:
        scoped.resolve("alpha/secret")
    for attempt in (
        lambda: scoped.resolve("beta/secret"),
        lambda: scoped.fetch("beta/secret@v1", tmp_path / "x"),
        lambda: scoped.fetch(admin.resolve("beta/secret"), tmp_path / "y"),
        lambda: scoped.versions("beta", "secret"),
        lambda: scoped.list("beta"),
        lambda: scoped.delete("beta/secret@v1"),
        lambda: scoped.set_alias("beta/secret@v1", "prod"),
        lambda: scoped.publish("beta", "secret", src, {}),
    ):
        with pytest.raises(AdapterNotFound) as exc:
            attempt()
        assert "beta/" in str(exc.value) and str(exc.value).startswith("no adapter")
    assert str(real_miss.value).startswith("no adapter alpha/secret")  # same words: no existence leak
    assert not (tmp_path / "x").exists() and admin.resolve("beta/secret").version == 1

    spy = _Spy(admin.store)
    admin.store = spy
    assert [v.ref for v in admin.list("beta")] == ["beta/bot@v1", "beta/secret@v1"]
    assert spy.keys and all(k.startswith("beta") for k in spy.keys)  # only that customer's prefix


BAD_REFS = [
    "", "acme", "acme/", "/acme/bot", "acme/bot/v1", "../acme/bot", "acme/..", "acme/../bot", "acme/a..b",
    "Acme/bot", "acme/Bot", "acme/bot@V1", "acme/bot@v0", "acme/bot@v01", "acme/bot@", "acme/bot@v1@v2",
    "s3://bucket/acme/bot", "file:///etc/passwd", "acme%2fbot/x", "acme/%2e%2e", "%2e%2e/bot",
    "acme\\bot", "acme/bo t", "acme/bot\n", "acme/bot\x00", "~/acme", "acme/" + "a" * 64,
    "a" * 40 + "/" + "b" * 40 + "@" + "c" * 130, "acme/-bot", "acme/.bot", "acme/bot@latest@x", "acme/ボット",
]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_bad_refs_are_rejected_before_storage(url, ref):
    cat = Catalog(url)
    for op in (cat.resolve, cat.fetch, cat.delete, cat.aliases):
        with pytest.raises(RefError, match="bad adapter ref"):
            op(ref)
    with pytest.raises(RefError):
        cat.import_adapter(Path("."), ref)
    assert cat.store.requests == 0


def test_bad_names_and_inputs_are_clear_errors(url, src, tmp_path):
    cat = Catalog(url)
    with pytest.raises(RefError, match=r"bad customer name '\.\.'"):
        cat.publish("..", "bot", src, {})
    with pytest.raises(RefError, match="bad adapter name 'a/b'"):
        cat.publish("acme", "a/b", src, {})
    with pytest.raises(RefError, match="bad customer name"):
        Catalog(url, customer="../x")
    with pytest.raises(CatalogError, match="does not exist or is not a directory"):
        cat.publish("acme", "bot", tmp_path / "missing", {})
    with pytest.raises(CatalogError, match="not JSON-serialisable"):
        cat.publish("acme", "bot", src, {"x": object()})
    with pytest.raises(CatalogError, match="give customer/adapter without @"):
        cat.import_adapter(src, "acme/bot@v2")
    with pytest.raises(CatalogError, match="grace period must be >= 0"):
        cat.gc(grace_seconds=-1)
    assert cat.list() == []


@pytest.mark.parametrize("bad", ["adapter_model.bin", "optimizer.pt", "extra/state.pkl"])
def test_pickle_files_are_refused(url, tmp_path, bad):
    folder = write_dummy_adapter(tmp_path / "a")
    (folder / bad).parent.mkdir(exist_ok=True)
    (folder / bad).write_bytes(b"\x80\x04K\x01.")  # a pickle
    cat = Catalog(url)
    with pytest.raises(CatalogError, match=rf"refusing pickle weight file\(s\) {bad}: only safetensors"):
        cat.import_adapter(folder, "acme/bot")
    assert cat.list() == [] and cat.store.children("acme/bot") == []  # nothing written


@pytest.mark.parametrize("link", ["notes.txt", "extra", "extra/deep/key.pem"])
def test_symlinks_are_refused_naming_the_path(url, tmp_path, link):
    """A link to a host file (or a folder of them) is never published: the import names it, writes nothing."""
    secret = tmp_path / "host" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    folder = write_dummy_adapter(tmp_path / "a")
    (folder / link).parent.mkdir(parents=True, exist_ok=True)
    (folder / link).symlink_to(secret.parent if link == "extra" else secret)
    cat = Catalog(url)
    for attempt in (lambda: cat.import_adapter(folder, "acme/bot"), lambda: cat.publish("acme", "bot", folder, {})):
        with pytest.raises(CatalogError, match=f"{link} is a symbolic link .*plain files only"):
            attempt()
    assert cat.list() == [] and cat.store.children("acme/bot") == []


def test_a_file_swapped_for_a_symlink_after_the_scan_is_not_read(url, tmp_path, monkeypatch):
    import farm.catalog.publish as publish

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    folder = write_dummy_adapter(tmp_path / "a", extra=True)
    scan = publish.scan_folder

    def scan_then_swap(src):
        files = scan(src)
        (folder / "README.md").unlink()
        (folder / "README.md").symlink_to(secret)
        return files

    monkeypatch.setattr(publish, "scan_folder", scan_then_swap)
    cat = Catalog(url)
    with pytest.raises(CatalogError, match="README.md: cannot be read as a plain file"):
        cat.import_adapter(folder, "acme/bot")
    assert cat.list() == []


def test_non_peft_and_fake_safetensors_are_refused(url, tmp_path):
    cat = Catalog(url)
    folder = write_dummy_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\x80\x04K\x01." * 4)  # pickle in disguise
    with pytest.raises(CatalogError, match="not a valid safetensors file"):
        cat.import_adapter(folder, "acme/bot")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CatalogError, match="peft_type is 'PREFIX_TUNING'; only LORA"):
        cat.import_adapter(folder, "acme/bot")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CatalogError, match="no adapter_config.json"):
        cat.import_adapter(folder, "acme/bot")


def test_fetch_refuses_a_non_empty_destination(url, src, tmp_path):
    cat = Catalog(url)
    cat.publish("acme", "bot", src, {})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(CatalogError, match="exists and is not an empty folder"):
        cat.fetch("acme/bot", dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_good_refs_parse():
    from farm.catalog import AdapterRef, parse_ref

    assert parse_ref("acme/support") == AdapterRef("acme", "support")
    assert parse_ref("acme/support@latest") == AdapterRef("acme", "support")
    assert parse_ref("acme-1/sup_port.v2@v12") == AdapterRef("acme-1", "sup_port.v2", version=12)
    assert parse_ref("acme/support@prod") == AdapterRef("acme", "support", alias="prod")
    assert str(parse_ref("acme/support@v3")) == "acme/support@v3"


def test_other_fsspec_urls_work_best_effort(src, farm_home, tmp_path):
    url = f"memory://farm-test-{tmp_path.name}"
    cat = Catalog(url)
    assert [cat.publish("acme", "bot", src, {}).version for _ in range(2)] == [1, 2]
    cat.set_alias("acme/bot@v1", "prod")
    assert Catalog(url).resolve("acme/bot@prod").version == 1
    assert (cat.fetch("acme/bot", tmp_path / "out") / "adapter_model.safetensors").exists()
    cat.delete("acme/bot@v2")
    assert cat.resolve("acme/bot").version == 1


def test_gc_finishes_a_delete_cut_short(url, src, monkeypatch):
    cat = Catalog(url)
    cat.publish("acme", "bot", src, {})
    cat.publish("acme", "bot", src, {})
    import farm.catalog.admin as admin_mod

    def die(*args):
        raise KeyboardInterrupt  # the deleting process goes away after writing the tombstone

    monkeypatch.setattr(admin_mod, "retreat_latest", die)
    with pytest.raises(KeyboardInterrupt):
        cat.delete("acme/bot@v2")
    monkeypatch.undo()
    report = cat.gc(grace_seconds=3600)
    assert report["finished_deletes"] == ["acme/bot@v2"] and report["repaired_latest"] == ["acme/bot"]
    assert cat.resolve("acme/bot").version == 1
    with pytest.raises(AdapterNotFound, match="deleted at"):
        cat.resolve("acme/bot@v2")
    assert cat.gc(grace_seconds=0) == {"removed_incomplete": [], "finished_deletes": [], "repaired_latest": []}


def test_resolve_by_immutable_id(url, src):
    cat = Catalog(url)
    v = cat.publish("acme", "bot", src, {})
    assert cat.resolve(v.id) == v and cat.resolve(v.ref + "#" + v.digest) == v
    with pytest.raises(AdapterNotFound, match="has a different farm.json"):
        cat.resolve(v.ref + "#" + "0" * 12)
    for bad in ("acme/bot#" + v.digest[:12], v.ref + "#xyz", "../x@v1#" + v.digest[:12]):
        with pytest.raises(RefError):
            cat.resolve(bad)
