"""Byte-plane grouping: the compiled kernels give numpy's bytes, and both invert exactly.

The kernels (deltackpt/format/_planes.c) write through raw pointers, so besides equality these tests
check what they must refuse: sizes that do not match, which would otherwise read or write out
of bounds.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltackpt.format import planes
from deltackpt.format.frame import decode_frame, encode_frame

WORDS = [1, 2, 3, 4, 8, 16]  # 2, 4 and 8 are native; the others always take numpy's path


def _reference_split(src: np.ndarray, word: int) -> np.ndarray:
    return src.reshape(-1, word).T.copy()


@given(word=st.sampled_from(WORDS), n=st.integers(0, 3000), offset=st.integers(0, 7),
       seed=st.integers(0, 2**32 - 1))
def test_split_merge_match_reference(plane_backend: str, word: int, n: int, offset: int,
                                     seed: int) -> None:
    raw = np.random.default_rng(seed).integers(0, 256, n * word + offset, dtype=np.uint8)
    src = raw[offset:]  # any alignment: the kernels must not assume aligned words
    out = np.full(src.size + 8, 0xAB, dtype=np.uint8)
    grouped = planes.split(src, word, out[:src.size])
    assert np.array_equal(grouped, _reference_split(src, word))
    assert (out[src.size:] == 0xAB).all(), "split wrote past its destination"
    back = np.full(src.size + 8, 0xCD, dtype=np.uint8)
    rows = [bytes(r) for r in grouped] if seed % 2 else list(grouped)  # bytes or arrays
    planes.merge(rows, word, back[:src.size])
    assert np.array_equal(back[:src.size], src)
    assert (back[src.size:] == 0xCD).all(), "merge wrote past its destination"


@pytest.mark.parametrize("word", WORDS)
def test_bad_sizes_are_refused(plane_backend: str, word: int) -> None:
    src = np.arange(8 * word, dtype=np.uint8)
    with pytest.raises(ValueError):
        planes.split(src, word, np.empty(src.size - 1, dtype=np.uint8))
    if word > 1:
        with pytest.raises(ValueError):
            planes.split(src[:-1], word, np.empty(src.size - 1, dtype=np.uint8))
    rows = list(_reference_split(src, word))
    with pytest.raises(ValueError):
        planes.merge(rows[:-1] if word > 1 else rows * 2, word, np.empty(src.size, np.uint8))
    with pytest.raises(ValueError):
        planes.merge([*rows[:-1], rows[-1][:-1]], word, np.empty(src.size, np.uint8))


@given(word=st.sampled_from([2, 4, 8]), n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_frames_identical_with_and_without_native(word: int, n: int, seed: int) -> None:
    if not planes.native_available():
        pytest.skip("deltackpt.format._planes was not built")
    rng = np.random.default_rng(seed)
    payload = (rng.integers(0, 4, n * word, dtype=np.uint8) * rng.integers(0, 2, n * word,
                                                                          dtype=np.uint8))
    old = planes.set_native(True)
    try:
        native = encode_frame(payload, word, 1)
        planes.set_native(False)
        plain = encode_frame(payload, word, 1)
        assert native == plain
        assert np.array_equal(decode_frame(native, payload.size), payload)
        planes.set_native(True)
        assert np.array_equal(decode_frame(plain, payload.size), payload)
    finally:
        planes.set_native(old)


def test_native_kernels_release_the_gil() -> None:
    """Another Python thread runs while one split is in the kernel (the worker pool relies on
    it). With a switch interval far longer than the test, the ticker can only take the GIL
    when the main thread gives it up; it sleeps after each tick, handing the GIL back."""
    if not planes.native_available():
        pytest.skip("deltackpt.format._planes was not built")
    src = np.full(1 << 25, 7, dtype=np.uint8)
    out = np.empty_like(src)  # not yet faulted in: the call takes a while
    go, stop = threading.Event(), threading.Event()
    ticks: list[int] = []

    def ticker() -> None:
        go.wait()
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.0001)
    t = threading.Thread(target=ticker)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # no forced hand-over: only a released GIL lets it run
    t.start()
    try:
        go.set()
        before = len(ticks)
        planes.split(src, 4, out)
        during = len(ticks) - before
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert during > 0, "no Python thread ran while the kernel worked: the GIL was held"


def test_native_built_where_required() -> None:
    """CI sets DELTACKPT_REQUIRE_NATIVE=1: a silent fallback to numpy there is a failure."""
    if os.environ.get("DELTACKPT_REQUIRE_NATIVE") != "1":
        pytest.skip("only checked where DELTACKPT_REQUIRE_NATIVE=1 (.ci/run sets it)")
    assert planes.native_available(), "the C extension deltackpt.format._planes was not built"


def test_bench_planes_quick_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark behind the README's kernel figures still runs (and checks its round trip)."""
    if not planes.native_available():
        pytest.skip("deltackpt.format._planes was not built")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_planes
    finally:
        sys.path.pop(0)
    assert bench_planes.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| split | 4 |" in out and "| load |" in out
    assert planes.native_in_use(), "the benchmark left the kernels switched off"
