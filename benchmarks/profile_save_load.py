"""Where the time of a lossless save, a keyframe load and a latest-step load goes, on the
suite's workload (a) (dense fp32 GPT + AdamW, 12 saves 3 steps apart, ~37 MiB per checkpoint).

Three views, each of every thread (the writer thread and the worker pool do the work, the
caller mostly waits):

* ``wall``: wall clock per operation against torch.save + fsync / torch.load of the same step,
  interleaved round by round (median [min..max]); minor page faults and kernel time per op.
* ``cprofile``: cProfile in every thread, timed by each thread's CPU clock (time.thread_time,
  so waiting for the GIL or a lock is not counted); C calls (zstd, xxh3, the plane kernels,
  json, fsync) show up under their own names. Per-call Python overhead is inflated by the
  profiler; ranked by CPU seconds, grouped into cost categories. Read the C calls' figures
  (stable run to run); a cheap Python function sometimes shows a large tottime (seen on
  threading's acquire in one run and frame._compressor in the next), so trust no single
  Python row that a second run does not repeat.
* ``sample``: a sampling thread reads every thread's stack every ~1 ms (sys._current_frames),
  no profiler overhead on the workers; each sample is put in a category by its innermost
  deltackpt/torch/stdlib frame; idle workers (waiting for work) are left out.

    PYTHONPATH=. python benchmarks/profile_save_load.py                 # all three views
    PYTHONPATH=. python benchmarks/profile_save_load.py --mode wall --rounds 7
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suitekit.workloads import make_workloads  # noqa: E402

import deltackpt  # noqa: E402


def checkpoints(quick: bool) -> list[tuple[int, Any]]:
    wl = next(w for w in make_workloads(quick, 1.0, None, None) if w.key == "a")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [(s, copy.deepcopy(st)) for s, st in wl.checkpoints()]
    finally:
        torch.set_num_threads(threads)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Usage:
    """Wall time, minor page faults and kernel CPU time of a block (whole process)."""

    def __enter__(self) -> Usage:
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.minflt = r1.ru_minflt - self.r0.ru_minflt
        self.stime = r1.ru_stime - self.r0.ru_stime
        self.utime = r1.ru_utime - self.r0.ru_utime


def fmt(xs: list[float]) -> str:
    return (f"{statistics.median(xs) * 1e3:7.1f} ms [{min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f}, "
            f"n={len(xs)}]")


def save_all(root: str, cps: list[tuple[int, Any]], **policy: Any) -> list[Usage]:
    out = []
    with deltackpt.open(root, **policy) as repo:
        for step, state in cps:
            with Usage() as u:
                repo.save(step, state)
            out.append(u)
    return out


def load(root: str, step: int) -> Usage:
    with Usage() as u, deltackpt.open(root, mode="r") as r:
        r.load(step)
    return u


def wall(cps: list[tuple[int, Any]], rounds: int, tmp: str) -> None:
    key, last = cps[0][0], cps[-1][0]
    res: dict[str, list[Usage]] = {}
    for rnd in range(rounds):
        root = os.path.join(tmp, f"w{rnd}")
        tdir = os.path.join(tmp, f"t{rnd}")
        os.makedirs(tdir)
        with deltackpt.open(root) as repo:
            for i, (step, state) in enumerate(cps):
                order = ("d", "t") if (i + rnd) % 2 == 0 else ("t", "d")
                for who in order:
                    if who == "d":
                        with Usage() as u:
                            repo.save(step, state)
                        res.setdefault("save deltackpt (fsync inside)", []).append(u)
                    else:
                        p = os.path.join(tdir, f"{step}.pt")
                        with Usage() as u:
                            torch.save(state, p)
                            fsync_file(p)
                        res.setdefault("save torch.save + fsync", []).append(u)
        for s, name in ((key, "keyframe"), (last, "latest")):
            order = ("d", "t") if rnd % 2 == 0 else ("t", "d")
            for who in order:
                if who == "d":
                    res.setdefault(f"load {name} step {s} deltackpt", []).append(load(root, s))
                else:
                    with Usage() as u:
                        torch.load(os.path.join(tdir, f"{s}.pt"), weights_only=True)
                    res.setdefault(f"load {name} step {s} torch.load", []).append(u)
        if rnd:
            shutil.rmtree(os.path.join(tmp, f"w{rnd - 1}"), ignore_errors=True)
            shutil.rmtree(os.path.join(tmp, f"t{rnd - 1}"), ignore_errors=True)
    print(f"\n## wall clock ({rounds} rounds, interleaved; per op: median [min..max])\n")
    print("| operation | wall | minor faults (median) | user CPU | sys CPU |")
    print("|---|---|---|---|---|")
    for name, us in res.items():
        print(f"| {name} | {fmt([u.wall for u in us])} | "
              f"{statistics.median(u.minflt for u in us):.0f} | "
              f"{statistics.median(u.utime for u in us) * 1e3:.0f} ms | "
              f"{statistics.median(u.stime for u in us) * 1e3:.0f} ms |")
    for op in ("save", f"load keyframe step {key}", f"load latest step {last}"):
        d = [u.wall for n, us in res.items() if n.startswith(op) and "deltackpt" in n
             for u in us]
        t = [u.wall for n, us in res.items() if n.startswith(op) and "torch" in n for u in us]
        if d and t:
            ratio = statistics.median(d) / statistics.median(t)
            print(f"\n{op}: deltackpt / torch median ratio {ratio:.2f}x")


# --------------------------------------------------------------------------------- categories
CATEGORIES = [  # (substring of "file:function" or of the C function's name, category, owner)
    ("ZstdCompressor' objects>", "zstd compress", "frame.py"),
    ("ZstdDecompressor' objects>", "zstd decompress", "frame.py"),
    ("frame_content_size", "zstd decompress", "frame.py"),
    ("xxhash", "xxh3 hashing", "writer.py / reconstruct.py / store/packs.py"),
    ("xxh3", "xxh3 hashing", "writer.py / reconstruct.py / store/packs.py"),
    ("_planes", "plane split/merge (C)", "planes.py / _planes.c"),
    ("planes.py", "plane split/merge (C)", "planes.py / _planes.c"),
    ("bitwise_xor", "xor delta / xor replay", "codecs/xor.py / reconstruct.py"),
    ("codecs/xor.py", "xor delta / xor replay", "codecs/xor.py / reconstruct.py"),
    ("posix.fsync", "fsync", "store/local.py"),
    ("fsync", "fsync", "store/local.py"),
    ("posix.pread", "file read", "store/local.py"),
    ("posix.read", "file read", "store/local.py"),
    ("posix.write", "file write", "store/local.py"),
    ("posix.pwrite", "file write", "store/local.py"),
    ("BufferedWriter", "file write", "store/local.py"),
    ("BufferedReader", "file read", "store/local.py"),
    ("FileIO", "file read", "store/local.py"),
    ("posix.rename", "rename/open/stat", "store/local.py"),
    ("posix.replace", "rename/open/stat", "store/local.py"),
    ("posix.open", "rename/open/stat", "store/local.py"),
    ("posix.stat", "rename/open/stat", "store/local.py"),
    ("posix.fstat", "rename/open/stat", "store/local.py"),
    ("posix.listdir", "rename/open/stat", "store/local.py"),
    ("posix.scandir", "rename/open/stat", "store/local.py"),
    ("json", "manifest JSON encode/parse", "manifest.py / checksum.py"),
    ("manifest.py", "manifest build/parse (Python)", "manifest.py"),
    ("checksum.py", "manifest JSON encode/parse", "checksum.py"),
    ("tree.py", "tree flatten/unflatten", "tree.py"),
    ("frame.py", "frame header/join (Python + copy)", "frame.py"),
    ("bytes' objects>", "frame header/join (Python + copy)", "frame.py"),
    ("writer.py:_chunk", "reference copy (ref_out)", "writer.py"),
    ("writer.py", "per-chunk Python (encoder)", "writer.py"),
    ("reconstruct.py", "per-chunk Python (reconstruct)", "reconstruct.py"),
    ("store/packs.py", "chunk store Python (packs)", "store/packs.py"),
    ("store/local.py", "local backend Python", "store/local.py"),
    ("hugepages", "allocation (madvise)", "hugepages.py"),
    ("torch.empty", "allocation", "repository.py"),
    ("numpy.empty", "allocation", "repository.py / scratch.py"),
    ("scratch.py", "allocation", "scratch.py"),
    ("repository.py", "repository Python (save/load driver)", "repository.py"),
    ("dtypes.py", "dtype/raw-bytes views", "dtypes.py"),
    ("concurrent/futures", "thread hand-offs (futures)", "writer.py bounded_map / repository.py"),
    ("threading.py", "thread hand-offs (locks/conditions)", "writer.py / repository.py"),
    ("queue.py", "thread hand-offs (locks/conditions)", "writer.py / repository.py"),
    ("acquire", "thread hand-offs (locks/conditions)", "writer.py / repository.py"),
    ("torch", "torch calls (views, tensor wrap)", "writer.py / repository.py / tree.py"),
    ("numpy", "numpy calls (views, copies)", "various"),
]


def categorize(label: str) -> tuple[str, str]:
    for needle, cat, owner in CATEGORIES:
        if needle in label:
            return cat, owner
    return "other: " + label[:60], "?"


# ---------------------------------------------------------------------------------- cProfile
class ThreadProfiles:
    """cProfile (thread CPU clock) in every thread started while installed, plus the caller."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._run = threading.Thread.run
        self._lock = threading.Lock()

    def __enter__(self) -> ThreadProfiles:
        outer = self

        def run(thread: threading.Thread) -> None:
            prof = cProfile.Profile(time.thread_time)
            with outer._lock:
                outer.profiles.append(prof)
            prof.enable()
            try:
                outer._run(thread)
            finally:
                prof.disable()

        threading.Thread.run = run  # type: ignore[method-assign]
        self.main = cProfile.Profile(time.thread_time)
        self.profiles.append(self.main)
        self.main.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.main.disable()
        threading.Thread.run = self._run  # type: ignore[method-assign]

    def stats(self) -> pstats.Stats:
        st = pstats.Stats(self.profiles[0])
        for p in self.profiles[1:]:
            try:
                st.add(p)
            except TypeError:  # a profile that recorded nothing
                pass
        return st


