"""Faults below the write protocol: process kills, full disks, I/O errors, lost and damaged files.

What tests/test_crash.py (hand-picked kill points of a save, random SIGKILLs of a save loop,
locks) and tests/test_gc.py (a kill before every durable operation of delete/gc/repack) already
cover is not repeated; this module adds:

* **Kill points, counted.** The durable operations (file commits and unlinks) of a save, a
  save whose retention deletes and rebases, a delete and a gc are enumerated and counted, and a
  child process is killed before *each* of them in turn for the two save variants; after every
  kill the committed steps load bit-exactly before and after recovery, and the next writer
  leaves no ``tmp/``, no ``txn/`` and (after gc) no unreferenced pack.
* **Random SIGKILLs of a writer that also deletes and collects garbage** (retention on every
  save, explicit gc): a short run by default, a long one with ``--runslow``.
* **Disk full and I/O errors**: ``OSError(ENOSPC)`` / ``OSError(EIO)`` injected at the N-th
  call of each file-system primitive the local backend uses (buffered write, fsync, rename,
  unlink, mkdir) for *every* N across a save, a save with retention, a delete and a gc. The
  error surfaces as the original ``OSError`` (errno kept) carrying a ``deltackpt:`` note naming
  the file and the operation; every step loads as before; a failed save is absent unless it
  failed after its commit point; the *same* writer saves again; after reopening and gc,
  ``verify()`` is clean and nothing is left over. Reads failing with EIO fail the load, and the
  next load works.
* **A real full file system** (tmpfs of a few MiB in a user namespace, no root needed; skipped
  with the reason where user namespaces are not available): saves until ENOSPC, then deleting
  old steps frees space and saving works again; a writer can open a completely full disk.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _durable import KILLED, check_each_kill, hook_durable_ops, run_forked
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.retention import KeepEvery, KeepLast
from deltackpt.errors import DeltaCkptError, DeltaCkptWarning
from deltackpt.store import local
from deltackpt.store.packs import decode_index

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
POLICY: dict[str, Any] = dict(chunk_bytes=1024, max_pack_bytes=800, keyframe_every=4,
                              workers=1)
BASE_STEPS = list(range(6))        # keyframes 0 and 4; 1-3 and 5 deltas
FIGURES: Counter[str] = Counter()  # printed by test_summary


def state_for(step: int) -> dict[str, Any]:
    """Deterministic training-like state: ``w`` changes sparsely (deltas), ``e`` never."""
    g = torch.Generator().manual_seed(21)
    w = torch.randn(2048, generator=g)
    e = torch.randn(512, generator=g).to(torch.bfloat16)
    rng = np.random.default_rng(step)
    idx = torch.from_numpy(rng.choice(2048, 40, replace=False))
    w[idx] += torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    return {"model": {"w": w, "e": e}, "opt": {"t": torch.tensor(step)}, "step": step}


# ---------------------------------------------------------------------------------- helpers
def _files(root: str, top: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(os.path.join(root, top)):
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs]
    return sorted(out)


def _packs(root: str) -> tuple[set[str], set[str]]:
    packs = {os.path.basename(f)[:-5] for f in _files(root, "packs")}
    idx = {os.path.basename(f)[:-4] for f in _files(root, "index")}
    return packs, idx


def _live(root: str) -> set[bytes]:
    with deltackpt.open(root, "r") as r:
        return {c.id for s in r.steps() for t in r.manifest(s).tensors for c in t.chunks}


def check_steps(root: str, must: set[int], may: set[int] = frozenset()) -> list[int]:
    """A fresh reader lists every step of ``must`` and only steps of ``must | may``, and each
    loads bit-exactly."""
    with deltackpt.open(root, "r", workers=1) as r:
        steps = r.steps()
        assert must <= set(steps) <= must | set(may), (steps, sorted(must), sorted(may))
        for s in steps:
            assert_bitexact(r.load(s), state_for(s))
    return steps


def check_clean(root: str) -> None:
    """After a writer ran recovery and gc: nothing left over, nothing unreferenced."""
    assert _files(root, "tmp") == [] and _files(root, "txn") == [], \
        (_files(root, "tmp"), _files(root, "txn"))
    packs, idx = _packs(root)
    assert packs == idx, f"packs without index {packs - idx}, indexes without pack {idx - packs}"
    live = _live(root)
    for pid in idx:
        with open(os.path.join(root, "index", f"{pid}.idx"), "rb") as f:
            ids = {e[0] for e in decode_index(f.read())[1]}
        assert ids & live, f"pack {pid} holds nothing a step needs"
    with deltackpt.open(root, "r") as r:
        report = r.verify()
        assert report.ok, report.problems


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("faults") / "base")
    with deltackpt.open(root, **POLICY) as repo:
        for s in BASE_STEPS:
            repo.save(s, state_for(s))
        assert [repo.manifest(s).kind for s in BASE_STEPS] == \
            ["keyframe", "delta", "delta", "delta", "keyframe", "delta"]
        assert len(repo.manifest(5).packs) >= 2    # a save spans several packs
    return root


def _copy(base: str, dst: str) -> str:
    shutil.copytree(base, dst)
    return dst


# ------------------------------------------------------------------------ the operations
NEXT = BASE_STEPS[-1] + 1


def op_save(w: deltackpt.Repository) -> None:
    w.save(NEXT, state_for(NEXT))


def op_save_retention(w: deltackpt.Repository) -> None:
    w.retention, w.auto_gc = KeepLast(2) | KeepEvery(4), True  # deletes 1, 2, 3, 5; rebases
    w.save(NEXT, state_for(NEXT))


def op_delete(w: deltackpt.Repository) -> None:
    w.delete(1, 4)                                    # a delta and a keyframe with dependents


def op_gc(w: deltackpt.Repository) -> None:
    w.gc(KeepLast(3), repack_below=0.9)               # deletes 0-2, rebases 3, repacks


OPS: dict[str, tuple[Callable[[deltackpt.Repository], None], set[int], set[int]]] = {
    # name: (operation, steps it may delete, steps it adds)
    "save": (op_save, set(), {NEXT}),
    "save+retention": (op_save_retention, {1, 2, 3, 5}, {NEXT}),
    "delete": (op_delete, {1, 4}, set()),
    "gc": (op_gc, {0, 1, 2}, set()),
}


# ============================================================ 1. kill points: counted, each tried
def _enumerate(base: str, work: str, name: str) -> list[str]:
    root = _copy(base, work)
    commit, delete = local._LocalStream.commit, local.LocalBackend.delete
    log: list[str] = []
    try:
        with deltackpt.open(root, "a", **POLICY) as w:
            hook_durable_ops(os.path.abspath(root), log)
            OPS[name][0](w)
    finally:
        local._LocalStream.commit, local.LocalBackend.delete = commit, delete
    return log


# minimum durable operations of each operation on the fixture (what the protocol needs)
MIN_POINTS = {"save": 10, "save+retention": 25, "delete": 12, "gc": 15}


def test_kill_points_enumerated(base, tmp_path):
    """Every durable operation of a save, a save with retention, a delete and a gc: counted
    and classified. A kill before each of them is tried below (saves) and in test_gc.py
    (delete, gc)."""
    counts = {}
    for name in OPS:
        log = _enumerate(base, str(tmp_path / name), name)
        kinds = Counter(op.split()[0] + " " + op.split()[1].split("/")[0] for op in log)
        counts[name] = len(log)
        FIGURES[f"durable operations: {name}"] = len(log)
        assert len(log) >= MIN_POINTS[name], (name, log)
        assert kinds["write txn"] >= 1 and kinds["write steps"] >= 1 or name in ("delete",
                                                                                "gc")
        print(f"\n{name}: {len(log)} durable operations: {dict(kinds)}")
    print(f"kill points per operation: {counts}; total {sum(counts.values())}")


def _kill_server(base: str, work: str, name: str, first: int | str, last: int | str) -> None:
    """Helper process: for k = first..last, copy ``base``, fork a child that runs operation
    ``name`` and dies before its k-th durable operation; stop at the first k it completes."""
    os.fsync = lambda fd: None   # a killed process loses nothing the kernel has; fsync is slow
    for k in range(int(first), int(last) + 1):
        dst = os.path.join(work, f"k{k:04d}")
        shutil.copytree(base, dst)

        def child(dst: str = dst, k: int = k) -> None:
            w = deltackpt.open(dst, "a", **POLICY)
            hook_durable_ops(os.path.abspath(dst), [], lambda log: len(log) == k,
                             os.path.join(work, f"k{k:04d}.op"))
            OPS[name][0](w)
            w.close()

        code = run_forked(child)
        print(json.dumps({"name": f"k{k:04d}", "code": code}), flush=True)
        if code != KILLED:
            return


def _helper(fn: str, *args: Any) -> subprocess.Popen[str]:
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_faults; "
            f"test_faults.{fn}(*sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _after_kill(path: str, name: str, point: str) -> None:
    doomed, added = OPS[name][1], OPS[name][2]
    kept = set(BASE_STEPS) - doomed
    committed = check_steps(path, kept, doomed | added)        # a reader, before recovery
    with deltackpt.open(path, "a", **POLICY) as w:               # recovery, then finish
        assert _files(path, "tmp") == [] and _files(path, "txn") == []
        if name == "save+retention":
            w.retention, w.auto_gc = KeepLast(2) | KeepEvery(4), True
        if NEXT not in committed:
            OPS[name][0](w)
        w.save(NEXT + 1, state_for(NEXT + 1))                   # the writer goes on
        w.gc(repack_below=0.0)
    if name == "save+retention":   # retention ran (again) with the last save
        check_steps(path, {0, 4, NEXT, NEXT + 1})
    else:
        check_steps(path, set(BASE_STEPS) | {NEXT, NEXT + 1})
    check_clean(path)


@pytest.mark.parametrize("name", ["save", "save+retention"])
def test_kill_before_every_durable_operation_of_a_save(base, tmp_path, name):
    work = str(tmp_path / "work")
    os.makedirs(work)
    server = _helper("_kill_server", base, work, name, 1, 200)
    checked: list[int] = []

    def check(path: str, k: int, point: str) -> None:
        _after_kill(path, name, point)
        checked.append(k)

    completed = check_each_kill(server, work, name, check)
    tried = len(checked)
    assert tried == completed - 1
    assert tried >= MIN_POINTS[name]
    FIGURES[f"kill points tried: {name}"] = tried
    print(f"\n{name}: killed before each of {tried} durable operations (+1 complete run)")


# ================================================== 2. random SIGKILLs, deletes and gc included
def _writer_loop(path: str, start: str) -> None:
    """Child: save from ``start`` on with retention after every save and an explicit gc every
    fifth step; report each committed save."""
    w = deltackpt.open(path, "a", retention=KeepLast(4) | KeepEvery(5), auto_gc=True,
                       **POLICY)
    print("ready", flush=True)
    s = int(start)
    while True:
        w.save(s, state_for(s))
        print(f"saved {s}", flush=True)
        if s % 5 == 3:
            w.gc(repack_below=0.7)
            print(f"gc {s}", flush=True)
        s += 1


def _random_kills(root: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    last = -1
    for _ in range(rounds):
        p = _helper("_writer_loop", root, last + 1)
        try:
            assert p.stdout is not None
            ready = p.stdout.readline()
            assert ready.startswith("ready"), p.stderr.read()[-3000:] if p.stderr else ready
            time.sleep(rng.uniform(0.05, 1.2))
            os.kill(p.pid, signal.SIGKILL)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, err[-3000:]
        saved = [int(x.split()[1]) for x in out.splitlines() if x.startswith("saved")]
        with deltackpt.open(root, "r", workers=1) as r:      # before any recovery
            steps = r.steps()
            if saved:
                assert max(saved) in steps       # the latest save always survives retention
            for s in steps:
                assert_bitexact(r.load(s), state_for(s))
        last = max([last, *saved, *steps])
        FIGURES["random SIGKILLs"] += 1
    with deltackpt.open(root, "a", **POLICY) as w:              # recovery
        assert _files(root, "tmp") == [] and _files(root, "txn") == []
        w.gc(repack_below=0.0)
    check_clean(root)
    check_steps(root, set(), set(range(last + 1)))


def test_random_sigkill_of_a_writer_that_deletes(tmp_path):
    _random_kills(str(tmp_path / "repo"), rounds=5, seed=11)


@pytest.mark.slow
def test_random_sigkill_of_a_writer_that_deletes_many(tmp_path):
    _random_kills(str(tmp_path / "repo"), rounds=40, seed=12)


# ================================================================= 3. disk full and I/O errors
PRIMITIVES = {"write": errno.ENOSPC, "fsync": errno.EIO, "rename": errno.ENOSPC,
              "unlink": errno.EIO, "mkdir": errno.ENOSPC}


class _FaultyFile:
    """The stream's buffered file, with a fault check before each ``write``."""

    def __init__(self, f: Any, check: Callable[[], None]) -> None:
        self._f, self._check = f, check

    def write(self, data: Any) -> int:
        self._check()
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class Faults:
    """Counts calls of the file-system primitives the local backend uses and raises
    ``OSError(errno)`` at the ``n``-th call of one of them (only while armed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, prim: str | None = None,
                 n: int = 0) -> None:
        self.prim, self.n = prim, n
        self.calls: Counter[str] = Counter()
        self.armed = False
        self.fired = False
        real = {"fsync": os.fsync, "rename": os.replace, "unlink": os.unlink,
                "mkdir": os.mkdir}

        def wrap(name: str) -> Callable[..., Any]:
            def fn(*args: Any, **kw: Any) -> Any:
                if self.armed:
                    self.calls[name] += 1
                    if name == self.prim and self.calls[name] == self.n:
                        self.fired = True
                        code = PRIMITIVES[name]
                        raise OSError(code, f"injected: {os.strerror(code)}")
                return real[name](*args, **kw) if name in real else None
            return fn

        check_write = wrap("write")
        init = local._LocalStream.__init__

        def p_init(stream: Any, *args: Any, **kw: Any) -> None:
            init(stream, *args, **kw)
            stream._f = _FaultyFile(stream._f, check_write)

        monkeypatch.setattr(local._LocalStream, "__init__", p_init)
        monkeypatch.setattr(os, "fsync", wrap("fsync"))
        monkeypatch.setattr(os, "replace", wrap("rename"))
        monkeypatch.setattr(os, "unlink", wrap("unlink"))
        monkeypatch.setattr(os, "mkdir", wrap("mkdir"))


def _count_calls(base: str, work: str, name: str, monkeypatch: pytest.MonkeyPatch
                 ) -> Counter[str]:
    root = _copy(base, work)
    with monkeypatch.context() as mp:
        faults = Faults(mp)
        with deltackpt.open(root, "a", **POLICY) as w:
            faults.armed = True
            OPS[name][0](w)
            faults.armed = False
    return faults.calls


def _inject(base: str, work: str, name: str, prim: str, n: int,
            monkeypatch: pytest.MonkeyPatch) -> str:
    """Run operation ``name`` failing at the n-th ``prim``; check everything; returns how it
    ended ("failed", "failed after commit")."""
    root = _copy(base, work)
    op, doomed, added = OPS[name]
    kept = set(BASE_STEPS) - doomed
    w = deltackpt.open(root, "a", **POLICY)
    try:
        with monkeypatch.context() as mp:
            faults = Faults(mp, prim, n)
            faults.armed = True
            exc: OSError | None = None
            try:
                with warnings.catch_warnings(record=True) as warned:
                    warnings.simplefilter("always")
                    op(w)
            except OSError as caught:
                exc = caught
            finally:
                faults.armed = False
            if exc is None and not faults.fired:
                # pack directories are named after random pack ids: how many a run creates
                # (mkdir, and the fsync of its parent) varies, as a new id may share its
                # directory with an old one
                assert prim in ("mkdir", "fsync") and faults.calls[prim] < n, \
                    (prim, n, dict(faults.calls))
                return "not reached"
        assert faults.fired
        if exc is None:
            # the fault hit the automatic gc after the committed save: a save that committed
            # never raises; the gc failure is a warning and gc runs again after the next save
            assert name == "save+retention", (prim, n)
            assert any(issubclass(x.category, DeltaCkptWarning) and "automatic gc" in
                       str(x.message) for x in warned), [str(x.message) for x in warned]
            steps = check_steps(root, kept, doomed | added)
            assert NEXT in steps
            outcome = "warned after commit"
        else:
            assert exc.errno == PRIMITIVES[prim], exc
            assert not isinstance(exc, DeltaCkptError)
            notes = getattr(exc, "__notes__", [])
            assert any(n_.startswith("deltackpt: ") for n_ in notes), (prim, n, notes)
            steps = check_steps(root, kept, doomed | added)
            outcome = "failed after commit" if NEXT in steps else "failed"
        w.retention = None
        if NEXT not in steps:                                   # the same writer retries
            w.save(NEXT, state_for(NEXT))
        w.save(NEXT + 1, state_for(NEXT + 1))                   # ... and goes on
        check_steps(root, kept | {NEXT, NEXT + 1}, doomed)
    finally:
        w.close()
    with deltackpt.open(root, "a", **POLICY) as w2:             # recovery, then gc
        w2.gc(repack_below=0.0)
    check_clean(root)
    return outcome


def _fault_sweep(base: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, name: str,
                 per_primitive: int | None) -> None:
    """Inject at every call of every primitive (``per_primitive`` None), or at about that
    many calls of each, spread evenly, the first and the last included."""
    calls = _count_calls(base, str(tmp_path / "count"), name, monkeypatch)
    assert calls["write"] and calls["fsync"] and calls["rename"], calls
    outcomes: Counter[str] = Counter()
    for prim in PRIMITIVES:
        total = calls[prim]
        stride = 1 if per_primitive is None else max(1, -(-total // per_primitive))
        for n in range(1, total + 1):
            if (n - 1) % stride and n != total:
                continue
            work = str(tmp_path / f"{prim}{n}")
            try:
                outcomes[_inject(base, work, name, prim, n, monkeypatch)] += 1
            except Exception as exc:
                raise AssertionError(f"{name}: {prim} #{n} of {calls[prim]} failing with "
                                     f"{errno.errorcode[PRIMITIVES[prim]]}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            shutil.rmtree(work)
    total = sum(outcomes.values())
    FIGURES[f"I/O faults injected: {name}"] = total
    print(f"\n{name}: primitive calls {dict(calls)}; {total} faults injected: {dict(outcomes)}")


@pytest.mark.parametrize("name", list(OPS))
def test_io_error_injected(base, tmp_path, monkeypatch, name):
    """About 6 calls of each primitive, spread over the operation (first and last included)."""
    _fault_sweep(base, tmp_path, monkeypatch, name, per_primitive=6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPS))
def test_io_error_at_every_call(base, tmp_path, monkeypatch, name):
    _fault_sweep(base, tmp_path, monkeypatch, name, per_primitive=None)


def test_read_errors_fail_the_load_only(base, tmp_path, monkeypatch):
    """EIO from pread at the n-th read of a load: that load raises OSError (with a note), the
    next load of the same reader is bit-exact, for every n."""
    root = _copy(base, str(tmp_path / "r"))
    real = os.pread
    calls = Counter()
    state = {"n": 0}

    def pread(fd: int, length: int, offset: int) -> bytes:
        calls["pread"] += 1
        if calls["pread"] == state["n"]:
            raise OSError(errno.EIO, "injected: Input/output error")
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    with deltackpt.open(root, "r", workers=1) as r:
        r.load(5)
        total = calls["pread"]
        assert total >= 4
        for n in range(1, total + 1):
            r.refresh()   # (forget cached chunks so the load reads again)
            calls.clear()
            state["n"] = n
            with pytest.raises(OSError) as info:
                r.load(5)
            assert info.value.errno == errno.EIO
            assert any("deltackpt: reading 'packs/" in x for x in info.value.__notes__)
            state["n"] = 0
            assert_bitexact(r.load(5), state_for(5))
    FIGURES["read faults injected"] = total


# ======================================================================= 4. a real full disk
def _userns_tmpfs() -> str | None:
    """Why a size-limited file system cannot be mounted here (None if it can)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1)/mount(8) not installed"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode:
        return f"user namespaces not available: {probe.stderr.strip()[:200]}"
    return None


