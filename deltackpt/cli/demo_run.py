"""``deltackpt demo``: train, checkpoint into a repository and beside it with torch.save,
print bytes per step, then verify every step and check the latest restores exactly."""
from __future__ import annotations

import os
import shutil
import time

import torch

from .. import open as open_repo
from ..errors import DeltaCkptError
from .demo import Trainer


def _nbytes(path: str) -> int:
    return os.path.getsize(path)


def _versus(what: str, pt: float, dc: float, unit: str, better: str, worse: str) -> str:
    """One labelled figure line: both names, both values and which is by how much ahead."""
    def fmt(x: float) -> str:
        from .fmt import human

        return human(x) if unit == "bytes" else f"{x:.2f} {unit}"

    if pt == dc or not pt or not dc:
        verdict = "the same" if pt == dc else "-"
    else:
        verdict = (f"deltackpt {pt / dc:.2f}x {better}" if dc < pt
                   else f"deltackpt {dc / pt:.2f}x {worse}")
    return f"{what}: torch.save {fmt(pt)}, deltackpt {fmt(dc)} ({verdict})"


def run_demo(directory: str, steps: int = 60, every: int = 5, *, overwrite: bool = False) -> int:
    """Run the demo in ``directory``; refuses to replace an earlier run's output unless
    ``overwrite`` (``--overwrite``), since ``DIR/repo`` may be a repository someone keeps."""
    from .fmt import human, table

    repo_dir = os.path.join(directory, "repo")
    pt_dir = os.path.join(directory, "torch_save")
    for d in (repo_dir, pt_dir):
        if os.path.exists(d) and (not os.path.isdir(d) or os.listdir(d)):
            if not overwrite:
                raise DeltaCkptError(
                    f"{d!r} already exists and is not empty (an earlier demo?); rerun with "
                    "--overwrite to replace it, or give another directory",
                    cause="output exists")
            if os.path.isdir(d):
                shutil.rmtree(d)
            else:
                os.remove(d)
    os.makedirs(pt_dir, exist_ok=True)
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
        print(table(["step", "loss", "kind", "depth", "torch.save", "deltackpt",
                     "torch.save/deltackpt"], rows))
        disk = repo.disk_usage()["total"]
        print()
        print(_versus(f"on disk ({len(rows)} checkpoints)", total_pt, disk, "bytes", "smaller",
                      "larger"))
        print(_versus("save time", t_pt, t_dc, "s", "faster", "slower")
              + "; one run on one machine: see benchmarks/ for repeatable figures")
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
