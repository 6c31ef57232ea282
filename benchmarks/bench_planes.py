"""Byte-plane kernels: the C extension (deltackpt/format/_planes.c) vs numpy, side by side, one run.

Two parts, every figure a ratio between the two paths measured interleaved in this run:
1. the kernels alone: ``planes.split`` / ``planes.merge`` on one 4 MiB chunk (the default
   ``chunk_bytes``) for word widths 2, 4 and 8, median CPU time of the calling thread;
2. whole saves and loads of workload (a) of ``benchmarks/suite.py`` (dense fp32 GPT + AdamW),
   the same checkpoints saved into two repositories, native on and off, alternating per save;
   loads alternate per step. Wall time and process CPU time (user + system), medians.

    python benchmarks/bench_planes.py            # a few minutes on 2 cores
    python benchmarks/bench_planes.py --quick    # CI-sized smoke run
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

import numpy as np

import deltackpt
from deltackpt.format import planes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suitekit.common import git_commit, write_results  # noqa: E402
from suitekit.workloads import make_workloads  # noqa: E402  (shared with the suite)

CHUNK = 4 << 20


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def kernels(repeat: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    out = np.empty_like(src)
    back = np.empty_like(src)
    rows = []
    for word in (2, 4, 8):
        t: dict[tuple[str, bool], list[float]] = {}
        for _ in range(repeat):
            for native in (True, False):
                planes.set_native(native)
                t0 = time.thread_time()
                grouped = planes.split(src, word, out)
                t1 = time.thread_time()
                planes.merge(list(grouped), word, back)
                t2 = time.thread_time()
                t.setdefault(("split", native), []).append(t1 - t0)
                t.setdefault(("merge", native), []).append(t2 - t1)
                assert np.array_equal(back, src)
        for op in ("split", "merge"):
            nat, ref = (statistics.median(t[(op, n)]) for n in (True, False))
            rows.append({"op": op, "word": word, "native_ms": nat * 1e3, "numpy_ms": ref * 1e3,
                         "speedup": ref / nat if nat else float("inf")})
    return rows


def whole(quick: bool, root: str) -> dict[str, Any]:
    wl = make_workloads(quick, 1.0, None, None)[0]
    states = [(s, copy.deepcopy(st)) for s, st in wl.checkpoints()]
    repos = {n: deltackpt.open(os.path.join(root, "native" if n else "numpy"), fsync=False)
             for n in (True, False)}
    save: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for i, (step, st) in enumerate(states):
            for native in ((True, False) if i % 2 else (False, True)):
                planes.set_native(native)
                c0, t0 = _cpu(), time.perf_counter()
                repos[native].save(step, st)
                if i:  # the first save is a keyframe in both: not a delta save
                    save[native].append((time.perf_counter() - t0, _cpu() - c0))
    finally:
        for r in repos.values():
            r.close()
    load: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    readers = {n: deltackpt.open(os.path.join(root, "native" if n else "numpy"), "r")
               for n in (True, False)}
    try:
        for i, (step, _) in enumerate(states):
            for native in ((True, False) if i % 2 else (False, True)):
                planes.set_native(native)
                c0, t0 = _cpu(), time.perf_counter()
                readers[native].load(step)
                load[native].append((time.perf_counter() - t0, _cpu() - c0))
    finally:
        for r in readers.values():
            r.close()

    def med(v: list[tuple[float, float]], k: int) -> float:
        return statistics.median(x[k] for x in v)
    out: dict[str, Any] = {"workload": wl.describe, "saves": len(states)}
    for name, d in (("save", save), ("load", load)):
        out[name] = {"native_wall_ms": med(d[True], 0) * 1e3, "numpy_wall_ms": med(d[False], 0) * 1e3,
                     "native_cpu_ms": med(d[True], 1) * 1e3, "numpy_cpu_ms": med(d[False], 1) * 1e3}
        out[name]["wall_ratio"] = out[name]["native_wall_ms"] / out[name]["numpy_wall_ms"]
        out[name]["cpu_ratio"] = out[name]["native_cpu_ms"] / out[name]["numpy_cpu_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if not planes.native_available():
        print("deltackpt.format._planes is not built (or DELTACKPT_NATIVE=0): nothing to compare")
        return 2
    root = tempfile.mkdtemp(prefix="deltackpt-planes-")
    try:
        k = kernels(5 if args.quick else 30)
        w = whole(args.quick, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        planes.set_native(True)
    lines = ["# Byte-plane kernels: C extension vs numpy", "",
             f"`python benchmarks/bench_planes.py{' --quick' if args.quick else ''}` on "
             f"{platform.machine()}, {os.cpu_count()} CPUs, commit {git_commit()}.", "",
             "## Kernels (one 4 MiB chunk, CPU time of the calling thread, median)", "",
             "| op | word | C (ms) | numpy (ms) | C is faster by |", "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['word']} | {r['native_ms']:.2f} | {r['numpy_ms']:.2f} | "
              f"{r['speedup']:.1f}x |" for r in k]
    lines += ["", f"## Whole saves and loads: {w['workload']}", "",
              "| | C wall (ms) | numpy wall (ms) | C / numpy wall | C / numpy CPU |",
              "|---|---|---|---|---|"]
    for name in ("save", "load"):
        r = w[name]
        lines.append(f"| {name} | {r['native_wall_ms']:.0f} | {r['numpy_wall_ms']:.0f} | "
                     f"{r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_results(args.out, "planes", text, {"kernels": k, "whole": w})
    return 0


if __name__ == "__main__":
    sys.exit(main())
