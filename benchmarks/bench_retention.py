"""Retention: the cost of rebuilding any step stays bounded as a run grows, and gc reclaims space.

Workload: deltackpt.cli.demo.Trainer with its default tiny config (char-level transformer, 2
layers, d=64: ~117k parameters; model + AdamW state + scheduler + RNG = ~1.4 MB per
checkpoint), trained on CPU with a checkpoint after *every* training step, 1,000 saves by
default, into a repository with the default policy (lossless, ``diff`` deltas against the
previous save, a keyframe every 10 saves). The same state is also written with ``torch.save``
each step, in the same run, as the baseline.

Measured (wall-clock medians on this machine, every figure from this run):

* load time of the first, a quarter, the middle, three quarters, the last and the
  deepest-chain step, each from a fresh ``Repository`` object (its chunk cache is cold; the OS
  page cache is warm for both sides), against ``torch.load`` of the same step's file;
* the chain depth (entries replayed) of each of those steps;
* disk: the repository against the sum of the ``torch.save`` files;
* ``gc(KeepLast(100) | KeepEvery(100))``: its time, steps deleted and rebased, bytes freed and
  bytes written by rebasing; then the same load measurements on the steps kept.

    python benchmarks/bench_retention.py                # full run (a few minutes on 2 cores)
    python benchmarks/bench_retention.py --quick        # CI smoke (~30 s), writes nothing
    python benchmarks/bench_retention.py --quick --out /tmp/r   # ... and writes its results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import torch

import deltackpt
from deltackpt.cli.demo import GPTConfig, Trainer
from deltackpt.engine.retention import KeepEvery, KeepLast

HERE = os.path.dirname(os.path.abspath(__file__))


def _dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(d, f))
    return total


def _equal(a: Any, b: Any) -> bool:
    """Bit-exact comparison of two checkpoint states (tensors by bytes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def _pick(steps: list[int], depth: dict[int, int]) -> dict[str, int]:
    """Steps to measure: spread over the run, plus the earliest step with the deepest chain
    (to compare with a late one of the same depth)."""
    n = len(steps)
    picks = {"first": steps[0], "quarter": steps[n // 4], "middle": steps[n // 2],
             "three quarters": steps[(3 * n) // 4], "last": steps[-1]}
    deepest = max(depth.values())
    picks["earliest deepest chain"] = next(s for s in steps if depth[s] == deepest)
    return picks


def measure_loads(repo_dir: str, pt_files: dict[int, str], repeat: int) -> dict[str, Any]:
    with deltackpt.open(repo_dir, "r") as repo:
        history = {r.step: r for r in repo.history()}
    steps = sorted(history)
    depth = {s: history[s].depth for s in steps}
    rows = []
    for role, step in _pick(steps, depth).items():
        with deltackpt.open(repo_dir, "r") as repo:
            ok = _equal(repo.load(step), torch.load(pt_files[step], weights_only=False))
        assert ok, f"step {step} does not restore bit-exactly"
        t_open, t_load, t_total, t_pt = [], [], [], []
        for _ in range(repeat):   # deltackpt and torch.load alternately, under the same load
            t0 = time.perf_counter()
            repo = deltackpt.open(repo_dir, "r")     # a fresh object: cold caches
            t1 = time.perf_counter()
            repo.load(step)
            t2 = time.perf_counter()
            repo.close()
            t3 = time.perf_counter()
            torch.load(pt_files[step], weights_only=False)
            t4 = time.perf_counter()
            t_open.append(t1 - t0)
            t_load.append(t2 - t1)
            t_total.append(t2 - t0)
            t_pt.append(t4 - t3)
        med = statistics.median
        rows.append({"role": role, "step": step, "depth": depth[step],
                     "kind": history[step].kind, "open_s": med(t_open), "load_s": med(t_load),
                     "open_load_s": med(t_total), "torch_load_s": med(t_pt),
                     "ratio_open_load": med(t_total) / med(t_pt),
                     "ratio_load": med(t_load) / med(t_pt)})
    return {"steps": len(steps), "max_depth": max(depth.values()),
            "mean_depth": statistics.mean(depth.values()), "depth": depth, "loads": rows}


def run(args: argparse.Namespace, root: str) -> dict[str, Any]:
    repo_dir = os.path.join(root, "repo")
    pt_dir = os.path.join(root, "pt")
    os.makedirs(pt_dir)
    trainer = Trainer(GPTConfig(), total_steps=args.saves)
    pt_files: dict[int, str] = {}
    pt_bytes = logical = 0
    t_save_dc, t_save_pt = [], []
    t_start = time.perf_counter()
    with deltackpt.open(repo_dir) as repo:
        policy = repo.policy.to_dict()
        while trainer.step < args.saves:
            loss = trainer.train_step()
            state = trainer.state()
            path = os.path.join(pt_dir, f"step-{trainer.step}.pt")
            t0 = time.perf_counter()
            torch.save(state, path)
            t1 = time.perf_counter()
            info = repo.save(trainer.step, state, meta={"loss": loss})
            t2 = time.perf_counter()
            t_save_pt.append(t1 - t0)
            t_save_dc.append(t2 - t1)
            pt_files[trainer.step] = path
            pt_bytes += os.path.getsize(path)
            logical += info.logical_bytes
            if trainer.step % 100 == 0:
                print(f"saved {trainer.step}/{args.saves} ({time.perf_counter() - t_start:.0f} s)",
                      file=sys.stderr, flush=True)
    build_s = time.perf_counter() - t_start
    state_bytes = os.path.getsize(pt_files[trainer.step])
    disk_before = _dir_bytes(repo_dir)
    before = measure_loads(repo_dir, pt_files, args.repeat)

    policy_desc = f"KeepLast({args.keep_last}) | KeepEvery({args.keep_every})"
    with deltackpt.open(repo_dir) as repo:
        t0 = time.perf_counter()
        report = repo.gc(KeepLast(args.keep_last) | KeepEvery(args.keep_every))
        gc_s = time.perf_counter() - t0
        kept = repo.steps()
        t0 = time.perf_counter()
        ok = repo.verify().ok
        verify_s = time.perf_counter() - t0
    assert ok, "verify failed after gc"
    disk_after = _dir_bytes(repo_dir)
    pt_kept = sum(os.path.getsize(pt_files[s]) for s in kept)
    after = measure_loads(repo_dir, pt_files, args.repeat)
    return {
        "workload": {"model": "deltackpt.cli.demo.Trainer, default GPTConfig "
                              f"({sum(p.numel() for p in trainer.model.parameters())} "
                              "parameters), AdamW, a save after every training step",
                     "saves": args.saves, "state_bytes_torch_save": state_bytes,
                     "logical_bytes_per_save": logical // args.saves, "policy": policy},
        "build": {"seconds": build_s, "save_median_s": statistics.median(t_save_dc),
                  "torch_save_median_s": statistics.median(t_save_pt)},
        "before_gc": {**before, "disk_bytes": disk_before, "torch_save_bytes": pt_bytes,
                      "disk_ratio": disk_before / pt_bytes},
        "gc": {"policy": policy_desc, "seconds": gc_s, "verify_seconds": verify_s,
               "deleted_steps": len(report.deleted_steps),
               "rebased_steps": len(report.rebased_steps),
               "deleted_packs": report.deleted_packs, "repacked_packs": report.repacked_packs,
               "freed_bytes_reported": report.freed_bytes,
               "rebase_bytes": report.rebase_bytes,
               "disk_freed_bytes": disk_before - disk_after},
        "after_gc": {**after, "disk_bytes": disk_after, "torch_save_bytes_kept": pt_kept,
                     "disk_ratio": disk_after / pt_kept, "kept_steps": kept},
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def render(res: dict[str, Any], meta: dict[str, Any]) -> str:
    w, b, g, a = res["workload"], res["before_gc"], res["gc"], res["after_gc"]
    pol = w["policy"]
    lines = ["# Retention: bounded rebuild cost and garbage collection", ""]
    load = meta["loadavg_1min_start_end"]
    lines.append(f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}, "
                 f"torch {meta['torch']}, deltackpt {meta['deltackpt']}). "
                 f"Command: `{meta['command']}`. The machine was shared: 1-minute load "
                 f"average {load[0]} at the start and {load[1]} at the end of the run, so "
                 f"absolute times are noisy; each deltackpt/torch pair was timed alternately "
                 f"under the same load.")
    lines.append("")
    lines.append(f"Workload: {w['model']}; {w['saves']} saves of a "
                 f"{_mb(w['state_bytes_torch_save'])} state (torch.save file size; "
                 f"{_mb(w['logical_bytes_per_save'])} of tensors), default policy (lossless, "
                 f"`{pol['codec']}` deltas against the {pol['reference']} save, a keyframe "
                 f"every {pol['keyframe_every']} saves). Building the run (training + both "
                 f"saves) took {res['build']['seconds']:.0f} s; median save "
                 f"{_ms(res['build']['save_median_s'])} (deltackpt, fsynced) vs "
                 f"{_ms(res['build']['torch_save_median_s'])} (torch.save, not fsynced).")
    lines.append("")
    lines.append("Times are medians of repeated loads, each from a fresh `Repository` object "
                 "(cold chunk cache; the OS page cache is warm for both sides), against "
                 "`torch.load` of the same step's torch.save file. *open*: opening the "
                 "repository (reads every index file); *load*: rebuilding the step; *depth*: "
                 "the number of stored entries the rebuild of the step's deepest chunk replays "
                 "(1 = self-contained).")
    lines += ["", "## Load cost along the run", "",
              ("| when | role | step | kind | depth | open | load | open + load | torch.load "
               "| (open + load) / torch.load | load / torch.load |"),
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for when, part in (("before gc", b), ("after gc", a)):
        for r in part["loads"]:
            lines.append(f"| {when} | {r['role']} | {r['step']} | {r['kind']} | {r['depth']} "
                         f"| {_ms(r['open_s'])} | {_ms(r['load_s'])} "
                         f"| {_ms(r['open_load_s'])} | {_ms(r['torch_load_s'])} "
                         f"| {r['ratio_open_load']:.2f}x | {r['ratio_load']:.2f}x |")
    lines += ["", "## Disk and gc", "",
              "| | steps | max depth | mean depth | repository | torch.save files | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| before gc | {b['steps']} | {b['max_depth']} | {b['mean_depth']:.1f} "
                 f"| {_mb(b['disk_bytes'])} | {_mb(b['torch_save_bytes'])} "
                 f"| {b['disk_ratio']:.3f} |")
    lines.append(f"| after gc | {a['steps']} | {a['max_depth']} | {a['mean_depth']:.1f} "
                 f"| {_mb(a['disk_bytes'])} | {_mb(a['torch_save_bytes_kept'])} (kept steps) "
                 f"| {a['disk_ratio']:.3f} |")
    lines.append("")
    lines.append(f"`gc({g['policy']})` took {g['seconds']:.2f} s: deleted {g['deleted_steps']} "
                 f"steps, rebased {g['rebased_steps']} (writing {_mb(g['rebase_bytes'])}), "
                 f"deleted {g['deleted_packs']} packs and repacked {g['repacked_packs']}; the "
                 f"repository shrank by {_mb(g['disk_freed_bytes'])} (gc reported "
                 f"{_mb(g['freed_bytes_reported'])} freed). `verify()` of the {a['steps']} "
                 f"kept steps afterwards: OK in {g['verify_seconds']:.1f} s.")
    lines.append("")
    loads = b["loads"]
    worst = max(loads, key=lambda r: r["load_s"])
    best = min(loads, key=lambda r: r["load_s"])
    first = next(r for r in loads if r["role"] == "first")
    last = next(r for r in loads if r["role"] == "last")
    early = next(r for r in loads if r["role"] == "earliest deepest chain")
    depth_before = {int(k): v for k, v in b["depth"].items()}
    depth_after = {int(k): v for k, v in a["depth"].items()}
    rose = sorted(s for s in depth_after if depth_after[s] > depth_before[s])
    fell = sorted(s for s in depth_after if depth_after[s] < depth_before[s])
    bounded = b["max_depth"] <= pol["keyframe_every"]
    open_b = statistics.median(r["open_s"] for r in b["loads"])
    open_a = statistics.median(r["open_s"] for r in a["loads"])
    lines.append(
        f"Reading: over {b['steps']} saves the deepest chain is {b['max_depth']} entries "
        + (f"(at most `keyframe_every` = {pol['keyframe_every']})"
           if bounded else f"(more than `keyframe_every` = {pol['keyframe_every']})")
        + f". Rebuilding: the slowest measured step (step {worst['step']}, depth "
        f"{worst['depth']}) took {worst['load_s'] / best['load_s']:.2f}x the fastest (step "
        f"{best['step']}, depth {best['depth']}); the last step took "
        f"{last['load_s'] / first['load_s']:.2f}x the first"
        + (f"; at equal depth ({last['depth']}), the last step (step {last['step']}) took "
           f"{last['load_s'] / early['load_s']:.2f}x the earliest (step {early['step']})"
           if early["depth"] == last["depth"] and early["step"] != last["step"] else "")
        + ". Opening a fresh repository "
        f"object is not bounded the same way: it reads one index file per pack, "
        f"{_ms(open_b)} with {b['steps']} steps before gc and {_ms(open_a)} with "
        f"{a['steps']} after (medians over the measured loads). gc lowered the chain depth of "
        f"{len(fell)} kept steps (rebased onto self-contained chunks) and raised it for "
        f"{len(rose)}.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 60 saves, KeepLast(10) | KeepEvery(10), 3 repeats")
    ap.add_argument("--saves", type=int, help="training steps, one save each (default 1000)")
    ap.add_argument("--repeat", type=int, help="loads per measurement (default 7)")
    ap.add_argument("--keep-last", type=int, help="default 100 (quick: 10)")
    ap.add_argument("--keep-every", type=int, help="default 100 (quick: 10)")
    ap.add_argument("--out", help="results folder (default benchmarks/results; --quick: none)")
    ap.add_argument("--workdir", help="where to build (default: a temporary folder)")
    args = ap.parse_args(argv)
    quick = args.quick
    args.saves = args.saves or (60 if quick else 1000)
    args.repeat = args.repeat or (3 if quick else 7)
    args.keep_last = args.keep_last or (10 if quick else 100)
    args.keep_every = args.keep_every or (10 if quick else 100)
    out = args.out or (None if quick else os.path.join(HERE, "results"))
    root = tempfile.mkdtemp(prefix="bench-retention-", dir=args.workdir)
    load_start = os.getloadavg()[0]
    try:
        res = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()[0]
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
                       f"{platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "deltackpt": deltackpt.__version__,
            "loadavg_1min_start_end": [round(load_start, 2), round(load_end, 2)],
            "command": "python benchmarks/bench_retention.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    meta["command"] = meta["command"].strip()
    text = render(res, meta)
    print(text)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "retention.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out, "retention.json"), "w") as f:
            json.dump({"meta": meta, "results": res}, f, indent=1)
        print(f"wrote {os.path.join(out, 'retention.md')} and retention.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
