"""ObjectStoreBackend against a real S3 API on loopback (moto's server, tests/_s3server.py).

The shared Backend conformance kit, then what only an object store needs: conditional-create
races, the lease (refusal, expiry and takeover, renewal, release), multipart uploads aborted
or left behind by a killed writer, listing consistency, typed errors, and a repository round
trip. Lease times to live are 1-2 s, so the whole module runs in well under a minute.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                                          "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips: it is useless without moto
import torch  # noqa: E402
from _s3server import S3Server  # noqa: E402
from _util import assert_bitexact  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.errors import LocationError, LockedError, StorageError  # noqa: E402
from deltackpt.repository import Repository  # noqa: E402
from deltackpt.store import objectstore  # noqa: E402
from deltackpt.store.backend import Backend  # noqa: E402
from deltackpt.store.objectstore import ObjectStoreBackend  # noqa: E402
from deltackpt.testing.backends import BackendTests  # noqa: E402

s3_server = _s3server.s3_server
MiB = 1 << 20
TTL = 2.0


def _backend(server: S3Server, url: str | None = None, **kw: Any) -> ObjectStoreBackend:
    kw.setdefault("lease_ttl", TTL)
    kw.setdefault("part_size", 5 * MiB)
    return ObjectStoreBackend.from_url(url or server.url(), server.storage_options, **kw)


def _key_prefix(b: ObjectStoreBackend) -> str:
    return b.url.split("/", 3)[3] + "/"


@pytest.fixture
def ob(s3_server: S3Server) -> ObjectStoreBackend:
    return _backend(s3_server)


# ============================================================================ conformance kit
class TestObjectStoreBackend(BackendTests):
    #: a killed holder's lease lapses within one ttl of its last renewal
    lock_expiry_seconds = TTL + 3.0

    @pytest.fixture(autouse=True)
    def _server(self, s3_server: S3Server) -> None:
        self.server = s3_server

    def make_backend(self, tmp_path: Path) -> Backend:
        return _backend(self.server)

    def backend_code(self, backend: Backend) -> str:
        assert isinstance(backend, ObjectStoreBackend)
        return ("from deltackpt.store.objectstore import ObjectStoreBackend\n"
                f"b = ObjectStoreBackend.from_url({backend.url!r}, "
                f"{self.server.storage_options!r}, lease_ttl={TTL!r})")


# ============================================================================ conditional writes
def test_write_new_race_between_clients(s3_server: S3Server) -> None:
    """Racing creators on separate clients (as separate machines would be): one wins."""
    url = s3_server.url("race")
    clients = [_backend(s3_server, url) for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    won: list[int] = []
    lost: list[int] = []

    def create(i: int) -> None:
        barrier.wait()
        try:
            clients[i].write_new("steps/10.manifest", f"writer {i}".encode())
            won.append(i)
        except FileExistsError:
            lost.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(lost) == len(clients) - 1
    assert clients[0].read("steps/10.manifest") == f"writer {won[0]}".encode()


# ============================================================================ the lease
def test_second_taker_refused_names_owner_and_expiry(ob: ObjectStoreBackend) -> None:
    lk = ob.lock("lock", "pid 1 on host-a")
    try:
        with pytest.raises(LockedError) as ei:
            ob.lock("lock", "pid 2 on host-b")
        text = str(ei.value)
        assert "pid 1 on host-a" in text and "expires at" in text and ob.url in text
        doc = json.loads(ob.read("lock"))
        assert doc["owner"] == "pid 1 on host-a" and doc["expires"] > time.time()
        assert set(doc) == {"owner", "token", "expires"}
    finally:
        lk.release()
    assert not ob.exists("lock")                  # released: deleted


def test_renewal_keeps_lease_past_ttl(s3_server: S3Server) -> None:
    b = _backend(s3_server, lease_ttl=1.5)
    lk = b.lock("lock", "long runner")
    try:
        time.sleep(3.2)                           # > 2 ttl: alive only through renewals
        lk.check()
        with pytest.raises(LockedError, match="long runner"):
            b.lock("lock", "newcomer")
    finally:
        lk.release()
    b.lock("lock", "newcomer").release()          # release lets a new taker in at once


def test_expired_lease_taken_over_and_old_holder_stops(s3_server: S3Server) -> None:
    url = s3_server.url("lease")
    old_b, new_b = _backend(s3_server, url, lease_ttl=1.0), _backend(s3_server, url)
    old = old_b.lock("lock", "stalled writer")
    assert isinstance(old, objectstore._Lease)
    with old._mutex:                              # the holder stalls: no renewal goes out
        time.sleep(1.3)
        with pytest.raises(LockedError, match="expired"):
            old.check()                           # by its own clock, before anyone takes it
        new = new_b.lock("lock", "next writer")   # expired: taken over with If-Match
    try:
        deadline = time.monotonic() + 5
        while old._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)                      # the stalled renewal now runs, and is refused
        with pytest.raises(LockedError) as ei:
            old.check()
        assert "taken over" in str(ei.value) and "next writer" in str(ei.value)
        new.check()
        old.release()                             # a lost lease's release touches nothing
        assert json.loads(new_b.read("lock"))["owner"] == "next writer"
        with pytest.raises(LockedError, match="next writer"):
            old_b.lock("lock", "stalled writer")
    finally:
        new.release()


def test_expired_lease_one_taker_wins(s3_server: S3Server) -> None:
    """A dead holder's expired lease, raced for by several takers: one If-Match wins."""
    url = s3_server.url("takeover")
    clients = [_backend(s3_server, url) for _ in range(6)]
    clients[0].write_atomic("lock", json.dumps(
        {"owner": "dead writer", "token": "0" * 32, "expires": time.time() - 5}).encode())
    barrier = threading.Barrier(len(clients))
    won: list[Any] = []
    refused: list[str] = []

    def take(i: int) -> None:
        barrier.wait()
        try:
            won.append(clients[i].lock("lock", f"taker {i}"))
        except LockedError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert len(won) == 1 and len(refused) == len(clients) - 1, refused
        holder = json.loads(clients[0].read("lock"))["owner"]
        assert all(holder in r for r in refused)
    finally:
        for lk in won:
            lk.release()


