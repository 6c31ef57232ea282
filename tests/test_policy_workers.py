"""The default ``workers`` follows the CPUs the process may use (its affinity mask), capped at
MAX_DEFAULT_WORKERS; and more than 8 workers (once the old cap) work end to end."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import deltackpt
from deltackpt.engine import policy
from deltackpt.engine.policy import MAX_DEFAULT_WORKERS, Policy, preset


@pytest.mark.parametrize("cpus", [1, 3, 12, 64, 200])
def test_default_follows_affinity_mask(monkeypatch: pytest.MonkeyPatch, cpus: int) -> None:
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: set(range(cpus)),
                        raising=False)
    monkeypatch.setattr(policy.os, "cpu_count", lambda: 512)  # the mask wins over the machine
    assert Policy().workers == min(cpus, MAX_DEFAULT_WORKERS)
    assert preset("balanced").workers == min(cpus, MAX_DEFAULT_WORKERS)
    assert Policy(workers=100).workers == 100  # an explicit value is not capped


def test_default_without_affinity_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(policy.os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(policy.os, "cpu_count", lambda: 24)
    assert Policy().workers == 24
    monkeypatch.setattr(policy.os, "cpu_count", lambda: None)
    assert Policy().workers == 1

    def refuse(pid: int) -> set[int]:
        raise OSError("not permitted")
    monkeypatch.setattr(policy.os, "sched_getaffinity", refuse, raising=False)
    monkeypatch.setattr(policy.os, "cpu_count", lambda: 1000)
    assert Policy().workers == MAX_DEFAULT_WORKERS


def test_default_is_read_when_the_policy_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not frozen at import: a process whose mask changes (taskset, a launcher pinning ranks)
    gets the new count on its next open."""
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert Policy().workers == 3
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert Policy().workers == 1


def test_sixteen_workers_round_trip(tmp_path: Path) -> None:
    """workers=16 (more than the cores here, more than the old cap of 8): every step saved and
    loaded bit-exactly, with more than 8 pool threads having run."""
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(96 * 1024, generator=g) for i in range(12)}  # 12 x 384 KiB
    state["ids"] = torch.arange(50_000)
    saved = []
    with deltackpt.open(tmp_path / "r", workers=16, chunk_bytes=64 * 1024,
                        keyframe_every=3) as repo:
        for step in range(5):
            for k in list(state)[:-1]:
                state[k].add_(torch.randn(state[k].shape, generator=g), alpha=1e-4)
            repo.save(step, state)
            saved.append({k: v.clone() for k, v in state.items()})
        assert repo.policy.workers == 16
        names = {t.name for t in threading.enumerate() if t.name.startswith("deltackpt_")}
        assert len(names) > 8, names  # 4 x 16 chunks are submitted before the first result
    with deltackpt.open(tmp_path / "r", "r", workers=16) as r:
        for step, want in enumerate(saved):
            got = r.load(step)
            assert got.keys() == want.keys()
            for k, v in want.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (step, k)
