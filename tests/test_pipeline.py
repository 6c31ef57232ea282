"""The save/load pipeline's shortcuts must never change what is stored or restored: the writer's
in-place reference update, decoding deltas in place into the output, inline tiny chunks."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.codecs import get_codec
from deltackpt.format.dtypes import numpy_type, torch_type
from deltackpt.format.frame import decode_frame, encode_frame
from deltackpt.store.packs import ChunkStore


def _state(seed: int, n: int = 6000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    base = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=base) + 1e-3 * seed * torch.randn(n, generator=g)
    return {"w": w, "b": torch.randn(300, generator=g).to(torch.bfloat16),
            "i": torch.arange(500, dtype=torch.int64) * seed, "tiny": torch.tensor([seed])}


def test_failed_delta_save_does_not_poison_the_next_ones(tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer overwrites its delta reference chunk by chunk while a save runs; a save that
    fails half-way must not leave a reference that later deltas would silently build on."""
    with deltackpt.open(tmp_path / "r", chunk_bytes=1024, workers=2) as repo:
        repo.save(0, _state(0))
        real = ChunkStore.put_frame
        calls = {"n": 0}

        def flaky(self: ChunkStore, *args: Any, **kwargs: Any) -> int:
            calls["n"] += 1
            if calls["n"] == 5:  # several chunks of the reference already overwritten
                raise OSError(5, "Input/output error")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(ChunkStore, "put_frame", flaky)
        with pytest.raises(OSError):
            repo.save(1, _state(1))
        monkeypatch.setattr(ChunkStore, "put_frame", real)
        assert calls["n"] >= 5
        for s in (2, 3, 4):
            info = repo.save(s, _state(s))
            assert info.kind == "delta"  # the reference was rebuilt from disk, not dropped
        assert repo.steps() == [0, 2, 3, 4]
    with deltackpt.open(tmp_path / "r", mode="r") as ro:
        for s in ro.steps():
            assert_bitexact(ro.load(s), _state(s))
        assert ro.verify().ok


@pytest.mark.parametrize("reference", ["previous", "keyframe"])
def test_reference_buffer_reuse_across_layout_changes(tmp_path: Any, reference: str) -> None:
    """Tensors that change size, dtype or appear/disappear between saves (so the in-place
    reference cannot be reused for them) round-trip exactly next to ones that can."""
    states = []
    for s in range(8):
        st_ = _state(s)
        if s % 3 == 1:
            st_["w"] = st_["w"][: 4000 + s]        # size change
        if s % 4 == 2:
            st_["i"] = st_["i"].to(torch.int32)    # dtype change
        if s % 2:
            st_["extra"] = torch.full((100,), float(s))
        states.append(st_)
    with deltackpt.open(tmp_path / "r", chunk_bytes=2048, keyframe_every=4,
                        reference=reference) as repo:
        for s, st_ in enumerate(states):
            repo.save(s, st_)
    with deltackpt.open(tmp_path / "r", mode="r") as ro:
        for s, st_ in enumerate(states):
            assert_bitexact(ro.load(s), st_)


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8,
           torch.int16, torch.int32, torch.int64, torch.uint8, torch.complex64, torch.bool]


@settings(max_examples=60, deadline=None)
@given(codec=st.sampled_from(["xor", "diff"]), dtype=st.sampled_from(_DTYPES),
       n=st.integers(0, 300), data=st.data())
def test_decode_into_equals_decode_even_in_place(codec: str, dtype: torch.dtype, n: int,
                                                data: st.DataObject) -> None:
    et = torch_type(dtype)
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cur = rng.integers(0, 256, n * et.itemsize, dtype=np.uint8)
    ref = rng.integers(0, 256, n * et.itemsize, dtype=np.uint8)
    c = get_codec(codec)
    payload, _ = c.encode(cur, ref, et)
    assert np.array_equal(c.decode(payload, ref, et, cur.size), cur)
    out = np.empty_like(cur)
    c.decode_into(payload.copy(), ref, out, et)
    assert np.array_equal(out, cur)
    aliased = ref.copy()  # the reader applies each delta onto the output itself
    c.decode_into(payload.copy(), aliased, aliased, et)
    assert np.array_equal(aliased, cur)


