"""``max_chain``: chains of at most N deltas between keyframes, with two reference copies at most.

The save after a step that sits N deltas from its keyframe is a delta against the keyframe,
whose state the writer keeps (read-only) next to the previous step's. Every step then rebuilds
from its keyframe's frame plus at most N deltas, while most deltas stay one save apart.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.writer import StepEncoder
from deltackpt.repository import Repository


def make_states(seed: int, n: int) -> list[dict[str, Any]]:
    """A drifting fp32 weight, an Adam-like moment, an unchanged tensor, an int tensor that
    changes now and then, and a tensor that appears half way (no reference at first)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6000, generator=g)
    frozen = torch.randn(3000, generator=g)
    ids = torch.arange(100, dtype=torch.int64)
    out = []
    for s in range(n):
        w = w + torch.randn(6000, generator=g) * 1e-3
        if rnd.random() < 0.3:
            ids = ids + 1
        st: dict[str, Any] = {"w": w.clone(), "m": torch.randn(2000, generator=g) * 1e-4,
                              "frozen": frozen, "ids": ids.clone(), "step": s}
        if s >= n // 2:
            st["late"] = torch.full((500,), float(s))
        out.append(st)
    return out


def links_of(repo: deltackpt.Repository, step: int) -> int:
    m = repo.manifest(step)
    n = 0
    while m.kind != "keyframe":
        m = repo.manifest(m.parent)
        n += 1
    return n


@pytest.mark.parametrize("codec", ["xor", "diff"])
@pytest.mark.parametrize("k,bound", [(16, 3), (10, 2), (5, 1), (4, 8)])
def test_every_step_is_within_the_bound_and_loads_bit_exactly(tmp_path, codec, k, bound):
    states = make_states(k * 10 + bound, 2 * k + 3)
    path = str(tmp_path / "r")
    with deltackpt.open(path, codec=codec, keyframe_every=k, max_chain=bound,
                        chunk_bytes=4096, fsync=False) as repo:
        for s, st in enumerate(states):
            repo.save(s, st)
            m = repo.manifest(s)
            i = s % k                                  # saves since its keyframe
            want = 0 if i == 0 else (i - 1) % bound + 1   # deltas back to the keyframe
            assert links_of(repo, s) == want, (s, links_of(repo, s))
            assert m.kind == ("keyframe" if s % k == 0 else "delta")
            if m.kind == "delta":  # a restart is a delta against the keyframe, else the previous
                assert m.parent == (m.keyframe if want == 1 else s - 1)
            depth = max((c.depth for t in m.tensors for c in t.chunks), default=1)
            assert depth <= bound + 1                 # the keyframe's frame plus <= N deltas
    with deltackpt.open(path, "r") as repo:
        assert repo.verify().ok
        for s, st in enumerate(states):
            assert_bitexact(repo.load(s), st)


def _ref_bytes(repo: Repository, *extra: Any) -> int:
    """Bytes of the distinct reference buffers the writer holds (and ``extra`` RefStates)."""
    seen: dict[int, int] = {}
    for r in (repo._ref, repo._key, *extra):
        if r is None:
            continue
        for t in r.tensors.values():
            base = t.data if t.data.base is None else t.data.base
            seen[id(base)] = base.nbytes
    return sum(seen.values())


def test_the_writer_holds_two_reference_copies_at_most(tmp_path, monkeypatch):
    states = make_states(1, 14)
    state_bytes = max(sum(v.numel() * v.element_size() for v in st.values()
                          if isinstance(v, torch.Tensor)) for st in states)
    peaks: list[int] = []
    encode = StepEncoder.encode

    def watched(self: StepEncoder, leaves: Any, *args: Any) -> Any:
        peaks.append(_ref_bytes(repo, self.ref))      # as the step starts encoding ...
        enc = encode(self, leaves, *args)
        new = deltackpt.repository.RefState(0, 0, 0, enc.reference)
        peaks.append(_ref_bytes(repo, self.ref, new))  # ... and with its new reference built
        return enc

    monkeypatch.setattr(StepEncoder, "encode", watched)
    with deltackpt.open(str(tmp_path / "r"), keyframe_every=10, max_chain=3,
                        chunk_bytes=4096, fsync=False) as repo:
        for s, st in enumerate(states):
            repo.save(s, st)
            peaks.append(_ref_bytes(repo))
            if repo._key is not None:                  # the keyframe copy is never written
                assert all(not t.data.flags.writeable for t in repo._key.tensors.values())
    assert max(peaks) <= 2 * state_bytes, (max(peaks), state_bytes)
    assert max(peaks) > state_bytes                    # (two copies are in use: keyframe + previous)


def test_without_max_chain_the_writer_keeps_one_copy(tmp_path):
    with deltackpt.open(str(tmp_path / "r"), keyframe_every=10, chunk_bytes=4096,
                        fsync=False) as repo:
        for s, st in enumerate(make_states(2, 6)):
            repo.save(s, st)
        assert repo._key is None


