"""One writer, many readers, under load: saves, deletes, rebases, repacks and a writer killed.

* A writer process saves in a loop with a retention policy (every save deletes steps and
  rebases their dependents) and an explicit ``gc`` with repacking every few steps, while
  several reader processes load, verify and re-open random steps -- including steps just
  deleted. A reader must only ever see a step bit-exactly as saved (the state of each step
  is deterministic) or ``StepNotFoundError``: no partial step, no other error. Midway the
  writer is SIGKILLed (a stale lock and a crashed save are left), a second writer must then
  be able to open (the lock died with it), run recovery under the readers' feet and go on.
  A second writer while the first lives gets ``LockedError``. Default: about 20 s; the
  ``slow`` variant runs for minutes.
* A long-lived reader never serves a stale manifest: a step deleted and saved again under the
  same number (same size, same shapes) loads as its new state every time.
* ``flock`` and ``fork()``: a forked child (a DataLoader worker) of the writer neither keeps
  the lock alive after the writer is killed nor releases the writer's lock when it exits.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.engine.retention import KeepEvery, KeepLast
from deltackpt.errors import LockedError, StepNotFoundError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
POLICY: dict[str, Any] = dict(chunk_bytes=2048, max_pack_bytes=6000, keyframe_every=5,
                              workers=1)


def state_for(step: int) -> dict[str, Any]:
    """Deterministic per step, sparse changes between steps (deltas), one tensor shared."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(4096, generator=g)
    e = torch.randn(1024, generator=g).to(torch.bfloat16)
    rng = np.random.default_rng(step)
    idx = torch.from_numpy(rng.choice(4096, 30, replace=False))
    w[idx] += torch.from_numpy(rng.standard_normal(30).astype(np.float32))
    return {"model": {"w": w, "e": e}, "step": torch.tensor(step), "n": step,
            "np": np.full(8, step, dtype=np.int32)}


def _helper(fn: str, *args: Any) -> subprocess.Popen[str]:
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_concurrency; "
            f"test_concurrency.{fn}(*sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# -------------------------------------------------------------------------- child processes
def _writer(root: str, start: str, seconds: str) -> None:
    """Save from ``start`` for ``seconds`` (then exit cleanly), retention on every save, gc
    with repacking every fifth step; reports each save."""
    w = deltackpt.open(root, "a", retention=KeepLast(3) | KeepEvery(7), auto_gc=True,
                       **POLICY)
    print(f"ready {os.getpid()}", flush=True)
    deadline = time.monotonic() + float(seconds)
    s = int(start)
    while time.monotonic() < deadline:
        w.save(s, state_for(s))
        if s % 5 == 4:
            w.gc(repack_below=0.8)
        print(f"saved {s}", flush=True)
        s += 1
    w.close()
    print("done", flush=True)


def _reader(root: str, seconds: str, seed: str) -> None:
    """Load / verify / re-open random steps for ``seconds``; print one JSON summary."""
    rng = random.Random(int(seed))
    expected: dict[int, Any] = {}
    stats: Counter[str] = Counter()
    errors: list[str] = []
    r = deltackpt.open(root, "r", workers=1)
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        steps = r.steps()
        if not steps:
            time.sleep(0.01)
            continue
        s = rng.choice(steps) if rng.random() < 0.85 else rng.randint(0, steps[-1])
        op = rng.random()
        try:
            if op < 0.65:
                value = r.load(s)
                assert_bitexact(value, expected.setdefault(s, state_for(s)))
                stats["load"] += 1
            elif op < 0.8:
                report = r.verify(s)
                if not report.ok:
                    errors.append(f"verify({s}): {[str(p) for p in report.problems]}")
                stats["verify step"] += 1
            elif op < 0.97:
                with deltackpt.open(root, "r", workers=1) as fresh:
                    value = fresh.load(s, select="model")
                assert_bitexact(value, {"model": expected.setdefault(s, state_for(s))["model"]})
                stats["fresh reader"] += 1
            else:
                report = r.verify()
                if not report.ok:
                    errors.append(f"verify(): {[str(p) for p in report.problems]}")
                stats["verify all"] += 1
        except StepNotFoundError:
            stats["deleted"] += 1
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure
            errors.append(f"step {s}: {type(exc).__name__}: {exc}")
        if len(expected) > 64:
            expected.clear()
    r.close()
    print(json.dumps({"stats": stats, "errors": errors[:20], "n_errors": len(errors)}),
          flush=True)


# --------------------------------------------------------------------------------- the test
def _read_until(p: subprocess.Popen[str], prefix: str) -> str:
    assert p.stdout is not None
    while True:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before {prefix!r}: "
                                 f"{p.stderr.read()[-3000:] if p.stderr else ''}")
        if line.startswith(prefix):
            return line