def _full_disk_child(root: str) -> None:
    """Runs inside the namespace, ``root`` on a small tmpfs: fill it with saves, check, free
    space by deleting, save again. Prints one JSON line of results."""
    out: dict[str, Any] = {}

    def big(step: int) -> dict[str, Any]:   # 256 KiB of incompressible floats per step
        return {"w": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(step)),
                "step": step}

    w = deltackpt.open(root, "a", chunk_bytes=64 * 1024, keyframe_every=1, workers=1)
    saved: list[int] = []
    for s in range(100):
        try:
            w.save(s, big(s))
            saved.append(s)
        except OSError as exc:
            out["error"] = [exc.errno, getattr(exc, "__notes__", [])]
            out["failed_step"] = s
            break
    out["saved"] = saved
    out["left"] = {d: sorted(os.listdir(os.path.join(root, d))) if os.path.isdir(
        os.path.join(root, d)) else [] for d in ("tmp", "txn")}
    with deltackpt.open(root, "r", workers=1) as r:
        out["steps"] = r.steps()
        out["bitexact"] = all(torch.equal(r.load(s)["w"], big(s)["w"]) for s in r.steps())
    w.delete(*saved[:3])                       # free space ...
    w.save(1000, big(1000))                    # ... and save again
    w.close()
    # a completely full disk: fill every byte left, then a writer still opens and deletes
    with open(os.path.join(root, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with deltackpt.open(root, "a", chunk_bytes=64 * 1024, keyframe_every=1, workers=1) as w2:
        try:
            w2.save(1001, big(1001))
            out["save_on_full_disk"] = "saved"
        except OSError as exc:
            out["save_on_full_disk"] = errno.errorcode[exc.errno]
        w2.delete(saved[3])
        os.remove(os.path.join(root, "filler"))
        w2.save(1002, big(1002))
    with deltackpt.open(root, "r", workers=1) as r:
        out["final_steps"] = r.steps()
        out["final_ok"] = r.verify().ok and all(
            torch.equal(r.load(s)["w"], big(s)["w"]) for s in r.steps())
    print("RESULT " + json.dumps(out), flush=True)


def test_full_file_system(tmp_path):
    reason = _userns_tmpfs()
    if reason:
        pytest.skip(f"no size-limited file system without root: {reason}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    root = str(mnt / "repo")
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_faults; "
            f"test_faults._full_disk_child({root!r})")
    cmd = ["unshare", "-rm", "sh", "-c",
           f'mount -t tmpfs -o size=1536k none "{mnt}" && exec "$0" -c "$1"',
           sys.executable, code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["error"][0] == errno.ENOSPC, out
    assert any(n.startswith("deltackpt: ") for n in out["error"][1]), out
    assert out["steps"] == out["saved"] and len(out["saved"]) >= 3, out
    assert out["failed_step"] not in out["steps"] and out["bitexact"], out
    assert out["left"] == {"tmp": [], "txn": []}, out           # the failed save cleaned up
    assert out["save_on_full_disk"] == "ENOSPC", out
    assert out["final_ok"] and 1000 in out["final_steps"] and 1002 in out["final_steps"], out
    FIGURES["full tmpfs: saves before ENOSPC"] = len(out["saved"])
    print(f"\nfull tmpfs: {out}")


# ============================================ 5. damage: every file deleted, bytes flipped, repair
DMG_STEPS = (10, 20, 30, 40)
DMG_POLICY: dict[str, Any] = dict(chunk_bytes=256, keyframe_every=3, workers=1)
DMG_PATHS = {"model/w", "model/b", "n"}


def dmg_state(step: int) -> dict[str, Any]:
    """Step 40 (a keyframe) holds the same values as step 30 (a delta): its raw chunks are
    intact copies of what step 30's delta records rebuild to, which repair can use."""
    k = min(step, 30) // 10
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, generator=g)             # 4 chunks
    w[::37] += 1e-3 * k
    b = torch.randn(64, generator=g).to(torch.bfloat16)   # 1 chunk, never changes
    n = np.arange(32, dtype=np.int64) * k         # numpy, 1 chunk
    return {"model": {"w": w, "b": b}, "n": n, "step": step}


@pytest.fixture(scope="module")
def dmg_base(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("damage") / "repo")
    with deltackpt.open(root, **DMG_POLICY) as repo:
        for s in DMG_STEPS:
            repo.save(s, dmg_state(s))
        assert [repo.manifest(s).kind for s in DMG_STEPS] == \
            ["keyframe", "delta", "delta", "keyframe"]
    os.remove(os.path.join(root, "lock"))
    return root


def _dmg_files(root: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs]
    return sorted(x for x in out if x != "lock")


def dmg_probe(root: str) -> tuple[dict[int, BaseException | None], Any, Any]:
    """Load every step read-only (bit-exact or a DeltaCkptError, nothing else), verify, plan
    the repair; check that verify names every step that fails, and the tensor where the
    error names one."""
    from deltackpt.ops import repair

    loads: dict[int, BaseException | None] = {}
    try:
        r = deltackpt.open(root, "r", workers=1)
    except DeltaCkptError as exc:
        return {s: exc for s in DMG_STEPS}, None, None
    with r:
        for s in DMG_STEPS:
            try:
                got = r.load(s)
            except DeltaCkptError as exc:
                loads[s] = exc
                continue
            assert_bitexact(got, dmg_state(s))   # never silently different data
            loads[s] = None
        report = r.verify()
        todo = repair.plan(r)
    listed = set(report.steps)
    for s, exc in loads.items():
        if exc is None or s not in listed:
            continue
        assert s in report.bad_steps, (s, exc, report.problems)
        if exc.path is not None:   # the tensor the load named is named for that step too
            named = {p.path for p in report.problems if p.step == s}
            assert exc.path in named or None in named, (s, exc, report.problems)
    for p in report.problems:
        assert p.message and p.cause
        if p.path is not None:
            assert p.path in DMG_PATHS and p.step in DMG_STEPS, p
    failed = {s for s, e in loads.items() if e is not None and s in listed}
    assert failed <= set(todo.damaged_steps) | set(report.bad_steps), (failed, todo)
    assert set(todo.lost_steps) <= failed | {s for s in DMG_STEPS if s not in listed}, todo
    return loads, report, todo


def _repair_and_check(root: str, todo: Any) -> set[int]:
    """Apply the plan with a writer; every step the plan did not give up on must then load
    bit-exactly and verify; returns the steps that load."""
    from deltackpt.ops import repair

    lost = set(todo.lost_steps)
    with deltackpt.open(root, "a", **DMG_POLICY) as w:
        left = repair.apply(w, todo)
        assert set(left.lost_steps) <= lost | set(left.damaged_steps), (todo, left)
        assert all(not a.recoverable for a in left.actions), left
    loaded = set()
    with deltackpt.open(root, "r", workers=1) as r:
        for s in r.steps():
            try:
                got = r.load(s)
            except DeltaCkptError:
                assert s in lost or s in left.damaged_steps, (s, todo, left)
                continue
            assert_bitexact(got, dmg_state(s))
            loaded.add(s)
        report = r.verify()
    assert set(report.bad_steps) <= lost | set(left.damaged_steps), (report.problems, todo)
    return loaded


def test_delete_every_file(dmg_base, tmp_path):
    """Each file of the repository deleted in turn: typed errors, verify names the damage,
    the repair plan says what comes back; applying it brings back every step it promised."""
    verdicts: Counter[str] = Counter()
    files = _dmg_files(dmg_base)
    for rel in files:
        root = _copy(dmg_base, str(tmp_path / rel.replace("/", "_")))
        os.remove(os.path.join(root, rel))
        loads, report, todo = dmg_probe(root)
        kind = rel.split("/")[0]
        if report is None:
            assert rel == "deltackpt.json"
            verdicts["config: open refused"] += 1
            continue
        if kind == "index":   # the pack is intact: the index is rebuilt, nothing is lost
            assert [a.kind for a in todo.actions] == ["reindex"] and todo.recoverable, todo
        if kind == "steps":   # the step is gone (not listed) and nothing else refers to it,
            assert report.ok or report.bad_steps, report   # or its dependents are named
        loaded = _repair_and_check(root, todo) if not todo.ok else \
            {s for s, e in loads.items() if e is None}
        verdicts[f"{kind}: {'recovered' if todo.recoverable else 'partly lost'}"] += 1
        if kind == "index":
            assert loaded == set(DMG_STEPS)
        shutil.rmtree(root)
    FIGURES["files deleted one at a time"] = len(files)
    print(f"\ndeleted each of {len(files)} files in turn: {dict(verdicts)}")


def test_damaged_delta_repaired_from_an_identical_raw_chunk(dmg_base, tmp_path):
    """Step 30's delta frames damaged: step 40 stores the same bytes raw, so the plan
    re-points step 30's records at them and step 30 loads bit-exactly again."""
    root = _copy(dmg_base, str(tmp_path / "r"))
    with deltackpt.open(root, "r") as r:
        m = r.manifest(30)
        others = {c.id for s in (10, 20, 40) for t in r.manifest(s).tensors for c in t.chunks}
        deltas = [(t.path, i, c) for t in m.tensors for i, c in enumerate(t.chunks)
                  if c.ref is not None and c.id not in others]   # (a payload shared with
        assert len(deltas) >= 3                                  # step 20 would break it too)
        locs = {r.store.locate(c.id) for _p, _i, c in deltas}
    for loc in locs:   # damage the last byte of each delta frame
        path = os.path.join(root, "packs", loc.pack[:2], f"{loc.pack}.pack")
        with open(path, "r+b") as f:
            f.seek(loc.offset + loc.length - 1)
            byte = f.read(1)
            f.seek(loc.offset + loc.length - 1)
            f.write(bytes([byte[0] ^ 0x10]))
    loads, report, todo = dmg_probe(root)
    assert loads[30] is not None and 30 in report.bad_steps
    assert loads[10] is None and loads[40] is None
    kinds = Counter(a.kind for a in todo.actions)
    assert kinds["repoint"] == len({(p, i) for p, i, _c in deltas}) and todo.recoverable, todo
    assert set(kinds) <= {"repoint", "repack"}, todo
    assert all(a.step == 30 for a in todo.actions if a.kind == "repoint")
    assert "recoverable" in str(todo) and "repair.apply" in str(todo)
    assert any(a.kind == "repack" for a in todo.actions)   # drops the damaged frames
    assert _repair_and_check(root, todo) == set(DMG_STEPS)
    with deltackpt.open(root, "r") as r:
        assert r.verify().ok


def test_lost_chunk_is_reported_lost(dmg_base, tmp_path):
    """A keyframe chunk whose bytes exist nowhere else: the plan says lost, names the step and
    tensor, and the steps whose chains replay it."""
    root = _copy(dmg_base, str(tmp_path / "r"))
    with deltackpt.open(root, "r") as r:
        loc = r.store.locate(r.manifest(10).tensor("model/w").chunks[0].id)
    path = os.path.join(root, "packs", loc.pack[:2], f"{loc.pack}.pack")
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.length - 1)
        byte = f.read(1)
        f.seek(loc.offset + loc.length - 1)
        f.write(bytes([byte[0] ^ 0x01]))
    loads, report, todo = dmg_probe(root)
    assert 10 in todo.lost_steps and not todo.recoverable
    lost = [a for a in todo.actions if a.kind == "lost"]
    assert any(a.step == 10 and a.path == "model/w" and a.chunk == 0 for a in lost), todo
    assert "LOST" in str(todo) and "backup" in str(todo)


def _flip_sweep(dmg_base: str, work: str, stride: int) -> None:
    shutil.copytree(dmg_base, work)
    flips = repaired = 0
    verdicts: Counter[str] = Counter()
    for rel in _dmg_files(work):
        fp = os.path.join(work, rel)
        with open(fp, "rb") as f:
            data = f.read()
        for i in range(0, len(data), stride):
            bad = bytearray(data)
            bad[i] ^= 1 << (i * 7 % 8)
            with open(fp, "wb") as f:
                f.write(bad)
            try:
                loads, report, todo = dmg_probe(work)
                flips += 1
                if todo is not None and not todo.ok:
                    verdicts["recoverable" if todo.recoverable else "lost"] += 1
                    if todo.recoverable and flips % 3 == 0:  # apply a third of the plans
                        scratch = work + ".fix"
                        shutil.copytree(work, scratch)
                        try:
                            assert _repair_and_check(scratch, todo) == set(DMG_STEPS)
                            repaired += 1
                        finally:
                            shutil.rmtree(scratch)
                else:
                    verdicts["not damage a load or verify sees" if todo is not None
                             else "open refused"] += 1
            except AssertionError as exc:
                raise AssertionError(f"{rel} byte {i}: {exc}") from exc
            finally:
                with open(fp, "wb") as f:
                    f.write(data)
    FIGURES["bytes flipped (repair sweep)"] += flips
    FIGURES["repair plans applied"] += repaired
    print(f"\nflipped {flips} bytes (every {stride}th): {dict(verdicts)}; applied {repaired} "
          "recoverable plans, each restoring every step")


def test_flip_sweep_with_repair_plans(dmg_base, tmp_path):
    _flip_sweep(dmg_base, str(tmp_path / "w"), stride=23)


def test_damaged_frame_that_still_decodes_is_rederived_not_lost(dmg_base, tmp_path):
    """A flipped bit in step 20's delta frame that its decode ignores (zstd's unused header
    bit): the frame fails its id (verify reports the pack), every step still loads
    bit-exactly, so the plan must not call
    step 20 lost, even once step 10's link is cached (chunk() used to skip plane replay then),
    and applying it must keep every step: the rebuilt bytes are stored raw before the repack
    drops the damaged frame."""
    work = str(tmp_path / "w")
    shutil.copytree(dmg_base, work)
    with deltackpt.open(work, "r", workers=1) as r:
        rec = r.manifest(20).tensor("model/w").chunks[1]
        assert rec.ref == 10
        loc = r.store.locate(rec.id)
    path = os.path.join(work, "packs", loc.pack[:2], loc.pack + ".pack")
    data = open(path, "rb").read()
    found = None
    for i in range(loc.offset, loc.offset + loc.length):
        bad = bytearray(data)
        bad[i] ^= 0x10
        open(path, "wb").write(bad)
        loads, report, todo = dmg_probe(work)    # (its own checks hold for every flip)
        if all(e is None for e in loads.values()) and not report.ok:
            found = (i, todo)
            break
    assert found is not None, "no byte of the frame is one no needed plane reads"
    i, todo = found
    assert todo.lost_steps == [] and todo.recoverable, todo
    assert any(a.kind == "rederive" and a.step == 20 for a in todo.actions), todo
    assert _repair_and_check(work, todo) == set(DMG_STEPS)
    with deltackpt.open(work, "r", workers=1) as r:
        assert r.verify().ok


@pytest.mark.slow
def test_flip_every_byte_with_repair_plans(dmg_base, tmp_path):
    _flip_sweep(dmg_base, str(tmp_path / "w"), stride=1)


def test_summary():
    """Runs last in this module: the figures the tests above produced."""
    print("\nfault figures: " + json.dumps(dict(FIGURES), indent=1))
