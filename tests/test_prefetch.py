"""Loads from a backend where every request is a round trip (``batch_reads``): frames arrive
ahead in windows of a few large requests, never one request per chunk, and a prefetch changes
nothing a load returns or reports: damaged bytes are still caught, a failed prefetch falls
back to the ordinary reads, and windows are released."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib.util import find_spec
from typing import Any, ClassVar

import _s3server
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine import reconstruct
from deltackpt.errors import IntegrityError
from deltackpt.store import packs
from deltackpt.store.memory import MemoryBackend

s3_server = _s3server.s3_server


class CountingBackend(MemoryBackend):
    """The in-memory backend, declared round-trip bound, counting its reads."""

    batch_reads: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.ranged: list[tuple[str, int, int]] = []
        self.batched: list[tuple[str, list[tuple[int, int]]]] = []
        self.fail_batches = False

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if name.startswith("packs/"):
            self.ranged.append((name, offset, length))
        return super().read_range(name, offset, length)

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]
                    ) -> list[bytes | memoryview]:
        if self.fail_batches:
            raise OSError("injected: the batched read failed")
        self.batched.append((name, list(ranges)))
        return [self.read_range(name, off, n) for off, n in ranges]

    def reset(self) -> None:
        self.ranged.clear()
        self.batched.clear()


def _states(n: int) -> dict[int, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g)
    out = {}
    for s in range(1, n + 1):
        w = w + 1e-3 * torch.randn(256, 512, generator=g)
        out[s] = {"model": {"w": w.clone(), "b": torch.arange(300, dtype=torch.int64) * s,
                            "h": w[:, :3].to(torch.bfloat16)}, "step": s}
    return out


@pytest.fixture
def saved() -> tuple[CountingBackend, dict[int, dict[str, Any]]]:
    mem = CountingBackend()
    states = _states(6)
    # 16 KiB chunks: every tensor is many chunks, and every step a chain of deltas
    with deltackpt.open("prefetch", backend=mem, keyframe_every=10, chunk_bytes=16 << 10) as r:
        for s, st in states.items():
            r.save(s, st)
    return mem, states


def test_a_load_reads_in_few_batched_requests(saved: Any) -> None:
    mem, states = saved
    with deltackpt.open("prefetch", "r", backend=mem) as repo:
        m = repo.manifest(6)
        chunks = sum(len(t.chunks) for t in m.tensors if not t.dropped)
        mem.reset()
        assert_bitexact(repo.load(6), states[6])
        requests = sum(len(r) for _n, r in mem.batched)
        # every frame of the 6-link chains arrived ahead, in one request per pack (its frames
        # are contiguous); none was read on its own
        assert mem.ranged == [(n, o, ln) for n, rs in mem.batched for o, ln in rs]
        assert len(mem.batched) == requests == len(repo.store.packs()) == 6
        assert chunks * 6 > 10 * requests
    assert not repo.store._ahead  # noqa: SLF001 - every window released


def test_small_windows_and_concurrent_loads_stay_exact(saved: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mem, states = saved
    monkeypatch.setattr(reconstruct, "PREFETCH_WINDOW", 40 << 10)  # a few frames a window
    monkeypatch.setattr(packs, "READ_GROUP", 32 << 10)
    with deltackpt.open("prefetch", "r", backend=mem) as repo:
        errors: list[BaseException] = []

        def load(step: int) -> None:
            try:
                for _ in range(3):
                    assert_bitexact(repo.load(step), states[step])
                    assert_bitexact(repo.load(step, select="model/h"),
                                    {"model": {"h": states[step]["model"]["h"]}})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(s,)) for s in (2, 4, 6, 6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(mem.batched) > 8   # many windows, each a batch
        assert not repo.store._ahead  # noqa: SLF001


def test_a_failed_prefetch_falls_back_to_ordinary_reads(saved: Any) -> None:
    mem, states = saved
    mem.fail_batches = True
    with deltackpt.open("prefetch", "r", backend=mem) as repo:
        mem.reset()
        assert_bitexact(repo.load(5), states[5])
        assert mem.ranged and not mem.batched


def test_a_damaged_prefetched_frame_is_still_caught(saved: Any) -> None:
    mem, _states_ = saved
    with deltackpt.open("prefetch", "r", backend=mem) as repo:
        entry = repo.manifest(6).tensor("model/w")
        assert entry is not None
        loc = repo.store.locate(entry.chunks[3].id)
    name = packs.pack_name(loc.pack)
    data = bytearray(mem.read(name))
    data[loc.offset + loc.length - 2] ^= 0x40
    mem.write_atomic(name, bytes(data))
    with deltackpt.open("prefetch", "r", backend=mem) as repo:
        mem.reset()
        with pytest.raises(IntegrityError) as info:
            repo.load(6)
        assert mem.batched
        assert info.value.step is not None and info.value.path == "model/w"


@pytest.mark.skipif(not (find_spec("obstore") and find_spec("moto")),
                    reason="object-store tests need obstore and moto[server]")
def test_a_load_from_s3_fetches_ahead(s3_server: _s3server.S3Server,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real S3 API (moto on loopback): a fresh reader's load makes one batched request
    per pack, no per-chunk GETs, and restores bit-exactly."""
    from deltackpt.store.objectstore import ObjectStoreBackend

    ranged: list[str] = []
    batched: list[int] = []
    orig_range, orig_ranges = ObjectStoreBackend.read_range, ObjectStoreBackend.read_ranges

    def read_range(self: ObjectStoreBackend, name: str, offset: int, length: int) -> bytes:
        ranged.append(name)
        return orig_range(self, name, offset, length)

    def read_ranges(self: ObjectStoreBackend, name: str, ranges: Sequence[tuple[int, int]]
                    ) -> list[bytes | memoryview]:
        batched.append(len(ranges))
        return orig_ranges(self, name, ranges)

    monkeypatch.setattr(ObjectStoreBackend, "read_range", read_range)
    monkeypatch.setattr(ObjectStoreBackend, "read_ranges", read_ranges)
    url, opts = s3_server.url("prefetch"), s3_server.storage_options
    states = _states(4)
    with deltackpt.open(url, storage_options=opts, chunk_bytes=16 << 10) as repo:
        for s, st in states.items():
            repo.save(s, st)
    with deltackpt.open(url, "r", storage_options=opts) as repo:
        ranged.clear()
        assert_bitexact(repo.load(4), states[4])
        assert_bitexact(repo.load(2, select="model/b"),
                        {"model": {"b": states[2]["model"]["b"]}})
    # load(4): one request per pack (4); load(2, select=...): the packs of steps 1-2
    assert not ranged and batched == [1] * len(batched) and len(batched) <= 6
