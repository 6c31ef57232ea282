"""Retention, delete, garbage collection, repack, diff and usage.

* A hypothesis state machine runs random sequences of saves (exact and lossy, tensors changing
  fully, sparsely or not at all, retyped, reshaped, added and removed), deletes of any steps
  (the latest included), gc with random retention policies and repack thresholds, dry runs,
  reopens and loads; after every rule the repository holds exactly the steps a model of it
  says, each loads as it did right after its save, and ``verify()`` is clean.
* Crash injection: delete / gc / repack run in a child process that dies (``os._exit``) before
  its k-th durable operation, for k = 1, 2, ... until one run completes; after every kill the
  kept steps still load bit-exactly (before and after recovery), ``verify()`` is clean, and
  running the operation again finishes the job.
* Dry runs change nothing; ``usage``/``du`` and ``diff`` report what they should; retention on
  open; readers of deleted steps get ``StepNotFoundError``; the CLI commands.

Crash children: a single helper process (``python -c "import test_gc; ..."``, so torch is
imported once) forks one child per kill point; parent and children share this module. The sweep
over kill points records and prints what a kill exposed (a to-be-deleted step left unloadable,
a rerun of the same delete refused, chunks duplicated by an interrupted repack: each once a bug,
each now pinned by a targeted test that passes). Kills and the
state machine run with ``os.fsync`` a no-op: a killed process loses nothing the kernel has, and
fsync is most of their time.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, timedelta
from typing import Any

import numpy as np
import pytest
import torch
from _durable import KILLED, check_each_kill, hook_durable_ops, run_forked
from _util import assert_bitexact
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import deltackpt
from deltackpt.cli.main import main as cli_main
from deltackpt.engine.policy import Rule
from deltackpt.engine.retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepNewerThan,
    KeepSteps,
    Retention,
    StepView,
    plan,
)
from deltackpt.errors import DeltaCkptError, LockedError, StepNotFoundError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LOSSY_RULE = Rule("*", {"id": "quant", "bits": 8})


# ================================================================================== helpers
def _listing(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (ns)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st_ = os.stat(p)
            out[os.path.relpath(p, root)] = (st_.st_size, st_.st_mtime_ns)
    return out


def _files(root: str, top: str) -> list[str]:
    return sorted(_listing(os.path.join(root, top)))


def _disk(root: str) -> int:
    """Bytes of the repository's files, less the lock file (its content names the pid)."""
    return sum(size for name, (size, _) in _listing(root).items() if name != "lock")


def _data_disk(root: str) -> int:
    """:func:`_disk` less the manifests: a version-2 manifest is zstd-compressed, so its size
    varies by a few bytes with the random txn and pack ids it names."""
    return _disk(root) - sum(size for name, (size, _) in _listing(root).items()
                             if name.startswith("steps"))


def _pack_ids(root: str) -> tuple[set[str], set[str]]:
    packs = {os.path.basename(f)[:-5] for f in _files(root, "packs")}
    idx = {os.path.basename(f)[:-4] for f in _files(root, "index")}
    return packs, idx


