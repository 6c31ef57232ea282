"""Hostile repositories, part 2: repository files that are not files.

Every kind of repository file (config, manifest, index, pack, journal, lock) replaced by a
symlink to a kernel pseudo-file (``/proc/kmsg``, ``/proc/self/mem``, ``/proc/self/pagemap``:
"regular files" to ``stat`` whose reads block, fail with EIO/EINVAL or never end) or by a FIFO.
Opening, listing, loading, ``history()`` and ``verify()`` give a ``DeltaCkptError`` (or work,
where the file is not needed), ``verify()`` reports instead of raising, and nothing hangs.
"""
from __future__ import annotations

import errno
import os

import pytest
import test_hostile
from test_hostile import STEPS, check, probe, read_doc

import deltackpt
from deltackpt.errors import CorruptFileError
from deltackpt.store import local
from deltackpt.store.local import LocalBackend

pristine = test_hostile.pristine  # the genuine repository each test copies (fixtures)
repo = test_hostile.repo
PROC = ["/proc/kmsg", "/proc/self/mem", "/proc/self/pagemap"]
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="no procfs")


def _rel(root: str, where: str) -> str:
    pid = read_doc(root, 0)["packs"][0]
    return {"config": "deltackpt.json", "manifest": f"steps/{0:020d}.json",
            "index": f"index/{pid}.idx", "pack": f"packs/{pid[:2]}/{pid}.pack",
            "journal": "txn/" + "a" * 32 + ".json", "lock": "lock"}[where]


def _plant(root: str, where: str, target: str, rel: str | None = None) -> str:
    """Replace the ``where`` file of ``root`` (at ``rel`` if given) by a symlink to ``target``
    (``"fifo"``: a FIFO)."""
    path = os.path.join(root, *(rel or _rel(root, where)).split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.remove(path)
    if target == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(target, path)
    return path


@needs_proc
@pytest.mark.parametrize("target", PROC + ["fifo"])
@pytest.mark.parametrize("where", ["config", "manifest", "index", "pack"])
def test_pseudo_files_read_by_readers(repo, where, target):
    _plant(repo, where, target)
    out = probe(repo)
    check(out)
    if where == "config":
        assert isinstance(out.open_error, CorruptFileError), out.open_error
        assert "deltackpt.json" in str(out.open_error)
        return
    assert out.open_error is None
    assert isinstance(out.loads[0], CorruptFileError if where == "manifest" else
                      deltackpt.errors.DeltaCkptError), out.loads[0]
    assert out.report is not None
    if where == "manifest" and target == "fifo":  # not listed as a step: its deltas break
        assert {1, 2} <= set(out.report.bad_steps), out.report.problems
    else:
        assert 0 in out.report.bad_steps, out.report.problems
    if target != "fifo" or where in ("config", "pack"):  # (a FIFO index is not listed)
        assert any("not a repository file" in p.message for p in out.report.problems)


@needs_proc
@pytest.mark.parametrize("target", PROC + ["fifo"])
@pytest.mark.parametrize("where", ["config", "manifest", "index", "pack", "journal"])
def test_pseudo_files_read_by_a_writer(repo, where, target):
    """A writer's open (recovery reads journals) refuses the config and drops a journal that
    is not a file; the target is never written (a symlink is removed, not followed)."""
    path = _plant(repo, where, target)
    out = probe(repo, mode="a")
    check(out)
    if where == "config":
        assert isinstance(out.open_error, CorruptFileError), out.open_error
    else:
        assert out.open_error is None
    if where == "journal":  # dropped by recovery (a FIFO is not even listed)
        assert os.path.lexists(path) == (target == "fifo")
        assert {s for s, e in out.loads.items() if e is None} == set(STEPS)


@needs_proc
@pytest.mark.parametrize("target", PROC + ["fifo", "directory", "outside"])
def test_lock_that_is_not_a_file(repo, tmp_path, target):
    """The writer writes its name into ``lock``: a symlink (to anything, even a regular file
    outside the repository), a FIFO or a directory there is refused, and nothing is written."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    if target == "directory":
        os.mkdir(os.path.join(repo, "lock"))
    else:
        _plant(repo, "lock", str(victim) if target == "outside" else target)
    out = probe(repo, mode="a")
    check(out)
    assert isinstance(out.open_error, CorruptFileError), out.open_error
    assert "lock" in str(out.open_error)
    assert victim.read_text() == "keep me"
    check(probe(repo), loaded=set(STEPS))   # readers take no lock


@needs_proc
def test_unreadable_pseudo_file_is_still_refused(repo, monkeypatch):
    """A pseudo-file this user may not open (``/proc/kmsg`` without root) is CorruptFileError,
    not PermissionError; a genuine unreadable file keeps its PermissionError."""
    real_open = os.open

    def deny(path, flags, *args):
        if not flags & getattr(os, "O_PATH", 0) and os.path.basename(str(path)) != "lock":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    b = LocalBackend(repo)
    rel = _rel(repo, "manifest")
    _plant(repo, "manifest", "/proc/self/mem", rel)
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(CorruptFileError, match="pseudo-file"):
        b.read(rel)
    with pytest.raises(PermissionError):
        b.read("deltackpt.json")


@needs_proc
@pytest.mark.parametrize("where", ["manifest", "index", "pack"])
def test_without_statfs_reads_stay_bounded(repo, monkeypatch, where):
    """Where the file system type cannot be told (no fstatfs), a pseudo-file is still refused
    or harmless: whole-file reads stop at the size fstat reports (0 for procfs) and a read
    error no genuine file gives (EAGAIN, EINVAL) is CorruptFileError."""
    monkeypatch.setattr(local, "_fs_type", lambda fd: None)
    rel = _rel(repo, where)
    for target in ("/proc/kmsg", "/proc/self/pagemap"):
        _plant(repo, where, target, rel)
        out = probe(repo)
        check(out)
        assert out.report is not None and not out.report.ok


def test_read_returns_the_size_fstat_reports(tmp_path):
    """The backend reads exactly the file's size (a file that is empty, short or large)."""
    b = LocalBackend(tmp_path)
    for data in (b"", b"x", os.urandom(70_000)):
        b.write_atomic("f.json", data)
        assert b.read("f.json") == data
