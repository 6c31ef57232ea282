"""torch.distributed.checkpoint through deltackpt.dcp: 2 gloo ranks on CPU, resharding, atomicity.

One spawn of two processes saves steps 0-2 (DTensor shards, a replicated tensor and plain
values), crashes a save before its commit point, saves again, and loads every step back on two
ranks; the tests in this process then check the sub-repositories and load on one rank.
"""
from __future__ import annotations

import datetime
import pickle
from typing import Any

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

dcp = pytest.importorskip("torch.distributed.checkpoint")
tensor_mod = pytest.importorskip("torch.distributed.tensor")
mp = pytest.importorskip("torch.multiprocessing")

import deltackpt  # noqa: E402
import deltackpt.dcp  # noqa: E402
from deltackpt.dcp import Reader, Writer, rank_path  # noqa: E402
from deltackpt.errors import DeltaCkptError, StepNotFoundError  # noqa: E402
from deltackpt.integrations.distributed import doc_to_metadata, metadata_to_doc  # noqa: E402

DTensor, Shard, Replicate = tensor_mod.DTensor, tensor_mod.Shard, tensor_mod.Replicate
#: what dcp.save/load raise for a failure on any rank (a BaseException, not an Exception)
Failed = (Exception, dcp.api.CheckpointException)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORLD = 2
SAVED = [0, 1, 2, 4, 5]        # committed steps after the worker ran (3 crashed and was dropped)
POLICY = {"chunk_bytes": 1024, "workers": 1}
TIMEOUT = datetime.timedelta(seconds=60)


# ---------------------------------------------------------------------------- the test state
def full_state(step: int) -> dict[str, Any]:
    """The whole (unsharded) state at ``step``: small changes from step to step."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(64, 48, generator=g)
    w[0, 0], w[0, 1], w[0, 2] = float("nan"), -0.0, float("inf")
    b = torch.randn(33, generator=g).to(torch.bfloat16)      # 33 rows: uneven 17 / 16 shards
    for k in range(1, step + 1):
        w[4 * k: 4 * k + 2] += 0.25 * k                      # only rank 0's rows change
        b[k] = k
    return {"model": {"w": w, "b": b,
                      "r": torch.arange(16, dtype=torch.float64),       # plain, on both ranks
                      "i": torch.arange(10, dtype=torch.int64) * 7},    # DTensor Replicate
            "step": step, "extra": {"lr": 0.1 * (step + 1), "tag": f"s{step}", "t": (step, "x")}}


def _shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    return full.chunk(WORLD, dim=0)[rank]


def dtensor_state(full: dict[str, Any], mesh: Any, rank: int) -> dict[str, Any]:
    m = full["model"]

    def sharded(t: torch.Tensor) -> Any:
        return DTensor.from_local(_shard(t, rank).clone(), mesh, [Shard(0)], run_check=False,
                                  shape=t.shape, stride=t.stride())

    return {"model": {"w": sharded(m["w"]), "b": sharded(m["b"]), "r": m["r"].clone(),
                      "i": DTensor.from_local(m["i"].clone(), mesh, [Replicate()],
                                              run_check=False)},
            "step": full["step"], "extra": dict(full["extra"])}


def empty_like_state(full: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: torch.full_like(v, 7) for k, v in full["model"].items()},
            "step": -1, "extra": {"lr": 0.0, "tag": "", "t": None}}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class CrashingWriter(Writer):
    """A writer whose coordinator dies between the ranks' writes and the commit point."""

    def finish(self, metadata: Any, results: Any) -> None:
        raise RuntimeError("simulated crash before the commit point")


