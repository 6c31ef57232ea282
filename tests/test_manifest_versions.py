"""Manifest versions 1 and 2 side by side: old repositories keep working under this writer.

Starts from the committed v1 golden repository (JSON manifests written by the code before
version 2) and keeps using it: new saves write version-2 manifests (deltas against the v1
steps), and load, log/history, du, verify, delete (rebasing v1 dependents into v2), gc and
repair (re-pointing a v1 step's records, committed as v2) all work across the mix, bit-exactly.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Any

import pytest
from _util import assert_bitexact

import deltackpt
from deltackpt.cli.main import main as cli_main
from deltackpt.ops.repair import apply as repair_apply
from deltackpt.ops.repair import plan as repair_plan
from deltackpt.store.manifest import MAGIC, Manifest, manifest_name

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
V1_REPO = os.path.join(GOLDEN, "v1", "repo")
NEW = [7, 8, 9]


def _golden() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden_mv",
                                                  os.path.join(GOLDEN, "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


MG = _golden()
OLD = MG.STEPS  # 0..6, all version 1


def expected(step: int) -> Any:
    """The state saved at ``step``: make_golden's, continued (step 10: step 6's again)."""
    return MG.build_state(6 if step == 10 else step)


def version_of(root: str, step: int) -> int:
    with open(os.path.join(root, manifest_name(step)), "rb") as f:
        return 2 if f.read(len(MAGIC)) == MAGIC else 1


@pytest.fixture()
def mixed(tmp_path) -> str:
    """The v1 golden repository plus steps 7-9 saved by this writer (version 2)."""
    root = str(tmp_path / "mixed")
    shutil.copytree(V1_REPO, root)
    with deltackpt.open(root, "a", **MG.COMMON, codec="diff", keyframe_every=10) as repo:
        for s in NEW:
            info = repo.save(s, expected(s))
            assert info.kind == "delta"   # resumed the v1 chain
    assert [version_of(root, s) for s in OLD + NEW] == [1] * len(OLD) + [2] * len(NEW)
    return root


def check_all(root: str, steps: list[int]) -> None:
    with deltackpt.open(root, "r") as repo:
        assert repo.steps() == steps
        for s in steps:
            assert_bitexact(repo.load(s), expected(s))
        report = repo.verify()
        assert report.ok, report.problems
        assert report.steps == steps


def test_mixed_repository_loads_verifies_and_lists(mixed, capsys):
    check_all(mixed, OLD + NEW)
    with deltackpt.open(mixed, "r") as repo:
        hist = repo.history()
        assert [r.step for r in hist] == OLD + NEW
        m7 = repo.manifest(7)
        assert m7.parent == 6 and any(c.ref == 6 for t in m7.tensors for c in t.chunks)
        for s in OLD + NEW:  # stored_bytes counts the manifest itself, whatever its version
            assert repo.manifest(s).stats["stored_bytes"] >= \
                os.path.getsize(os.path.join(mixed, manifest_name(s)))
    assert cli_main(["log", mixed, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == OLD + NEW
    assert cli_main(["du", mixed, "--json"]) == 0
    du = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in du["steps"]] == OLD + NEW
    assert sum(r["stored_bytes"] for r in du["steps"]) == du["stored_bytes"]
    assert cli_main(["show", mixed, "--step", "6"]) == 0
    assert cli_main(["show", mixed, "--step", "8"]) == 0
    assert cli_main(["verify", mixed]) == 0


def test_delete_rebases_v1_dependents_into_v2(mixed):
    """Deleting v1 keyframe 4 rebases v1 steps 5 and 6 (and whatever of 7-9 replays through
    4): their new manifests are version 2; everything still loads bit-exactly."""
    with deltackpt.open(mixed, "a", **MG.COMMON) as repo:
        report = repo.delete(4)
        assert report.deleted_steps == [4] and 5 in report.rebased_steps
        assert 6 in report.rebased_steps
    assert version_of(mixed, 5) == 2 and version_of(mixed, 6) == 2
    assert version_of(mixed, 3) == 1
    check_all(mixed, [0, 1, 2, 3, 5, 6, *NEW])
    with deltackpt.open(mixed, "a", **MG.COMMON) as repo:
        repo.delete(0, 1)          # the v1 chain 0 <- 1 <- 2 <- 3 loses its start
        r = repo.gc()
        assert not r.deleted_steps or set(r.deleted_steps) <= {0, 1}
    # 2 was rebased (v2); 3 (v1) did not need it: its deltas now replay through a v2 step
    assert version_of(mixed, 2) == 2 and version_of(mixed, 3) == 1
    check_all(mixed, [2, 3, 5, 6, *NEW])


def test_gc_retention_over_mixed_versions(mixed):
    from deltackpt.engine.retention import KeepLast
    with deltackpt.open(mixed, "a", **MG.COMMON) as repo:
        report = repo.gc(KeepLast(4))
        assert report.deleted_steps == [0, 1, 2, 3, 4, 5]
    check_all(mixed, [6, *NEW])


def test_repair_repoints_a_v1_record_and_commits_v2(mixed):
    """A delta frame of v1 step 6 damaged, its bytes stored raw by a new keyframe (v2):
    repair re-points step 6's record, committing step 6 as version 2."""
    with deltackpt.open(mixed, "a", **MG.COMMON, keyframe_every=1) as repo:
        repo.save(10, expected(10))                        # = step 6's state, all raw
    with deltackpt.open(mixed, "r") as r:
        m6 = r.manifest(6)
        raw10 = {c.id for t in r.manifest(10).tensors for c in t.chunks}
        others = {c.id for s in (4, 5, *NEW) for t in r.manifest(s).tensors for c in t.chunks}
        target = next(c for t in m6.tensors for c in t.chunks
                      if c.ref is not None and c.digest in raw10 and c.id not in others)
        loc = r.store.locate(target.id)
    pack = os.path.join(mixed, "packs", loc.pack[:2], f"{loc.pack}.pack")
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length - 1)
        byte = f.read(1)
        f.seek(loc.offset + loc.length - 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with deltackpt.open(mixed, "r") as r:
        assert 6 in r.verify().bad_steps
        todo = repair_plan(r)
    assert todo.recoverable and any(a.kind == "repoint" and a.step == 6
                                    for a in todo.actions), todo
    assert version_of(mixed, 6) == 1
    with deltackpt.open(mixed, "a", **MG.COMMON) as w:
        left = repair_apply(w, todo)
    assert not left.actions, left
    assert version_of(mixed, 6) == 2
    check_all(mixed, OLD + NEW + [10])


def test_unreadable_v1_manifest_in_a_mixed_repository(mixed):
    """A damaged v1 manifest: history skips it, verify and repair name it lost, gc keeps it,
    delete removes it; the v2 steps are unaffected."""
    path = os.path.join(mixed, manifest_name(2))
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01
    open(path, "wb").write(bytes(data))
    with deltackpt.open(mixed, "r") as repo:
        unreadable: dict[int, str] = {}
        assert [r.step for r in repo.history(unreadable=unreadable)] == [0, 1, 3, 4, 5, 6,
                                                                          *NEW]
        assert set(unreadable) == {2} and "checksum" in unreadable[2]
        assert 2 in repo.verify().bad_steps
        assert 2 in repair_plan(repo).lost_steps
        for s in NEW:
            assert_bitexact(repo.load(s), expected(s))
    with deltackpt.open(mixed, "a", **MG.COMMON) as repo:
        with pytest.warns(deltackpt.errors.DeltaCkptWarning, match=r"steps \[2\]"):
            assert repo.gc().unreadable_steps == [2]
        with pytest.warns(deltackpt.errors.DeltaCkptWarning, match="step 3 depends"):
            repo.delete(2)   # (3 needed 2's chunks: it stays as unloadable as it was)
        assert 2 not in repo.steps()
        for s in NEW:
            assert_bitexact(repo.load(s), expected(s))


def test_v1_written_by_to_bytes_reads_back(tmp_path):
    """Manifest.to_bytes(1) writes what the pre-v2 writer wrote: a repository whose new
    manifests are rewritten in version 1 still loads (the reader does not care which)."""
    root = str(tmp_path / "r")
    with deltackpt.open(root, "a", **MG.COMMON, codec="xor") as repo:
        for s in range(3):
            repo.save(s, MG.build_state(s))
    for s in (0, 2):
        p = os.path.join(root, manifest_name(s))
        m = Manifest.from_bytes(open(p, "rb").read(), s)
        open(p, "wb").write(m.to_bytes(1))
    assert [version_of(root, s) for s in range(3)] == [1, 2, 1]
    with deltackpt.open(root, "r") as repo:
        for s in range(3):
            assert_bitexact(repo.load(s), MG.build_state(s))
        assert repo.verify().ok
