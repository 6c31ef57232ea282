"""HTTP-level faults between deltackpt and S3 (moto on loopback), injected by
:class:`deltackpt.testing.httpproxy.FaultProxy`: transient 5xx, delays, dropped connections and
cut responses, permanent refusals, a lost answer to the commit point and a lease that cannot be
renewed. Each test checks what the caller sees (a save that succeeds, or a typed error naming
the object), that the proxy's rule really fired, and afterwards, with the faults gone, that a
new writer (its recovery run) sees exactly the committed steps, bit-exact, and ``verify`` passes.

obstore retries transient failures (here 3 retries, 10-100 ms apart: ``_s3server.FAST_RETRY``);
obstore 0.12 sends every body with a Content-Length (no chunked uploads).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                    "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips
import torch  # noqa: E402
from _s3server import S3Server  # noqa: E402
from _util import assert_bitexact  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.errors import LockedError, StorageError  # noqa: E402
from deltackpt.repository import Repository  # noqa: E402
from deltackpt.store.objectstore import ObjectStoreBackend  # noqa: E402
from deltackpt.testing.httpproxy import FaultProxy  # noqa: E402

s3_server = _s3server.s3_server
TTL = 1.5
PACK = r"/packs/[0-9a-f]{2}/[0-9a-f]{32}\.pack$"
MANIFEST = r"/steps/\d{20}\.json$"


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's S3 server, no rules."""
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def _state(step: int, n: int = 4096) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g), "idx": torch.arange(step, step + 8)},
            "opt": {"step": step}}


def _big(step: int) -> dict[str, Any]:
    """About 12 MiB: a pack of three 5 MiB parts (a multipart upload)."""
    return _state(step, 3 << 20)


def _open(s3: S3Server, proxy: FaultProxy, url: str, mode: str = "a",
          ttl: float = TTL) -> Repository:
    backend = ObjectStoreBackend.from_url(url, s3.options_via(proxy.endpoint), lease_ttl=ttl,
                                          part_size=5 << 20)
    return deltackpt.open(url, mode=mode, backend=backend)


def _keys(s3: S3Server, url: str, sub: str = "") -> set[str]:
    """The objects under the repository's prefix (``sub``: a folder in it), seen directly."""
    prefix = url.split("/", 3)[3] + "/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix + sub)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def _chunk_objects(s3: S3Server, url: str) -> set[str]:
    return _keys(s3, url, "packs/") | _keys(s3, url, "index/")


def _check_clean(s3: S3Server, proxy: FaultProxy, url: str, saved: dict[int, Any]) -> None:
    """With every fault gone: a new writer (recovery runs) sees exactly ``saved``, bit-exact;
    verify passes; no journal, no incomplete upload is left."""
    proxy.clear()
    with _open(s3, proxy, url) as repo:
        assert repo.steps() == sorted(saved)
        for step, state in saved.items():
            assert_bitexact(repo.load(step), state)
        report = repo.verify()
        assert report.ok, report.problems
    assert not _keys(s3, url, "txn/")
    assert not s3.multipart_uploads(url.split("/", 3)[3] + "/")


# ================================================================== transient errors: retried
SAVE_FAULTS = {
    "pack PUT 503": ({"method": "PUT", "path": PACK, "status": 503, "times": 2}, False),
    "index PUT 500": ({"method": "PUT", "path": r"/index/", "status": 500, "times": 2}, False),
    "journal PUT 503": ({"method": "PUT", "path": r"/txn/", "status": 503, "times": 2}, False),
    "manifest create 503": ({"method": "PUT", "path": MANIFEST, "status": 503, "times": 2}, False),
    "part upload 500": ({"method": "PUT", "query": r"partNumber=2&", "status": 500, "times": 2},
                        True),
    "upload start 503": ({"method": "POST", "query": r"^uploads=", "status": 503, "times": 2},
                         True),
    "upload complete 503": ({"method": "POST", "query": r"uploadId=", "status": 503, "times": 2},
                            True),
}