def _clone(value: Any) -> Any:
    """A deep copy of a state whose tensors share nothing with the original."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _oracle_keep(policy: Retention, steps: list[int], meta: dict[int, dict[str, Any]]) -> set[int]:
    """What a retention policy keeps, written from its documentation (not from its code)."""
    if isinstance(policy, AnyOf):
        return set().union(*(_oracle_keep(p, steps, meta) for p in policy.policies))
    if isinstance(policy, KeepLast):
        return set(steps[max(0, len(steps) - policy.n):]) if policy.n > 0 else set()
    if isinstance(policy, KeepEvery):
        return {s for s in steps if s % policy.m == 0}
    if isinstance(policy, KeepSteps):
        return set(steps) & set(policy.steps)
    if isinstance(policy, KeepBest):
        scored = []
        for s in steps:
            v = meta[s].get(policy.key)
            if type(v) in (int, float) and not math.isnan(v):
                scored.append((v, s))
        scored.sort(key=lambda x: x[0], reverse=policy.mode == "max")  # values are unique
        return {s for _, s in scored[:policy.n]}
    if isinstance(policy, KeepNewerThan):  # only ages of +-1 day are used: all or nothing
        return set(steps) if policy.age > timedelta(0) else set()
    raise AssertionError(f"unknown policy {policy!r}")


def _oracle_plan(policy: Retention, steps: list[int], meta: dict[int, dict[str, Any]]
                 ) -> tuple[set[int], set[int]]:
    steps = sorted(steps)
    keep = _oracle_keep(policy, steps, meta)
    if steps:
        keep.add(steps[-1])  # the latest step is always kept
    return keep & set(steps), set(steps) - keep


# ======================================================================= the state machine
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.uint8]
MUTATIONS = ["same", "same", "sparse", "sparse", "sparse", "full", "retype", "reshape"]


def _rand(rng: np.random.Generator, dtype: torch.dtype, n: int) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.from_numpy(rng.standard_normal(n).astype(np.float64)).to(dtype)
    return torch.from_numpy(rng.integers(0, 200, n)).to(dtype)


def _mutate(t: torch.Tensor, how: str, rng: np.random.Generator) -> torch.Tensor:
    n = t.numel()
    if how == "same":
        return t
    if how == "sparse":
        t = t.clone()
        idx = torch.from_numpy(rng.choice(n, max(1, n // 50), replace=False))
        t.view(-1)[idx] = _rand(rng, t.dtype, len(idx))
        return t
    if how == "full":
        if t.dtype.is_floating_point:  # small steps everywhere, like training
            return (t.double() + 1e-3 * _rand(rng, torch.float64, n).view(t.shape)).to(t.dtype)
        return _rand(rng, t.dtype, n).view(t.shape)
    if how == "retype":
        choices = [d for d in DTYPES if d != t.dtype]
        return t.to(choices[int(rng.integers(len(choices)))])
    if how == "reshape":
        m = int(rng.integers(1, 700))
        return _rand(rng, t.dtype, m)
    raise AssertionError(how)


def policies() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        # hypothesis leans towards the first choice: a policy that makes delta chains
        "keyframe_every": st.sampled_from([4, 3, 6, 2, 1]),
        "max_chain": st.sampled_from([0, 2, 1]),
        "reference": st.sampled_from(["previous", "keyframe"]),
        "codec": st.sampled_from(["diff", "xor"]),
        "chunk_bytes": st.sampled_from([256, 512, 1024]),
        "max_pack_bytes": st.sampled_from([1500, 1 << 20]),
        "workers": st.sampled_from([1, 2]),
        "cache_bytes": st.sampled_from([0, 1 << 20]),
        "rules": st.sampled_from([(), (LOSSY_RULE,)]),
        "exact_every": st.integers(0, 3),
    })


_BASE_POLICIES = st.one_of(
    st.builds(KeepLast, st.integers(0, 4)),
    st.builds(KeepEvery, st.integers(1, 5)),
    st.builds(KeepSteps, st.sets(st.integers(0, 40), max_size=4)),
    st.builds(KeepBest, st.just("loss"), st.integers(1, 2), st.sampled_from(["min", "max"])),
    st.sampled_from([KeepNewerThan(timedelta(days=1)), KeepNewerThan(timedelta(days=-1))]),
)
RETENTIONS = st.lists(_BASE_POLICIES, min_size=1, max_size=3).map(
    lambda ps: functools.reduce(operator.or_, ps))


class GCMachine(RuleBasedStateMachine):
    """Model: ``self.kept`` maps each committed step to what loading it must return."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="dckpt-gc-")
        self.path = os.path.join(self.dir, "repo")
        self.repo: deltackpt.Repository | None = None
        self.kept: dict[int, Any] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.deleted: set[int] = set()
        self.tensors: dict[str, torch.Tensor] = {}
        self.next_step = 0
        self.retention: Retention | None = None
        self.policy: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _open(self) -> None:
        self.repo = deltackpt.open(self.path, "a", retention=self.retention,
                                   auto_gc=self.retention is not None, **self.policy)

    @initialize(policy=policies(), seed=st.integers(0, 2**32 - 1),
                retention=st.one_of(st.none(), st.none(), RETENTIONS))
    def start(self, policy: dict[str, Any], seed: int, retention: Retention | None) -> None:
        self.policy, self.retention = policy, retention
        rng = np.random.default_rng(seed)
        self.tensors = {"a": _rand(rng, torch.float32, 600).view(20, 30),
                        "b": _rand(rng, torch.bfloat16, 300),
                        "c": _rand(rng, torch.int64, 100)}
        self._open()

    def teardown(self) -> None:
        if self.repo is not None:
            self.repo.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- saving --------------------------------------------------------------------------------
    def _apply_retention_after_save(self) -> None:
        if self.retention is None:
            return
        _, doomed = _oracle_plan(self.retention, list(self.kept), self.meta)
        for s in doomed:
            self._forget(s)

    def _forget(self, s: int) -> None:
        del self.kept[s]
        del self.meta[s]
        self.deleted.add(s)

    def _save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        assert self.repo is not None
        expected = _clone(state)
        info = self.repo.save(step, state, meta=meta)
        self._count("save exact" if info.exact else "save lossy")
        self.meta[step] = meta
        self.kept[step] = None
        self._apply_retention_after_save()  # the repository applied it inside save()
        if step not in self.kept:
            self._count("saved step removed by retention at once")
            return
        if info.exact:
            self.kept[step] = expected
            assert_bitexact(self.repo.load(step), expected)
        else:  # what the decoder gives now is what this step must give for ever after
            self.kept[step] = self.repo.load(step)

    def _meta(self, step: int, kind: str, loss: int) -> dict[str, Any]:
        value = {"none": None, "nan": float("nan"), "bool": True,
                 "num": loss + step / 1024}[kind]  # step/1024: no ties between steps
        return {} if value is None else {"loss": value, "step": step}

    @rule(seed=st.integers(0, 2**32 - 1),
          how=st.lists(st.sampled_from(MUTATIONS), min_size=6, max_size=6),
          add=st.booleans(), remove=st.booleans(), gap=st.integers(1, 3),
          meta_kind=st.sampled_from(["num", "num", "none", "nan", "bool"]),
          loss=st.integers(0, 50))
    def save(self, seed: int, how: list[str], add: bool, remove: bool, gap: int,
             meta_kind: str, loss: int) -> None:
        rng = np.random.default_rng(seed)
        names = sorted(self.tensors)
        for i, name in enumerate(names):
            self.tensors[name] = _mutate(self.tensors[name], how[i % len(how)], rng)
        if add and len(self.tensors) < 6:
            name = f"t{self.next_step}"
            self.tensors[name] = _rand(rng, DTYPES[int(rng.integers(len(DTYPES)))],
                                       int(rng.integers(1, 500)))
        if remove and len(self.tensors) > 1:
            del self.tensors[names[int(rng.integers(len(names)))]]
        step = self.next_step
        self.next_step += gap
        state = {"model": dict(self.tensors), "step": step, "lr": 1.0 / (step + 1)}
        self._save(step, state, self._meta(step, meta_kind, loss))

    # saves are the common operation: two more rules with the same body weight them up
    save_again = save
    save_once_more = save

    @precondition(lambda self: any(s < max(self.kept, default=-1) for s in self.deleted))
    @rule(data=st.data())
    def resave_deleted_step(self, data: st.DataObject) -> None:
        """Reuse the number of a deleted step below the latest (a new, different state)."""
        latest = max(self.kept)
        step = data.draw(st.sampled_from(sorted(s for s in self.deleted if s < latest)))
        self.deleted.discard(step)
        state = {"model": {"z": torch.full((50,), float(step)), **self.tensors},
                 "step": step, "resaved": True}
        self._save(step, state, {"loss": 100 + step / 1024})
        self._count("resave")

    # -- deleting ------------------------------------------------------------------------------
    @precondition(lambda self: bool(self.kept))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        assert self.repo is not None
        steps = sorted(self.kept)
        doomed = data.draw(st.lists(st.sampled_from(steps), min_size=1, max_size=3, unique=True))
        report = self.repo.delete(*doomed)
        assert sorted(report.deleted_steps) == sorted(doomed)
        for s in doomed:
            self._forget(s)
        self._count("delete")
        if report.rebased_steps:
            self._count("rebase")
        if max(steps) in doomed:
            self._count("delete latest")

    delete_again = delete   # (weights: hypothesis enables a random subset of rules per run)

    @rule(step=st.integers(0, 200))
    def delete_unknown(self, step: int) -> None:
        """Deleting an absent step is a no-op that says so (it may be the rerun of a delete
        that crashed), never an error and never a change to another step."""
        assert self.repo is not None
        if step in self.kept:
            return
        before = {k: v for k, v in _listing(self.path).items() if k.startswith("steps")}
        report = self.repo.delete(step)
        assert report.absent_steps == [step] and report.deleted_steps == []
        assert report.rebased_steps == []
        assert {k: v for k, v in _listing(self.path).items() if k.startswith("steps")} == before

    @rule(retention=st.one_of(st.none(), RETENTIONS),
          repack_below=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
    def gc(self, retention: Retention | None, repack_below: float) -> None:
        assert self.repo is not None
        policy = retention or self.retention
        report = self.repo.gc(retention, repack_below=repack_below)
        doomed: set[int] = set()
        if policy is not None:
            _, doomed = _oracle_plan(policy, list(self.kept), self.meta)
        assert sorted(report.deleted_steps) == sorted(doomed), (policy, report)
        for s in doomed:
            self._forget(s)
        self._count("gc")
        if report.repacked_packs:
            self._count("repack")
        if report.rebased_steps:
            self._count("rebase")

    gc_again = gc

    @rule(retention=RETENTIONS, repack_below=st.sampled_from([0.5, 1.0]))
    def gc_dry_run(self, retention: Retention, repack_below: float) -> None:
        assert self.repo is not None
        before = _listing(self.path)
        report = self.repo.gc(retention, dry_run=True, repack_below=repack_below)
        assert _listing(self.path) == before
        _, doomed = _oracle_plan(retention, list(self.kept), self.meta)
        assert report.dry_run and sorted(report.deleted_steps) == sorted(doomed)

    # -- reopening and reading -----------------------------------------------------------------
    @rule(new_policy=st.one_of(st.none(), st.none(), policies()))
    def reopen(self, new_policy: dict[str, Any] | None) -> None:
        assert self.repo is not None
        self.repo.close()
        if new_policy is not None:
            self.policy = new_policy
        self._open()
        self._count("reopen")

    @precondition(lambda self: bool(self.kept))
    @rule(data=st.data(), fresh_reader=st.booleans())
    def load(self, data: st.DataObject, fresh_reader: bool) -> None:
        assert self.repo is not None
        s = data.draw(st.sampled_from(sorted(self.kept)))
        if fresh_reader:
            with deltackpt.open(self.path, "r") as r:
                assert_bitexact(r.load(s), self.kept[s])
        else:
            assert_bitexact(self.repo.load(s), self.kept[s])

    @precondition(lambda self: len(self.kept) >= 2)
    @rule(data=st.data())
    def diff(self, data: st.DataObject) -> None:
        assert self.repo is not None
        a, b = data.draw(st.lists(st.sampled_from(sorted(self.kept)), min_size=2, max_size=2,
                                  unique=True))
        ta, tb = self.kept[a]["model"], self.kept[b]["model"]
        for d in self.repo.diff(a, b):
            name = d.path.removeprefix("model/")
            if d.path.startswith("model/") and name in ta and name in tb \
                    and ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape:
                x = ta[name].reshape(-1).view(torch.uint8).reshape(ta[name].numel(), -1)
                y = tb[name].reshape(-1).view(torch.uint8).reshape(tb[name].numel(), -1)
                n_changed = int((x != y).any(dim=1).sum())
                assert d.status == ("unchanged" if n_changed == 0 else "changed"), d
                assert d.changed_fraction == n_changed / max(1, ta[name].numel()), d
            elif d.path.startswith("model/") and name in ta and name in tb:
                assert d.status == "retyped", d
            elif d.path.startswith("model/") and name in tb:
                assert d.status == "added", d
            elif d.path.startswith("model/") and name in ta:
                assert d.status == "removed", d

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def steps_match_model(self) -> None:
        if self.repo is None:
            return
        assert self.repo.steps() == sorted(self.kept)

    @invariant()
    def every_kept_step_loads_as_saved(self) -> None:
        if self.repo is None:
            return
        for s, expected in self.kept.items():
            assert_bitexact(self.repo.load(s), expected)
        for s in self.deleted - set(self.kept):
            assert s not in self.repo
            with pytest.raises(StepNotFoundError):
                self.repo.load(s)

    @invariant()
    def verifies(self) -> None:
        if self.repo is None:
            return
        report = self.repo.verify()
        assert report.ok, report.problems
        assert sorted(report.steps) == sorted(self.kept)


GC_STATS: dict[str, int] = {}


def _run_machine(max_examples: int, steps: int) -> None:
    class Counting(GCMachine):
        def teardown(self) -> None:
            for k, v in self.counts.items():
                GC_STATS[k] = GC_STATS.get(k, 0) + v
            super().teardown()

    # fsync orders writes against power loss, which these runs do not exercise; it is most
    # of their time
    real_fsync, os.fsync = os.fsync, _no_fsync
    try:
        _run(Counting, max_examples, steps)
    finally:
        os.fsync = real_fsync


def _run(machine: type, max_examples: int, steps: int) -> None:
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much]))


