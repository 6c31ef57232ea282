"""A writer keeps checkpointing through damage it did not cause, and every refusal is typed.

Damage in an old step (an unreadable manifest) must not make later saves raise, stop retention
or block deleting that step; damage in the latest step must not stop a new writer from saving
(it starts a keyframe, with a warning naming the damage). The repair plan recommends only what
works. Also the first-hour API checks: a selection that matches nothing, a file given as the
repository path, meta values from a training loop.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.retention import KeepLast
from deltackpt.errors import (
    CorruptFileError,
    DeltaCkptWarning,
    IntegrityError,
    RepositoryNotFoundError,
    SelectionError,
    UnsupportedValueError,
)
from deltackpt.ops.repair import plan as repair_plan
from deltackpt.store.manifest import manifest_name

POLICY = dict(chunk_bytes=4096, keyframe_every=10, workers=2, fsync=False)


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4000, generator=g)
    noise = torch.randn(4000, generator=torch.Generator().manual_seed(step)) * 1e-3
    return {"model": {"w": base + noise * step}, "opt": {"step": step}}


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x04]))


def _flip_manifest(root: str, step: int) -> None:
    path = os.path.join(root, manifest_name(step))
    _flip(path, os.path.getsize(path) // 2)


def _saved(tmp_path: Any, steps: int) -> str:
    """A repository holding steps ``0 .. steps - 1`` (one keyframe, then deltas)."""
    root = str(tmp_path / "r")
    with deltackpt.open(root, "a", **POLICY) as repo:
        for s in range(steps):
            repo.save(s, state_for(s))
    return root


def test_damaged_old_manifest_does_not_stop_saves_or_retention(tmp_path):
    root = _saved(tmp_path, 4)
    _flip_manifest(root, 1)
    with deltackpt.open(root, "r") as r:
        with pytest.raises(CorruptFileError):
            r.manifest(1)
    with deltackpt.open(root, "a", retention=KeepLast(3), auto_gc=True, **POLICY) as repo:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for s in range(4, 8):
                info = repo.save(s, state_for(s))           # a committed save never raises
                assert info.step == s
        # retention ran after each save: everything but the last 3 and the unreadable step
        # (which retention cannot judge) is gone
        assert repo.steps() == [1, 5, 6, 7]
        assert any(issubclass(w.category, DeltaCkptWarning) and "[1]" in str(w.message)
                   for w in warned), [str(w.message) for w in warned]
        # the repair plan recommends deleting the step, not a partial load that cannot work
        todo = repair_plan(repo)
        assert todo.lost_steps == [1]
        text = str(todo)
        assert "delete" in text and "select" not in text, text
        with pytest.raises(CorruptFileError):
            repo.load(1, select="model")
        report = repo.delete(1)                                # what the plan advises works
        assert report.deleted_steps == [1]
        assert repo.steps() == [5, 6, 7]
        assert repo.verify().ok
        for s in repo.steps():
            assert_bitexact(repo.load(s), state_for(s))


def test_deleting_a_damaged_step_keeps_its_loadable_dependents(tmp_path):
    """Dependents whose chains pass through the damaged manifest were unloadable already;
    deleting the damaged step rebases what can be rebased and reports the rest."""
    root = _saved(tmp_path, 4)
    _flip_manifest(root, 2)  # 3 is a delta of 2
    with deltackpt.open(root, "a", **POLICY) as repo:
        with pytest.raises(IntegrityError):
            repo.load(3)
        with pytest.warns(DeltaCkptWarning, match="step 3"):
            report = repo.delete(2)
        assert report.deleted_steps == [2] and report.damaged_steps == [3]
        assert repo.steps() == [0, 1, 3]
        for s in (0, 1):
            assert_bitexact(repo.load(s), state_for(s))
        with pytest.raises(IntegrityError):
            repo.load(3)
        with pytest.warns(DeltaCkptWarning, match="step 4 is saved as a keyframe"):
            repo.save(4, state_for(4))        # and the run goes on (its reference is broken)
        assert_bitexact(repo.load(4), state_for(4))


def test_gc_never_removes_packs_while_a_manifest_is_unreadable(tmp_path):
    root = _saved(tmp_path, 6)
    _flip_manifest(root, 3)
    with deltackpt.open(root, "a", **POLICY) as repo:
        before = sorted(os.listdir(os.path.join(root, "index")))
        with pytest.warns(DeltaCkptWarning) as warned:
            report = repo.gc(KeepLast(1), repack_below=1.0)
        said = [str(w.message) for w in warned]
        assert any("step 5 depends on a deleted step" in m for m in said), said  # 5->4->3
        assert any("cannot be read, so no pack was removed" in m for m in said), said
        assert report.unreadable_steps == [3]
        assert report.deleted_packs == 0 and report.repacked_packs == 0
        assert sorted(os.listdir(os.path.join(root, "index"))) == before


@pytest.mark.parametrize("damage", ["pack", "manifest of its parent"])
def test_damage_in_the_latest_step_starts_a_keyframe(tmp_path, damage):
    root = _saved(tmp_path, 4)
    with deltackpt.open(root, "r") as repo:
        latest = repo.manifest(3)
        assert latest.kind == "delta"
    if damage == "pack":
        pid = latest.packs[0]
        path = os.path.join(root, "packs", pid[:2], f"{pid}.pack")
        _flip(path, os.path.getsize(path) // 2)
    else:
        _flip_manifest(root, 2)
    with deltackpt.open(root, "a", **POLICY) as repo:
        with pytest.warns(DeltaCkptWarning, match=r"step 4 is saved as a keyframe.*step"):
            info = repo.save(4, state_for(4))
        assert info.kind == "keyframe"
        info = repo.save(5, state_for(5))        # and deltas again from there
        assert info.kind == "delta"
        for s in (4, 5):
            assert_bitexact(repo.load(s), state_for(s))


def test_select_that_matches_nothing_names_the_top_level_keys(tmp_path):
    with deltackpt.open(str(tmp_path / "r"), "a", **POLICY) as repo:
        repo.save(0, {"model": {"w": torch.ones(3)}, "opt": {"lr": 0.1}, "epoch": 3})
        with pytest.raises(SelectionError, match=r"'nope'.*'epoch', 'model', 'opt'") as err:
            repo.load(0, select="nope")
        assert isinstance(err.value, KeyError)
        with pytest.raises(SelectionError, match="'model/nope'"):
            repo.load(0, select=["model", "model/nope"])
        assert repo.load(0, select="epoch") == {"epoch": 3}     # a leaf without tensors
        assert list(repo.load(0, select=["model/w"])["model"]) == ["w"]
        assert repo.load(0, select="")["epoch"] == 3            # the root: everything


def test_a_file_is_not_a_repository(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"hello")
    for mode in ("a", "r"):
        with pytest.raises(RepositoryNotFoundError, match="is a file"):
            deltackpt.open(str(path), mode)
    assert path.read_bytes() == b"hello"


def test_meta_takes_numbers_from_a_training_loop(tmp_path):
    with deltackpt.open(str(tmp_path / "r"), "a", **POLICY) as repo:
        loss = (torch.ones(3, requires_grad=True) * 2).sum()          # a 0-d tensor with grad
        repo.save(0, {"w": torch.ones(2)}, meta={
            "loss": loss, "acc": np.float32(0.5), "n": np.int64(7), "ok": np.bool_(True),
            "lr": [torch.tensor(1e-3, dtype=torch.float64)], "tag": "x"})
        meta = repo.manifest(0).meta
        assert meta == {"loss": 6.0, "acc": 0.5, "n": 7, "ok": True, "lr": [1e-3], "tag": "x"}
        assert type(meta["n"]) is int and type(meta["ok"]) is bool
        with pytest.raises(UnsupportedValueError, match=r"meta\['hist'\].*shape \(3,\)"):
            repo.save(1, {"w": torch.ones(2)}, meta={"hist": torch.ones(3)})
        with pytest.raises(UnsupportedValueError, match=r"meta\['cfg'\]\['fn'\]"):
            repo.save(1, {"w": torch.ones(2)}, meta={"cfg": {"fn": print}})
        with pytest.raises(UnsupportedValueError, match="keys must be str"):
            repo.save(1, {"w": torch.ones(2)}, meta={1: 2})
        assert repo.steps() == [0]


def test_log_lists_the_steps_around_an_unreadable_manifest(tmp_path, capsys):
    from deltackpt.cli.main import main

    root = _saved(tmp_path, 4)
    _flip_manifest(root, 1)
    with deltackpt.open(root, "r") as r:
        with pytest.raises(CorruptFileError):
            r.history()
        damaged: dict[int, str] = {}
        assert [h.step for h in r.history(unreadable=damaged)] == [0, 2, 3]
        assert list(damaged) == [1] and "checksum" in damaged[1]
    assert main(["log", root]) == 1                      # exit 1: something is damaged
    out, err = capsys.readouterr()
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == ["0", "2", "3"]
    assert "step 1: UNREADABLE manifest" in err and "deltackpt verify" in err


def test_delete_leaves_partly_live_packs_to_gc_unless_asked(tmp_path):
    """Step 0's pack also holds a chunk every later step still names: deleting step 0 leaves
    that pack (with its dead bytes) for gc, unless ``repack_below`` asks delete to repack."""
    def state(s: int) -> dict[str, Any]:
        return {"moving": torch.full((2048,), float(s)), "frozen": torch.arange(2048.0)}

    for repack_below, repacked in ((0.0, 0), (1.0, 1)):
        root = str(tmp_path / f"r{repack_below}")
        with deltackpt.open(root, "a", **POLICY) as repo:
            for s in range(3):
                repo.save(s, state(s))
            report = repo.delete(0, repack_below=repack_below)
            assert report.deleted_steps == [0] and report.repacked_packs == repacked
            gc_report = repo.gc(repack_below=1.0)
            assert gc_report.repacked_packs == 1 - repacked     # gc repacks what delete left
            for s in (1, 2):
                assert_bitexact(repo.load(s), state(s))


def test_du_around_an_unreadable_manifest_still_adds_up(tmp_path, capsys):
    from deltackpt.cli.main import main
    from deltackpt.ops.stepdiff import account

    root = _saved(tmp_path, 4)
    _flip_manifest(root, 1)
    with deltackpt.open(root, "r") as r:
        acc = account(r)
    assert [u.step for u in acc.steps] == [0, 2, 3] and list(acc.unreadable) == [1]
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert sum(u.stored_bytes for u in acc.steps) + acc.dead_bytes + acc.overhead_bytes \
        == acc.total_bytes == on_disk
    assert main(["du", root]) == 1
    out, err = capsys.readouterr()
    assert "chunks no readable step names" in out and "step 1: UNREADABLE manifest" in err