@pytest.mark.parametrize("fault", list(SAVE_FAULTS))
def test_transient_error_on_save_is_retried(s3_server: S3Server, proxy: FaultProxy,
                                            fault: str) -> None:
    rule_kw, big = SAVE_FAULTS[fault]
    url = s3_server.url("tr")
    saved = {1: _state(1), 2: _big(2) if big else _state(2)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        rule = proxy.add_rule(**rule_kw)
        info = repo.save(2, saved[2])
        assert info.step == 2 and repo.steps() == [1, 2]
        assert rule.hits == rule_kw["times"], proxy.log       # the fault did happen
        assert_bitexact(repo.load(2), saved[2])
    _check_clean(s3_server, proxy, url, saved)


LOAD_FAULTS = {
    "pack GET 503": {"method": "GET", "path": PACK, "status": 503, "times": 3},
    "manifest GET 500": {"method": "GET", "path": MANIFEST, "status": 500, "times": 2},
    "index GET 503": {"method": "GET", "path": r"/index/", "status": 503, "times": 2},
    "LIST 503": {"method": "GET", "query": r"list-type=2", "status": 503, "times": 2},
    "HEAD 500": {"method": "HEAD", "status": 500, "times": 3},
}


@pytest.mark.parametrize("fault", list(LOAD_FAULTS))
def test_transient_error_on_load_is_retried(s3_server: S3Server, proxy: FaultProxy,
                                            fault: str) -> None:
    url = s3_server.url("tl")
    saved = {s: _state(s) for s in (1, 2, 3)}
    with _open(s3_server, proxy, url) as repo:
        for s, state in saved.items():
            repo.save(s, state)
    rule = proxy.add_rule(**LOAD_FAULTS[fault])
    with _open(s3_server, proxy, url, mode="r") as reader:       # a fresh reader: no cache
        assert reader.steps() == [1, 2, 3]
        for s, state in saved.items():
            assert_bitexact(reader.load(s), state)
    assert rule.hits == LOAD_FAULTS[fault]["times"], proxy.log
    _check_clean(s3_server, proxy, url, saved)


def test_lease_renewal_failing_briefly_keeps_the_lease(s3_server: S3Server,
                                                       proxy: FaultProxy) -> None:
    """One renewal fails for good (1 + 3 retries answered 503); the next one, a third of the
    ttl later, succeeds before the lease runs out: the writer still commits."""
    url = s3_server.url("renew")
    saved = {1: _state(1), 2: _state(2)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        rule = proxy.add_rule(method="PUT", path=r"/lock$", status=503, times=4)
        time.sleep(TTL * 1.2)                      # past the ttl of the last renewal before it
        assert rule.hits == 4
        repo.save(2, saved[2])
    _check_clean(s3_server, proxy, url, saved)


# ======================================================================== slow, cut, dropped
def test_delays_are_only_slow(s3_server: S3Server, proxy: FaultProxy) -> None:
    url = s3_server.url("delay")
    saved = {1: _state(1), 2: _state(2)}
    rules = [proxy.add_rule(method="PUT", path=PACK, action="delay", delay=0.3, times=None),
             proxy.add_rule(method="PUT", path=MANIFEST, action="delay", delay=0.3, times=None),
             proxy.add_rule(method="GET", path=PACK, action="delay", delay=0.3, times=1)]
    t = time.monotonic()
    with _open(s3_server, proxy, url) as repo:
        for s, state in saved.items():
            repo.save(s, state)
    with _open(s3_server, proxy, url, mode="r") as reader:
        for s, state in saved.items():
            assert_bitexact(reader.load(s), state)
    assert time.monotonic() - t >= 0.3 * 5
    assert [r.hits for r in rules] == [2, 2, 1]
    _check_clean(s3_server, proxy, url, saved)


DROPS = {
    # the link dies mid-upload of a pack (a single PUT), of a part, of a completion
    "pack PUT, mid-body": ({"method": "PUT", "path": PACK, "action": "drop",
                            "after_bytes": 20_000}, False),
    "part upload, mid-body": ({"method": "PUT", "query": r"partNumber=1&", "action": "drop",
                               "after_bytes": 1 << 20}, True),
    "index PUT, no answer": ({"method": "PUT", "path": r"/index/", "action": "drop"}, False),
    # applied by the store, the answer lost: retried as the same idempotent write
    "pack PUT, answer lost": ({"method": "PUT", "path": PACK, "action": "reset_response"},
                              False),
    "upload complete, answer lost": ({"method": "POST", "query": r"uploadId=",
                                      "action": "reset_response"}, True),
}


@pytest.mark.parametrize("fault", list(DROPS))
def test_dropped_connection_on_save(s3_server: S3Server, proxy: FaultProxy, fault: str) -> None:
    """A connection lost mid-request or before the answer of a write that is safe to repeat:
    obstore sends it again (the log shows the retry) and the save succeeds, bit-exact."""
    rule_kw, big = DROPS[fault]
    url = s3_server.url("drop")
    saved = {1: _state(1, 16384)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        proxy.reset_stats()
        rule = proxy.add_rule(**rule_kw)
        state = _big(2) if big else _state(2, 16384)
        repo.save(2, state)                            # retried by obstore: saved
        saved[2] = state
        assert rule.hits == 1, proxy.log
        assert sum(rule.matches(m, *t.partition("?")[::2]) for m, t, _s in proxy.log) == 2  # a retry
    _check_clean(s3_server, proxy, url, saved)


@pytest.mark.parametrize("action", ["drop", "reset_response"])
def test_cut_reads_are_retried_never_wrong(s3_server: S3Server, proxy: FaultProxy,
                                           action: str) -> None:
    """A GET of a pack that dies before its answer, or after 64 KiB of a 12 MiB body: obstore
    asks again (a ranged GET for the rest), and the load is bit-exact."""
    url = s3_server.url("cut")
    saved = {1: _big(1), 2: _state(2)}
    with _open(s3_server, proxy, url) as repo:
        for s, state in saved.items():
            repo.save(s, state)
    rule = proxy.add_rule(method="GET", path=PACK, action=action, after_bytes=64 << 10, times=2)
    with _open(s3_server, proxy, url, mode="r") as reader:
        for s, state in saved.items():
            assert_bitexact(reader.load(s), state)
    assert rule.hits == 2
    _check_clean(s3_server, proxy, url, saved)


def test_a_link_that_stays_down_is_a_storage_error(s3_server: S3Server,
                                                   proxy: FaultProxy) -> None:
    """Every upload of the pack dies mid-body: obstore's retries run out, the save raises
    StorageError naming the pack; nothing of the step is visible, earlier steps are intact."""
    url = s3_server.url("down")
    saved = {1: _state(1, 16384)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        before = _chunk_objects(s3_server, url)
        rule = proxy.add_rule(method="PUT", path=PACK, action="drop", after_bytes=20_000,
                              times=None)
        with pytest.raises(StorageError) as err:
            repo.save(2, _state(2, 16384))
        assert err.value.key is not None and err.value.key.startswith("packs/")
        assert err.value.key in str(err.value)
        assert rule.hits == 4                          # the first try and 3 retries
        assert repo.steps() == [1]
        proxy.clear()
        assert_bitexact(repo.load(1), saved[1])
    assert _chunk_objects(s3_server, url) == before    # the failed step's uploads are gone
    _check_clean(s3_server, proxy, url, saved)


# ====================================================================== permanent refusals
@pytest.mark.parametrize("where", ["pack PUT", "part upload"])
def test_permanent_403_on_pack_upload(s3_server: S3Server, proxy: FaultProxy, where: str) -> None:
    url = s3_server.url("deny")
    saved = {1: _state(1), 2: _state(2)}
    with _open(s3_server, proxy, url) as repo:
        for s, state in saved.items():
            repo.save(s, state)
        before = _chunk_objects(s3_server, url)
        if where == "pack PUT":
            rule = proxy.add_rule(method="PUT", path=PACK, status=403, times=None)
            state = _state(3)
        else:
            rule = proxy.add_rule(method="PUT", query=r"partNumber=", status=403, times=None)
            state = _big(3)
        with pytest.raises(StorageError) as err:
            repo.save(3, state)
        assert err.value.key is not None and err.value.key.startswith("packs/")
        assert err.value.key in str(err.value) and "privileges" in str(err.value)
        assert rule.hits >= 1
        assert repo.steps() == [1, 2]
    with _open(s3_server, proxy, url, mode="r") as reader:       # rule still on: reads work
        assert reader.steps() == [1, 2]
        for s, st in saved.items():
            assert_bitexact(reader.load(s), st)
    assert _chunk_objects(s3_server, url) == before
    _check_clean(s3_server, proxy, url, saved)
    proxy.clear()
    with _open(s3_server, proxy, url) as repo:                    # and the run goes on
        repo.save(3, state)
    saved[3] = state
    _check_clean(s3_server, proxy, url, saved)


def test_permanent_403_on_pack_reads(s3_server: S3Server, proxy: FaultProxy) -> None:
    url = s3_server.url("denyread")
    saved = {1: _state(1), 2: _state(2)}
    with _open(s3_server, proxy, url) as repo:
        for s, state in saved.items():
            repo.save(s, state)
    rule = proxy.add_rule(method="GET", path=PACK, status=403, times=None)
    with _open(s3_server, proxy, url, mode="r") as reader:
        assert reader.steps() == [1, 2]                # manifests still readable
        with pytest.raises(StorageError) as err:
            reader.load(2)
        key = err.value.key
        assert key is not None and key.startswith("packs/") and key.endswith(".pack")
        assert key in str(err.value) and err.value.step in (1, 2)
        report = reader.verify()                       # not "ok", and not called damage
        assert not report.ok
        assert {p.cause for p in report.problems} == {"PermissionDeniedError"}
        assert all("packs/" in p.message for p in report.problems)
    assert rule.hits >= 2
    _check_clean(s3_server, proxy, url, saved)


# ============================================================================ the commit point
def test_commit_point_create_dropped_is_invisible(s3_server: S3Server, proxy: FaultProxy) -> None:
    """The manifest's create never reaches the store (the connection drops before, or in the
    middle of, its body): obstore does not retry a conditional create on a dropped connection,
    the save raises StorageError naming the manifest, and the step is not visible; saved again,
    it commits."""
    url = s3_server.url("commit-drop")
    saved = {1: _state(1)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        for after in (0, 10):
            rule = proxy.add_rule(method="PUT", path=MANIFEST, action="drop", after_bytes=after)
            with pytest.raises(StorageError) as err:
                repo.save(2, _state(2))
            assert err.value.key == "steps/00000000000000000002.json"
            assert rule.hits == 1 and repo.steps() == [1]
            with _open(s3_server, proxy, url, mode="r") as reader:
                assert reader.steps() == [1]
        repo.save(2, _state(2))                        # a second try commits
        saved[2] = _state(2)
        assert repo.steps() == [1, 2]
    _check_clean(s3_server, proxy, url, saved)


def test_commit_point_applied_but_answer_lost(s3_server: S3Server, proxy: FaultProxy) -> None:
    """The store creates the manifest but the answer never arrives: the step is committed
    (it is there, whole), so the save reports it saved; the writer goes on with deltas on it.
    (It raised StorageError for a committed step before deltackpt read the manifest back.)"""
    url = s3_server.url("commit-lost")
    saved = {1: _state(1)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        rule = proxy.add_rule(method="PUT", path=MANIFEST, action="reset_response")
        saved[2] = _state(2)
        info = repo.save(2, saved[2])
        assert info.step == 2 and rule.hits == 1
        assert ("PUT", 200) in {(m, status) for m, t, status in proxy.log   # the store applied it
                                if t.endswith("/steps/00000000000000000002.json")}
        assert repo.steps() == [1, 2]
        assert not _keys(s3_server, url, "txn/")       # finished as a commit: journal dropped
        saved[3] = _state(3)
        assert repo.save(3, saved[3]).kind == "delta"
        with pytest.raises(deltackpt.StepExistsError):
            repo.save(2, saved[2])
    _check_clean(s3_server, proxy, url, saved)


# ======================================================================= the lease runs out
def test_lease_unrenewable_past_its_ttl(s3_server: S3Server, proxy: FaultProxy) -> None:
    """Every renewal fails for longer than the ttl: the writer refuses to commit
    (LockedError naming the lease), nothing of the step is visible, committed steps stay
    intact; once renewals get through again the same writer commits."""
    url = s3_server.url("lease")
    saved = {1: _state(1)}
    with _open(s3_server, proxy, url) as repo:
        repo.save(1, saved[1])
        rule = proxy.add_rule(method="PUT", path=r"/lock$", status=503, times=None)
        time.sleep(TTL * 1.3)
        with pytest.raises(LockedError) as err:
            repo.save(2, _state(2))
        assert "lease 'lock'" in str(err.value) and "without a renewal" in str(err.value)
        assert rule.hits >= 4 and repo.steps() == [1]
        with _open(s3_server, proxy, url, mode="r") as reader:
            assert reader.steps() == [1]
            assert_bitexact(reader.load(1), saved[1])
        proxy.clear()
        deadline = time.monotonic() + 10 * TTL          # the next renewal gets through
        while True:
            try:
                repo.save(2, _state(2))
                break
            except LockedError:
                assert time.monotonic() < deadline
                time.sleep(TTL / 6)
        saved[2] = _state(2)
    _check_clean(s3_server, proxy, url, saved)
