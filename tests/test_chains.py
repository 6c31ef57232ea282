"""Chains of saves: deltas stay exact however states evolve, and cost what they should.

Long chains with random changes between steps (unchanged, sparse, drift, full rewrite, dtype
and shape changes, tensors added/removed, ties and duplicates) under both codecs, both
reference modes and several keyframe intervals; chain-depth bounds; zero cost for unchanged
tensors; dedup; reopen-and-continue; partial loads that read only what they select; and the
typed errors of the repository API.
"""
from __future__ import annotations

import os
import random
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.engine.reconstruct import Reconstructor
from deltackpt.errors import (
    DeltaCkptError,
    IntegrityError,
    LockedError,
    ReadOnlyError,
    RepositoryNotFoundError,
    StepExistsError,
    StepNotFoundError,
)
from deltackpt.store.manifest import manifest_name
from deltackpt.store.packs import pack_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHAIN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64,
                torch.float8_e5m2]
SHAPES = [(7,), (3, 5), (2, 3, 4), (), (0, 4), (1, 1, 1, 6), (40, 16), (300,), (4, 8, 20)]
MUTATIONS = ["same", "same", "same", "clone", "sparse", "sparse", "drift", "full", "dtype",
             "reshape", "resize", "remove"]


# ------------------------------------------------------------------------------- generators
def rand_tensor(rnd: random.Random, dtype: torch.dtype | None = None,
                shape: tuple[int, ...] | None = None) -> torch.Tensor:
    dtype = dtype if dtype is not None else rnd.choice(CHAIN_DTYPES)
    shape = shape if shape is not None else rnd.choice(SHAPES)
    gen = torch.Generator().manual_seed(rnd.getrandbits(62))
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), generator=gen,
                        dtype=torch.uint8)
    if dtype is torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def _same_numel_shape(rnd: random.Random, t: torch.Tensor) -> tuple[int, ...]:
    n = t.numel()
    options = [(n,), (1, n), (n, 1)] + [(d, n // d) for d in (2, 3, 4) if n and n % d == 0]
    options = [s for s in options if s != tuple(t.shape)]
    return rnd.choice(options)


def mutate(rnd: random.Random, t: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """One random change; never modifies ``t`` in place (saved states must stay as saved)."""
    op = rnd.choice(MUTATIONS)
    if op == "same":
        return op, t
    if op == "clone":
        return op, t.clone()
    if op == "sparse" and t.numel():
        u = t.clone()
        b = u.reshape(-1).view(torch.uint8)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(b.numel())
            b[i] = rnd.randint(0, 1) if t.dtype is torch.bool else rnd.randrange(256)
        return op, u
    if op == "drift" and t.numel():
        gen = torch.Generator().manual_seed(rnd.getrandbits(62))
        if t.dtype.is_floating_point or t.dtype.is_complex:
            noise = 1e-3 * torch.randn(t.shape, generator=gen)
            return op, (t.to(torch.complex64 if t.dtype.is_complex else torch.float64)
                         + noise).to(t.dtype)
        if t.dtype is torch.bool:
            return op, ~t
        return op, t + 1
    if op == "dtype":
        return op, rand_tensor(rnd, rnd.choice([d for d in CHAIN_DTYPES if d != t.dtype]),
                               tuple(t.shape))
    if op == "reshape" and t.numel() > 1:
        return op, t.reshape(_same_numel_shape(rnd, t))
    if op == "resize":
        return op, rand_tensor(rnd, t.dtype, rnd.choice([s for s in SHAPES if s != t.shape]))
    if op == "remove":
        return op, None
    return "full", rand_tensor(rnd, t.dtype, tuple(t.shape))


class Evolving:
    """A model/optimizer-like state that changes randomly from step to step."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.model: dict[str, torch.Tensor] = {f"layer{i}.weight": rand_tensor(rnd)
                                               for i in range(4)}
        self.opt: dict[str, torch.Tensor] = {f"{i}": rand_tensor(rnd) for i in range(3)}
        # "hot" tensors change at every step that is not idle, the way trained weights do:
        # a counter (+1: its deltas always pay) and a float tensor drifting by ~1 ulp
        self.hot = {"counter": torch.arange(512, dtype=torch.int64) * 1000,
                    "drift": rand_tensor(rnd, torch.float32, (32, 32))}
        self.counter = 10
        self.idle = False

    def step(self) -> None:
        rnd = self.rnd
        self.idle = rnd.random() < 0.15  # a step where nothing at all changes
        if self.idle:
            return
        gen = torch.Generator().manual_seed(rnd.getrandbits(62))
        self.hot = {"counter": self.hot["counter"] + 1,
                    "drift": self.hot["drift"] * (1 + 1e-7 * torch.randn(32, 32, generator=gen))}
        for pool in (self.model, self.opt):
            for name in list(pool):
                _op, new = mutate(rnd, pool[name])
                if new is None:
                    if len(pool) > 1:
                        del pool[name]
                else:
                    pool[name] = new
            if rnd.random() < 0.3:
                self.counter += 1
                pool[f"new{self.counter}"] = rand_tensor(rnd)
        if rnd.random() < 0.3:  # a duplicate of a model tensor in the optimizer (dedup)
            name = rnd.choice(sorted(self.model))
            self.opt["shadow"] = self.model[name].clone()
        elif "shadow" in self.opt and rnd.random() < 0.3:
            del self.opt["shadow"]

    def state(self, step: int) -> dict[str, Any]:
        model = OrderedDict(self.hot | self.model)
        model._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
        tied_name = min(self.model)
        return {"model": model,
                "optimizer": {"state": dict(self.opt),
                              "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999),
                                                "params": list(range(len(self.opt)))}]},
                "tied": (tied_name, self.model[tied_name]),
                "step": step}


# --------------------------------------------------------------------------- chain checking
def manifest_size(repo: deltackpt.Repository, step: int) -> int:
    return os.path.getsize(os.path.join(repo.path, *manifest_name(step).split("/")))


def check_save(repo: deltackpt.Repository, info: deltackpt.SaveInfo, step: int, index: int,
               prev_step: int | None, keyframe_step: int | None, reference: str, k: int,
               idle: bool) -> bool:
    """Invariants of one save, the ``index``-th of a fresh writer. Returns 'was a keyframe'."""
    m = repo.manifest(step)
    keyframe = index % k == 0
    counter = m.tensor("model/counter")
    assert counter is not None
    if keyframe:
        check_save.counter_depth = 1  # type: ignore[attr-defined]
    elif not idle:
        # the counter changed, and a +1 delta always pays: its chain grows by one entry
        # (previous) or is keyframe <- delta (keyframe)
        check_save.counter_depth = (  # type: ignore[attr-defined]
            check_save.counter_depth + 1 if reference == "previous" else 2)  # type: ignore
    if counter.chunk_bytes >= 1024:  # smaller chunks: frame overhead can make raw cheaper
        assert [c.depth for c in counter.chunks] == \
            [check_save.counter_depth] * len(counter.chunks)  # type: ignore[attr-defined]
    assert info.kind == m.kind == ("keyframe" if keyframe else "delta")
    assert info.depth == m.depth
    assert m.delta_index == index % k
    if reference == "previous":
        assert info.depth <= k and info.depth <= m.delta_index + 1
    else:
        assert info.depth <= min(2, k)
    if keyframe:
        assert m.parent is None and m.keyframe == step
    else:
        assert m.keyframe == keyframe_step
        assert m.parent == (prev_step if reference == "previous" else keyframe_step)
    total_chunks = sum(len(e.chunks) for e in m.tensors)
    assert info.new_chunks + info.reused_chunks == total_chunks
    assert info.stored_bytes >= manifest_size(repo, step)
    if not keyframe:
        # every tensor whose bytes equal its reference's costs no new chunk
        ref = repo.manifest(m.parent)  # type: ignore[arg-type]
        unchanged = 0
        for e in m.tensors:
            r = ref.tensor(e.path)
            if r is not None and (r.kind, r.dtype, r.nbytes, r.digest, r.chunk_bytes) == \
                    (e.kind, e.dtype, e.nbytes, e.digest, e.chunk_bytes):
                unchanged += len(e.chunks)
        assert info.reused_chunks >= unchanged
        if idle:
            assert info.new_chunks == 0
            assert info.stored_bytes == manifest_size(repo, step)  # only the manifest
    return keyframe


def run_chain(tmp_path: Any, rnd: random.Random, codec: str, reference: str, k: int,
              n_steps: int, chunk_bytes: int = 1024, check_all_every_step: bool = True) -> None:
    path = tempfile.mkdtemp(dir=tmp_path)  # hypothesis runs many chains per tmp_path
    evo = Evolving(rnd)
    saved: dict[int, Any] = {}
    with deltackpt.open(path, codec=codec, reference=reference, keyframe_every=k,
                        chunk_bytes=chunk_bytes) as repo:
        prev = keyframe_step = None
        step = 0
        for index in range(n_steps):
            if index:
                evo.step()
            step += rnd.randint(1, 3)
            state = evo.state(step)
            info = repo.save(step, state)
            saved[step] = state
            if check_save(repo, info, step, index, prev, keyframe_step, reference, k,
                          evo.idle and index > 0):
                keyframe_step = step
            prev = step
            assert repo.steps() == sorted(saved) and repo.latest == step
            for s in (saved if check_all_every_step or index == n_steps - 1 else [step]):
                out = repo.load(s)
                assert_bitexact(saved[s], out)
                assert out["tied"][1] is out["model"][out["tied"][0]]
    # a fresh reader without any cache replays every chain from disk
    with deltackpt.open(path, mode="r", cache_bytes=0) as reader:
        assert reader.steps() == sorted(saved)
        for s in sorted(saved, reverse=True):
            assert_bitexact(saved[s], reader.load(s))
        report = reader.verify()
        assert report.ok, report.problems
        assert report.steps == sorted(saved)
        check_record_depths(reader)


def check_record_depths(reader: deltackpt.Repository) -> None:
    """Every chunk record: depth <= delta_index + 1, and depth is exactly the number of payloads
    its rebuild decodes (counted on a reader without a chunk cache)."""
    gets = [0]
    real_get = reader.store.get

    def counting_get(cid: bytes, *args: Any, **kwargs: Any) -> Any:
        gets[0] += 1
        return real_get(cid, *args, **kwargs)

    reader.store.get = counting_get  # type: ignore[method-assign]
    try:
        for s in reader.steps():
            m = reader.manifest(s)
            for e in m.tensors:
                for i, rec in enumerate(e.chunks):
                    assert 1 <= rec.depth <= m.delta_index + 1
                    before = gets[0]
                    reader.reconstructor.chunk(s, e, i)
                    assert gets[0] - before == rec.depth, (s, e.path, i)
    finally:
        del reader.store.get


CONFIGS = [(c, r, k) for c in ("diff", "xor") for r in ("previous", "keyframe")
           for k in (1, 3, 10)]


@pytest.mark.parametrize("codec,reference,k", CONFIGS)
def test_seeded_random_chain(tmp_path: Any, codec: str, reference: str, k: int) -> None:
    rnd = random.Random(f"{codec}-{reference}-{k}")
    run_chain(tmp_path, rnd, codec, reference, k, n_steps=16)


@pytest.mark.slow
@pytest.mark.parametrize("codec,reference,k", CONFIGS)
def test_seeded_random_chain_long(tmp_path: Any, codec: str, reference: str, k: int) -> None:
    for seed in range(3):
        rnd = random.Random(f"long-{seed}-{codec}-{reference}-{k}")
        run_chain(tmp_path, rnd, codec, reference, k, n_steps=60,
                  check_all_every_step=False)


@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(rnd=st.randoms(use_true_random=False), codec=st.sampled_from(["diff", "xor"]),
       reference=st.sampled_from(["previous", "keyframe"]), k=st.sampled_from([1, 2, 3, 10]),
       n_steps=st.integers(2, 9), chunk_bytes=st.sampled_from([64, 100, 1024, 4096]))
def test_hypothesis_chain(tmp_path: Any, rnd: random.Random, codec: str, reference: str,
                          k: int, n_steps: int, chunk_bytes: int) -> None:
    run_chain(tmp_path, rnd, codec, reference, k, n_steps, chunk_bytes)


# ----------------------------------------------------------------------------- costs, dedup
def _random_f32(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("codec", ["diff", "xor"])
@pytest.mark.parametrize("reference", ["previous", "keyframe"])
def test_unchanged_and_sparse_changes_cost(tmp_path: Any, codec: str, reference: str) -> None:
    w = _random_f32(4096, 1)                       # 16 KiB = 64 chunks of 256 B
    b = torch.arange(10, dtype=torch.int64)
    with deltackpt.open(tmp_path / "r", codec=codec, reference=reference,
                        chunk_bytes=256) as repo:
        first = repo.save(0, {"w": w, "b": b})
        assert first.new_chunks == 65 and first.stored_bytes > 16384
        # fresh objects holding the same bytes: nothing new at all
        same = repo.save(1, {"w": w.clone(), "b": b.clone()})
        assert same.kind == "delta" and same.new_chunks == 0 and same.reused_chunks == 65
        assert same.stored_bytes == manifest_size(repo, 1)
        # three elements in three different chunks change: three new (delta) chunks
        w2 = w.clone()
        w2[[0, 1000, 4095]] += 1e-3
        sparse = repo.save(2, {"w": w2, "b": b})
        assert sparse.new_chunks == 3 and sparse.reused_chunks == 62
        assert sparse.depth == 2  # keyframe (raw) <- one delta; unchanged chunks are copies
        # the data added is three small delta chunks (plus their index), not the tensor
        assert sparse.stored_bytes - manifest_size(repo, 2) < 0.1 * w.numel() * 4
        for step, want in ((0, w), (1, w), (2, w2)):
            assert torch.equal(repo.load(step)["w"].view(torch.int32), want.view(torch.int32))


def test_fully_changed_tensor_is_not_worse_than_raw(tmp_path: Any) -> None:
    """A delta that does not pay is stored as a self-contained chunk (depth 1 for it)."""
    def noise(seed: int) -> torch.Tensor:  # incompressible, and so is any delta of it
        return torch.randint(-2**31, 2**31 - 1, (2048,), dtype=torch.int32,
                             generator=torch.Generator().manual_seed(seed))

    with deltackpt.open(tmp_path / "r", chunk_bytes=1024) as repo:
        k0 = repo.save(0, {"w": noise(1)})
        k1 = repo.save(1, {"w": noise(2)})
        assert k1.kind == "delta" and k1.new_chunks == 8
        assert k1.stored_bytes <= 1.05 * k0.stored_bytes + 512
        assert all(c.ref is None and c.depth == 1 for c in repo.manifest(1).tensors[0].chunks)
        assert torch.equal(repo.load(1)["w"], noise(2))


def _pack_bytes(path: Any) -> int:
    total = 0
    for root, _d, names in os.walk(os.path.join(path, "packs")):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total


def test_identical_tensors_across_model_and_optimizer_are_stored_once(tmp_path: Any) -> None:
    w = _random_f32(8192, 3)  # 32 KiB of incompressible data
    one = {"model": {"w": w}, "optimizer": {"state": {}}}
    two = {"model": {"w": w}, "optimizer": {"state": {0: {"w_copy": w.clone()}}}}
    with deltackpt.open(tmp_path / "one", chunk_bytes=4096) as r1:
        i1 = r1.save(0, one)
    with deltackpt.open(tmp_path / "two", chunk_bytes=4096) as r2:
        i2 = r2.save(0, two)
        out = r2.load(0)
    assert i2.logical_bytes == 2 * i1.logical_bytes
    assert i2.new_chunks == i1.new_chunks == 8 and i2.reused_chunks == 8
    assert _pack_bytes(tmp_path / "two") == _pack_bytes(tmp_path / "one")
    assert i2.stored_bytes < i1.stored_bytes + 1024  # one more manifest entry, no more data
    assert i2.stored_bytes < 1.2 * (w.numel() * 4)
    assert_bitexact(two, out)
    assert out["model"]["w"] is not out["optimizer"]["state"][0]["w_copy"]  # equal, not tied


def test_renamed_or_moved_tensor_costs_nothing(tmp_path: Any) -> None:
    w = _random_f32(1024, 4)
    with deltackpt.open(tmp_path / "r", chunk_bytes=512, reference="previous") as repo:
        repo.save(0, {"model": {"a": w}})
        moved = repo.save(1, {"optimizer": [{"moved": w.clone()}], "model": {}})
        assert moved.new_chunks == 0
        assert torch.equal(repo.load(1)["optimizer"][0]["moved"], w)


def test_dtype_and_shape_changes_at_one_path(tmp_path: Any) -> None:
    w = _random_f32(64, 5)
    states = [{"x": w}, {"x": w.reshape(8, 8)}, {"x": w.view(torch.int32)},
              {"x": w.to(torch.float64)}, {"x": w[:10].clone()}, {"x": w.to(torch.bfloat16)},
              {"x": np.arange(64, dtype=np.float32)}, {"x": w.clone()}, {}]
    for codec in ("diff", "xor"):
        with deltackpt.open(tmp_path / codec, codec=codec, chunk_bytes=64) as repo:
            for i, s in enumerate(states):
                repo.save(i, s)
            for i, s in enumerate(states):
                assert_bitexact(s, repo.load(i))
            assert repo.verify().ok
            # a reshape keeps the bytes: every chunk reused
            assert repo.manifest(1).stats["new_chunks"] == 0


def test_tied_and_untied_across_steps(tmp_path: Any) -> None:
    p = torch.nn.Parameter(_random_f32(100, 6))
    with deltackpt.open(tmp_path / "r", chunk_bytes=128) as repo:
        repo.save(0, {"emb": p, "head": p})
        assert len(repo.manifest(0).tensors) == 1
        q = torch.nn.Parameter(p.detach().clone())
        info = repo.save(1, {"emb": p, "head": q})
        assert info.new_chunks == 0 and len(repo.manifest(1).tensors) == 2
        o0, o1 = repo.load(0), repo.load(1)
        assert o0["emb"] is o0["head"] and o1["emb"] is not o1["head"]
        assert torch.equal(o1["head"], p) and type(o1["head"]) is torch.nn.Parameter


# ---------------------------------------------------------------------- reopen and continue
def _small_state(i: int) -> dict[str, Any]:
    base = _random_f32(300, 7)
    base[i % 300] += i  # one element changes per step
    return {"model": {"w": base, "b": torch.full((5,), float(i))},
            "optimizer": {"state": {0: {"step": torch.tensor(float(i))}}}, "step": i}


@pytest.mark.parametrize("codec", ["diff", "xor"])
@pytest.mark.parametrize("reference", ["previous", "keyframe"])
def test_reopen_and_continue(tmp_path: Any, codec: str, reference: str) -> None:
    path = tmp_path / "r"
    k = 10
    pol = {"codec": codec, "reference": reference, "keyframe_every": k, "chunk_bytes": 256}
    with deltackpt.open(path, **pol) as repo:
        for i in range(4):
            repo.save(i, _small_state(i))
    # resume="rebuild": the chain goes on as if the writer had never closed
    with deltackpt.open(path, resume="rebuild", **pol) as repo:
        assert repo.steps() == [0, 1, 2, 3]
        info = repo.save(4, _small_state(4))
        m = repo.manifest(4)
        assert info.kind == "delta" and m.delta_index == 4 and m.keyframe == 0
        assert m.parent == (3 if reference == "previous" else 0)
        assert info.depth <= (5 if reference == "previous" else 2)
        assert info.new_chunks <= 4  # the w chunk, b, step: nothing re-sent in full
        same = repo.save(5, _small_state(4) | {"step": 4})
        assert same.new_chunks == 0 and same.stored_bytes == manifest_size(repo, 5)
        for i in range(6, 12):
            repo.save(i, _small_state(i))
        kinds = [repo.manifest(s).kind for s in range(12)]
        assert kinds == ["keyframe"] + ["delta"] * 9 + ["keyframe", "delta"]
    # resume="keyframe": the first save after reopening starts a new chain
    with deltackpt.open(path, resume="keyframe", **pol) as repo:
        info = repo.save(12, _small_state(12))
        assert info.kind == "keyframe" and info.depth == 1
        assert repo.save(13, _small_state(13)).kind == "delta"
    # a different codec and chunk size on reopen: still exact
    other = dict(pol, codec="xor" if codec == "diff" else "diff", chunk_bytes=64)
    with deltackpt.open(path, **other) as repo:
        assert repo.save(14, _small_state(14)).kind == "delta"
        repo.save(15, _small_state(15))
    with deltackpt.open(path, mode="r", cache_bytes=0) as reader:
        assert reader.steps() == list(range(16))
        for i in range(16):
            want = _small_state(4) | {"step": 4} if i == 5 else _small_state(i)
            assert_bitexact(want, reader.load(i))
        assert reader.verify().ok


def test_out_of_order_steps_and_reopen(tmp_path: Any) -> None:
    path = tmp_path / "r"
    order = [10, 5, 20, 1, 15]
    with deltackpt.open(path, keyframe_every=3, chunk_bytes=128) as repo:
        for s in order:
            repo.save(s, _small_state(s))
        assert repo.steps() == sorted(order) and repo.latest == 20
    with deltackpt.open(path, keyframe_every=3, chunk_bytes=128) as repo:
        repo.save(3, _small_state(3))
        for s in order + [3]:
            assert_bitexact(_small_state(s), repo.load(s))
        assert_bitexact(_small_state(20), repo.load())  # default: the latest step


# --------------------------------------------------------------------------- partial loads
def _partial_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    model = OrderedDict([("enc.weight", t(4, 4)), ("enc.bias", t(4))])
    model._metadata = OrderedDict([("enc", {"version": 2})])  # type: ignore[attr-defined]
    return {
        "model": model,
        "optimizer": {"state": {0: {"exp_avg": t(4, 4), "step": torch.tensor(3.0)},
                                1: {"exp_avg": t(4), "step": torch.tensor(3.0)}},
                      "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "extra": [t(2), (t(3), {"k": t(5)})],
        "a/b": {"x": t(6)},
        "step": 3,
    }


SELECTIONS = [
    ("model", lambda s: {"model": s["model"]}),
    ("optimizer/state", lambda s: {"optimizer": {"state": s["optimizer"]["state"]}}),
    ("optimizer/state/1", lambda s: {"optimizer": {"state": {1: s["optimizer"]["state"][1]}}}),
    (["model", "optimizer/param_groups"],
     lambda s: {"model": s["model"],
                "optimizer": {"param_groups": s["optimizer"]["param_groups"]}}),
    ("extra/1/0", lambda s: {"extra": [(s["extra"][1][0],)]}),
    ("extra/1/1/k", lambda s: {"extra": [({"k": s["extra"][1][1]["k"]},)]}),
    ("/extra/0/", lambda s: {"extra": [s["extra"][0]]}),
    ("a%2Fb", lambda s: {"a/b": s["a/b"]}),
    ("step", lambda s: {"step": s["step"]}),
]


@pytest.mark.parametrize("select,want", SELECTIONS, ids=[str(s[0]) for s in SELECTIONS])
def test_partial_load_returns_selected_subtrees_and_reads_only_them(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, select: Any, want: Any) -> None:
    state = _partial_state()
    with deltackpt.open(tmp_path / "r", chunk_bytes=64) as repo:
        repo.save(0, state)
        repo.save(1, state | {"step": 4})  # a delta step: selection must work there too
    expected = want(state)
    with deltackpt.open(tmp_path / "r", mode="r") as reader:
        read: set[str] = set()
        original = Reconstructor.chunk_into  # each load rebuilds through its own instance

        def spy(self: Reconstructor, step: int, entry: Any, i: int, out: Any) -> Any:
            read.add(entry.path)
            return original(self, step, entry, i, out)

        monkeypatch.setattr(Reconstructor, "chunk_into", spy)
        out = reader.load(0, select=select)
        assert_bitexact(expected, out)
        out1 = reader.load(1, select=select)
        assert_bitexact(want(state | {"step": 4}), out1)
    prefixes = [select] if isinstance(select, str) else select
    prefixes = [p.strip("/") for p in prefixes]
    assert all(any(p == s or p.startswith(s + "/") for s in prefixes) for p in read), read
    n_selected = sum(1 for _ in _tensors(expected))
    assert len(read) == n_selected


def _tensors(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _corrupt_chunks(repo_path: Any, tensor_paths: list[str], step: int) -> None:
    """Flip bytes inside the stored frames of every chunk of the given tensors of ``step``."""
    with deltackpt.open(repo_path, mode="r") as reader:
        m = reader.manifest(step)
        locs = {reader.store.locate(c.id) for p in tensor_paths for c in m.tensor(p).chunks}
    for loc in locs:  # each stored frame once (equal chunks share one frame)
        name = os.path.join(repo_path, *pack_name(loc.pack).split("/"))
        with open(name, "r+b") as f:
            f.seek(loc.offset + loc.length // 2)
            byte = f.read(1)
            f.seek(loc.offset + loc.length // 2)
            f.write(bytes([byte[0] ^ 0xFF]))


def test_partial_load_survives_damage_outside_the_selection(tmp_path: Any) -> None:
    state = _partial_state()
    path = tmp_path / "r"
    with deltackpt.open(path, chunk_bytes=64) as repo:
        repo.save(0, state)
        state1 = _partial_state()
        state1["model"]["enc.bias"] = state1["model"]["enc.bias"] + 1
        state1["optimizer"]["state"][0]["exp_avg"] = state1["optimizer"]["state"][0][
            "exp_avg"] * 2
        repo.save(1, state1)
        unselected = [e.path for e in repo.manifest(0).tensors
                      if e.path.startswith("optimizer/state")]
        assert unselected
    _corrupt_chunks(path, unselected, 0)
    with deltackpt.open(path, mode="r", cache_bytes=0) as reader:
        assert_bitexact({"model": state["model"]}, reader.load(0, select="model"))
        assert_bitexact({"model": state1["model"]}, reader.load(1, select="model"))
        assert_bitexact({"extra": state["extra"]}, reader.load(0, select="extra"))
        for step in (0, 1):
            with pytest.raises(IntegrityError) as info:
                reader.load(step)
            assert info.value.path is not None and info.value.path.startswith("optimizer/")
            with pytest.raises(IntegrityError):
                reader.load(step, select="optimizer/state")
        report = reader.verify()
        assert not report.ok
        assert {p.path.split("/")[0] for p in report.problems if p.path} == {"optimizer"}


# ------------------------------------------------------------------------------ usage errors
def test_read_only_repository_refuses_writes(tmp_path: Any) -> None:
    path = tmp_path / "r"
    with deltackpt.open(path) as repo:
        repo.save(0, {"x": torch.ones(2)})
    with deltackpt.open(path, mode="r") as reader:
        with pytest.raises(ReadOnlyError):
            reader.save(1, {"x": torch.zeros(2)})
        assert reader.steps() == [0]
        assert_bitexact({"x": torch.ones(2)}, reader.load(0))
    repo = deltackpt.open(path)
    repo.close()
    with pytest.raises(ReadOnlyError):
        repo.save(1, {"x": torch.zeros(2)})
    with pytest.raises(RepositoryNotFoundError):
        deltackpt.open(tmp_path / "missing", mode="r")


def test_saving_an_existing_step_is_refused(tmp_path: Any) -> None:
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(7, {"x": torch.ones(3)})
        with pytest.raises(StepExistsError) as info:
            repo.save(7, {"x": torch.zeros(3)})
        assert info.value.step == 7 and isinstance(info.value, DeltaCkptError)
        assert_bitexact({"x": torch.ones(3)}, repo.load(7))
        assert repo.steps() == [7]
        repo.save(8, {"x": torch.zeros(3)})  # the writer is still fine


def test_missing_step_is_a_typed_error_naming_it(tmp_path: Any) -> None:
    with deltackpt.open(tmp_path / "r") as repo:
        with pytest.raises(StepNotFoundError):
            repo.load()  # empty repository
        repo.save(3, {"x": torch.ones(1)})
        for bad in (4, 0, 123456789):
            with pytest.raises(StepNotFoundError) as info:
                repo.load(bad)
            assert info.value.step == bad and str(bad) in str(info.value)
            assert isinstance(info.value, KeyError) and isinstance(info.value, DeltaCkptError)
        with pytest.raises(StepNotFoundError):
            repo.manifest(4)
        with pytest.raises(StepNotFoundError):
            repo.verify(4)


@pytest.mark.parametrize("rel", ["ckpt", "runs/exp1"])
def test_relative_repository_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                  rel: str) -> None:
    monkeypatch.chdir(tmp_path)
    with deltackpt.open(rel) as repo:
        repo.save(0, {"x": torch.ones(2)})
    with deltackpt.open(rel, mode="r") as reader:
        assert_bitexact({"x": torch.ones(2)}, reader.load(0))
    assert os.path.isdir(tmp_path / rel)


def test_second_writer_is_locked_out(tmp_path: Any) -> None:
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(0, {"x": torch.ones(1)})
        with pytest.raises(LockedError):
            deltackpt.open(tmp_path / "r", mode="a")
        with deltackpt.open(tmp_path / "r", mode="r") as reader:  # readers are welcome
            assert reader.steps() == [0]
    with deltackpt.open(tmp_path / "r") as again:  # released on close
        again.save(1, {"x": torch.ones(1)})
