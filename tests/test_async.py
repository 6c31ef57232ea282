"""Asynchronous saves: the caller waits only for the copy; errors surface on the next call."""
from __future__ import annotations

import copy

import pytest
import torch

import deltackpt
from deltackpt.errors import StepExistsError

from _util import assert_bitexact


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 40, generator=g), "v": torch.randn(40, 300, generator=g).t(),
            "c": torch.randn(50, dtype=torch.complex64, generator=g).conj(), "n": seed}


def test_async_save_snapshots_before_returning(tmp_path):
    with deltackpt.open(tmp_path / "r", chunk_bytes=4096) as repo:
        states = []
        for s in range(5):
            st = _state(s)
            states.append(copy.deepcopy(st))
            fut = repo.save(s, st, blocking=False)
            st["w"].add_(1.0)       # training goes on mutating the tensors in place
            st["v"].zero_()
        assert fut.result().step == 4
        repo.wait_until_finished()
        assert repo.steps() == list(range(5))
        for s, expected in enumerate(states):
            assert_bitexact(repo.load(s), expected)
        assert repo.verify().ok


def test_async_saves_commit_in_order_and_dedupe_steps(tmp_path):
    with deltackpt.open(tmp_path / "r") as repo:
        futs = [repo.save(s, _state(s), blocking=False) for s in range(4)]
        with pytest.raises(StepExistsError):
            repo.save(3, _state(3), blocking=False)  # still queued: refused at once
        kinds = [f.result().kind for f in futs]
        assert kinds[0] == "keyframe" and set(kinds[1:]) == {"delta"}


def test_background_error_surfaces_on_next_call(tmp_path, monkeypatch):
    repo = deltackpt.open(tmp_path / "r")
    repo.save(0, _state(0))
    calls = {"n": 0}
    real = repo._save_now

    def failing(*args, **kwargs):
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repo, "_save_now", failing)
    fut = repo.save(1, _state(1), blocking=False)
    with pytest.raises(OSError):
        fut.result()
    with pytest.raises(OSError, match="No space"):
        repo.save(2, _state(2))  # the next call reports the background failure
    monkeypatch.setattr(repo, "_save_now", real)
    repo.save(2, _state(2))  # reported once; the repository goes on working
    assert repo.steps() == [0, 2]
    repo.close()


def test_close_waits_for_background_saves(tmp_path):
    repo = deltackpt.open(tmp_path / "r")
    for s in range(3):
        repo.save(s, _state(s), blocking=False)
    repo.close()
    with deltackpt.open(tmp_path / "r", mode="r") as ro:
        assert ro.steps() == [0, 1, 2]
        assert_bitexact(ro.load(2), _state(2))
