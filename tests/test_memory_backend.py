"""A Repository on the in-memory backend: saves, loads, verify, delete, gc and repack round
trips, a second writer refused, and whole-pack reads where ranged reads are costly."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.errors import LockedError
from deltackpt.store import packs
from deltackpt.store.memory import MemoryBackend
from deltackpt.store.packs import (
    ChunkStore,
    decode_index,
    index_name,
    read_pack_entries,
    scan_pack,
)


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[: step % 64] += step * 1e-3           # a little changes each step: deltas chain
    return {"model": {"w": w, "b": torch.arange(64, dtype=torch.float32) * step},
            "step": step, "opt": {"lr": 1e-3}}


@pytest.fixture
def mem() -> MemoryBackend:
    return MemoryBackend()


def _save(mem: MemoryBackend, steps: range, **kw: Any) -> dict[int, dict[str, Any]]:
    saved = {s: _state(s) for s in steps}
    with deltackpt.open("mem-repo", backend=mem, keyframe_every=4, **kw) as repo:
        for s, state in saved.items():
            repo.save(s, state)
    return saved


def test_save_load_round_trip(mem: MemoryBackend) -> None:
    saved = _save(mem, range(1, 9))
    assert mem.list_dirs("") and mem.list("index")      # everything lives in the dict
    with deltackpt.open("mem-repo", "r", backend=mem) as repo:
        assert repo.steps() == list(saved)
        for s, state in saved.items():
            assert_bitexact(repo.load(s), state)
        assert repo.verify().ok
        du = repo.disk_usage()
        assert du["total"] == sum(mem.usage().values()) and du["packs"] > 0 and du["steps"] > 0


def test_second_writer_refused(mem: MemoryBackend) -> None:
    with deltackpt.open("mem-repo", backend=mem):
        with pytest.raises(LockedError):
            deltackpt.open("mem-repo", backend=mem)
    deltackpt.open("mem-repo", backend=mem).close()     # released on close


def test_delete_gc_and_repack(mem: MemoryBackend) -> None:
    saved = _save(mem, range(1, 13))
    with deltackpt.open("mem-repo", backend=mem) as repo:
        deleted = repo.delete(*range(1, 11, 2))
        assert deleted.deleted_steps == list(range(1, 11, 2))
        swept = repo.gc(repack_below=1.0)
        assert deleted.deleted_packs + swept.repacked_packs + swept.deleted_packs > 0
        kept = [s for s in saved if s not in range(1, 11, 2)]
        assert repo.steps() == kept
        for s in kept:
            assert_bitexact(repo.load(s), saved[s])
        assert repo.verify().ok


def test_repack_keeps_shared_chunks(mem: MemoryBackend) -> None:
    """Step 2 shares a tensor with step 1 (stored once, in step 1's pack): deleting step 1
    leaves that pack partly live, and gc repacks it through the pack API."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(256, 256, generator=g)
    one = {"shared": shared, "own": torch.randn(256, 256, generator=g)}
    two = {"shared": shared.clone(), "own": torch.randn(256, 256, generator=g)}
    with deltackpt.open("mem-repo", backend=mem, keyframe_every=1) as repo:
        repo.save(1, one)
        repo.save(2, two)
        repo.delete(1)
        report = repo.gc(repack_below=0.9)
        assert report.repacked_packs == 1 and report.freed_bytes > 0
        assert_bitexact(repo.load(2), two)
        assert repo.verify().ok


def test_manifest_cache_revalidated(mem: MemoryBackend) -> None:
    """MemoryBackend fingerprints files: a step deleted through another Repository on the same
    backend is not served from the reader's cached manifest."""
    _save(mem, range(1, 4))
    reader = deltackpt.open("mem-repo", "r", backend=mem)
    try:
        reader.manifest(3)
        with deltackpt.open("mem-repo", backend=mem) as writer:
            writer.delete(3)
        with pytest.raises(deltackpt.StepNotFoundError):
            reader.manifest(3)
    finally:
        reader.close()


class _WholeReads(MemoryBackend):
    """A backend whose ranged reads are costly: whole-pack work must read each pack once."""

    random_access = False

    def __init__(self) -> None:
        super().__init__()
        self.ranged = 0

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.ranged += 1
        return super().read_range(name, offset, length)


def test_whole_pack_reads_without_random_access() -> None:
    b = _WholeReads()
    store = ChunkStore(b)
    rng = np.random.default_rng(0)
    for _ in range(5):
        store.put(rng.integers(0, 4, 3000, dtype=np.uint8), 1, 1)
    (pid,) = store.flush()
    _, entries = decode_index(b.read(index_name(pid)))
    b.ranged = 0
    assert scan_pack(b, pid, entries) == []
    walked, complete = read_pack_entries(b, pid)
    assert complete and walked == [(c, o, n) for c, o, n, _p in entries]
    new = "f" * 32
    assert packs.copy_entries(b, pid, entries[1:3], new) == [
        (c, o, n, p) for c, o, n, p in decode_index(b.read(index_name(new)))[1]]
    assert b.ranged == 0
    assert scan_pack(b, new, decode_index(b.read(index_name(new)))[1]) == []


def test_copy_entries_refuses_a_damaged_frame(mem: MemoryBackend) -> None:
    store = ChunkStore(mem)
    store.put(np.arange(3000, dtype=np.uint16).view(np.uint8), 2, 1)
    (pid,) = store.flush()
    _, entries = decode_index(mem.read(index_name(pid)))
    name = packs.pack_name(pid)
    data = bytearray(mem.read(name))
    _cid, off, length, _plen = entries[0]
    data[off + length - 1] ^= 1
    mem.write_atomic(name, bytes(data))
    new = "e" * 32
    with pytest.raises(deltackpt.CorruptChunkError):
        packs.copy_entries(mem, pid, entries, new)
    assert not mem.exists(packs.pack_name(new)) and not mem.exists(index_name(new))
    assert scan_pack(mem, pid, entries)            # the trailer no longer matches
