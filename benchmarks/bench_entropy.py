"""rANS plane coder (deltackpt/format/entropy.py) vs zstd level 1 on the byte planes of real deltas.

A small GPT (deltackpt.cli.demo, 4 layers, dim 256) trains with AdamW from a fixed seed; the fp32
tensors of two consecutive steps, grouped as parameters, exp_avg and exp_avg_sq, are XORed and
split into byte planes (deltackpt.format.planes.split). For every plane, in ONE run with the methods
interleaved per repeat:

* zstd level 1 (zstandard, one thread): ratio, compress and decompress MB/s;
* our coder, order 0: ratio, encode and decode MB/s (C; AVX2 where the CPU has it);
* our coder with contexts: the reference's top byte (sign + 7 exponent bits), the 15 most
  common values one bucket each, every other value bucket 15;
* the numpy fallback decoder (order 0 and contexts), and estimate() against the real size.

MB/s are plane (uncompressed) bytes per second of CPU time of the calling thread (every
method runs on it), the median of the repeats; "spread" is (max - min) / median over the
repeats. A synthetic 1 MiB skewed plane is measured the same way, and the plane-3 ratio at
several block sizes.

    python benchmarks/bench_entropy.py            # about a minute on 2 cores
    python benchmarks/bench_entropy.py --quick    # CI-sized smoke run (nothing written)
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zstandard

from deltackpt.cli.demo import GPTConfig, Trainer
from deltackpt.format import entropy, planes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suitekit.common import git_commit, write_results  # noqa: E402

GROUPS = ("params", "exp_avg", "exp_avg_sq")


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).numpy().view(np.uint32) for t in tensors])


def training_states(quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """fp32 words of two consecutive training steps, by group."""
    torch.manual_seed(0)
    cfg = GPTConfig(layers=2, dim=64, block=64) if quick else GPTConfig(layers=4, dim=256,
                                                                         block=128)
    warm = 3 if quick else 20
    tr = Trainer(cfg, total_steps=100, seed=0)
    for _ in range(warm):
        tr.train_step()
    states = []
    for _ in range(2):
        tr.train_step()
        st = copy.deepcopy(tr.state())
        model = [t for t in st["model"].values() if t.dtype == torch.float32]
        opt = st["optimizer"]["state"]
        ids = sorted(opt)
        states.append({"params": _flat(model),
                       "exp_avg": _flat([opt[i]["exp_avg"] for i in ids]),
                       "exp_avg_sq": _flat([opt[i]["exp_avg_sq"] for i in ids])})
    desc = (f"GPT layers={cfg.layers} dim={cfg.dim}, AdamW, steps {warm + 1} -> {warm + 2}, "
            f"{states[0]['params'].size} parameters")
    return states[0], states[1], desc


def buckets(top: np.ndarray) -> tuple[np.ndarray, int]:
    """The 15 most common top-byte values get buckets 0..14 (by frequency), the rest 15."""
    counts = np.bincount(top, minlength=256)
    common = np.argsort(-counts, kind="stable")[:15]
    common = common[counts[common] > 0]
    lut = np.full(256, len(common), np.uint8)
    lut[common] = np.arange(len(common), dtype=np.uint8)
    return lut[top], len(common) + 1


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU time of this thread (the machine is shared: wall time would count other jobs)."""
    t0 = time.thread_time()
    r = fn()
    return time.thread_time() - t0, r


def _stats(n: int, times: list[float]) -> dict[str, float]:
    speeds = [n / t / 1e6 for t in times if t > 0]
    med = statistics.median(speeds)
    return {"mbps": med, "spread": (max(speeds) - min(speeds)) / med if med else 0.0,
            "runs": len(speeds)}


def measure_plane(plane: np.ndarray, ctx: np.ndarray, nctx: int, repeat: int,
                  numpy_repeat: int) -> dict[str, Any]:
    n = plane.size
    zc = zstandard.ZstdCompressor(level=1, write_content_size=True)
    zd = zstandard.ZstdDecompressor()
    out = np.empty(n, np.uint8)
    t: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for r in range(repeat):
        dt, z = _timed(lambda: zc.compress(plane))
        t.setdefault("zstd_enc", []).append(dt)
        dt, raw = _timed(lambda: zd.decompress(z, max_output_size=n))
        t.setdefault("zstd_dec", []).append(dt)
        assert raw == plane.tobytes()
        sizes["zstd"] = len(z)
        for name, c, m in (("o0", None, 1), ("ctx", ctx, nctx)):
            dt, body = _timed(lambda: entropy.encode(plane, c, m))
            t.setdefault(f"{name}_enc", []).append(dt)
            dt, _ = _timed(lambda: entropy.decode(body, n, c, m, out=out))
            t.setdefault(f"{name}_dec", []).append(dt)
            assert np.array_equal(out, plane)
            sizes[name] = len(body)
            dt, est = _timed(lambda: entropy.estimate(plane, c, m))
            t.setdefault(f"{name}_est", []).append(dt)
            sizes[f"{name}_estimate"] = est
            if r < numpy_repeat:
                old = entropy.set_native(False)
                try:
                    dt, _ = _timed(lambda: entropy.decode(body, n, c, m, out=out))
                finally:
                    entropy.set_native(old)
                t.setdefault(f"{name}_numpy_dec", []).append(dt)
                assert np.array_equal(out, plane)
    res: dict[str, Any] = {"bytes": n, "sizes": sizes,
                           "ratio": {k: n / v for k, v in sizes.items()
                                     if not k.endswith("estimate")}}
    res["speed"] = {k: _stats(n, v) for k, v in t.items()}
    res["estimate_error"] = {k: sizes[f"{k}_estimate"] / sizes[k] - 1 for k in ("o0", "ctx")}
    return res