def test_state_machine():
    GC_STATS.clear()
    _run_machine(max_examples=40, steps=40)
    print(f"state machine rule counts: {dict(sorted(GC_STATS.items()))}")
    assert GC_STATS.get("delete", 0) and GC_STATS.get("gc", 0) and GC_STATS.get("save exact")


@pytest.mark.slow
def test_state_machine_heavy():
    GC_STATS.clear()
    _run_machine(max_examples=150, steps=50)
    print(f"state machine rule counts: {dict(sorted(GC_STATS.items()))}")
    for kind in ("delete", "delete latest", "gc", "repack", "rebase", "save lossy", "reopen",
                 "resave"):
        assert GC_STATS.get(kind, 0) > 0, (kind, GC_STATS)


# ========================================================================= crash injection
CRASH_POLICY: dict[str, Any] = {"chunk_bytes": 1024, "max_pack_bytes": 3000,
                                "keyframe_every": 4, "workers": 1, "exact_every": 0,
                                "rules": (Rule("model/q", {"id": "quant", "bits": 8}),)}
CRASH_STEPS = list(range(10))   # keyframes 0, 4, 8; deltas between; "model/q" lossy in deltas


def crash_state(step: int) -> dict[str, Any]:
    """Deterministic training-like state: ``w`` changes sparsely, ``q`` a little everywhere
    (stored lossily at delta steps), ``e`` never (shared chunks)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(2048, generator=g)
    q = torch.randn(512, generator=g)
    e = torch.randn(1024, generator=g).to(torch.bfloat16)
    for s in range(1, step + 1):
        rng = np.random.default_rng(s)
        idx = torch.from_numpy(rng.choice(2048, 24, replace=False))
        w[idx] += torch.from_numpy(rng.standard_normal(24).astype(np.float32))
        q += torch.from_numpy(rng.standard_normal(512).astype(np.float32)) * 1e-2
    return {"model": {"w": w, "q": q, "e": e}, "step": torch.tensor(step), "n": step}


def _op_delete_keyframe(repo: deltackpt.Repository) -> Any:
    return repo.delete(4)                  # 5, 6, 7 replay deltas through keyframe 4


def _op_delete_several(repo: deltackpt.Repository) -> Any:
    return repo.delete(1, 2, 9)            # two deltas with dependents, and the latest step


def _op_gc_retention(repo: deltackpt.Repository) -> Any:
    return repo.gc(KeepLast(2) | KeepEvery(3), repack_below=0.9)


def _op_gc_repack(repo: deltackpt.Repository) -> Any:
    return repo.gc(repack_below=0.9)       # base had steps deleted without repacking


CRASH_OPS: dict[str, tuple[Any, set[int]]] = {   # op, steps it deletes
    "delete_keyframe": (_op_delete_keyframe, {4}),
    "delete_several": (_op_delete_several, {1, 2, 9}),
    "gc_retention": (_op_gc_retention, {1, 2, 4, 5, 7}),
    "gc_repack": (_op_gc_repack, set()),
}


def _crash_child(path: str, op: str, die: Any, note: str, work: str) -> None:
    repo = deltackpt.open(path, "a", **CRASH_POLICY)
    log: list[str] = []
    hook_durable_ops(os.path.abspath(path), log, die, note)
    CRASH_OPS[op][0](repo)
    repo.close()
    with open(os.path.join(work, "ops.json"), "w") as f:
        json.dump(log, f)


def _no_fsync(fd: int) -> None:
    """Killing a process loses nothing the kernel already has: fsync only slows these tests
    down (the ordering it provides against power loss is not what they exercise)."""


def _crash_server(base: str, work: str, op: str, spec_json: str) -> None:
    """Runs in a helper process. ``spec`` ``{"k": [first, last]}``: for k = first, ...: copy
    ``base``, fork a child that runs ``op`` on the copy and dies before its k-th durable
    operation; stop at the first k the operation completes without reaching. ``{"label":
    prefix, "nth": n}``: one child, dying before the n-th operation whose label starts with
    ``prefix``. Prints one JSON line per child."""
    spec = json.loads(spec_json)
    os.fsync = _no_fsync
    if "k" in spec:
        runs = [(f"k{k:04d}", functools.partial(lambda k, log: len(log) == k, k))
                for k in range(spec["k"][0], spec["k"][1] + 1)]
    else:
        def die(log: list[str]) -> bool:
            return log[-1].startswith(spec["label"]) and \
                sum(x.startswith(spec["label"]) for x in log) == spec["nth"]
        runs = [("label", die)]
    for name, die_fn in runs:
        dst = os.path.join(work, name)
        shutil.copytree(base, dst)
        op_file = os.path.join(work, f"{name}.op")
        code = run_forked(lambda: _crash_child(dst, op, die_fn, op_file, work))  # noqa: B023 - runs at once
        print(json.dumps({"name": name, "code": code}), flush=True)
        if code != KILLED:
            return


def _start_crash_server(base: str, work: str, op: str, spec: dict[str, Any]
                        ) -> subprocess.Popen[str]:
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_gc; "
            f"test_gc._crash_server(*sys.argv[1:5])")
    return subprocess.Popen([sys.executable, "-c", code, base, work, op, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _crash_once(base: str, work: str, op: str, label: str, nth: int = 1) -> tuple[str, str]:
    """Run ``op`` on a copy of ``base`` in a child killed before the ``nth`` durable operation
    labelled ``label...``; returns (the copy, the operation it died before)."""
    os.makedirs(work, exist_ok=True)
    server = _start_crash_server(base, work, op, {"label": label, "nth": nth})
    out, err = server.communicate(timeout=300)
    assert server.returncode == 0 and json.loads(out.splitlines()[-1])["code"] == KILLED, \
        (out, err[-3000:])
    with open(os.path.join(work, "label.op")) as f:
        return os.path.join(work, "label"), f.read()


@pytest.fixture(scope="module")
def crash_bases(tmp_path_factory) -> dict[str, tuple[str, dict[int, Any]]]:
    """Per operation: a repository to run it on, and what each of its steps loads."""
    root = tmp_path_factory.mktemp("gc-crash")
    base = str(root / "base")
    with deltackpt.open(base, "a", **CRASH_POLICY) as repo:
        for s in CRASH_STEPS:
            info = repo.save(s, crash_state(s))
            assert info.exact == (s % 4 == 0), (s, info)
        kinds = [repo.manifest(s).kind for s in CRASH_STEPS]
        assert kinds == ["keyframe", "delta", "delta", "delta"] * 2 + ["keyframe", "delta"]
        assert len(repo.manifest(0).packs) > 1          # saves span several packs
    bases = {}
    for op in CRASH_OPS:
        path = str(root / op)
        shutil.copytree(base, path)
        if op == "gc_repack":  # leave dead bytes in packs that still hold live chunks
            with deltackpt.open(path, "a", **CRASH_POLICY) as repo:
                repo.delete(2, 5)
        with deltackpt.open(path, "r") as repo:
            expected = {s: repo.load(s) for s in repo.steps()}
        for s, value in expected.items():
            if s % 4 == 0:
                assert_bitexact(value, crash_state(s))
        bases[op] = (path, expected)
    return bases


def _check_state(path: str, expected: dict[int, Any], kept: set[int]) -> tuple[list[int],
                                                                             list[int]]:
    """Every kept step is there and loads bit-exactly, every other step there loads
    bit-exactly too or is reported ``broken``; verify() finds nothing else. Returns (steps,
    broken)."""
    broken = []
    with deltackpt.open(path, "r", workers=1) as r:
        steps = r.steps()
        assert kept <= set(steps) <= set(expected), (steps, sorted(kept))
        for s in steps:
            try:
                value = r.load(s)
            except DeltaCkptError:
                if s in kept:
                    raise
                broken.append(s)
                continue
            assert_bitexact(value, expected[s])
        report = r.verify()
        assert all(p.step in broken for p in report.problems), report.problems
        assert bool(report.problems) == bool(broken), (broken, report.problems)
    return steps, broken


SAME_DELETE_REFUSED: dict[str, list[int]] = {}
BROKEN_AFTER_KILL: dict[str, dict[int, list[int]]] = {}
DUPLICATES_AFTER_KILL: dict[str, dict[int, int]] = {}


def _finish(path: str, op: str, doomed: set[int], k: int) -> None:
    """Run the operation again after a crash."""
    with deltackpt.open(path, "a", **CRASH_POLICY) as w:
        if op.startswith("delete"):
            left = sorted(s for s in doomed if s in w)
            try:
                CRASH_OPS[op][0](w)
            except StepNotFoundError:  # some were deleted before the crash: finish the rest
                SAME_DELETE_REFUSED.setdefault(op, []).append(k)
                w.delete(*left)
        else:
            CRASH_OPS[op][0](w)


def _check_killed(path: str, op: str, k: int, expected: dict[int, Any], kept: set[int],
                  before: int) -> int:
    doomed = CRASH_OPS[op][1]
    _, broken = _check_state(path, expected, kept)               # a reader, before recovery
    with deltackpt.open(path, "a", **CRASH_POLICY):             # recovery
        pass
    assert _files(path, "txn") == [] and _files(path, "tmp") == []
    _, broken_after = _check_state(path, expected, kept)
    if broken or broken_after:
        BROKEN_AFTER_KILL.setdefault(op, {})[k] = sorted(set(broken) | set(broken_after))
    _finish(path, op, doomed, k)
    steps, broken = _check_state(path, expected, kept)
    assert steps == sorted(kept) and not broken
    packs, idx = _pack_ids(path)
    assert packs == idx, "packs without an index, or indexes without a pack"
    final = _disk(path)
    dups = _duplicated_chunks(path)
    if dups:  # the known repack leak (test_crash_in_repack_leaves_no_duplicate_chunks)
        DUPLICATES_AFTER_KILL.setdefault(op, {})[k] = len(dups)
    else:
        assert final < before, (final, before)
    return _data_disk(path)


def _duplicated_chunks(path: str) -> dict[bytes, list[str]]:
    """Chunk ids listed by more than one index file."""
    from deltackpt.store.packs import decode_index

    where: dict[bytes, list[str]] = {}
    for f in _files(path, "index"):
        with open(os.path.join(path, "index", f), "rb") as fh:
            pid, entries = decode_index(fh.read())
        for cid, *_ in entries:
            where.setdefault(cid, []).append(pid)
    return {c: p for c, p in where.items() if len(p) > 1}


@pytest.mark.parametrize("op", list(CRASH_OPS))
def test_crash_at_every_durable_operation(crash_bases, tmp_path, monkeypatch, op):
    monkeypatch.setattr(os, "fsync", _no_fsync)
    base, expected = crash_bases[op]
    kept = set(expected) - CRASH_OPS[op][1]
    before = _disk(base)
    work = str(tmp_path / "work")
    os.makedirs(work)
    server = _start_crash_server(base, work, op, {"k": [1, 400]})
    finals: dict[int, int] = {}

    def check(path: str, k: int, point: str) -> None:
        finals[k] = _check_killed(path, op, k, expected, kept, before)

    completed = check_each_kill(server, work, op, check)
    n_points = completed - 1
    with open(os.path.join(work, "ops.json")) as f:
        ops = json.load(f)
    assert len(ops) == n_points == len(finals)
    clean = os.path.join(work, f"k{completed:04d}")
    assert _check_state(clean, expected, kept) == (sorted(kept), [])
    assert _disk(clean) < before, (_disk(clean), before)
    clean_disk = _data_disk(clean)
    assert any(o.startswith("write txn/") for o in ops)
    if CRASH_OPS[op][1]:
        assert any(o.startswith("delete steps/") for o in ops)
    if op in ("gc_retention", "gc_repack"):
        assert any(o.startswith("write packs/") for o in ops)   # a repack ran
    over_clean = {k: (ops[k - 1], v - clean_disk) for k, v in finals.items() if v > clean_disk}
    # finishing after a kill frees as much as a clean run (packs and indexes to the byte), except
    # where the known repack leak left duplicated chunks
    assert set(over_clean) <= set(DUPLICATES_AFTER_KILL.get(op, {})), over_clean
    print(f"\n{op}: {n_points} durable operations, killed before each of them in turn "
          f"(+1 complete run); disk {before} -> {clean_disk} bytes. Known bugs seen: killed "
          f"states with a broken to-be-deleted step {BROKEN_AFTER_KILL.get(op, {})}; same "
          f"delete refused on rerun after kills {SAME_DELETE_REFUSED.get(op, [])}; duplicated "
          f"chunks left after kills {DUPLICATES_AFTER_KILL.get(op, {})} (bytes over a clean "
          f"run: {over_clean})")
    assert n_points >= 7, f"{op}: only {n_points} durable operations"


# ---------------------------------------------------------- known bugs found by crash runs
def test_crash_between_manifest_removals_leaves_every_step_loadable(crash_bases, tmp_path):
    base, expected = crash_bases["delete_several"]           # delete(1, 2, 9)
    path, point = _crash_once(base, str(tmp_path / "w"), "delete_several", "delete steps/", 2)
    assert point == "delete steps/00000000000000000002.json"  # removals go latest first
    with deltackpt.open(path, "r") as r:
        assert r.steps() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
        assert r.verify().ok
        for s in r.steps():
            assert_bitexact(r.load(s), expected[s])


def test_rerunning_the_same_delete_after_a_crash_finishes_it(crash_bases, tmp_path):
    """After a crash past the removal of the doomed manifest, rerunning the same delete
    finishes the sweep instead of refusing the step that is already gone."""
    base, _ = crash_bases["delete_keyframe"]                 # delete(4)
    path, _ = _crash_once(base, str(tmp_path / "w"), "delete_keyframe", "delete packs/")
    with deltackpt.open(path, "a", **CRASH_POLICY) as w:
        assert 4 not in w
        report = w.delete(4)
    assert report.absent_steps == [4] and report.deleted_packs > 0


def test_crash_in_repack_leaves_no_duplicate_chunks(crash_bases, tmp_path):
    """Fixed: a repack killed after its new index was written and before the old index was
    deleted is finished by recovery (the journal names the pack it replaces), so no live chunk
    stays in two packs."""
    base, _ = crash_bases["gc_repack"]
    clean = str(tmp_path / "clean")
    shutil.copytree(base, clean)
    with deltackpt.open(clean, "a", **CRASH_POLICY) as w:
        _op_gc_repack(w)
    path, point = _crash_once(base, str(tmp_path / "w"), "gc_repack", "delete index/")
    assert point.startswith("delete index/")
    for _ in range(3):
        with deltackpt.open(path, "a", **CRASH_POLICY) as w:
            w.gc(repack_below=0.9)
    assert _duplicated_chunks(path) == {}
    assert _disk(path) <= _disk(clean)


# ================================================================ dry run, usage, diff, du
def _small_state(step: int, n: int = 3000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, generator=g)
    frozen = torch.randn(1000, generator=g)
    for s in range(1, step + 1):
        w[(s * 37) % n] += 1.0
    return {"model": {"w": w, "frozen": frozen}, "step": step}


def _build_small(path: str, steps: range | list[int], **policy: Any) -> None:
    with deltackpt.open(path, "a", **{"chunk_bytes": 1024, **policy}) as repo:
        for s in steps:
            repo.save(s, _small_state(s), meta={"val_loss": 10.0 - s})


def test_dry_run_changes_nothing_and_predicts_the_real_run(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(12), keyframe_every=5)
    policy = KeepLast(3) | KeepEvery(4)
    with deltackpt.open(path, "a") as repo:
        before = _listing(path)
        time.sleep(0.01)  # an mtime change would show
        dry = repo.gc(policy, dry_run=True, repack_below=0.9)
        assert _listing(path) == before
        assert dry.dry_run and dry.deleted_steps == [1, 2, 3, 5, 6, 7]
        assert dry.rebased_steps and dry.freed_bytes > 0
        real = repo.gc(policy, repack_below=0.9)
        assert real.deleted_steps == dry.deleted_steps
        assert real.rebased_steps == dry.rebased_steps
        assert repo.steps() == [0, 4, 8, 9, 10, 11]
    with deltackpt.open(path, "r") as r:   # a dry run on a read-only repository works too
        before = _listing(path)
        again = r.gc(KeepLast(1), dry_run=True)
        assert again.deleted_steps == [0, 4, 8, 9, 10] and _listing(path) == before
        for s in r.steps():
            assert_bitexact(r.load(s), _small_state(s))
        assert r.verify().ok


def test_cli_gc_dry_run_changes_nothing(tmp_path, capsys):
    path = str(tmp_path / "r")
    _build_small(path, range(6))
    before = {k: v for k, v in _listing(path).items() if k != "lock"}
    assert cli_main(["gc", path, "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would delete steps [0, 1, 2, 3]"), out
    assert "would free" in out
    # the CLI opens the repository as a writer, which rewrites the lock file's owner line
    assert {k: v for k, v in _listing(path).items() if k != "lock"} == before
    with deltackpt.open(path, "r") as r:
        assert r.steps() == list(range(6))


def test_cli_gc_dry_run_works_while_a_writer_holds_the_lock(tmp_path, capsys):
    path = str(tmp_path / "r")
    _build_small(path, range(6))
    with deltackpt.open(path, "a"):
        code = cli_main(["gc", path, "--keep-last", "2", "--dry-run"])
        if code != 0:  # the CLI turns the error into exit status 1 and a message
            err = capsys.readouterr().err
            if "locked" in err:
                raise LockedError(err)
        assert code == 0


def test_repack_below_one_rewrites_only_packs_with_garbage(tmp_path):
    """Fixed: the pack header and trailer count as live (every pack has them), so
    gc(repack_below=1.0) leaves packs without garbage alone."""
    path = str(tmp_path / "r")
    _build_small(path, range(6), keyframe_every=3)
    with deltackpt.open(path, "a") as repo:
        repo.gc(repack_below=1.0)
        packs = _pack_ids(path)[0]
        report = repo.gc(repack_below=1.0)   # nothing is garbage now
        assert report.repacked_packs == 0 and report.freed_bytes == 0
        assert _pack_ids(path)[0] == packs


def test_usage_unique_bytes_are_what_deleting_frees(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(8), keyframe_every=4)
    with deltackpt.open(path, "a") as repo:
        rows = {u.step: u for u in repo.usage()}
        last = rows[7]
        assert last.dependents == 0 and last.unique_bytes > 0
        m = repo.manifest(7)
        manifest_size = os.path.getsize(os.path.join(path, "steps", f"{7:020d}.json"))
        index_sizes = sum(os.path.getsize(os.path.join(path, "index", f"{p}.idx"))
                          for p in m.packs)
        before = _disk(path)
        report = repo.delete(7)
        repo.gc(repack_below=1.0)
        freed = before - _disk(path)
        # what deleting frees is the step's unique chunk bytes plus its own files' framing:
        # its manifest, its index files, pack header/trailer and 24-byte entry headers
        others = {c.id for s in repo.steps() if s != 7
                  for t in repo.manifest(s).tensors for c in t.chunks}
        n_unique = len({c.id for t in m.tensors for c in t.chunks} - others)
        assert n_unique > 0
        overhead = manifest_size + index_sizes + len(m.packs) * 40 + 24 * n_unique
        assert last.unique_bytes <= freed <= last.unique_bytes + overhead, \
            (last, freed, overhead)
        assert report.freed_bytes <= freed


@pytest.mark.parametrize("reference,expected", [
    ("keyframe", [3, 0, 0, 0, 3, 0, 0, 0]),   # every delta is taken against its keyframe
    ("previous", [1, 1, 1, 0, 1, 1, 1, 0]),   # each changed chunk against the step before
])
def test_usage_dependents_and_shared_bytes(tmp_path, reference, expected):
    path = str(tmp_path / "r")
    with deltackpt.open(path, "a", chunk_bytes=1024, keyframe_every=4,
                        reference=reference) as repo:
        g = torch.Generator().manual_seed(0)
        w, fixed = torch.randn(256, generator=g), torch.randn(256, generator=g)
        for s in range(8):
            w = w + 1e-3 * torch.randn(256, generator=g)   # one chunk, changed every step
            repo.save(s, {"w": w, "fixed": fixed})
        rows = repo.usage()
        assert [u.step for u in rows] == list(range(8))
        assert [u.dependents for u in rows] == expected
        assert [u.kind for u in rows] == ["keyframe", "delta", "delta", "delta"] * 2
        for u in rows:
            assert u.unique_bytes > 0 and u.unique_bytes + u.shared_bytes > 0
        # "fixed" never changes: every step names the keyframe's chunk, so it is shared
        assert all(u.shared_bytes > 0 for u in rows)
        assert rows[4].depth == 1 and rows[3].depth == (2 if reference == "keyframe" else 4)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().reshape(-1)


def test_diff_sparse_change_is_exact_and_unchanged_tensors_read_nothing(tmp_path, monkeypatch):
    from deltackpt.engine.reconstruct import Reconstructor

    path = str(tmp_path / "r")
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(10_000, generator=g), "frozen": torch.randn(5000, generator=g),
         "h": torch.randn(300, generator=g).to(torch.bfloat16),
         "i": torch.arange(1000, dtype=torch.int64), "gone": torch.zeros(3)}
    b = {k: v.clone() for k, v in a.items() if k != "gone"}
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.choice(10_000, 137, replace=False))
    b["w"][idx] += torch.from_numpy(rng.standard_normal(137).astype(np.float32))
    b["h"][:30] = b["h"][:30] * 2
    b["i"][::100] += 1
    b["new"] = torch.ones(4)
    with deltackpt.open(path, "a", chunk_bytes=4096) as repo:
        repo.save(0, a)
        repo.save(1, b)
    calls: list[str] = []
    real = Reconstructor.chunk

    def counting(self, step, entry, i):  # type: ignore[no-untyped-def]
        calls.append(entry.path)
        return real(self, step, entry, i)

    monkeypatch.setattr(Reconstructor, "chunk", counting)
    with deltackpt.open(path, "r") as repo:
        rows = {d.path: d for d in repo.diff(0, 1)}
    assert set(rows) == {"w", "frozen", "h", "i", "gone", "new"}
    fr = rows["frozen"]
    assert fr.status == "unchanged" and fr.chunks_read == 0 and "frozen" not in calls
    assert fr.changed_fraction == 0.0 and fr.max_abs == 0.0
    assert rows["gone"].status == "removed" and rows["new"].status == "added"
    for name in ("w", "h"):
        d = rows[name]
        x, y = _np(a[name]), _np(b[name])
        delta = y - x
        assert d.status == "changed" and d.numel == x.size
        assert d.changed_fraction == np.count_nonzero(delta) / x.size
        assert d.max_abs == pytest.approx(np.abs(delta).max(), rel=1e-12)
        assert d.rms == pytest.approx(np.sqrt(np.mean(delta ** 2)), rel=1e-9)
        assert d.relative == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(x), rel=1e-9)
        assert d.chunks_read > 0
    assert rows["w"].changed_fraction == 137 / 10_000
    assert rows["i"].status == "changed" and rows["i"].changed_fraction == 10 / 1000
    assert rows["i"].max_abs is None and rows["i"].rms is None


def test_diff_across_chunk_layouts_and_after_rebase(tmp_path):
    path = str(tmp_path / "r")
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(5000, generator=g)
    w1 = w0.clone()
    w1[4000:4100] -= 0.5
    w2 = w1.clone()
    w2[17] = 3.0
    with deltackpt.open(path, "a", chunk_bytes=4096) as repo:
        repo.save(0, {"w": w0})
        repo.save(1, {"w": w1})
    with deltackpt.open(path, "a", chunk_bytes=1024) as repo:   # another chunk layout
        repo.save(2, {"w": w2})
        d = repo.diff(0, 2)[0]
        delta = _np(w2) - _np(w0)
        assert d.changed_fraction == 101 / 5000
        assert d.max_abs == pytest.approx(np.abs(delta).max(), rel=1e-12)
        assert d.relative == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(_np(w0)),
                                           rel=1e-9)
        repo.delete(1)   # step 2 is rebased
        assert repo.diff(0, 2)[0] == d
        with pytest.raises(StepNotFoundError):
            repo.diff(0, 1)


# ==================================================================== retention policies
def _views(steps: list[int], meta: dict[int, dict[str, Any]] | None = None,
           age_days: dict[int, float] | None = None) -> list[StepView]:
    from datetime import datetime

    now = datetime.now(UTC)
    return [StepView(s, now - timedelta(days=(age_days or {}).get(s, 0.0)),
                     (meta or {}).get(s, {})) for s in steps]


def test_plan_policies():
    steps = list(range(0, 35, 5))   # 0, 5, ..., 30
    assert plan(KeepLast(2), _views(steps)) == ([25, 30], [0, 5, 10, 15, 20])
    assert plan(KeepLast(99), _views(steps))[1] == []
    assert plan(KeepLast(0), _views(steps))[0] == [30]          # the latest is always kept
    assert plan(KeepEvery(10), _views(steps))[0] == [0, 10, 20, 30]
    assert plan(KeepSteps([5, 7]), _views(steps))[0] == [5, 30]
    assert plan(KeepLast(1) | KeepEvery(15) | KeepSteps([5]), _views(steps))[0] == \
        [0, 5, 15, 30]
    ages = {0: 10, 5: 3, 10: 0.5}
    assert plan(KeepNewerThan(timedelta(days=1)), _views(steps, age_days=ages))[1] == [0, 5]
    meta = {0: {"loss": 3.0}, 5: {"loss": 1.0}, 10: {"loss": float("nan")},
            15: {"loss": True}, 20: {"loss": 2.0}, 25: {"other": 0}, 30: {"loss": 9.0}}
    assert plan(KeepBest("loss"), _views(steps, meta))[0] == [5, 30]
    assert plan(KeepBest("loss", n=2), _views(steps, meta))[0] == [5, 20, 30]
    assert plan(KeepBest("loss", mode="max"), _views(steps, meta))[0] == [30]
    assert plan(KeepBest("loss", n=2, mode="max"), _views(steps, meta))[0] == [0, 30]
    assert plan(KeepLast(3), []) == ([], [])


def test_retention_applied_after_every_save(tmp_path):
    path = str(tmp_path / "r")
    policy = KeepLast(3) | KeepEvery(10)
    with deltackpt.open(path, "a", chunk_bytes=1024, keyframe_every=4,
                        retention=policy, auto_gc=True) as repo:
        for s in range(26):
            info = repo.save(s, _small_state(s))
            alive = [t for t in range(s + 1) if t % 10 == 0 or t > s - 3]
            assert repo.steps() == alive
            assert list(info.removed_steps) == ([s - 3] if s >= 3 and (s - 3) % 10 else [])
    with deltackpt.open(path, "r") as r:
        assert r.steps() == [0, 10, 20, 23, 24, 25]
        for s in r.steps():
            assert_bitexact(r.load(s), _small_state(s))
        assert r.verify().ok
    with deltackpt.open(path, "a", chunk_bytes=1024) as repo:    # no retention: keeps all
        repo.save(26, _small_state(26))
        assert repo.steps() == [0, 10, 20, 23, 24, 25, 26]
        report = repo.gc(policy)        # an explicit policy
        assert report.deleted_steps == [23]


def test_retention_without_auto_gc_only_sets_the_gc_default(tmp_path):
    """``retention=`` alone never deletes on save: only ``gc()`` (or ``auto_gc=True``) does."""
    with deltackpt.open(str(tmp_path / "r"), "a", chunk_bytes=1024,
                        retention=KeepLast(2)) as repo:
        for s in range(5):
            assert repo.save(s, _small_state(s)).removed_steps == ()
        assert repo.steps() == [0, 1, 2, 3, 4]
        assert repo.gc().deleted_steps == [0, 1, 2]
        assert repo.steps() == [3, 4]
    with pytest.raises(ValueError, match="retention"):
        deltackpt.open(str(tmp_path / "r2"), "a", auto_gc=True)


def test_auto_gc_logs_what_it_removed(tmp_path, caplog):
    with deltackpt.open(str(tmp_path / "r"), "a", chunk_bytes=1024,
                        retention=KeepLast(2), auto_gc=True) as repo:
        with caplog.at_level(logging.INFO, logger="deltackpt"):
            for s in range(4):
                repo.save(s, _small_state(s))
    removed = [r.getMessage().split(" (rebased")[0] for r in caplog.records
               if "retention after step" in r.getMessage()]
    assert removed == ["deltackpt: retention after step 2 deleted steps [0]",
                       "deltackpt: retention after step 3 deleted steps [1]"]


def test_keep_best_by_meta_and_latest_always_kept(tmp_path):
    path = str(tmp_path / "r")
    losses = [5.0, 3.0, 4.0, 1.5, float("nan"), 2.0, 6.0]
    with deltackpt.open(path, "a", chunk_bytes=1024, keyframe_every=3) as repo:
        for s, loss in enumerate(losses):
            repo.save(s, _small_state(s), meta={"val_loss": loss, "acc": -loss})
        repo.save(7, _small_state(7), meta={})              # latest, no metric
        dry = repo.gc(KeepBest("val_loss", n=2), dry_run=True)
        assert dry.deleted_steps == [0, 1, 2, 4, 6]
        assert repo.gc(KeepBest("acc", mode="max")).deleted_steps == [0, 1, 2, 4, 5, 6]
        assert repo.steps() == [3, 7]
        assert repo.gc(KeepSteps([])).deleted_steps == [3]
        assert repo.steps() == [7]
        assert repo.gc(KeepLast(0)).deleted_steps == []
        assert_bitexact(repo.load(7), _small_state(7))
        assert repo.verify().ok


def test_delete_everything_then_save_again(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(5), keyframe_every=3)
    with deltackpt.open(path, "a", chunk_bytes=1024) as repo:
        repo.delete(*range(5))
        assert repo.steps() == [] and _files(path, "packs") == []
        repo.save(9, _small_state(9))
        assert_bitexact(repo.load(9), _small_state(9))
        assert repo.verify().ok


# ================================================================================ readers
def _reader_child(path: str) -> None:
    """Open a reader, wait for a line on stdin, then load steps 2 and 3 and report."""
    r = deltackpt.open(path, "r")
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        r.load(2)
        print("loaded 2", flush=True)
    except StepNotFoundError as exc:
        print(f"StepNotFoundError {exc.step} {isinstance(exc, KeyError)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        print(f"other {type(exc).__name__}: {exc}", flush=True)
    value = r.load(3)
    ok = torch.equal(value["model"]["w"], _small_state(3)["model"]["w"])
    print(f"step 3 {ok}", flush=True)


def test_reader_in_another_process_gets_step_not_found(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(6), keyframe_every=6)
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_gc; "
            f"test_gc._reader_child(sys.argv[1])")
    child = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        with deltackpt.open(path, "a") as w:
            report = w.delete(2)      # step 3 is a delta against 2: it is rebased
            assert report.rebased_steps == [3]
            w.gc(repack_below=1.0)
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert out.splitlines() == ["StepNotFoundError 2 True", "step 3 True"], (out, err)


def test_reader_object_gets_step_not_found(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(6), keyframe_every=6)
    with deltackpt.open(path, "r") as r, deltackpt.open(path, "a") as w:
        w.delete(2, 5)
        w.gc(repack_below=1.0)
        for s in (2, 5):
            with pytest.raises(StepNotFoundError) as info:
                r.load(s)
            assert info.value.step == s and isinstance(info.value, DeltaCkptError)
            assert s not in r
        assert r.steps() == [0, 1, 3, 4]
        for s in r.steps():
            assert_bitexact(r.load(s), _small_state(s))


def test_reader_that_parsed_manifests_before_a_rebase_still_loads(tmp_path):
    path = str(tmp_path / "r")
    _build_small(path, range(6), keyframe_every=6)
    with deltackpt.open(path, "r") as r, deltackpt.open(path, "a") as w:
        r.history()             # parses (and caches) every manifest, reads no chunk
        w.delete(2)
        w.gc(repack_below=1.0)
        assert_bitexact(r.load(3), _small_state(3))
        with pytest.raises(StepNotFoundError):
            r.load(2)


def test_reader_that_loaded_a_step_sees_its_deletion_and_resave(tmp_path):
    """Fixed: a reader revalidates a cached manifest on every use (one stat), so it sees
    another process delete a step it had loaded, and the new state once it is saved again."""
    path = str(tmp_path / "r")
    _build_small(path, range(4), keyframe_every=4)
    with deltackpt.open(path, "r") as r, deltackpt.open(path, "a", chunk_bytes=1024) as w:
        assert_bitexact(r.load(2), _small_state(2))
        w.delete(2)
        w.gc(repack_below=1.0)
        with pytest.raises(StepNotFoundError):
            r.load(2)
        resaved = {"model": {"w": torch.zeros(7)}, "step": -2}
        w.save(2, resaved)
        value = r.load(2)
        assert_bitexact(value, resaved)
        assert_bitexact(r.load(3), _small_state(3))


# ==================================================================================== CLI
def test_cli_gc_delete_diff_du(tmp_path, capsys):
    path = str(tmp_path / "r")
    _build_small(path, range(8), keyframe_every=4)
    assert cli_main(["gc", path, "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete steps [0, 1, 2, 3, 4, 5]" in out and "would free" in out
    with deltackpt.open(path, "r") as r:
        assert r.steps() == list(range(8))

    assert cli_main(["du", path]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["step", "kind", "depth", "logical", "stored", "cumulative", "unique",
                      "shared", "dependents"]
    assert "8 steps" in out and "on disk" in out
    assert cli_main(["du", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in doc["steps"]] == list(range(8))
    assert doc["steps"][0]["dependents"] >= 1 and doc["disk"]["total"] == _disk_total(path)

    assert cli_main(["diff", path, "0", "3"]) == 0
    out = capsys.readouterr().out
    assert "model/w" in out and "changed" in out and "model/frozen" not in out
    assert cli_main(["diff", path, "0", "3", "--all"]) == 0
    assert "model/frozen" in capsys.readouterr().out
    assert cli_main(["diff", path, "0", "3", "--json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model/w"]["changed_fraction"] == 3 / 3000
    assert rows["model/frozen"]["status"] == "unchanged"

    assert cli_main(["delete", path, "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted steps [5]; rebased [6, 7]"), out

    assert cli_main(["gc", path, "--keep-last", "2", "--keep-every", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted steps [1, 2, 3]; rebased"), out
    assert "freed" in out and "rebasing wrote" in out
    assert cli_main(["gc", path, "--keep-best", "val_loss:min", "--repack-below", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("deleted steps [0, 4, 6]")  # best = latest
    assert cli_main(["verify", path]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 steps")

    assert cli_main(["delete", path, "42"]) == 0   # absent: nothing to do, and it says so
    assert "steps [42] were not in the repository" in capsys.readouterr().err
    with deltackpt.open(path, "r") as r:
        assert r.steps() == [7]
        assert_bitexact(r.load(7), _small_state(7))


def _disk_total(path: str) -> int:
    return sum(size for size, _ in _listing(path).values())


@pytest.mark.parametrize("args", [["--keep-every", "0"], ["--keep-newer-than", "3w"]])
def test_cli_gc_rejects_bad_retention_arguments(tmp_path, capsys, args):
    path = str(tmp_path / "r")
    _build_small(path, range(3))
    with pytest.raises(SystemExit) as exit_info:   # argparse: usage error, status 2
        cli_main(["gc", path, *args])
    assert exit_info.value.code == 2


def test_retention_on_open_keeps_the_writer_reference(tmp_path, monkeypatch):
    from deltackpt.repository import Repository

    calls = []
    real = Repository._rebuild_reference

    def counting(self):  # type: ignore[no-untyped-def]
        calls.append(self.latest)
        return real(self)

    monkeypatch.setattr(Repository, "_rebuild_reference", counting)
    # every delta is taken against keyframe 0, which is pinned: the steps deleted have no
    # dependents and the reference (step 0) is never touched
    with deltackpt.open(str(tmp_path / "r"), "a", chunk_bytes=1024, keyframe_every=20,
                        reference="keyframe", retention=KeepLast(3) | KeepSteps([0]),
                        auto_gc=True) as repo:
        for s in range(10):
            repo.save(s, _small_state(s))
        assert repo.steps() == [0, 7, 8, 9]
        assert all(repo.manifest(s).parent == 0 for s in (7, 8, 9))
        for s in repo.steps():
            assert_bitexact(repo.load(s), _small_state(s))
    assert len(calls) <= 1, f"the reference was rebuilt from disk before {len(calls)} saves"
