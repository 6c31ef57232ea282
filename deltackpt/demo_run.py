"""``deltackpt demo``: train, checkpoint into a repository and beside it with torch.save,
print bytes per step, then verify every step and check the latest restores exactly."""
from __future__ import annotations

import os
import shutil
import time

import torch

from . import open as open_repo
from .demo import Trainer


def _nbytes(path: str) -> int:
    return os.path.getsize(path)


def run_demo(directory: str, steps: int = 60, every: int = 5) -> int:
    from .cli import human, table

    repo_dir = os.path.join(directory, "repo")
    pt_dir = os.path.join(directory, "torch_save")
    for d in (repo_dir, pt_dir):
        if os.path.exists(d):
            shutil.rmtree(d)
    os.makedirs(pt_dir)
    trainer = Trainer(total_steps=steps)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"training a {n_params / 1e3:.0f}k-parameter transformer for {steps} steps on CPU, "
          f"checkpoint every {every} steps -> {repo_dir}")
    rows = []
    total_pt = total_dc = 0
    t_pt = t_dc = 0.0
    with open_repo(repo_dir) as repo:
        for _ in range(steps):
            loss = trainer.train_step()
            if trainer.step % every:
                continue
            state = trainer.state()
            t0 = time.perf_counter()
            pt = os.path.join(pt_dir, f"step-{trainer.step}.pt")
            torch.save(state, pt)
            t1 = time.perf_counter()
            info = repo.save(trainer.step, state, meta={"loss": round(loss, 4)})
            t2 = time.perf_counter()
            t_pt += t1 - t0
            t_dc += t2 - t1
            total_pt += _nbytes(pt)
            total_dc += info.stored_bytes
            rows.append([trainer.step, f"{loss:.3f}", info.kind, info.depth,
                         human(_nbytes(pt)), human(info.stored_bytes),
                         f"{_nbytes(pt) / info.stored_bytes:.2f}x"])
        print(table(["step", "loss", "kind", "depth", "torch.save", "deltackpt", "smaller"],
                    rows))
        disk = repo.disk_usage()["total"]
        print(f"\ntotal: torch.save {human(total_pt)} in {len(rows)} files; deltackpt "
              f"{human(disk)} on disk ({total_pt / disk:.2f}x smaller); save time "
              f"{t_pt:.2f}s vs {t_dc:.2f}s (one machine, one run: see benchmarks/ for "
              "repeatable figures)")
        report = repo.verify()
        latest = repo.load()
    ok = report.ok
    print(f"verify: {'OK' if ok else 'FAILED'}: {len(report.steps)} steps, {report.tensors} "
          f"tensors rebuilt and checked against save-time digests")
    for p in report.problems:
        print(f"  - {p.message}")
    same = all(torch.equal(a, b) for a, b in zip(latest["model"].values(),
                                                  trainer.model.state_dict().values()))
    print(f"latest step restores the live model bit-exactly: {same}")
    return 0 if ok and same else 1
