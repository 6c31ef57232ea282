"""XOR chains replayed in byte-plane space: same bytes as link-by-link replay, or the same error.

The reader XORs a chain's stored planes and regroups them into words once (reconstruct
``_replay_planes``). It skips the per-link payload checks, so these tests pin down that it still
returns exactly what was saved, that it is really taken, and that a damaged link is still
reported by the step and tensor it belongs to.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.reconstruct import Reconstructor
from deltackpt.errors import IntegrityError
from deltackpt.store.packs import pack_name

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("plane_backend")]

# word 1 (one plane), word 2, 4, 8, complex (two words per element); odd element counts make
# planes whose length is not a multiple of 8 (byte lanes instead of 8-byte lanes)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
          torch.uint8, torch.int32, torch.complex64, torch.float8_e4m3fn, torch.bool]
SIZES = [1, 7, 1001, 4099]


def _walk(steps: int, seed: int) -> list[dict[str, Any]]:
    """States where a tenth of each tensor's elements drift every step (deltas pay)."""
    g = torch.Generator().manual_seed(seed)
    cur = {}
    for dt in DTYPES:
        for n in SIZES:
            cur[f"{dt}".replace("torch.", "") + f"/{n}"] = torch.randn(n, generator=g)
    out = []
    for _ in range(steps):
        state = {}
        for k, v in cur.items():
            moved = torch.rand(v.shape, generator=g) < 0.1
            v += moved * 1e-2 * torch.randn(v.shape, generator=g)
            dt = getattr(torch, k.split("/")[0])
            state[k] = (v.to(dt) if not dt.is_complex else torch.complex(v, -v).to(dt)).clone()
        out.append(state)
    return out


CODECS = ["xor", "pxor"]


def _save(path: Any, states: list[dict[str, Any]], codec: str = "xor", **policy: Any) -> None:
    with deltackpt.open(path, codec=codec, keyframe_every=100, chunk_bytes=1024,
                        **policy) as repo:
        for step, state in enumerate(states, 1):
            repo.save(step, state)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every plane-replay attempt's outcome."""
    seen: list[bool] = []
    real = Reconstructor._replay_planes

    def wrapped(self: Reconstructor, chain: Any, i: int, out: np.ndarray) -> bool:
        ok = real(self, chain, i, out)
        seen.append(ok)
        return ok
    monkeypatch.setattr(Reconstructor, "_replay_planes", wrapped)
    return seen


@pytest.mark.parametrize("codec", CODECS)
def test_plane_replay_is_bit_exact_and_taken(tmp_path: Any, spy: list[bool], codec: str) -> None:
    states = _walk(6, seed=1)
    _save(tmp_path / "r", states, codec)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        for step, state in enumerate(states, 1):
            assert_bitexact(repo.load(step), state)
            m = repo.manifest(step)
            assert max(c.depth for c in m.tensor("float32%2F4099").chunks) == step
    assert spy and all(spy), "every chain of 2+ links should have been replayed in planes"


@pytest.mark.parametrize("codec", CODECS)
def test_plane_replay_equals_link_by_link(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                          codec: str) -> None:
    states = _walk(5, seed=2)
    _save(tmp_path / "r", states, codec)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        fast = repo.load(5)
    monkeypatch.setattr(Reconstructor, "_replay_planes", lambda *a: False)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        slow = repo.load(5)
    assert_bitexact(fast, slow)
    assert_bitexact(fast, states[-1])


def test_diff_chains_are_not_replayed_in_planes(tmp_path: Any, spy: list[bool]) -> None:
    """Integer differences carry between bytes: only XOR commutes with plane grouping."""
    states = _walk(3, seed=3)
    with deltackpt.open(tmp_path / "r", codec="diff", chunk_bytes=1024) as repo:
        for step, state in enumerate(states, 1):
            repo.save(step, state)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        assert_bitexact(repo.load(3), states[-1])
    assert spy and not any(spy)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_damaged_middle_link_is_named(tmp_path: Any, where: str, codec: str) -> None:
    """A byte flipped in step 3's frame of one chunk: loading step 5 names step 3 and the
    tensor, never returns wrong data."""
    states = _walk(5, seed=4)
    _save(tmp_path / "r", states, codec)
    path = "float32%2F4099"  # the manifest escapes "/" inside a key
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        rec = repo.manifest(3).tensor(path).chunks[1]
        assert rec.ref == 2, "the test needs a delta at step 3"
        loc = repo.store.locate(rec.id)
    at = {"start": 40, "middle": loc.length // 2, "end": loc.length - 1}[where]
    name = os.path.join(tmp_path / "r", *pack_name(loc.pack).split("/"))
    with open(name, "r+b") as f:
        f.seek(loc.offset + at)
        byte = f.read(1)
        f.seek(loc.offset + at)
        f.write(bytes([byte[0] ^ 0x5A]))
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        assert_bitexact(repo.load(2), states[1])  # steps before the damage are untouched
        with pytest.raises(IntegrityError) as err:
            repo.load(5)
    assert err.value.step == 3 and err.value.path == path, str(err.value)


def _adam_walk(steps: int, seed: int) -> list[dict[str, Any]]:
    """Values of many magnitudes moved by steps of one absolute size (as Adam's are): the
    frames code their high planes in contexts of the reference's exponent byte, and some
    steps change so much that a plane is cheaper literal than as a delta."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(20000, generator=g) * torch.exp(torch.empty(20000).uniform_(-6, 2,
                                                                           generator=g))
    out = []
    for s in range(steps):
        v = v + (1e-1 if s % 3 == 2 else 1e-3) * torch.randn(v.shape, generator=g)
        out.append({"w": v.clone(), "h": v.to(torch.bfloat16)})
    return out


def test_context_coded_chains_replay_in_planes(tmp_path: Any, spy: list[bool],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from deltackpt.format import entropy
    from deltackpt.format.frame import CTX_REFERENCE, parse_frame
    if not entropy.can_encode():
        pytest.skip("the rANS coder is not built here")
    states = _adam_walk(7, seed=5)
    with deltackpt.open(tmp_path / "r", keyframe_every=100, chunk_bytes=1 << 16) as repo:
        for step, state in enumerate(states, 1):
            repo.save(step, state)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        contexts = 0
        for step in range(2, 8):
            for rec in repo.manifest(step).tensor("w").chunks:
                frame, loc = repo.store.read_frame(rec.id)
                f = parse_frame(frame, loc.payload_length)
                contexts += sum(p.context == CTX_REFERENCE for p in f.planes)
        assert contexts, "the test needs context-coded planes"
        fast = [repo.load(s) for s in range(1, 8)]
    assert spy and all(spy)
    monkeypatch.setattr(Reconstructor, "_replay_planes", lambda *a: False)
    with deltackpt.open(tmp_path / "r", mode="r") as repo:
        for s, want in enumerate(fast, 1):
            assert_bitexact(repo.load(s), want)
            assert_bitexact(want, states[s - 1])