def _label(func: tuple[str, int, str]) -> str:
    path, _line, name = func
    if path == "~":
        return name  # a C function: "<method 'compress' of 'zstd.ZstdCompressor' objects>"
    for marker in ("deltackpt/", "site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{name}"


def cprofile_view(title: str, fn: Any) -> None:
    with ThreadProfiles() as tp:
        t0 = time.perf_counter()
        fn()
        wall_s = time.perf_counter() - t0
    st = tp.stats()
    by_cat: Counter[tuple[str, str]] = Counter()
    funcs = []
    for func, (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        lab = _label(func)
        by_cat[categorize(lab)] += tt
        funcs.append((tt, nc, lab))
    total = sum(by_cat.values())
    print(f"\n## cProfile, all threads, thread CPU time: {title} (wall {wall_s * 1e3:.0f} ms "
          f"under the profiler; CPU {total * 1e3:.0f} ms)\n")
    print("| rank | category | CPU ms | share | owner |")
    print("|---|---|---|---|---|")
    for i, ((cat, owner), tt) in enumerate(by_cat.most_common(16), 1):
        print(f"| {i} | {cat} | {tt * 1e3:.0f} | {100 * tt / total:.1f}% | {owner} |")
    print("\ntop functions (tottime, CPU):")
    for tt, nc, lab in sorted(funcs, reverse=True)[:22]:
        print(f"  {tt * 1e3:8.1f} ms  {nc:7d} calls  {lab}")


# ----------------------------------------------------------------------------------- sampler
IDLE = ("threading.py:wait", "queue.py:get", "thread.py:_worker", "_base.py:result",
        "threading.py:_wait_for_tstate_lock", "threading.py:join", "_base.py:wait")


class Sampler:
    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.samples: Counter[tuple[str, str]] = Counter()
        self.lines: Counter[str] = Counter()
        self.idle = 0
        self.n = 0

    def __enter__(self) -> Sampler:
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _loop(self) -> None:
        me = threading.get_ident()
        main = threading.main_thread().ident
        while not self._stop.is_set():
            frames = sys._current_frames()
            for ident, frame in frames.items():
                if ident == me:
                    continue
                inner = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                if inner.startswith(IDLE) or ident == main and inner.startswith(IDLE):
                    self.idle += 1
                    continue
                f, lab = frame, None
                while f is not None:  # the innermost frame of deltackpt (else the innermost)
                    path = f.f_code.co_filename
                    if "deltackpt" in path:
                        rel = path.split("deltackpt/", 1)[-1]
                        lab = f"{rel}:{f.f_code.co_name}:{f.f_lineno}"
                        break
                    f = f.f_back
                if lab is None:
                    lab = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
                try:
                    import linecache
                    src = linecache.getline(f.f_code.co_filename, f.f_lineno).strip() \
                        if f is not None else ""
                except Exception:  # noqa: BLE001
                    src = ""
                self.lines[f"{lab}  | {src[:70]}"] += 1
                self.samples[categorize_line(lab, src)] += 1
                self.n += 1
            time.sleep(self.interval)


def categorize_line(lab: str, src: str) -> tuple[str, str]:
    s = src
    rules = [
        ("_worth_compressing" in lab or ("compress(" in s and "decompress" not in s),
         ("zstd compress", "frame.py")),
        ("decompress" in s or "frame_content_size" in s, ("zstd decompress", "frame.py")),
        ("xxh3" in s or "chunk_id(" in s, ("xxh3 hashing", "writer.py / reconstruct.py / "
                                                            "store/packs.py")),
        ("split(" in s or "merge(" in s or "planes.py" in lab,
         ("plane split/merge (C)", "planes.py / _planes.c")),
        ("bitwise_xor" in s or "xor.py" in lab or "encode_into" in s,
         ("xor delta / xor replay", "codecs/xor.py / reconstruct.py")),
        ("fsync" in s or "fsync" in lab, ("fsync", "store/local.py")),
        ("read_range" in s or "pread" in s or "read(" in s and "local.py" in lab,
         ("file read", "store/local.py")),
        (".write(" in s and ("local.py" in lab or "packs.py" in lab),
         ("file write", "store/local.py / store/packs.py")),
        ("join(" in s and "frame.py" in lab, ("frame join (copy)", "frame.py")),
        ("ref_out[" in s, ("reference copy (ref_out)", "writer.py")),
        ("tree.py" in lab, ("tree flatten/unflatten", "tree.py")),
        ("manifest.py" in lab or "checksum.py" in lab or "to_bytes" in s or "from_bytes" in s,
         ("manifest JSON encode/parse", "manifest.py / checksum.py")),
        ("_allocate" in lab or "empty(" in s or "scratch(" in s or "buffer(" in s,
         ("allocation", "repository.py / scratch.py")),
        ("submit(" in s or "result()" in s or "bounded_map" in lab,
         ("thread hand-offs", "writer.py bounded_map")),
        ("staging.py" in lab, ("staging copy", "staging.py")),
    ]
    for cond, cat in rules:
        if cond:
            return cat
    return ("other: " + lab, "?")


def sample_view(title: str, fn: Any) -> None:
    with Sampler() as sm:
        t0 = time.perf_counter()
        fn()
        wall_s = time.perf_counter() - t0
    print(f"\n## sampled stacks, all threads (~1 ms): {title} (wall {wall_s * 1e3:.0f} ms, "
          f"{sm.n} busy thread-samples, {sm.idle} idle left out)\n")
    print("| rank | category | samples | share | owner |")
    print("|---|---|---|---|---|")
    for i, ((cat, owner), n) in enumerate(sm.samples.most_common(16), 1):
        print(f"| {i} | {cat} | {n} | {100 * n / max(1, sm.n):.1f}% | {owner} |")
    print("\ntop lines:")
    for line, n in sm.lines.most_common(18):
        print(f"  {n:6d}  {line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("all", "wall", "cprofile", "sample"), default="all")
    ap.add_argument("--rounds", type=int, default=5, help="wall: rounds (fresh repository)")
    ap.add_argument("--loads", type=int, default=5, help="profiled loads of each step")
    ap.add_argument("--quick", action="store_true", help="the suite's --quick workload (a)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cps = checkpoints(args.quick)
    mib = sum(v.numel() * v.element_size() for v in _tensors(cps[0][1])) / 2**20
    print(f"workload (a): {len(cps)} checkpoints of {mib:.1f} MiB (steps {cps[0][0]}.."
          f"{cps[-1][0]}), built in {time.perf_counter() - t0:.0f} s; deltackpt "
          f"{deltackpt.__version__}, workers={deltackpt.Policy().workers}, "
          f"load average {os.getloadavg()[0]:.1f}")
    tmp = tempfile.mkdtemp(prefix="deltackpt-prof-", dir=os.environ.get("BENCH_TMP"))
    try:
        if args.mode in ("all", "wall"):
            wall(cps, args.rounds, tmp)
        key, last = cps[0][0], cps[-1][0]
        views = {"cprofile": cprofile_view, "sample": sample_view}
        for mode, view in views.items():
            if args.mode not in ("all", mode):
                continue
            root = os.path.join(tmp, mode)
            view(f"lossless save of all {len(cps)} steps", functools.partial(save_all, root, cps))
            for what, s in (("keyframe", key), ("latest", last)):
                view(f"load of {what} step {s} x{args.loads} (fresh reader each)",
                     functools.partial(_loads, root, s, args.loads))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _loads(root: str, step: int, n: int) -> None:
    for _ in range(n):
        load(root, step)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


if __name__ == "__main__":
    sys.exit(main())
