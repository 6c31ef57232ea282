"""Reference structures side by side: size, rebuild depth and load time, one run, interleaved.

Workload (a) of ``benchmarks/suite.py`` (a dense fp32 GPT trained with AdamW) saved into one
repository per structure, the same checkpoints in a rotating order per save, and with
``torch.save`` as the baseline:

* the default (codec ``pxor``, each step against the previous one, a keyframe every 10 saves),
  and with contexts off;
* ``max_chain=N k=20``: chains of at most N deltas, restarting from the keyframe (the writer
  keeps the keyframe's state as a second reference: two copies at most);
* the previous default: ``xor`` chains with a keyframe every 10 saves.

Per structure: logical over stored bytes (the repository on disk), worst and mean number of
deltas a step replays, median save time, and every step's load time (median of the rounds) as
a ratio to ``torch.load`` of that step's ``torch.save`` file, worst and median over the steps.

    python benchmarks/bench_references.py            # ~3 minutes on 2 cores
    python benchmarks/bench_references.py --quick    # CI-sized smoke run
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

import deltackpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suitekit.common import git_commit, write_results  # noqa: E402
from suitekit.workloads import make_workloads  # noqa: E402  (shared with the suite)

STRUCTURES: dict[str, dict[str, Any]] = {
    "default (pxor chain k=10)": {},
    "pxor, contexts off": {"contexts": False},
    "pxor max_chain=4 k=20": {"max_chain": 4, "keyframe_every": 20},
    "pxor max_chain=2 k=20": {"max_chain": 2, "keyframe_every": 20},
    "xor chain k=10 (old default codec)": {"codec": "xor"},
}


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _links(repo: deltackpt.Repository, step: int) -> int:
    m, n = repo.manifest(step), 0
    while m.kind != "keyframe" and m.parent is not None:
        m, n = repo.manifest(m.parent), n + 1
    return n


def run(quick: bool, root: str, rounds: int) -> dict[str, Any]:
    saves = 6 if quick else 32
    wl = make_workloads(quick, 1.0, saves, None)[0]
    states = [(s, copy.deepcopy(st)) for s, st in wl.checkpoints()]
    names = list(STRUCTURES)
    repos = {n: deltackpt.open(os.path.join(root, f"r{i}"), fsync=False, **STRUCTURES[n])
             for i, n in enumerate(names)}
    save_t: dict[str, list[float]] = {n: [] for n in names + ["torch.save"]}
    logical = 0
    try:
        for i, (step, st) in enumerate(states):
            order = names[i % len(names):] + names[:i % len(names)] + ["torch.save"]
            for n in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                if n == "torch.save":
                    torch.save(st, os.path.join(root, f"t{step}.pt"))
                else:
                    info = repos[n].save(step, st)
                    if n == names[0]:
                        logical += info.logical_bytes
                save_t[n].append(time.perf_counter() - t0)
    finally:
        for r in repos.values():
            r.close()
    load_t: dict[str, dict[int, list[float]]] = {n: {} for n in names + ["torch.load"]}
    readers = {n: deltackpt.open(os.path.join(root, f"r{i}"), "r") for i, n in enumerate(names)}
    try:
        for rnd in range(rounds):
            for i, (step, _) in enumerate(states):
                order = names[(i + rnd) % len(names):] + names[:(i + rnd) % len(names)]
                for n in ["torch.load"] + order if (i + rnd) % 2 else order + ["torch.load"]:
                    t0 = time.perf_counter()
                    if n == "torch.load":
                        torch.load(os.path.join(root, f"t{step}.pt"), weights_only=False)
                    else:
                        readers[n].load(step)
                    load_t[n].setdefault(step, []).append(time.perf_counter() - t0)
        links = {n: [_links(readers[n], s) for s, _ in states] for n in names}
    finally:
        for r in readers.values():
            r.close()
    base = {s: statistics.median(v) for s, v in load_t["torch.load"].items()}
    rows = []
    for i, n in enumerate(names):
        per_step = {s: statistics.median(v) / base[s] for s, v in load_t[n].items()}
        stored = _du(os.path.join(root, f"r{i}"))
        rows.append({"structure": n, "policy": STRUCTURES[n], "ratio": logical / stored,
                     "stored_bytes": stored, "worst_links": max(links[n]),
                     "mean_links": statistics.mean(links[n]),
                     "save_ms": statistics.median(save_t[n][1:]) * 1e3,
                     "save_vs_torch": statistics.median(save_t[n][1:])
                     / statistics.median(save_t["torch.save"][1:]),
                     "load_worst_vs_torch": max(per_step.values()),
                     "load_median_vs_torch": statistics.median(per_step.values())})
    return {"workload": wl.describe, "saves": len(states), "logical_bytes": logical,
            "torch_save_ms": statistics.median(save_t["torch.save"][1:]) * 1e3,
            "torch_load_ms": statistics.median(base.values()) * 1e3, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--rounds", type=int, default=None, help="load rounds (default 3; 1 quick)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="deltackpt-refs-")
    try:
        r = run(args.quick, root, args.rounds or (1 if args.quick else 3))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = ["# Reference structures", "",
             f"`python benchmarks/bench_references.py{' --quick' if args.quick else ''}` on "
             f"{platform.machine()}, {os.cpu_count()} CPUs, commit {git_commit()}; "
             f"{r['saves']} saves of {r['workload']}; page cache, fsync off for every method.",
             "", f"torch.save median {r['torch_save_ms']:.0f} ms, torch.load median "
             f"{r['torch_load_ms']:.0f} ms (the load ratios are per step, against torch.load of "
             "that step's file, medians of the rounds).", "",
             "| structure | x smaller | worst / mean deltas replayed | save vs torch.save | "
             "load: worst step / median step vs torch.load |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['structure']} | {row['ratio']:.3f}x | {row['worst_links']} / "
                     f"{row['mean_links']:.2f} | {row['save_vs_torch']:.2f}x | "
                     f"{row['load_worst_vs_torch']:.2f}x / {row['load_median_vs_torch']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_results(args.out, "references", text, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