def test_unreadable_lease_counts_as_expired(ob: ObjectStoreBackend) -> None:
    ob.write_atomic("lock", b"not json")
    lk = ob.lock("lock", "repairer")
    lk.check()
    lk.release()


# ============================================================================ uploads
def test_large_stream_is_multipart_and_whole(s3_server: S3Server, ob: ObjectStoreBackend) -> None:
    data = os.urandom(MiB) * 12 + b"tail"
    s = ob.create_stream("packs/ab/big.pack")
    for i in range(0, len(data), 3 * MiB + 17):
        s.write(memoryview(data)[i:i + 3 * MiB + 17])
    assert s.tell() == len(data)
    assert s3_server.multipart_uploads(_key_prefix(ob))      # parts are going up ...
    assert not ob.exists("packs/ab/big.pack")                # ... invisible
    s.commit()
    assert ob.size("packs/ab/big.pack") == len(data)
    assert ob.read("packs/ab/big.pack") == data
    assert ob.read_range("packs/ab/big.pack", 5 * MiB - 3, 10) == data[5 * MiB - 3:5 * MiB + 7]
    assert not s3_server.multipart_uploads(_key_prefix(ob))


def test_stream_aborted_mid_upload_leaves_nothing(s3_server: S3Server,
                                                  ob: ObjectStoreBackend) -> None:
    s = ob.create_stream("packs/cd/aborted.pack")
    s.write(b"x" * (12 * MiB))
    assert s3_server.multipart_uploads(_key_prefix(ob))
    s.abort()
    assert not s3_server.multipart_uploads(_key_prefix(ob))  # parts deleted
    assert not ob.exists("packs/cd/aborted.pack")
    assert ob.list("packs/cd") == [] and ob.list_dirs("packs") == []
    assert ob.usage().get("packs", 0) == 0


