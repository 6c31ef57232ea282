"""Any call sequence is safe: saves commit in call order whatever mix of blocking and background
saves, deletes, gc, loads, verifies and closes the caller makes, from any thread.

The state machine drives one writer through random sequences of those operations against a model
(the steps that must exist and the state each holds); every load is compared bit for bit and the
whole repository is verified at the end of each sequence.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import deltackpt
from deltackpt.engine.retention import KeepLast
from deltackpt.errors import ReadOnlyError, StepExistsError

POLICY = dict(chunk_bytes=2048, keyframe_every=4, workers=2, fsync=False)


def state_for(step: int) -> dict[str, Any]:
    """A small training-like state: a slowly drifting weight, a changing moment, an int."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(3000, generator=g)
    drift = torch.randn(3000, generator=torch.Generator().manual_seed(step)) * 1e-3
    return {"model": {"w": w + drift * step, "b": torch.arange(7, dtype=torch.int64) + step},
            "opt": {"m": drift.clone(), "step": step},
            "np": np.full(5, step, dtype=np.int16)}


def test_background_then_blocking_saves_commit_in_order(tmp_path):
    """The issue's sequence: save(s, blocking=False) then save(s + 1) while the first is in
    flight. Before the fix, about half of the committed steps failed their digests."""
    for r in range(3):
        path = str(tmp_path / f"r{r}")
        with deltackpt.open(path, "a", **POLICY) as repo:
            for s in range(6):
                got = repo.save(s, state_for(s), blocking=bool(s % 2))
                if s % 2 == 0:
                    assert not isinstance(got, deltackpt.SaveInfo)
        with deltackpt.open(path, "r") as repo:
            assert repo.steps() == list(range(6))
            report = repo.verify()
            assert report.ok, [str(p) for p in report.problems]
            for s in range(6):
                assert_bitexact(repo.load(s), state_for(s))


def test_delete_and_gc_wait_for_background_saves(tmp_path):
    """A delete's rebase, and a gc, queued behind background saves run after them."""
    path = str(tmp_path / "r")
    with deltackpt.open(path, "a", **POLICY) as repo:
        for s in range(5):
            repo.save(s, state_for(s), blocking=False)
        report = repo.delete(2)                 # 3 and 4 chain through 2: rebased
        assert report.deleted_steps == [2]
        repo.save(5, state_for(5), blocking=False)
        repo.save(6, state_for(6), blocking=False)
        assert repo.gc(KeepLast(3)).deleted_steps == [0, 1, 3]
        repo.save(7, state_for(7), blocking=False)
        assert_bitexact(repo.load(), state_for(7))   # the load sees the save called before it
    with deltackpt.open(path, "r") as repo:
        assert repo.steps() == [4, 5, 6, 7]
        assert repo.verify().ok
        for s in repo.steps():
            assert_bitexact(repo.load(s), state_for(s))


def test_background_save_copies_the_state_at_call_time(tmp_path):
    with deltackpt.open(str(tmp_path / "r"), "a", **POLICY) as repo:
        st_ = state_for(0)
        repo.save(0, st_, blocking=False)
        st_["model"]["w"].add_(1.0)             # the training loop goes on
        repo.save(1, st_)
        st_["model"]["w"].sub_(1.0)
        assert_bitexact(repo.load(0), state_for(0))
        assert torch.equal(repo.load(1)["model"]["w"], state_for(0)["model"]["w"] + 1.0)


def test_a_step_queued_twice_is_refused(tmp_path):
    with deltackpt.open(str(tmp_path / "r"), "a", **POLICY) as repo:
        repo.save(0, state_for(0), blocking=False)
        with pytest.raises(StepExistsError):
            repo.save(0, state_for(1), blocking=False)
        with pytest.raises(StepExistsError):
            repo.save(0, state_for(1))
        repo.wait()
        assert_bitexact(repo.load(0), state_for(0))


def test_saves_from_many_threads(tmp_path):
    """Four threads save (blocking and not), load and verify at once: every step commits
    exactly once and loads bit-exactly."""
    path = str(tmp_path / "r")
    errors: list[BaseException] = []
    with deltackpt.open(path, "a", **POLICY) as repo:
        def worker(k: int) -> None:
            try:
                for i in range(6):
                    s = 4 * i + k
                    repo.save(s, state_for(s), blocking=(i + k) % 2 == 0)
                    if i % 2:
                        done = [x for x in repo.steps() if x % 4 == k]
                        assert_bitexact(repo.load(done[-1]), state_for(done[-1]))
                if k == 0:
                    assert repo.verify().ok
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        repo.wait()
    assert not errors, errors
    with deltackpt.open(path, "r") as repo:
        assert repo.steps() == list(range(24))
        assert repo.verify().ok
        for s in repo.steps():
            assert_bitexact(repo.load(s), state_for(s))


def test_close_from_another_thread_finishes_queued_saves(tmp_path):
    path = str(tmp_path / "r")
    repo = deltackpt.open(path, "a", **POLICY)
    futures = [repo.save(s, state_for(s), blocking=False) for s in range(3)]
    closer = threading.Thread(target=repo.close)
    closer.start()
    closer.join()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(ReadOnlyError, match="closed"):
        repo.save(3, state_for(3))
    with pytest.raises(ReadOnlyError, match="closed"):
        repo.load(0)
    repo.close()  # twice: nothing
    with deltackpt.open(path, "r") as r:
        assert r.steps() == [0, 1, 2]