def block_sweep(plane: np.ndarray, ctx: np.ndarray, nctx: int) -> list[dict[str, Any]]:
    rows = []
    for bl in (14, 15, 16, 17, 18, 20):
        rows.append({"block_log2": bl,
                     "o0_ratio": plane.size / len(entropy.encode(plane, block_log2=bl)),
                     "ctx_ratio": plane.size / len(entropy.encode(plane, ctx, nctx,
                                                                   block_log2=bl))})
    return rows


def _cell(s: dict[str, float]) -> str:
    return f"{s['mbps']:.0f} ±{50 * s['spread']:.0f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run; writes nothing")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if not entropy.can_encode():
        print("deltackpt.format._entropy is not built (or DELTACKPT_NATIVE=0): nothing to measure")
        return 2
    repeat = args.repeat or (1 if args.quick else 9)
    numpy_repeat = 1 if args.quick else 3
    ref, new, desc = training_states(args.quick)
    rows = []
    sweep: list[dict[str, Any]] = []
    for group in GROUPS:
        words = ref[group].size
        xor = (ref[group] ^ new[group]).view(np.uint8)
        grouped = planes.split(xor, 4, np.empty(xor.size, np.uint8))
        ctx, nctx = buckets(ref[group].view(np.uint8).reshape(words, 4)[:, 3].copy())
        for k in range(4):
            plane = np.ascontiguousarray(grouped[k])
            r = measure_plane(plane, ctx, nctx, repeat, numpy_repeat)
            r.update(group=group, plane=k, nctx=nctx)
            rows.append(r)
            if k == 3 and group == "params" and not args.quick:
                sweep = block_sweep(plane, ctx, nctx)
    rng = np.random.default_rng(0)
    skewed = (rng.geometric(0.2, 1 << 20) % 256).astype(np.uint8)
    syn = measure_plane(skewed, np.zeros(skewed.size, np.uint8), 1, repeat, numpy_repeat)
    syn.update(group="synthetic geometric(0.2), 1 MiB", plane="-", nctx=1)
    rows.append(syn)

    simd = "AVX2" if _simd() else "scalar"
    lines = ["# rANS plane coder vs zstd level 1", "",
             f"`python benchmarks/bench_entropy.py{' --quick' if args.quick else ''}` on "
             f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} CPUs, "
             f"commit {git_commit()}, zstandard {zstandard.__version__}, decoder {simd}.",
             "", f"Data: XOR of consecutive steps, {desc}. Planes: byte k of each fp32 word "
             "(3 = sign + high exponent bits). ctx: bucketed reference top byte. MB/s of plane "
             f"bytes per CPU second of the one thread, median of {repeat} interleaved repeats "
             f"(numpy decoder: {numpy_repeat}); ±x% = half the (max - min) spread over the repeats.", "",
             "| group | plane | MiB | ratio zstd-1 | ratio o0 | ratio ctx | zstd enc | zstd dec "
             "| o0 enc | o0 dec | ctx enc | ctx dec | numpy dec o0 | numpy dec ctx | estimate "
             "error o0 / ctx |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, q = r["speed"], r["ratio"]
        ctx_cells = (f"{q['ctx']:.3f}", _cell(s["ctx_enc"]), _cell(s["ctx_dec"]),
                     _cell(s["ctx_numpy_dec"])) if r["nctx"] > 1 else ("-", "-", "-", "-")
        lines.append(
            f"| {r['group']} | {r['plane']} | {r['bytes'] / 2**20:.2f} | {q['zstd']:.3f} | "
            f"{q['o0']:.3f} | {ctx_cells[0]} | {_cell(s['zstd_enc'])} | {_cell(s['zstd_dec'])} | "
            f"{_cell(s['o0_enc'])} | {_cell(s['o0_dec'])} | {ctx_cells[1]} | {ctx_cells[2]} | "
            f"{_cell(s['o0_numpy_dec'])} | {ctx_cells[3]} | "
            f"{100 * r['estimate_error']['o0']:+.1f}% / "
            f"{100 * r['estimate_error']['ctx']:+.1f}% |")
    if sweep:
        lines += ["", "Block size (params, plane 3): ratio by `block_log2` (defaults: "
                  f"{entropy.BLOCK_LOG2_ORDER0} order 0, {entropy.BLOCK_LOG2_CTX} ctx)", "",
                  "| block_log2 | o0 ratio | ctx ratio |", "|---|---|---|"]
        lines += [f"| {s['block_log2']} | {s['o0_ratio']:.3f} | {s['ctx_ratio']:.3f} |"
                  for s in sweep]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_results(args.out, "entropy", text,
                            {"data": desc, "repeat": repeat, "numpy_repeat": numpy_repeat,
                             "decoder": simd, "commit": git_commit(), "rows": rows,
                             "block_sweep": sweep})
    return 0


def _simd() -> bool:
    from deltackpt.format import _entropy
    on = _entropy.set_simd(True)
    _entropy.set_simd(on)
    return bool(on)


if __name__ == "__main__":
    sys.exit(main())