def test_killed_writer_leftover_is_invisible(s3_server: S3Server, ob: ObjectStoreBackend) -> None:
    code = ("from deltackpt.store.objectstore import ObjectStoreBackend\n"
            f"b = ObjectStoreBackend.from_url({ob.url!r}, {s3_server.storage_options!r}, "
            f"part_size={5 * MiB})\n"
            "s = b.create_stream('packs/ef/killed.pack')\n"
            "s.write(b'k' * (12 << 20))\n"
            "print('WRITING', flush=True)\nimport time\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "WRITING"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert s3_server.multipart_uploads(_key_prefix(ob))      # the leftover exists ...
    assert not ob.exists("packs/ef/killed.pack")             # ... and nothing shows it
    assert ob.list("packs/ef") == [] and "ef" not in ob.list_dirs("packs")
    with pytest.raises(FileNotFoundError):
        ob.read("packs/ef/killed.pack")
    assert ob.usage().get("packs", 0) == 0


def test_listing_consistency(ob: ObjectStoreBackend) -> None:
    expected: set[str] = set()
    for i in range(30):
        ob.write_atomic(f"index/{i:03d}.idx", b"i" * i)
        expected.add(f"{i:03d}.idx")
    for i in range(30, 35):
        s = ob.create_stream(f"index/{i:03d}.idx")
        s.write(b"s" * i)
        s.commit()
        expected.add(f"{i:03d}.idx")
    ob.write_new("index/new.idx", b"n")
    expected.add("new.idx")
    assert ob.list("index") == sorted(expected)
    for i in range(0, 35, 3):
        ob.delete(f"index/{i:03d}.idx")
        expected.discard(f"{i:03d}.idx")
        assert ob.list("index") == sorted(expected)          # each delete shows at once
    assert ob.usage()["index"] == sum(ob.size(f"index/{n}") for n in expected)


# ============================================================================ errors
def test_missing_bucket_is_a_storage_error(s3_server: S3Server) -> None:
    b = ObjectStoreBackend.from_url("s3://no-such-bucket-here/p", s3_server.storage_options)
    with pytest.raises(StorageError) as ei:
        b.write_atomic("config.json", b"{}")
    assert ei.value.key == "config.json" and "config.json" in str(ei.value)


def test_unreachable_store_retried_then_storage_error(s3_server: S3Server) -> None:
    dead = f"http://127.0.0.1:{_s3server._free_port()}"       # nothing listens there
    opts = {**s3_server.storage_options, "endpoint_url": dead,
            "retry_config": {"max_retries": 2, "retry_timeout": objectstore.timedelta(seconds=2)}}
    b = ObjectStoreBackend.from_url("s3://deltackpt-test/p", opts)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        b.read("steps/1.manifest")
    assert "steps/1.manifest" in str(ei.value) and time.monotonic() - t0 < 30
    assert isinstance(ei.value, deltackpt.DeltaCkptError)


def test_bad_url_and_options(s3_server: S3Server) -> None:
    with pytest.raises(LocationError, match="not an object store URL"):
        ObjectStoreBackend.from_url("ftp://host/p")
    with pytest.raises(LocationError, match="cannot open"):
        ObjectStoreBackend.from_url("s3://bkt/p", {"no_such_option": "1"})


def test_missing_obstore_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "obs", None)
    with pytest.raises(LocationError, match=r'pip install "deltackpt\[s3\]"'):
        ObjectStoreBackend.from_url("s3://bkt/p")


def test_import_deltackpt_does_not_import_obstore() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, deltackpt; "
                          "deltackpt.open; print('obstore' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ============================================================================ a repository on S3
def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 64, generator=g) + step * 1e-3
    return {"model": {"w": w, "b": torch.full((64,), float(step))}, "step": step}


def test_repository_round_trip(s3_server: S3Server) -> None:
    url = s3_server.url("repo")
    saved = {s: _state(s) for s in range(1, 7)}
    with Repository(url, backend=_backend(s3_server, url), keyframe_every=3) as repo:
        for s, state in saved.items():
            repo.save(s, state)
        with pytest.raises(LockedError):       # one writer: the lease refuses a second
            Repository(url, backend=_backend(s3_server, url))
    with Repository(url, "r", backend=_backend(s3_server, url)) as repo:
        assert repo.steps() == list(saved)
        for s, state in saved.items():
            assert_bitexact(repo.load(s), state)
        assert repo.verify().ok
    with Repository(url, backend=_backend(s3_server, url)) as repo:
        report = repo.delete(1, 2)
        assert report.deleted_steps == [1, 2]
        repo.gc(repack_below=1.0)
        assert repo.steps() == [3, 4, 5, 6]
        for s in (3, 4, 5, 6):
            assert_bitexact(repo.load(s), saved[s])
        assert repo.verify().ok
    b = _backend(s3_server, url)
    assert not b.exists("lock")                 # closed: the lease is gone
    assert b.list("") and b.list_dirs("")


def test_write_replace_is_if_match(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object changes between the replace's HEAD and its PUT (another machine): the PUT's
    If-Match on the ETag read refuses, so the other writer's object stays."""
    a, other = _backend(s3_server), None
    a.write_atomic("steps/7.manifest", b"read")
    seen = a.fingerprint("steps/7.manifest")
    stale = a._head("steps/7.manifest")  # noqa: SLF001 - the HEAD the race makes stale
    other = ObjectStoreBackend(a.store, url=a.url)
    other.write_atomic("steps/7.manifest", b"other writer")
    monkeypatch.setattr(a, "_head", lambda name: stale)
    with pytest.raises(FileExistsError):
        a.write_replace("steps/7.manifest", b"rebased", seen)
    assert a.read("steps/7.manifest") == b"other writer"
