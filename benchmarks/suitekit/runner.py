"""Running the suite: every workload's checkpoints saved and loaded by every method, and the
report rewritten after each workload."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import zstandard

import deltackpt

from .common import RESULTS_DIR, git_commit, log, pkg_version, preset_policies
from .config import run_config
from .measure import PeakRSS, compare, fingerprint, state_bytes, touch
from .methods import FileMethod, Method, make_methods
from .plots import plots
from .report import summarize, to_markdown
from .targets import baseline_meta, check_targets, load_baseline, target_status
from .workloads import Workload, make_workloads


@dataclass
class MethodResult:
    name: str
    lossless: bool
    tensors_only: bool
    note: str
    error: str | None = None
    durable: bool = True
    steps: list[int] = field(default_factory=list)
    disk_after: list[int] = field(default_factory=list)    # total bytes after each save
    save_s: list[float] = field(default_factory=list)
    fsync_s: list[float] = field(default_factory=list)     # file methods: fsync afterwards
    stall_s: list[float] = field(default_factory=list)
    save_extra_rss: list[int] = field(default_factory=list)
    exact_saves: list[bool] = field(default_factory=list)  # deltackpt's own flag per save
    kinds: list[str] = field(default_factory=list)         # deltackpt: keyframe / delta
    max_rel_error: float = 0.0
    held_bytes: int = 0                                    # RSS freed by closing the repo
    load_step_s: dict[int, list[float]] = field(default_factory=dict)  # every step, per round
    load_last_s: list[float] = field(default_factory=list)
    load_key_s: list[float] = field(default_factory=list)  # the first saved step (a keyframe)
    load_extra_rss: list[int] = field(default_factory=list)
    exact: dict[int, dict[str, int]] = field(default_factory=dict)


def _err(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno} " \
            f"({tb[-1].name})" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:300] + where


def run_workload(wl: Workload, root: str, repeat: int) -> dict[str, Any]:
    wroot = os.path.join(root, wl.key)
    methods: list[Method | None] = []
    results: list[MethodResult] = []
    m: Method | None
    for name, factory in make_methods():
        try:
            m = factory()
            m.setup(wroot)
            methods.append(m)
            results.append(MethodResult(name, m.lossless, m.tensors_only, m.note,
                                        durable=m.durable))
        except Exception as exc:  # noqa: BLE001 - e.g. zipnn missing: record, go on
            log(f"  {name}: unavailable: {_err(exc)}")
            methods.append(None)
            results.append(MethodResult(name, True, True, "", error=_err(exc)))
    fps: dict[int, dict[str, tuple[Any, ...]]] = {}
    st_bytes = 0
    t_start = time.perf_counter()
    t_train = 0.0
    it = wl.checkpoints()
    k = 0
    while True:
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # training is not measured: one thread is many times faster
        try:                      # on a busy machine (OpenMP spin-waits); saves/loads get all
            step, state = next(it)
        except StopIteration:
            break
        finally:
            torch.set_num_threads(threads)
        t_train += time.perf_counter() - t0
        fps[step] = fingerprint(state)
        st_bytes = state_bytes(state)
        order = list(range(len(methods)))
        order = order[k % len(order):] + order[:k % len(order)]
        for j in order:
            m, r = methods[j], results[j]
            if m is None or r.error:
                continue
            try:
                with PeakRSS(clean=k == wl.saves - 1) as mem:  # memory: the last save
                    t1 = time.perf_counter()
                    extra = m.save(step, state)
                    dt = time.perf_counter() - t1
                if isinstance(m, FileMethod):  # durable-save time, measured separately
                    t1 = time.perf_counter()
                    m.sync(step)
                    r.fsync_s.append(time.perf_counter() - t1)
                r.steps.append(step)
                r.save_s.append(dt)
                if mem.clean:
                    r.save_extra_rss.append(mem.extra)
                r.disk_after.append(m.disk())
                if "stall_s" in extra:
                    r.stall_s.append(extra["stall_s"])
                if "exact" in extra:
                    r.exact_saves.append(bool(extra["exact"]))
                    r.kinds.append(str(extra["kind"]))
                    r.max_rel_error = max(r.max_rel_error, float(extra["max_rel_error"]))
            except Exception as exc:  # noqa: BLE001
                r.error = f"save of step {step}: {_err(exc)}"
                log(f"  {r.name}: FAILED {r.error}")
        del state
        k += 1
        log(f"  {wl.key}: step {step} saved by all methods")
    t_saves = time.perf_counter() - t_start - t_train
    for m, r in zip(methods, results, strict=False):
        if m is not None:
            try:
                r.held_bytes = m.finish()
            except Exception as exc:  # noqa: BLE001
                r.error = r.error or f"close: {_err(exc)}"
    steps = sorted(fps)
    last, key = steps[-1], steps[0]  # the first save of a repository is always a keyframe
    # every step in `rounds` interleaved rounds (per-step median: the worst ratio to torch.load;
    # bit-exactness on the first), then the keyframe step and the last step again
    rounds = max(1, min(repeat, 3))
    plan = [(s, i) for _ in range(rounds) for s in steps for i in range(len(methods))]
    plan += [(s, i) for _ in range(max(0, repeat - 1)) for s in dict.fromkeys((key, last))
             for i in range(len(methods))]
    final = {i: n_job for n_job, (s, i) in enumerate(plan)}  # memory: each one's last load
    for n_job, (s, i) in enumerate(plan):
        m, r = methods[i], results[i]
        if m is None or r.error or s not in r.steps:
            continue
        try:
            with PeakRSS(clean=final[i] == n_job) as mem:
                t0 = time.perf_counter()
                obj = m.load(s)
                touch(obj)
                dt = time.perf_counter() - t0
            if s not in r.exact:
                r.exact[s] = compare(fps[s], obj, m.tensors_only)
            if len(r.load_step_s.setdefault(s, [])) < rounds:
                r.load_step_s[s].append(dt)
            if s == last:
                r.load_last_s.append(dt)
            if s == key:
                r.load_key_s.append(dt)
            if mem.clean:
                r.load_extra_rss.append(mem.extra)
            del obj
        except Exception as exc:  # noqa: BLE001
            r.error = f"load of step {s}: {_err(exc)}"
            log(f"  {r.name}: FAILED {r.error}")
    for m in methods:
        repo = getattr(m, "repo", None) if m is not None else None
        if repo is not None:
            repo.close()
    shutil.rmtree(wroot, ignore_errors=True)
    log(f"  {wl.key}: done ({t_train:.0f} s training, {t_saves:.0f} s saving, "
        f"{time.perf_counter() - t_start - t_train - t_saves:.0f} s loading)")
    return {"key": wl.key, "title": wl.title, "describe": wl.describe, "steps": steps,
            "key_step": key, "state_bytes": st_bytes, "train_s": t_train,
            "methods": [r.__dict__ for r in results]}


def run_suite(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Measure the workloads ``args`` selects and write suite.md/suite.json (and plots) to
    ``args.out``; 1 if a lossless restore was not bit-exact or a deltackpt method failed.
    ``argv`` is the command line recorded in the report (default: ``sys.argv[1:]``)."""
    t_all = time.perf_counter()
    out = args.out or (tempfile.mkdtemp(prefix="deltackpt-suite-out-") if args.quick else
                       RESULTS_DIR)
    os.makedirs(out, exist_ok=True)
    repeat = args.repeat or (2 if args.quick else 3)
    wls = [w for w in make_workloads(args.quick, args.scale, args.saves, args.every)
           if w.key in args.workloads]
    config = run_config(args.quick, args.scale, args.saves, args.every)
    baseline = load_baseline(config)
    root = tempfile.mkdtemp(prefix="deltackpt-suite-", dir=os.environ.get("BENCH_TMP"))
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    commit, policies = git_commit(), preset_policies()  # as imported, before anything runs
    gc.collect()
    gc.freeze()  # keep the interpreter's and torch's objects out of later collections
    ws: list[dict[str, Any]] = []
    cmd = "python benchmarks/suite.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:]))

    def report(final: bool) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        rows = {w["key"]: summarize(w) for w in ws}
        pol = deltackpt.Policy()
        chunk_window = 2 * 4 * pol.workers * pol.chunk_bytes
        targets = check_targets(ws, rows, chunk_window, baseline)
        meta = {"config": config, "baseline": baseline_meta(baseline),
                "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"{platform.system()} {platform.release()}",
                "python": platform.python_version(), "deltackpt": deltackpt.__version__,
                "safetensors": pkg_version("safetensors"),
                "zstandard": zstandard.__version__, "zipnn": pkg_version("zipnn"),
                "loadavg": loadavg, "command": cmd, "rss_method": PeakRSS.method,
                "chunk_window": chunk_window, "complete": final,
                "deltackpt_commit": commit, "policies": policies,
                "wall_min": (time.perf_counter() - t_all) / 60}
        pngs = plots(ws, rows, out)
        md = to_markdown(meta, ws, rows, targets, pngs)
        if not final:
            md = md.replace("\n## Targets", "\n**PARTIAL: the run is still going (done: "
                            + ", ".join(w["key"] for w in ws) + ").**\n\n## Targets", 1)
        with open(os.path.join(out, "suite.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out, "suite.json"), "w") as f:
            json.dump({"meta": meta, "targets": targets, "summary": rows, "workloads": ws}, f,
                      indent=1, default=str)
        if final:
            print(md)
        return rows, targets

    try:
        for i, w in enumerate(wls):
            log(f"workload ({w.key}) {w.title}: {w.describe}")
            torch.manual_seed(0)
            ws.append(run_workload(w, root, repeat if w.key != "f" else min(repeat, 2)))
            if i < len(wls) - 1:
                report(final=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, targets = report(final=True)
    log(f"wrote {out}/suite.md, suite.json and plots")
    for t in targets:
        log(f"target {target_status(t['met'])}: {t['target']}: {t['measured']}")
    bad = [r["name"] for rs in rows.values() for r in rs
           if r["lossless"] and r["checked"] and r["exact_steps"] != r["checked"]]
    if bad:
        log(f"NOT BIT-EXACT although lossless: {sorted(set(bad))}")
    # deltackpt failing a save or load is a crash; another method missing (zipnn not
    # installed) is not. A missed target is never a failure.
    broken = sorted({f"{k}: {r['name']}: {r['error']}" for k, rs in rows.items() for r in rs
                     if r["name"].startswith("deltackpt") and r["error"]})
    for b in broken:
        log(f"DELTACKPT FAILED: {b}")
    return 1 if bad or broken else 0