def _under_load(root: str, seconds: float, readers: int) -> dict[str, Any]:
    with deltackpt.open(root, "a", **POLICY) as w:
        for s in range(3):
            w.save(s, state_for(s))
    first = seconds * 0.55
    writer = _helper("_writer", root, 3, 10_000)
    procs = [_helper("_reader", root, seconds, 100 + i) for i in range(readers)]
    summary: dict[str, Any] = {"kills": 0}
    try:
        _read_until(writer, "ready")
        time.sleep(2.0)
        with pytest.raises(LockedError):                  # one writer at a time
            deltackpt.open(root, "a")
        time.sleep(max(0.0, first - 2.0))
        os.kill(writer.pid, signal.SIGKILL)               # mid-save, most likely
        out, _ = writer.communicate(timeout=60)
        summary["kills"] += 1
        saved = [int(x.split()[1]) for x in out.splitlines() if x.startswith("saved")]
        last = max(saved, default=2)
        time.sleep(0.5)
        # the lock died with the writer: a new one opens at once, recovers under the readers
        writer = _helper("_writer", root, last + 2, seconds - first - 1.0)
        _read_until(writer, "ready")
        out, err = writer.communicate(timeout=seconds + 120)
        assert writer.returncode == 0, err[-3000:]
        summary["saved"] = len(saved) + sum(x.startswith("saved") for x in out.splitlines())
        results = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in [writer, *procs]:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    stats: Counter[str] = Counter()
    for res in results:
        stats.update(res["stats"])
        assert res["n_errors"] == 0, res["errors"]
    summary["reads"] = dict(stats)
    with deltackpt.open(root, "a", **POLICY) as w:      # recovery, then gc: nothing left over
        w.gc(repack_below=0.0)
    for leftovers in ("txn", "tmp"):
        d = os.path.join(root, leftovers)
        assert not os.path.isdir(d) or not os.listdir(d), os.listdir(d)
    with deltackpt.open(root, "r") as r:
        for s in r.steps():
            assert_bitexact(r.load(s), state_for(s))
        assert r.verify().ok
    return summary


def test_readers_under_a_writer_that_deletes_and_dies(tmp_path):
    summary = _under_load(str(tmp_path / "repo"), seconds=16.0, readers=3)
    print(f"\nconcurrency: {summary}")
    reads = summary["reads"]
    assert reads.get("load", 0) >= 20 and summary["saved"] >= 10, summary


@pytest.mark.slow
def test_readers_under_a_writer_for_minutes(tmp_path):
    summary = _under_load(str(tmp_path / "repo"), seconds=180.0, readers=4)
    print(f"\nconcurrency (long): {summary}")
    assert summary["reads"].get("deleted", 0) > 0, summary


def test_same_step_deleted_and_saved_again_is_never_stale(tmp_path):
    """Delete and re-save one step number with a state of the same shapes (same manifest
    size), as fast as possible: a long-lived reader always gets the current state."""
    root = str(tmp_path / "repo")
    with deltackpt.open(root, "a", **POLICY) as w, deltackpt.open(root, "r") as r:
        w.save(0, state_for(0))
        for i in range(1, 60):
            assert_bitexact(r.load(0), state_for(i - 1))
            w.delete(0)
            with pytest.raises(StepNotFoundError):
                r.load(0)
            w.save(0, state_for(i))
            assert_bitexact(r.load(0), state_for(i))


# ------------------------------------------------------------------------------ flock + fork
def _forking_writer(root: str) -> None:
    """Open the writer, fork a child that just sleeps (a DataLoader worker), report both."""
    w = deltackpt.open(root, "a", **POLICY)
    w.save(0, state_for(0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):   # (do not hold the parent's pipes open)
            os.dup2(null, fd)
        time.sleep(60)
        os._exit(0)
    print(f"pids {os.getpid()} {pid}", flush=True)
    sys.stdin.readline()


def _forked_child_closes(root: str) -> None:
    """The child of a fork closes the inherited repository (as a worker's cleanup might);
    the parent must keep its lock."""
    w = deltackpt.open(root, "a", **POLICY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        w.close()
        os._exit(0)
    os.waitpid(pid, 0)
    print("child closed", flush=True)
    sys.stdin.readline()
    w.close()


def test_forked_child_does_not_keep_the_lock(tmp_path):
    root = str(tmp_path / "repo")
    p = _helper("_forking_writer", root)
    child = None
    try:
        line = _read_until(p, "pids")
        child = int(line.split()[2])
        with pytest.raises(LockedError):
            deltackpt.open(root, "a")
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        os.kill(child, 0)                        # the forked child is still alive ...
        with deltackpt.open(root, "a", **POLICY) as w:   # ... and the lock is free
            w.save(1, state_for(1))
    finally:
        if p.poll() is None:
            p.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_forked_child_closing_keeps_the_parents_lock(tmp_path):
    root = str(tmp_path / "repo")
    p = _helper("_forked_child_closes", root)
    try:
        _read_until(p, "child closed")
        with pytest.raises(LockedError):
            deltackpt.open(root, "a")
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        p.communicate(timeout=60)
        with deltackpt.open(root, "a", **POLICY):
            pass
    finally:
        if p.poll() is None:
            p.kill()
