"""Manifest size and parse / state-tree decode time, version 1 against version 2.

Saves ``--saves`` steps of workload (a) of benchmarks/suite.py (the dense fp32 GPT + AdamW run:
about 220 tensors) losslessly and with a 2-bit lossy rule, then, on the latest step, reports:

* the manifest's bytes per step in version 1 (``Manifest.to_bytes(1)``: what deltackpt wrote
  before version 2, byte for byte) and version 2 (what it writes now);
* ``Manifest.from_bytes`` of each (checksum + decompression + parse + validation; the version-1
  parser is the code from before version 2, unchanged), with Python's cyclic GC running and
  paused (``load`` pauses it);
* the state-tree decode, ``unflatten`` with the leaves stubbed: the full decoder (the code from
  before, which every decode ran; still what a decode with ``select`` runs) and the fast pass
  that ``unflatten``/``leaf_indices`` of a whole tree now take;
* a whole ``load`` of the latest step from a fresh reader, on the repository as written (v2)
  and with every manifest rewritten in version 1, and the share of it the manifests of the
  chain and the two tree decodes take.

Each time is the best of ``--repeat`` runs (other load on the machine only ever adds time;
the best is the steadiest estimate of the work itself).

    python benchmarks/bench_manifest.py               # workload (a) at full size (~1 min)
    python benchmarks/bench_manifest.py --quick       # the --quick GPT (fewer, smaller tensors)
    python benchmarks/bench_manifest.py --profile     # plus cProfile of v2 parse + decode
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deltackpt
from deltackpt.engine.policy import Rule
from deltackpt.format.tree import leaf_indices, unflatten
from deltackpt.store.manifest import Manifest, manifest_name


def _states(quick: bool, saves: int, every: int) -> list[tuple[int, Any]]:
    from suitekit.workloads import Trainer, gpt_cfg, train_checkpoints  # workload (a)
    tr = Trainer(gpt_cfg(quick, 1.0), total_steps=saves * every)
    return [(s, copy.deepcopy(st)) for s, st in train_checkpoints(tr, saves, every)]


def _ms(fn: Callable[[], Any], repeat: int, paused: bool = False) -> float:
    times = []
    for _ in range(repeat):
        if paused:
            gc.disable()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        gc.enable()
    return 1e3 * min(times)


def _rewrite(src: str, dst: str, version: int) -> None:
    shutil.copytree(src, dst)
    for f in os.listdir(os.path.join(dst, "steps")):
        p = os.path.join(dst, "steps", f)
        with open(p, "rb") as fh:
            m = Manifest.from_bytes(fh.read())
        with open(p, "wb") as fh:
            fh.write(m.to_bytes(version))


def _chain(root: str, step: int) -> list[int]:
    """The steps whose manifests a load of ``step`` parses."""
    with deltackpt.open(root, "r") as r:
        todo, seen = [step], set()
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            todo += [c.ref for t in r.manifest(s).tensors for c in t.chunks
                     if c.ref is not None]
    return sorted(seen)


def measure(tmp: str, states: list[tuple[int, Any]], repeat: int, profile: bool,
            **policy: Any) -> dict[str, Any]:
    root = os.path.join(tmp, "v2")
    with deltackpt.open(root, "a", **policy) as repo:
        for s, st in states:
            repo.save(s, st)
    steps = [s for s, _ in states]
    last = steps[-1]
    raw: dict[int, dict[int, bytes]] = {1: {}, 2: {}}
    for s in steps:
        with open(os.path.join(root, *manifest_name(s).split("/")), "rb") as f:
            raw[2][s] = f.read()
        raw[1][s] = Manifest.from_bytes(raw[2][s], s).to_bytes(1)
    m = Manifest.from_bytes(raw[2][last], last)
    out: dict[str, Any] = {"tensors": len(m.tensors),
                           "chunks": sum(len(t.chunks) for t in m.tensors),
                           "tree_nodes": _count(m.tree), "chain": _chain(root, last)}
    for v in (1, 2):
        data = raw[v][last]
        out[f"bytes_v{v}"] = statistics.mean(len(b) for b in raw[v].values())
        out[f"parse_v{v}"] = _ms(lambda d=data: Manifest.from_bytes(d, last), repeat)
        out[f"parse_v{v}_paused"] = _ms(lambda d=data: Manifest.from_bytes(d, last), repeat,
                                        True)
    stub = object()
    out["tree_full"] = _ms(lambda: unflatten(m.tree, lambda i: stub, [""]), repeat, True)
    out["tree_fast"] = _ms(lambda: unflatten(m.tree, lambda i: stub), repeat, True)
    out["leaves_fast"] = _ms(lambda: leaf_indices(m.tree), repeat, True)
    _rewrite(root, os.path.join(tmp, "v1"), 1)
    for v in (1, 2):
        where = os.path.join(tmp, f"v{v}")

        def load(where: str = where) -> None:
            with deltackpt.open(where, "r") as r:
                r.load(last)
        load()
        out[f"load_v{v}"] = _ms(load, max(5, repeat // 8))
    if profile:
        prof = cProfile.Profile()
        gc.disable()
        prof.enable()
        for _ in range(50):
            unflatten(Manifest.from_bytes(raw[2][last], last).tree, lambda i: stub)
        prof.disable()
        gc.enable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return out


def _count(node: Any) -> int:
    return 1 + sum(_count(x) for x in node) if isinstance(node, list) else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    states = _states(args.quick, args.saves, 3)
    runs = {"lossless (default policy)": {},
            "lossy 2-bit (quant bits=2 on every tensor between keyframes)": {
                "rules": [Rule("*", {"id": "quant", "bits": 2, "block": 256})]}}
    for name, policy in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(tmp, states, args.repeat, args.profile, workers=1, **policy)
        n = len(r["chain"])
        print(f"\n{name}: {r['tensors']} tensors, {r['chunks']} chunk records, "
              f"{r['tree_nodes']} tree lists; a load of the latest step parses {n} manifests "
              f"(steps {r['chain']})")
        print(f"  manifest bytes/step   v1 {r['bytes_v1']:9.0f}   v2 {r['bytes_v2']:9.0f}   "
              f"({r['bytes_v1'] / r['bytes_v2']:.1f}x smaller)")
        print(f"  parse ms (GC on)      v1 {r['parse_v1']:9.2f}   v2 {r['parse_v2']:9.2f}")
        print(f"  parse ms (GC paused)  v1 {r['parse_v1_paused']:9.2f}   "
              f"v2 {r['parse_v2_paused']:9.2f}")
        print(f"  tree decode ms        full decoder {r['tree_full']:.2f}   fast pass "
              f"{r['tree_fast']:.2f} (leaf_indices {r['leaves_fast']:.2f})")
        before = n * r["parse_v1_paused"] + 2 * r["tree_full"]
        after = n * r["parse_v2_paused"] + r["tree_fast"] + r["leaves_fast"]
        print(f"  load ms               v1 manifests {r['load_v1']:.1f}   v2 {r['load_v2']:.1f};"
              f" manifests + tree decodes: before {before:.1f} "
              f"({100 * before / r['load_v1']:.0f}%), now {after:.1f} "
              f"({100 * after / r['load_v2']:.0f}%)")


if __name__ == "__main__":
    main()
