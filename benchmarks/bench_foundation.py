"""Foundation figures: deltackpt (lossless) vs torch.save / torch.load, side by side, one run.

Workload: the 3.2M-parameter char-level transformer of deltackpt.cli.demo (4 layers, d=256),
AdamW + cosine schedule, fp32, a checkpoint (model + optimizer + scheduler + RNG) every 10 steps;
once with every parameter trained ("dense") and once with all but the output layer frozen
("frozen"). Each checkpoint is written both ways; sizes are file bytes on disk, times are
wall-clock medians on this machine, and every claim is a ratio between the two in this run.

    python benchmarks/bench_foundation.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_foundation.py --quick    # CI-sized smoke run
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
from typing import Any

import torch

import deltackpt
from deltackpt.cli.demo import GPTConfig, Trainer


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_workload(name: str, cfg: GPTConfig, steps: int, every: int, freeze: bool, root: str,
                 policy: dict[str, Any], repeat: int) -> dict[str, Any]:
    repo_dir = os.path.join(root, name, "repo")
    pt_dir = os.path.join(root, name, "pt")
    os.makedirs(pt_dir)
    trainer = Trainer(cfg, total_steps=steps, freeze_backbone=freeze)
    t_pt, t_pt_sync, t_dc, pt_bytes, files = [], [], [], 0, []
    raw_bytes = 0
    with deltackpt.open(repo_dir, **policy) as repo:
        while trainer.step < steps:
            trainer.train_step()
            if trainer.step % every:
                continue
            state = trainer.state()
            path = os.path.join(pt_dir, f"step-{trainer.step}.pt")
            t0 = time.perf_counter()
            torch.save(state, path)
            t1 = time.perf_counter()
            _fsync_file(path)
            t2 = time.perf_counter()
            info = repo.save(trainer.step, state)
            t3 = time.perf_counter()
            t_pt.append(t1 - t0)
            t_pt_sync.append(t2 - t0)
            t_dc.append(t3 - t2)
            pt_bytes += os.path.getsize(path)
            raw_bytes += info.logical_bytes
            files.append((trainer.step, path))
        disk = repo.disk_usage()["total"]
        history = repo.history()
    saved_steps = [s for s, _ in files]
    deepest = max(history, key=lambda r: (r.depth, r.step)).step
    load_rows = {}
    for label, step in (("first", saved_steps[0]), ("deepest", deepest),
                        ("last", saved_steps[-1])):
        path = dict(files)[step]
        t_load_pt = _median_time(lambda: torch.load(path, weights_only=True), repeat)

        def load_dc(step: int = step) -> None:
            with deltackpt.open(repo_dir, mode="r") as r:  # cold chunk cache every time
                r.load(step)

        t_load_dc = _median_time(load_dc, repeat)
        depth = next(r.depth for r in history if r.step == step)
        load_rows[label] = {"step": step, "depth": depth, "torch_load_s": t_load_pt,
                            "deltackpt_load_s": t_load_dc, "ratio": t_load_dc / t_load_pt}
    with deltackpt.open(repo_dir, mode="r") as r:
        report = r.verify()
    return {
        "workload": name, "checkpoints": len(files), "params": sum(
            p.numel() for p in trainer.model.parameters()),
        "tensor_bytes_per_ckpt": raw_bytes // len(files),
        "torch_save_bytes": pt_bytes, "deltackpt_bytes": disk,
        "size_ratio": pt_bytes / disk,
        "save_s_median": {"torch.save": statistics.median(t_pt),
                          "torch.save+fsync": statistics.median(t_pt_sync),
                          "deltackpt": statistics.median(t_dc)},
        "save_ratio_vs_torch_save": statistics.median(t_dc) / statistics.median(t_pt),
        "save_ratio_vs_torch_save_fsync": statistics.median(t_dc) / statistics.median(t_pt_sync),
        "load": load_rows, "verify_ok": report.ok, "policy": policy,
    }


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']} (torch {meta['torch']}); "
             f"`{meta['command']}`.", "",
             "| workload | ckpts | torch.save total | deltackpt total | smaller by | "
             "save: torch.save | +fsync | deltackpt | deltackpt/torch.save | verify |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["save_s_median"]
        lines.append(
            f"| {r['workload']} | {r['checkpoints']} | {r['torch_save_bytes'] / 2**20:.1f} MiB"
            f" | {r['deltackpt_bytes'] / 2**20:.1f} MiB | **{r['size_ratio']:.2f}x** | "
            f"{s['torch.save'] * 1e3:.0f} ms | {s['torch.save+fsync'] * 1e3:.0f} ms | "
            f"{s['deltackpt'] * 1e3:.0f} ms | {r['save_ratio_vs_torch_save']:.2f}x | "
            f"{'ok' if r['verify_ok'] else 'FAILED'} |")
    lines += ["", "| workload | load of | step | chain depth | torch.load | deltackpt.load | "
              "ratio |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for label, row in r["load"].items():
            lines.append(f"| {r['workload']} | {label} | {row['step']} | {row['depth']} | "
                         f"{row['torch_load_s'] * 1e3:.0f} ms | "
                         f"{row['deltackpt_load_s'] * 1e3:.0f} ms | {row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (CI smoke)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--codec", default="diff")
    ap.add_argument("--reference", default="previous")
    ap.add_argument("--keyframe-every", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        cfg, steps, repeat = GPTConfig(), args.steps or 40, 1
    else:
        cfg, steps, repeat = GPTConfig(layers=4, dim=256, block=128), args.steps or 200, 3
    policy = {"codec": args.codec, "reference": args.reference,
              "keyframe_every": args.keyframe_every}
    root = tempfile.mkdtemp(prefix="deltackpt-bench-", dir=os.environ.get("BENCH_TMP"))
    try:
        results = [run_workload(name, cfg, steps, args.every, freeze, root, policy, repeat)
                   for name, freeze in (("dense", False), ("frozen", True))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "command": "python benchmarks/" + os.path.basename(__file__) + " " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    md = to_markdown(results, meta)
    print(md)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "foundation.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "foundation.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0 if all(r["verify_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
