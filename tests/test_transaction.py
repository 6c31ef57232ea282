"""The transaction module's public operations (deltackpt/engine/transaction.py).

* Recovery: a transaction journaled and half-written (packs and indexes, no manifest) and then
  abandoned, as a crash leaves it, is undone by the next writer; earlier steps are untouched.
* ``Repository.rewrite_manifest``: a new manifest of a committed step (every chunk re-pointed at
  raw copies, as a rebase does) restores exactly what the step restored; a build that fails
  leaves the previous manifest and no leftovers; a missing step raises ``StepNotFoundError``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.transaction import Transactions
from deltackpt.errors import DeltaCkptError, StepNotFoundError
from deltackpt.format import checksum
from deltackpt.ops.rewrite import with_raw_records
from deltackpt.store.manifest import ChunkRef, Manifest, TensorEntry
from deltackpt.store.packs import index_name, pack_name


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[: seed + 1] += seed  # later steps differ a little from the first: saved as deltas
    return {"w": w, "b": torch.arange(256, dtype=torch.float32) * seed}


def _files(root: str, sub: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(root, sub)):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


def test_recovery_undoes_a_half_written_step(tmp_path):
    path = str(tmp_path / "repo")
    with deltackpt.open(path) as repo:
        repo.save(0, _state(0))
        packs_before = set(repo.store.packs())

        def half_write() -> tuple[str, list[str]]:
            txn = repo.transactions.begin(1)
            repo.store.put(np.arange(4096, dtype=np.uint8), 1, 3)
            written = repo.store.flush()  # pack and index written, never committed
            return txn, written

        txn, written = repo.run_exclusive(half_write)
        assert written and all(repo.backend.exists(index_name(p)) for p in written)
        assert repo.transactions.journaled(written[0])
        assert _files(path, "txn") == [f"txn/{txn}.json"]
        assert not repo.transactions.committed(1, txn)
        assert 1 not in repo
    # the process "crashed": the journal and the step's packs outlive it
    assert _files(path, "txn") == [f"txn/{txn}.json"]
    with deltackpt.open(path) as repo:  # a writer's open recovers
        assert _files(path, "txn") == []
        for pid in written:
            assert not repo.backend.exists(pack_name(pid))
            assert not repo.backend.exists(index_name(pid))
        assert set(repo.store.packs()) == packs_before
        assert repo.steps() == [0]
        assert_bitexact(repo.load(0), _state(0))
        repo.save(1, _state(1))
        assert_bitexact(repo.load(1), _state(1))
        assert repo.verify().ok


def test_recovery_keeps_a_step_committed_before_the_crash(tmp_path):
    """A journal left after the commit point (the crash came before it was dropped) names a
    committed step: recovery keeps its packs."""
    path = str(tmp_path / "repo")
    with deltackpt.open(path) as repo:
        repo.save(0, _state(0))
        m = repo.manifest(0)
        assert repo.transactions.committed(0, m.txn)
        assert not repo.transactions.committed(0, "0" * 32)
        assert m.packs
        # the journal the save wrote before its commit point, as a crash would leave it
        repo.backend.write_atomic(f"txn/{m.txn}.json", checksum.dump(
            {"txn": m.txn, "step": 0, "packs": m.packs, "kind": "save"}))
        # and one of a save of step 1 that never committed, naming a pack never written
        stale = Transactions(repo.backend, repo.manifest, {})
        stale.begin(1)
        stale.journal_pack("f" * 32)
    assert len(_files(path, "txn")) == 2
    with deltackpt.open(path) as repo:
        assert _files(path, "txn") == []
        assert all(repo.backend.exists(pack_name(p)) for p in m.packs)
        assert_bitexact(repo.load(0), _state(0))
        assert repo.verify().ok


def _all_raw(repo: deltackpt.Repository, m: Manifest, txn: str) -> tuple[Manifest, int]:
    """``m`` with every delta record replaced by a raw copy of the bytes it rebuilds to."""
    written = 0

    def raw_id(t: TensorEntry, i: int, c: ChunkRef) -> bytes | None:
        nonlocal written
        if c.ref is None:
            return None
        cid, n = repo.store.put(repo.reconstructor.chunk(m.step, t, i), t.etype.word,
                                repo.policy.zstd_level, cid=c.digest)
        written += n
        return cid

    new = with_raw_records(m, txn, raw_id)
    return new, written


def test_rewrite_manifest_keeps_what_the_step_restores(tmp_path):
    path = str(tmp_path / "repo")
    with deltackpt.open(path) as repo:
        for s in range(3):
            repo.save(s, _state(s))
        before = repo.manifest(2)
        assert before.kind == "delta"
        new = repo.rewrite_manifest(2, lambda txn: _all_raw(repo, before, txn))
        repo.forget_steps([2])
        assert new.kind == "keyframe" and new.txn != before.txn
        assert all(c.ref is None for t in new.tensors for c in t.chunks)
        assert [t.digest for t in new.tensors] == [t.digest for t in before.tensors]
        assert new.tree == before.tree and new.meta == before.meta and new.time == before.time
        assert _files(path, "txn") == []
        assert_bitexact(repo.load(2), _state(2))
        repo.delete(0, 1)  # nothing left to rebase: step 2 no longer depends on them
        assert_bitexact(repo.load(2), _state(2))
        assert repo.verify().ok
    with deltackpt.open(path, "r") as repo:
        assert_bitexact(repo.load(2), _state(2))


def test_rewrite_manifest_that_fails_changes_nothing(tmp_path):
    path = str(tmp_path / "repo")
    with deltackpt.open(path) as repo:
        for s in range(2):
            repo.save(s, _state(s))
        before = repo.manifest(1)
        packs = set(repo.store.packs())

        def build(txn: str) -> tuple[Manifest, int]:
            _all_raw(repo, before, txn)  # chunks written, then the build fails
            raise DeltaCkptError("build failed")

        with pytest.raises(DeltaCkptError, match="build failed"):
            repo.rewrite_manifest(1, build)
        assert repo.manifest(1).txn == before.txn
        assert set(repo.store.packs()) == packs
        assert _files(path, "txn") == []
        assert_bitexact(repo.load(1), _state(1))


def test_rewrite_of_a_missing_step_raises(tmp_path):
    path = str(tmp_path / "repo")
    with deltackpt.open(path) as repo:
        repo.save(0, _state(0))
        m = repo.manifest(0)
        with pytest.raises(StepNotFoundError) as info:
            repo.rewrite_manifest(7, lambda txn: (m, 0))
        assert info.value.step == 7
        assert 7 not in repo and repo.steps() == [0]
        assert _files(path, "txn") == []
    with deltackpt.open(path, "r") as repo, pytest.raises(deltackpt.ReadOnlyError):
        repo.rewrite_manifest(0, lambda txn: (m, 0))