def _no_unpickling(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("unpickling during load")


# ------------------------------------------------------------------------------ the workers
def _worker(rank: int, init: str, repo: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=TIMEOUT)
    try:
        _work(rank, repo)
    finally:
        deltackpt.dcp.close()
        dist.destroy_process_group()


def _work(rank: int, repo: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    sub = rank_path(repo, rank)
    for step in (0, 1, 2):
        dcp.save(dtensor_state(full_state(step), mesh, rank),
                 storage_writer=Writer(repo, step, meta={"loss": 1.0 / (step + 1)}, **POLICY))

    # a save whose commit point is never reached: nothing visible, the ranks' steps orphaned
    crashing = CrashingWriter(repo, 3, **POLICY)
    try:
        dcp.save(dtensor_state(full_state(3), mesh, rank), storage_writer=crashing)
    except Failed as exc:  # DCP wraps it in a CheckpointException
        assert "simulated crash" in str(exc), exc
    else:
        raise AssertionError("the crashing save did not fail")
    with deltackpt.open(sub, "r") as r:
        assert r.steps() == [0, 1, 2, 3]            # written, not committed
    with deltackpt.open(repo, "r") as top:
        assert top.steps() == [0, 1, 2]
    dist.barrier()
    # the next save removes the orphan; a crashed step can also be saved again afterwards
    dcp.save(dtensor_state(full_state(4), mesh, rank), storage_writer=Writer(repo, 4, **POLICY))
    with deltackpt.open(sub, "r") as r:
        assert r.steps() == [0, 1, 2, 4]
    try:
        dcp.save(dtensor_state(full_state(5), mesh, rank),
                 storage_writer=CrashingWriter(repo, 5, **POLICY))
    except Failed:
        pass
    dcp.save(dtensor_state(full_state(5), mesh, rank), storage_writer=Writer(repo, 5, **POLICY))
    with deltackpt.open(sub, "r") as r, deltackpt.open(repo, "r") as top:
        assert r.steps() == SAVED
        assert r.manifest(5).meta["dcp_save_id"] == top.manifest(5).meta["dcp"]["save_id"]
    # a committed step is never overwritten
    try:
        dcp.save(dtensor_state(full_state(5), mesh, rank), storage_writer=Writer(repo, 5))
    except Failed as exc:
        assert "already saved" in str(exc), exc
    else:
        raise AssertionError("saving a committed step again did not fail")

    # load every step on two ranks into fresh DTensors, with torch.load made to fail
    real_load = torch.load
    torch.load = _no_unpickling
    try:
        for step in SAVED + [None]:
            want = full_state(SAVED[-1] if step is None else step)
            got = dtensor_state(empty_like_state(want), mesh, rank)
            dcp.load(got, storage_reader=Reader(repo, step))
            for name in ("w", "b"):
                local = got["model"][name].to_local()
                assert same_bits(local, _shard(want["model"][name], rank)), (step, name)
            assert torch.equal(got["model"]["b"].to_local(), _shard(want["model"]["b"], rank))
            assert same_bits(got["model"]["i"].to_local(), want["model"]["i"])
            assert same_bits(got["model"]["r"], want["model"]["r"])
            assert got["step"] == want["step"] and got["extra"] == want["extra"], step
            assert type(got["extra"]["t"]) is tuple
    finally:
        torch.load = real_load


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("dcp")
    repo = str(base / "repo")
    mp.spawn(_worker, args=(f"file://{base}/init", repo), nprocs=WORLD, join=True)
    return repo


# ------------------------------------------------------------------------------------- tests
def test_two_ranks_save_deltas_and_dedupe(saved_repo: str) -> None:
    for rank in range(WORLD):
        with deltackpt.open(rank_path(saved_repo, rank), "r") as sub:
            assert sub.steps() == SAVED
            assert sub.manifest(0).kind == "keyframe"
            for step in SAVED[1:]:
                m = sub.manifest(step)
                assert m.kind == "delta", (rank, step)
                assert m.stats["reused_chunks"] > 0, (rank, step)      # unchanged chunks
                assert all(t.chunk_bytes == 1024 for t in m.tensors)  # policy passed through
            assert sub.verify().ok
    # rank 1's rows of w never change: its later steps point at the chunks stored at step 0
    with deltackpt.open(rank_path(saved_repo, 1), "r") as sub:
        def w_chunks(step: int) -> list[bytes]:
            (w,) = [t for t in sub.manifest(step).tensors if t.path == "tensors/model.w@32,0"]
            return [c.id for c in w.chunks]
        assert len(w_chunks(0)) == 6 and all(w_chunks(s) == w_chunks(0) for s in SAVED)
    with deltackpt.open(saved_repo, "r") as top:
        assert top.steps() == SAVED
        assert top.manifest(1).meta["loss"] == 0.5
        assert top.manifest(1).meta["dcp"]["world_size"] == WORLD
        assert top.verify().ok                  # the dcp/ directory does not upset verify


def test_one_rank_reshards_bit_exact_without_unpickling(saved_repo: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, _no_unpickling)
    monkeypatch.setattr(torch, "load", _no_unpickling)
    for step in SAVED:
        want = full_state(step)
        got = empty_like_state(want)
        dcp.load(got, storage_reader=Reader(saved_repo, step), no_dist=True)
        for name, t in want["model"].items():
            assert same_bits(got["model"][name], t), (step, name)
        assert got["step"] == step and got["extra"] == want["extra"]
    # partial read: one tensor only, into a slice-shaped request of a resharded layout
    got = {"model": {"b": torch.zeros(33, dtype=torch.bfloat16)}}
    dcp.load(got, storage_reader=Reader(saved_repo, 2), no_dist=True,
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert same_bits(got["model"]["b"], full_state(2)["model"]["b"])


def test_single_process_crash_leaves_nothing_and_next_writer_cleans(tmp_path: Any) -> None:
    repo = str(tmp_path / "repo")
    state = {"w": torch.arange(300, dtype=torch.float32), "n": 3}
    dcp.save(state, storage_writer=Writer(repo, 0, keep_open=False), no_dist=True)
    with pytest.raises(Failed, match="simulated crash"):
        dcp.save(state, storage_writer=CrashingWriter(repo, 1, keep_open=False), no_dist=True)
    with deltackpt.open(repo, "r") as top:
        assert top.steps() == [0]
    with pytest.raises(Failed):
        dcp.load({"w": torch.zeros(300)}, storage_reader=Reader(repo, 1), no_dist=True)
    with pytest.raises(StepNotFoundError, match="step 1"):
        Reader(repo, 1).read_metadata()
    assert deltackpt.dcp.prune(repo, dry_run=True) == {0: [1]}
    state["w"][5] = -1
    dcp.save(state, storage_writer=Writer(repo, 1, keep_open=False), no_dist=True)
    with deltackpt.open(rank_path(repo, 0), "r") as sub:
        assert sub.steps() == [0, 1] and sub.manifest(1).kind == "delta"
    got = {"w": torch.zeros(300), "n": 0}
    dcp.load(got, storage_reader=Reader(repo), no_dist=True)
    assert same_bits(got["w"], state["w"]) and got["n"] == 3
    # deleting a top-level step orphans the rank steps; prune removes them
    with deltackpt.open(repo) as top:
        top.delete(0)
    assert deltackpt.dcp.prune(repo) == {0: [0]}
    with deltackpt.open(rank_path(repo, 0), "r") as sub:
        assert sub.steps() == [1] and sub.verify().ok
    got = {"w": torch.zeros(300), "n": 0}
    dcp.load(got, storage_reader=Reader(repo, 1), no_dist=True)
    assert same_bits(got["w"], state["w"])


def test_metadata_document_roundtrip_and_checks(tmp_path: Any) -> None:
    repo = str(tmp_path / "repo")
    state = {"a": {"x": torch.ones(3, 2, dtype=torch.float16)}, "b": [1, 2], "c": "z"}
    md = dcp.save(state, storage_writer=Writer(repo, 7, keep_open=False), no_dist=True)
    doc = metadata_to_doc(md, 1, "id")
    back = doc_to_metadata(doc, 7)
    assert back.state_dict_metadata == md.state_dict_metadata
    assert back.planner_data == md.planner_data and back.storage_data == md.storage_data
    with deltackpt.open(repo, "r") as top:
        assert top.load(7)["dcp"]["entries"]["a.x"]["dtype"] == "float16"
    for bad in ({**doc, "format": "x"}, {**doc, "entries": {"a.x": {"type": "tensor"}}},
                {**doc, "storage": [{"fqn": "a.x", "rank": 5, "kind": "tensor", "key": "k",
                                     "nbytes": 0}]}):
        with pytest.raises(DeltaCkptError, match="step 7"):
            doc_to_metadata(bad, 7)
    with pytest.raises(TypeError):
        Writer(repo, 8, no_such_option=1)
    with pytest.raises(ValueError):
        Writer(repo, -1)


class Opaque:
    """A picklable object that is not a plain value."""


class _SavePlanner(dcp.DefaultSavePlanner):
    def transform_object(self, write_item: Any, object: Any) -> Any:  # noqa: A002
        return super().transform_object(write_item, object)


class _LoadPlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        super().load_bytes(read_item, value)


def test_custom_planners_and_odd_keys(tmp_path: Any) -> None:
    """A custom save planner's bytes are decoded with weights_only=True (never stored as
    pickle); a custom load planner gets bytes made here from the decoded value."""
    repo = str(tmp_path / "repo")
    state = {"we/ird%key": torch.arange(5), "o": {"n": 1, "t": (2.5, "s")}}
    dcp.save(state, storage_writer=Writer(repo, 0, keep_open=False), planner=_SavePlanner(),
             no_dist=True)
    got = {"we/ird%key": torch.zeros(5, dtype=torch.int64), "o": {"n": 0, "t": None}}
    dcp.load(got, storage_reader=Reader(repo, 0), planner=_LoadPlanner(), no_dist=True)
    assert torch.equal(got["we/ird%key"], state["we/ird%key"]) and got["o"] == state["o"]

    with pytest.raises(Failed, match="cannot be stored without pickle"):
        dcp.save({"x": Opaque()}, storage_writer=Writer(repo, 1, keep_open=False),
                 planner=_SavePlanner(), no_dist=True)
    with pytest.raises(Failed, match="cannot store"):
        dcp.save({"x": Opaque()}, storage_writer=Writer(repo, 1, keep_open=False),
                 no_dist=True)
    with deltackpt.open(repo, "r") as top:
        assert top.steps() == [0]