def test_background_error_is_raised_once_by_the_next_call(tmp_path):
    """A background save that fails (disk full at its flush) reports through its future and,
    once, through the next call; the repository stays usable and the step can be saved."""
    with deltackpt.open(str(tmp_path / "r"), "a", **POLICY) as repo:
        repo.save(0, state_for(0))
        orig = repo.store.flush

        def full() -> list[str]:
            raise OSError(28, "No space left on device")

        repo.store.flush = full  # type: ignore[method-assign]
        fut = repo.save(1, state_for(1), blocking=False)
        with pytest.raises(OSError):
            fut.result()
        repo.store.flush = orig  # type: ignore[method-assign]
        with pytest.raises(OSError, match="No space"):
            repo.load(0)                              # the next call reports it ...
        assert_bitexact(repo.load(0), state_for(0))   # ... once
        assert repo.steps() == [0]
        repo.save(1, state_for(1))
        assert_bitexact(repo.load(1), state_for(1))


# --------------------------------------------------------------------------- state machine
class CallSequences(RuleBasedStateMachine):
    """One writer, random sequences of every operation; the model is what must be there."""

    def __init__(self) -> None:
        super().__init__()
        self.next_step = 0
        self.expected: dict[int, int] = {}   # step -> state seed, in call order

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="deltackpt-seq-")
        self.path = self.dir + "/r"
        self.policy = dict(POLICY, keyframe_every=data.draw(st.sampled_from([2, 3, 5])),
                           max_chain=data.draw(st.sampled_from([0, 1, 2])),
                           reference=data.draw(st.sampled_from(["previous", "keyframe"])),
                           codec=data.draw(st.sampled_from(["xor", "diff"])))
        self.repo = self._open()

    def _open(self) -> deltackpt.Repository:
        """A writer whose saves take a while (a slow disk), so that background saves are still
        in flight when the next calls arrive: the interleavings this machine is about."""
        repo = deltackpt.open(self.path, "a", **self.policy)
        save_now = repo._save_now

        def slow(*args: Any) -> Any:
            time.sleep(0.01)
            return save_now(*args)

        repo._save_now = slow  # type: ignore[method-assign]
        return repo

    def _new_step(self, gap: int) -> int:
        self.next_step += gap
        return self.next_step

    @rule(gap=st.integers(1, 3), seed=st.integers(0, 50))
    def save_background(self, gap: int, seed: int) -> None:
        s = self._new_step(gap)
        self.repo.save(s, state_for(seed), blocking=False)
        self.expected[s] = seed

    @rule(gap=st.integers(1, 3), seed=st.integers(0, 50))
    def save_blocking(self, gap: int, seed: int) -> None:
        s = self._new_step(gap)
        info = self.repo.save(s, state_for(seed))
        assert info.step == s
        self.expected[s] = seed

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def save_existing_step_refused(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.expected)))
        with pytest.raises(StepExistsError):
            self.repo.save(s, state_for(0), blocking=data.draw(st.booleans()))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        doomed = data.draw(st.lists(st.sampled_from(sorted(self.expected)), min_size=1,
                                    max_size=2, unique=True))
        report = self.repo.delete(*doomed)
        assert report.deleted_steps == sorted(doomed)
        for s in doomed:
            del self.expected[s]

    @rule(keep=st.integers(1, 4), repack=st.sampled_from([0.0, 0.5, 1.0]))
    def gc(self, keep: int, repack: float) -> None:
        report = self.repo.gc(KeepLast(keep), repack_below=repack)
        doomed = sorted(self.expected)[:-keep]
        assert report.deleted_steps == doomed
        for s in doomed:
            del self.expected[s]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.expected)))
        assert_bitexact(self.repo.load(s), state_for(self.expected[s]))

    @precondition(lambda self: self.expected)
    @rule()
    def load_latest(self) -> None:
        s = max(self.expected)
        assert_bitexact(self.repo.load(), state_for(self.expected[s]))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def load_selected(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.expected)))
        got = self.repo.load(s, select="model")
        assert_bitexact(got, {"model": state_for(self.expected[s])["model"]})

    @rule()
    def verify(self) -> None:
        report = self.repo.verify()
        assert report.ok, [str(p) for p in report.problems]

    @rule()
    def wait(self) -> None:
        self.repo.wait()
        assert self.repo.steps() == sorted(self.expected)

    @rule(background=st.booleans())
    def close_and_reopen(self, background: bool) -> None:
        if background:
            t = threading.Thread(target=self.repo.close)
            t.start()
            t.join()
        else:
            self.repo.close()
        with pytest.raises(ReadOnlyError):
            self.repo.save(self._new_step(1), state_for(0), blocking=background)
        self.repo = self._open()
        assert self.repo.steps() == sorted(self.expected)

    @invariant()
    def only_called_steps_exist(self) -> None:
        """Committed steps are a subset of those saved and not deleted (background saves may
        still be in flight; deletes and gc have finished when they return)."""
        if hasattr(self, "repo"):
            assert set(self.repo.steps()) <= set(self.expected)

    def teardown(self) -> None:
        import shutil
        if not hasattr(self, "repo"):
            return
        try:
            self.repo.close()
            with deltackpt.open(self.path, "r") as r:
                assert r.steps() == sorted(self.expected)
                report = r.verify()
                assert report.ok, [str(p) for p in report.problems]
                for s, seed in self.expected.items():
                    assert_bitexact(r.load(s), state_for(seed))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestCallSequences = CallSequences.TestCase
TestCallSequences.settings = settings(max_examples=40, stateful_step_count=16, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