@settings(max_examples=60, deadline=None)
@given(word=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 3000), seed=st.integers(0, 2**31))
def test_frame_decodes_into_a_caller_buffer(word: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    payload = (rng.standard_normal(n * word) * 3).astype(np.int8).view(np.uint8)
    frame = encode_frame(payload, word, 1)
    out = np.full(payload.size, 0xAB, np.uint8)
    got = decode_frame(frame, payload.size, out)
    assert got is out and np.array_equal(out, payload)


def test_numpy_big_endian_and_views_through_the_pipeline(tmp_path: Any) -> None:
    a = np.arange(20000, dtype=">f4").reshape(100, 200)[:, ::3]
    st_ = {"be": a, "le": np.arange(7, dtype="<u2")}
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(0, st_)
        b = (a + 1).astype(">f4")  # arithmetic would give a native-order array
        repo.save(1, {"be": b, "le": st_["le"]})
        out = repo.load(1)
    assert out["be"].dtype == np.dtype(">f4") and np.array_equal(out["be"], b)
    assert numpy_type(np.dtype(">f4")).name == ">f4"


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_policy(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    import os as os_mod

    calls = {"n": 0}
    real = os_mod.fsync

    def counting(fd: int) -> None:
        calls["n"] += 1
        real(fd)

    monkeypatch.setattr(os_mod, "fsync", counting)
    with deltackpt.open(tmp_path / "r", fsync=fsync) as repo:
        for s in range(3):
            repo.save(s, _state(s))
        repo.delete(1)
        repo.gc()
    assert (calls["n"] > 0) == fsync
    with deltackpt.open(tmp_path / "r", mode="r") as ro:
        assert ro.steps() == [0, 2]
        assert_bitexact(ro.load(2), _state(2))


@given(sizes=st.lists(st.integers(0, 200_000), max_size=60), fail_at=st.none() | st.integers(0, 59))
@settings(max_examples=40, deadline=None)
def test_bounded_map_batches_small_items_keeps_order_and_errors(sizes: list[int],
                                                                fail_at: int | None) -> None:
    """Small items share a task, large ones get their own; results come back in input order;
    the first failing item's error is raised and no task outlives the call."""
    from concurrent.futures import ThreadPoolExecutor

    from deltackpt.engine.writer import BATCH_BYTES, SMALL_CHUNK, _tasks, bounded_map

    items = list(enumerate(sizes))
    tasks = list(_tasks(items, lambda it: it[1]))
    assert [it for t in tasks for it in t] == items
    for t in tasks:
        assert len(t) == 1 or all(n < SMALL_CHUNK for _, n in t)
        assert sum(n for _, n in t[:-1]) < BATCH_BYTES and len(t) <= 256
    running: list[int] = []

    def fn(it: tuple[int, int]) -> int:
        running.append(it[0])
        if it[0] == fail_at:
            raise KeyError(it[0])
        return it[0] * 2

    with ThreadPoolExecutor(2) as pool:
        if fail_at is not None and fail_at < len(items):
            with pytest.raises(KeyError) as err:
                list(bounded_map(pool, fn, items, 3, lambda it: it[1]))
            assert err.value.args == (fail_at,)
            seen = len(running)
            pool.submit(lambda: None).result()
            assert len(running) == seen  # nothing still running after the call returned
        else:
            assert list(bounded_map(pool, fn, items, 3, lambda it: it[1])) == \
                [i * 2 for i, _ in items]


def test_huge_page_advice_leaves_buffers_usable() -> None:
    from deltackpt.runtime import hugepages

    buf = np.empty(9 << 20, np.uint8)[3:]  # unaligned start, spans several 2 MiB pages
    hugepages.advise(buf)
    buf[:] = np.arange(buf.size, dtype=np.uint64).astype(np.uint8)
    assert int(buf[12345]) == 12345 % 256
    hugepages.advise(np.empty(10, np.uint8))  # below the threshold: a no-op