@pytest.mark.parametrize("blocking", [True, False])
def test_reopen_mid_chain_continues_the_same_structure(tmp_path, blocking):
    """A writer reopened at any point restarts chains where an uninterrupted one would (its
    links come from the manifests' parents, the keyframe's state from disk)."""
    states = make_states(3, 23)
    policy = dict(keyframe_every=12, max_chain=3, chunk_bytes=4096, fsync=False)
    ref_path, path = str(tmp_path / "ref"), str(tmp_path / "r")
    with deltackpt.open(ref_path, **policy) as repo:
        for s, st in enumerate(states):
            repo.save(s, st, blocking=blocking)
        repo.wait()
        parents = [repo.manifest(s).parent for s in range(len(states))]
    cuts = {5, 6, 9, 13, 17}
    repo = deltackpt.open(path, **policy)
    try:
        for s, st in enumerate(states):
            if s in cuts:
                repo.close()
                repo = deltackpt.open(path, **policy)
            repo.save(s, st, blocking=blocking)
        repo.wait()
        assert [repo.manifest(s).parent for s in range(len(states))] == parents
        for s, st in enumerate(states):
            assert_bitexact(repo.load(s), st)
    finally:
        repo.close()


def test_a_deleted_keyframe_makes_the_next_restart_a_keyframe(tmp_path):
    states = make_states(4, 12)
    with deltackpt.open(str(tmp_path / "r"), keyframe_every=20, max_chain=2,
                        chunk_bytes=4096, fsync=False) as repo:
        for s in range(4):                  # 0 keyframe; 1, 2 chain; 3 restarts from 0
            repo.save(s, states[s])
        assert repo.manifest(3).parent == 0
        repo.delete(0)                      # 1 and 3 are rebased; the keyframe copy is stale
        assert repo._key is None
        for s in range(4, 12):
            repo.save(s, states[s])
        assert repo.verify().ok
        for s in repo.steps():
            assert_bitexact(repo.load(s), states[s])
            assert links_of(repo, s) <= 2


def test_max_chain_is_validated():
    with pytest.raises(deltackpt.PolicyError, match="max_chain"):
        deltackpt.Policy(max_chain=-1)
    with pytest.raises(deltackpt.PolicyError, match="max_chain"):
        deltackpt.Policy(max_chain="3")
    assert deltackpt.Policy(max_chain=np.int64(3)).max_chain == 3
    assert "max_chain" in os.linesep.join(deltackpt.Policy().to_dict())


def test_bench_references_quick_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark that measures the structures runs (its figures are not checked here)."""
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    sys.path.insert(0, bench)
    try:
        import bench_references
    finally:
        sys.path.remove(bench)
    assert bench_references.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| pxor max_chain=4 k=20 |" in out and "| default (pxor chain k=10) |" in out


def test_lossy_tiers_with_bounded_chains(tmp_path):
    """Closed-loop lossy deltas restart from the keyframe's exact state: verify passes, exact
    steps are bit-exact, and errors stay bounded (never accumulate along the chains)."""
    states = make_states(5, 25)
    with deltackpt.open(str(tmp_path / "r"), policy="balanced", max_chain=3,
                        chunk_bytes=4096, fsync=False) as repo:
        for s, st in enumerate(states):
            repo.save(s, st)
            assert links_of(repo, s) <= 3
        report = repo.verify()
        assert report.ok and report.lossy_steps
        for s, st in enumerate(states):
            got = repo.load(s)
            if repo.manifest(s).exact:
                assert_bitexact(got, st)
            else:
                assert torch.allclose(got["w"], st["w"], rtol=0, atol=1e-2)
                assert torch.equal(got["ids"], st["ids"])       # integers are always exact


def test_a_step_whose_parent_was_deleted(tmp_path):
    """Found by the gc state machine: step 1 reuses step 0's raw records (nothing changed), so
    deleting 0 does not rebase it and its manifest still names 0 as parent. The writer's
    reference rebuilt from step 1 must not follow that parent (links come from record depths)."""
    st = make_states(6, 1)[0]
    path = str(tmp_path / "r")
    with deltackpt.open(path, keyframe_every=4, max_chain=2, chunk_bytes=4096,
                        fsync=False) as repo:
        for s in range(3):
            repo.save(s, st)
        repo.delete(0, 2)
        assert repo.manifest(1).parent == 0 and repo.manifest(1).depth == 1
        repo.save(3, st)
    with deltackpt.open(path, keyframe_every=4, max_chain=2, chunk_bytes=4096) as repo:
        repo.save(4, make_states(6, 2)[1])
        for s in (1, 3):
            assert_bitexact(repo.load(s), st)
        assert repo.verify().ok
