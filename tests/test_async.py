"""Asynchronous saves: the caller waits only for the copy; errors surface on the next call."""
from __future__ import annotations

import copy

import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.errors import StepExistsError


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


def _mixed_state(seed: int) -> dict:
    import numpy as np
    g = torch.Generator().manual_seed(seed)
    return {"p": torch.nn.Parameter(torch.randn(64, 8, generator=g)),
            "g": torch.randn(16, generator=g).requires_grad_(True),
            "f8": torch.randn(33, generator=g).to(torch.float8_e4m3fn),
            "b": torch.rand(17, generator=g) > 0.5,
            "e": torch.empty(0, 3), "z": torch.tensor(seed),
            "np": np.arange(seed, seed + 7, dtype=">i4"), "view": torch.arange(40.0)[::3]}


def test_async_staging_buffers_are_reused_and_bitexact(tmp_path):
    # two buffers allowed: a buffer released only after wait() returned would make the next
    # save allocate a second one (a page fault per 4 KiB of the stall)
    with deltackpt.open(tmp_path / "r", async_buffers=2) as repo:
        pool = repo._staging
        expected = []
        first = None
        for s in range(12):
            st = _mixed_state(s)
            expected.append(copy.deepcopy(st))
            repo.save(s, st, blocking=False)
            with torch.no_grad():
                st["p"].add_(1.0)
            repo.wait()
            assert len(pool._free) == 1 and pool._busy == 0  # released after the save
            buf = pool._free[0]
            first = first or buf
            assert buf is first  # reused, never reallocated for a state of the same size
        for s, exp in enumerate(expected):
            assert_bitexact(repo.load(s), exp)


def test_async_back_pressure_waits_for_a_free_buffer(tmp_path, monkeypatch):
    import threading
    import time

    with deltackpt.open(tmp_path / "r", async_buffers=1) as repo:
        gate = threading.Event()
        real = repo._save_now

        def slow(*args, **kwargs):
            gate.wait(10)
            return real(*args, **kwargs)

        monkeypatch.setattr(repo, "_save_now", slow)
        repo.save(0, _state(0), blocking=False)
        done = threading.Event()

        def second():
            repo.save(1, _state(1), blocking=False)
            done.set()

        th = threading.Thread(target=second)
        th.start()
        time.sleep(0.3)
        assert not done.is_set()  # the only staging buffer is still read by save 0
        gate.set()
        th.join(10)
        assert done.is_set()
        repo.wait()
        assert repo.steps() == [0, 1]


def test_async_failure_releases_its_buffer(tmp_path, monkeypatch):
    with deltackpt.open(tmp_path / "r", async_buffers=1) as repo:
        def failing(*args, **kwargs):
            raise OSError(5, "Input/output error")

        real = repo._save_now
        monkeypatch.setattr(repo, "_save_now", failing)
        fut = repo.save(0, _state(0), blocking=False)
        with pytest.raises(OSError):
            fut.result()
        monkeypatch.setattr(repo, "_save_now", real)
        with pytest.raises(OSError):
            repo.wait()
        repo.save(1, _state(1), blocking=False)  # would wait forever if the buffer leaked
        repo.wait()
        assert repo.steps() == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.complex64, torch.complex128, torch.int64, torch.int32,
                                   torch.int16, torch.int8, torch.uint8, torch.bool])
def test_staged_copies_are_exact_and_detached_from_the_originals(dtype):
    """The staging fast path (raw memmove now, a typed view of the buffer later) keeps dtype, shape,
    strides and bytes, and later in-place changes to the originals do not reach the copy."""
    from deltackpt.engine.staging import StagingPool, materialize, stage
    from deltackpt.format.tree import flatten

    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, 4, generator=g, dtype=torch.float64) * 100
    values = {"3d": base.to(dtype), "0d": base[0, 0, 0].to(dtype), "1": base[:1, :1].to(dtype),
              "empty": base[:0].to(dtype), "tied": None, "odd": base.reshape(-1)[:7].to(dtype)}
    values["tied"] = values["3d"]
    state = {"a": values, "b": list(values.values())}
    expected = copy.deepcopy(state)
    _, leaves = flatten(state)
    pool = StagingPool(1)
    staged, buf = stage(leaves, pool)
    staged = materialize(staged, buf)
    for v in values.values():
        if v.numel():
            v.reshape(-1).view(torch.uint8).bitwise_not_()  # training moves on
    try:
        by_index = {lf.index: lf.value for lf in staged}
        _, originals = flatten(expected)
        assert len(originals) == len(staged)
        for lf in originals:
            got = by_index[lf.index]
            assert_bitexact(got, lf.value)
            assert got.stride() == lf.value.stride() or got.numel() <= 1
    finally:
        pool.release(buf)
