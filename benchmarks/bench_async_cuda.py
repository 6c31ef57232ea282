"""Asynchronous saves of a CUDA training state: how long the training loop is blocked.

A GPT of deltackpt.cli.demo trained with AdamW on the GPU; every ``--every`` steps the state is
saved three ways, side by side in one run: ``torch.save`` (which copies every tensor to the
host, then writes), ``deltackpt`` blocking, and ``deltackpt`` with ``blocking=False`` (the loop
waits for one copy into pinned staging memory; encoding and writing run in the background
while training goes on). Every saved step is then restored and compared bit for bit with a
host copy taken at save time. Needs a CUDA device (exits with a message otherwise).

    python benchmarks/bench_async_cuda.py [--layers 8 --dim 512 --saves 8 --every 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

import deltackpt
from deltackpt.cli.demo import GPTConfig, TinyGPT


def _host_copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host_copy(v) for v in x)
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.cpu().reshape(-1).view(torch.uint8),
                                b.cpu().reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--saves", type=int, default=8)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = GPTConfig(layers=args.layers, dim=args.dim, block=128)
    model = TinyGPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    root = tempfile.mkdtemp(prefix="deltackpt-cuda-")
    times: dict[str, list[float]] = {"torch.save": [], "deltackpt": [], "async stall": [],
                                     "async total": [], "train step": []}
    expected: dict[int, Any] = {}
    sync_repo = deltackpt.open(os.path.join(root, "sync"))
    async_repo = deltackpt.open(os.path.join(root, "async"))
    step = 0
    state_bytes = 0
    for _ in range(args.saves):
        for _ in range(args.every):
            x = torch.randint(0, cfg.vocab, (16, cfg.block), device=dev)
            t0 = time.perf_counter()
            loss = model(x).float().logsumexp(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            times["train step"].append(time.perf_counter() - t0)
            step += 1
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        expected[step] = _host_copy(state)
        state_bytes = sum(t.numel() * t.element_size() for t in _tensors(expected[step]))
        t0 = time.perf_counter()
        torch.save(state, os.path.join(root, f"{step}.pt"))
        times["torch.save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sync_repo.save(step, state)
        times["deltackpt"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fut = async_repo.save(step, state, blocking=False)
        times["async stall"].append(time.perf_counter() - t0)
        # training goes on (and changes the tensors) while the save runs in the background
        x = torch.randint(0, cfg.vocab, (16, cfg.block), device=dev)
        loss = model(x).float().logsumexp(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        fut.result()
        times["async total"].append(time.perf_counter() - t0)
    sync_repo.close()
    async_repo.close()
    exact = {}
    for name in ("sync", "async"):
        with deltackpt.open(os.path.join(root, name), mode="r") as r:
            exact[name] = sum(_same(expected[s], r.load(s, map_location="cpu"))
                              for s in r.steps())
    med = {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}
    ratio = {k: med[k] / med["torch.save"] for k in ("deltackpt", "async stall")}
    report = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "state_bytes": state_bytes, "saves": args.saves, "median_s": med,
        "ratio_to_torch_save": ratio, "bit_exact_steps": exact,
        "command": "python benchmarks/bench_async_cuda.py " + " ".join(sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "async_cuda.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# Asynchronous save of a CUDA training state",
        "",
        f"{report['device']}, torch {report['torch']}, {report['cpu_count']} CPU cores; "
        f"state {state_bytes / 2**20:.1f} MiB (model + AdamW), {args.saves} saves. "
        f"Command: `{report['command']}`. Medians (first save excluded); ratios to torch.save "
        "in the same run.",
        "",
        "| method | median | vs torch.save |",
        "|---|---|---|",
        f"| torch.save (to page cache, no fsync) | {med['torch.save'] * 1e3:.0f} ms | 1.00x |",
        f"| deltackpt save (blocking, fsynced) | {med['deltackpt'] * 1e3:.0f} ms | "
        f"{ratio['deltackpt']:.2f}x |",
        f"| deltackpt save(blocking=False): loop blocked | {med['async stall'] * 1e3:.1f} ms | "
        f"**{ratio['async stall']:.2f}x** |",
        f"| (one training step, for scale) | {med['train step'] * 1e3:.0f} ms | |",
        "",
        f"Restored bit-exactly: blocking {exact['sync']}/{args.saves}, "
        f"async {exact['async']}/{args.saves} steps (compared with host copies taken at save "
        "time, while training had already changed the GPU tensors).",
    ]
    with open(os.path.join(args.out, "async_cuda.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = exact["sync"] == exact["async"] == args.saves
    return 0 if ok else 1


def _tensors(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


if __name__ == "__main__":
    sys.exit(main())
