"""Storage-cost suite: every checkpoint method side by side on six workloads, in one run.

Methods (each checkpoint of a run is written by every method, in a rotating order):

* ``torch.save``           the baseline (one ``.pt`` file per step; no fsync, as users call it)
* ``safetensors``          ``safetensors.torch.save_file`` of the flattened tensors; non-tensor
                           values (step counters, scheduler fields, hyper-parameters) are NOT
                           stored by this method
* ``safetensors+zstd``     the same file's bytes compressed with zstd level 3 (all cores)
* ``zipnn``                ZipNN, lossless, per tensor with ``input_format="torch"`` (the usage
                           its README shows; dtype-aware byte grouping); tensors of dtypes ZipNN
                           does not take (int, bool) go through zstd level 3; tensors only
* ``deltackpt``            deltackpt, default (lossless) policy, ``save(...)`` blocking
* ``deltackpt async``      the same policy with ``save(..., blocking=False)``: the stall is the
                           time until the call returns, the save time is until ``wait()`` returns
* ``deltackpt balanced`` / ``deltackpt archive``   the lossy presets (not bit-exact at every step)

Workloads (generated locally from fixed seeds, no downloads):

a) dense pre-training of the char transformer of deltackpt.cli.demo with AdamW, fp32
b) the same with bf16 mixed precision: bf16 model weights rounded from fp32 master params that
   AdamW updates; the checkpoint holds the bf16 model and the fp32 master + optimizer (forward
   and backward run in fp32 on the bf16-rounded weights: bf16 matmuls are emulated, several times
   slower, on this CPU build; the bytes checkpointed are the same kind)
c) fine-tuning with a frozen backbone (``Trainer(freeze_backbone=True)``)
d) LoRA adapters (rank 8) on every linear projection of a frozen base; full state_dict saved
e) a recommendation model: a 200k x 32 item table and a 20k x 32 user table
   (``nn.Embedding(sparse=True)`` + ``SparseAdam``), a dense MLP with Adam; Zipf-popular items,
   so each step touches a few hundred rows
f) a large synthetic state (1 GiB at --scale 1): float32 tensors shaped like a transformer plus
   two Adam moments, advanced by a random-walk Adam update between saves; few saves (throughput)

Measured per workload x method: bytes on disk (total and per save), save time (median), the
async stall, load time of the last step (median, a fresh reader each time), the load time of
every step (median of up to 3 interleaved rounds; the worst ratio of those medians to
torch.load of the same step), bit-exactness of every restored
step (tensor bytes, dtypes, shapes and non-tensor values compared with fingerprints taken at save
time), and peak RSS during save and load.

Peak RSS: the process's high-water mark (VmHWM in /proc/self/status) is reset to the current RSS
by writing "5" to /proc/self/clear_refs right before each save/load, and read right after; the
figure reported is the peak minus the RSS just before the call, i.e. the memory the call needed on
top of what the process already held (the training state, and for deltackpt its reference). It is
taken on each method's last save and last load, after ``malloc_trim(0)`` so that heap memory
freed earlier is given back to the OS and a new allocation shows up as RSS rather than silently
reusing a free list (the other, timed samples run on the heap as it is, like a training loop's).
Where clear_refs is not writable, a psutil thread samples RSS every 2 ms instead. The memory a
deltackpt repository keeps between saves (its delta reference) is measured as the RSS freed by
closing it.

Targets (workloads a and f, each against the same run's torch.save / torch.load; listed
first in suite.md, MET / MISSED / N/A with the figures and their spread): lossless save <= 1.0x
torch.save followed by fsync (moonshot <= 0.8x) with no loss in size; ``save(blocking=False)``
stall <= 0.15x torch.save; load of a keyframe step (the first saved step: every step once per
round, then extra rounds of it) <= 1.0x torch.load; load of the latest step <= 1.2x; load of
every saved step <= 2.0x (the worst step); lossless bytes >= the previous default format's
(results/suite_baseline.json: exact bytes per run configuration, compared byte for byte when
this run's configuration and torch.save bytes match it, else as ratios to torch.save). A
missed target does not change the exit status: 1 means a lossless method restored a step
that is not bit-exact, or a deltackpt method failed (a crash).

    python benchmarks/suite.py            # full run (~15-20 min on 2 cores); writes results/
    python benchmarks/suite.py --quick    # CI-sized run (~2.5 min on 2 cores); a temp dir
    python benchmarks/suite.py --scale 2  # larger models / tables / big state
    python benchmarks/suite.py --rerender # rebuild suite.md + plots from results/suite.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
import zstandard
from torch import nn
from torch.nn.utils import parametrize

import deltackpt
from deltackpt.cli.demo import GPTConfig, Trainer

MiB = 1 << 20
GiB = 1 << 30

# the targets, for workloads (a) dense fp32 and (f) large state, against the same run's torch
TARGET_WORKLOADS = ("a", "f")
TARGET_SAVE = 1.0       # lossless save <= torch.save followed by fsync ...
MOONSHOT_SAVE = 0.8     # ... (moonshot: <= 0.8x), with no loss in size against the baseline
TARGET_STALL = 0.15     # save(blocking=False) stall <= 0.15x torch.save
TARGET_LOAD_KEY = 1.0   # load of a keyframe step (the first saved) <= torch.load of that step
TARGET_LOAD_LAST = 1.2  # load of the latest step <= 1.2x torch.load
TARGET_LOAD_ANY = 2.0   # load of every saved step <= 2x torch.load of the same step (worst)
#: the lossless bytes of the previous default format, per run configuration (see load_baseline)
BASELINE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "suite_baseline.json")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


HWM = _can_reset_hwm()

try:
    import ctypes
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except OSError:
    _LIBC = None


def trim() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise, hiding allocations)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss() -> int:
    if HWM:
        return _status_kb("VmRSS")
    import psutil
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS during a block, minus the RSS at its start (``extra``)."""

    method = ("VmHWM reset via /proc/self/clear_refs" if HWM
              else "psutil RSS sampling thread (2 ms)")

    def __init__(self, clean: bool = True) -> None:
        self.clean = clean  # trim the heap first: only for samples whose memory is reported

    def __enter__(self) -> PeakRSS:
        if self.clean:
            trim()
        self.before = rss()
        if HWM:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if HWM:
            self.peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, rss())
        self.extra = max(0, self.peak - self.before)


# ----------------------------------------------------------------------------- state trees
def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every tensor and plain value of a nested state."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from walk(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)) and obj:
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}/{i}" if path else str(i))
    else:
        yield path, obj


def tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.numel() == 0:
        return xxhash.xxh3_128(b"").digest()
    return xxhash.xxh3_128(t.contiguous().reshape(-1).view(torch.uint8).numpy()).digest()


def fingerprint(state: Any) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for path, v in walk(state):
        if isinstance(v, torch.Tensor):
            out[path] = ("T", str(v.dtype), tuple(v.shape), tensor_digest(v))
        else:
            out[path] = ("V", repr(v))
    return out


def compare(saved: dict[str, tuple[Any, ...]], loaded: Any, tensors_only: bool) -> dict[str, int]:
    """Counts of tensors/values restored bit-exactly, differing, or missing."""
    got = fingerprint(loaded)
    res = {"tensors": 0, "tensor_mismatch": 0, "values": 0, "value_mismatch": 0,
           "values_not_stored": 0}
    for path, fp in saved.items():
        if fp[0] == "T":
            res["tensors"] += 1
            if got.get(path) != fp:
                res["tensor_mismatch"] += 1
        else:
            res["values"] += 1
            if tensors_only:
                res["values_not_stored"] += 1
            elif got.get(path) != fp:
                res["value_mismatch"] += 1
    return res


def touch(obj: Any) -> None:
    """Read one byte of every 4 KiB page of every tensor: a lazily mapped load (safetensors
    memory-maps its file) is then as resident as an eager one, inside the timed region."""
    for _, v in walk(obj):
        if isinstance(v, torch.Tensor) and v.numel():
            b = v.detach().reshape(-1).view(torch.uint8)
            int(b[::4096].sum())


def flat_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The state's tensors by path, contiguous, no two sharing storage (safetensors' rules)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, v in walk(state):
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            if ptr in seen:
                t = t.clone()
            elif ptr != -1:
                seen.add(ptr)
            out[path] = t
    return out


def state_bytes(state: Any) -> int:
    return sum(v.numel() * v.element_size() for _, v in walk(state)
               if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------------------- methods
class Method:
    name = ""
    lossless = True
    tensors_only = False
    note = ""
    #: whether a save (plus the fsync the suite adds for file methods) survives power loss
    durable = True

    def setup(self, root: str) -> None:
        self.dir = os.path.join(root, self.key)
        os.makedirs(self.dir, exist_ok=True)

    @property
    def key(self) -> str:
        return self.name.replace(" ", "_").replace("+", "_").replace(".", "_")

    def save(self, step: int, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def disk(self) -> int:
        total = 0
        for dirpath, _d, files in os.walk(self.dir):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def load(self, step: int) -> Any:
        raise NotImplementedError

    def finish(self) -> int:
        """End of the save phase; returns bytes of memory freed (held between saves)."""
        return 0


class FileMethod(Method):
    suffix = ""

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step}{self.suffix}")

    def sync(self, step: int) -> None:
        fd = os.open(self.path(step), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class TorchSave(FileMethod):
    name, suffix = "torch.save", ".pt"

    def save(self, step: int, state: Any) -> dict[str, Any]:
        torch.save(state, self.path(step))
        return {}

    def load(self, step: int) -> Any:
        return torch.load(self.path(step), weights_only=True)


class SafeTensors(FileMethod):
    name, suffix, tensors_only = "safetensors", ".safetensors", True
    note = "tensors only: non-tensor values are not stored"

    def save(self, step: int, state: Any) -> dict[str, Any]:
        from safetensors.torch import save_file
        save_file(flat_tensors(state), self.path(step))
        return {}

    def load(self, step: int) -> Any:
        from safetensors.torch import load_file
        return load_file(self.path(step))


class SafeTensorsZstd(FileMethod):
    name, suffix, tensors_only = "safetensors+zstd", ".safetensors.zst", True
    note = "zstd level 3 (all cores) of the safetensors bytes; tensors only"

    def save(self, step: int, state: Any) -> dict[str, Any]:
        from safetensors.torch import save
        data = save(flat_tensors(state))
        comp = zstandard.ZstdCompressor(level=3, threads=-1).compress(data)
        del data
        with open(self.path(step), "wb") as f:
            f.write(comp)
        return {}

    def load(self, step: int) -> Any:
        from safetensors.torch import load
        with open(self.path(step), "rb") as f:
            comp = f.read()
        data = zstandard.ZstdDecompressor().decompress(comp)
        del comp
        return load(data)


ZIPNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ZipNNMethod(FileMethod):
    """ZipNN per tensor (input_format="torch"), in a small container file:
    b"ZNNC" | u64 header length | JSON header [[path, dtype, shape, codec, length], ...] | blobs.

    zipnn 0.5.4 compresses *in place*: compress() scrambles the buffer it is given (even a
    Python ``bytes``), so each tensor is copied first (the copy is part of the save time)."""

    name, suffix, tensors_only = "zipnn", ".znnc", True
    note = "per tensor, input_format=torch; int/bool tensors via zstd-3; tensors only"

    def __init__(self) -> None:
        import zipnn  # noqa: F401 - fail here (recorded) if unavailable
        self.version = _pkg_version("zipnn")

    def save(self, step: int, state: Any) -> dict[str, Any]:
        from zipnn import ZipNN
        z = ZipNN(input_format="torch")
        zc = zstandard.ZstdCompressor(level=3)
        header, blobs = [], []
        for path, t in flat_tensors(state).items():
            if t.dtype in ZIPNN_DTYPES and t.numel():
                blob, codec = bytes(z.compress(t.clone())), "zipnn"
            else:
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                blob, codec = zc.compress(raw), "zstd"
            header.append([path, str(t.dtype).removeprefix("torch."), list(t.shape), codec,
                           len(blob)])
            blobs.append(blob)
        head = json.dumps(header).encode()
        with open(self.path(step), "wb") as f:
            f.write(b"ZNNC" + struct.pack("<Q", len(head)) + head)
            for b in blobs:
                f.write(b)
        return {}

    def load(self, step: int) -> Any:
        from zipnn import ZipNN
        z = ZipNN(input_format="torch")
        zd = zstandard.ZstdDecompressor()
        with open(self.path(step), "rb") as f:
            data = f.read()
        n = struct.unpack("<Q", data[4:12])[0]
        header = json.loads(data[12:12 + n])
        pos, out = 12 + n, {}
        for path, dtype, shape, codec, length in header:
            blob = data[pos:pos + length]
            pos += length
            dt = getattr(torch, dtype)
            if codec == "zipnn":
                t = z.decompress(blob)
            elif math.prod(shape) == 0:
                t = torch.empty(shape, dtype=dt)
            else:
                raw = bytearray(zd.decompress(blob))
                t = torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(shape)
            out[path] = t
        return out


class DeltaMethod(Method):
    def __init__(self, name: str, policy: str | None = None, blocking: bool = True,
                 **options: Any) -> None:
        self.name = name
        self.policy = policy
        self.options = options
        self.durable = options.get("fsync", True)
        self.blocking = blocking
        self.lossless = policy in (None, "lossless")
        self.repo: Any = None
        if not self.lossless:
            self.note = f"lossy preset {policy!r}"
        elif not blocking:
            self.note = "save(..., blocking=False)"
        elif options:
            self.note = ", ".join(f"{k}={v!r}" for k, v in options.items())

    def setup(self, root: str) -> None:
        super().setup(root)
        self.repo = deltackpt.open(os.path.join(self.dir, "repo"), policy=self.policy,
                                   **self.options)

    def save(self, step: int, state: Any) -> dict[str, Any]:
        if self.blocking:
            info = self.repo.save(step, state)
            return {"exact": info.exact, "max_rel_error": info.max_rel_error, "kind": info.kind}
        t0 = time.perf_counter()
        fut = self.repo.save(step, state, blocking=False)
        stall = time.perf_counter() - t0
        self.repo.wait()
        info = fut.result()
        return {"stall_s": stall, "exact": info.exact, "max_rel_error": info.max_rel_error,
                "kind": info.kind}

    def disk(self) -> int:
        return self.repo.disk_usage()["total"] if self.repo is not None else super().disk()

    def finish(self) -> int:
        gc.collect()
        trim()
        before = rss()
        self.repo.close()
        self.repo = None
        gc.collect()
        trim()
        return max(0, before - rss())

    def load(self, step: int) -> Any:
        with deltackpt.open(os.path.join(self.dir, "repo"), mode="r") as r:
            return r.load(step)


def write_results(out_dir: str, stem: str, text: str, data: Any) -> None:
    """``out_dir/stem.md`` (the table a reader sees) and ``out_dir/stem.json`` (every figure)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _git_commit() -> str:
    """deltackpt's commit, "+dirty" if its package files differ from it (they change often)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(deltackpt.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "deltackpt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def _policies() -> dict[str, Any]:
    from deltackpt.engine.policy import preset
    return {"lossless": deltackpt.Policy().to_dict(), "balanced": preset("balanced").to_dict(),
            "archive": preset("archive").to_dict()}


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def make_methods() -> list[tuple[str, Callable[[], Method]]]:
    return [("torch.save", TorchSave), ("safetensors", SafeTensors),
            ("safetensors+zstd", SafeTensorsZstd), ("zipnn", ZipNNMethod),
            ("deltackpt", lambda: DeltaMethod("deltackpt")),
            ("deltackpt async", lambda: DeltaMethod("deltackpt async", blocking=False)),
            ("deltackpt fast-load", lambda: DeltaMethod("deltackpt fast-load",
                                                        keyframe_every=4)),
            ("deltackpt no-fsync", lambda: DeltaMethod("deltackpt no-fsync", fsync=False)),
            ("deltackpt balanced", lambda: DeltaMethod("deltackpt balanced", "balanced")),
            ("deltackpt archive", lambda: DeltaMethod("deltackpt archive", "archive"))]


# -------------------------------------------------------------------------------- workloads
def gpt_cfg(quick: bool, scale: float) -> GPTConfig:
    if quick:
        dim = max(32, round(64 * math.sqrt(scale) / 16) * 16)
        return GPTConfig(layers=2, dim=dim, block=64)
    dim = max(64, round(256 * math.sqrt(scale) / 32) * 32)
    return GPTConfig(layers=4, dim=dim, block=128)


def _checkpoints(trainer: Any, saves: int, every: int) -> Iterator[tuple[int, Any]]:
    while trainer.step < saves * every:
        trainer.train_step()
        if trainer.step % every == 0:
            yield trainer.step, trainer.state()


class BF16Trainer(Trainer):
    """bf16 mixed precision as far as the checkpoint is concerned: the model's weights are bf16,
    rounded from fp32 master params that AdamW updates. Forward/backward run in fp32 on the
    bf16-rounded weights (the CPU build here has no fast bf16 matmul: a bf16 step was several times
    slower), so the bytes checkpointed are those of bf16 training: bf16 model + fp32 master +
    fp32 optimizer state."""

    def __init__(self, cfg: GPTConfig, *, total_steps: int, lr: float = 3e-4,
                 batch: int = 16) -> None:
        super().__init__(cfg, total_steps=total_steps, lr=lr, batch=batch)
        self.master = {n: nn.Parameter(p.detach().clone())
                       for n, p in self.model.named_parameters()}
        self.bf16 = {n: t.detach().to(torch.bfloat16) if t.is_floating_point() else t
                     for n, t in self.model.state_dict().items()}
        self.opt = torch.optim.AdamW(list(self.master.values()), lr=lr, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    def train_step(self) -> float:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.bf16[name])  # compute with the bf16-rounded weights
        n = self.data.numel() - self.cfg.block - 1
        ix = torch.randint(0, n, (self.batch,), generator=self.gen)
        x = torch.stack([self.data[i:i + self.cfg.block] for i in ix.tolist()])
        y = torch.stack([self.data[i + 1:i + 1 + self.cfg.block] for i in ix.tolist()])
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in self.model.named_parameters():
            self.master[name].grad = p.grad
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for name, m in self.master.items():
                self.bf16[name].copy_(m)  # round the updated master to bf16
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, object]:
        return {"model": self.bf16, "master": self.master,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "data_rng": self.gen.get_state(), "step": self.step}


class LoRA(nn.Module):
    """W + (alpha/r) * B @ A as a parametrization of a frozen weight."""

    def __init__(self, out_f: int, in_f: int, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A)


def lora_trainer(cfg: GPTConfig, total_steps: int) -> Trainer:
    tr = Trainer(cfg, total_steps=total_steps, lr=1e-3)
    for p in tr.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(123)
    targets: list[tuple[nn.Module, str]] = [(tr.model.head, "weight")]
    for b in tr.model.blocks:
        targets += [(b.attn, "in_proj_weight"), (b.attn.out_proj, "weight"),
                    (b.mlp[0], "weight"), (b.mlp[2], "weight")]
    for mod, name in targets:
        w = getattr(mod, name)
        parametrize.register_parametrization(mod, name, LoRA(w.shape[0], w.shape[1]))
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    tr.sched = torch.optim.lr_scheduler.LambdaLR(
        tr.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return tr


class RecSys(nn.Module):
    def __init__(self, n_items: int, n_users: int, dim: int = 32) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, dim, sparse=True)
        self.users = nn.Embedding(n_users, dim, sparse=True)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.normal_(self.users.weight, std=0.05)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.users(u), self.items(i)], -1)).squeeze(-1)


class RecSysTrainer:
    """Clicks on Zipf-popular items from a hidden low-rank preference model; SparseAdam on the
    tables (only rows in the batch change), Adam on the MLP."""

    def __init__(self, n_items: int, n_users: int, batch: int = 512, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = RecSys(n_items, n_users)
        self.sparse_opt = torch.optim.SparseAdam(
            [self.model.items.weight, self.model.users.weight], lr=1e-2)
        self.dense_opt = torch.optim.Adam(self.model.mlp.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed + 7)
        self.hid_items = torch.randn(n_items, 8, generator=g)
        self.hid_users = torch.randn(n_users, 8, generator=g)
        ranks = torch.arange(1, n_items + 1, dtype=torch.float64)
        self.cdf = torch.cumsum(ranks ** -1.1, 0)
        self.cdf /= self.cdf[-1].clone()
        self.perm = torch.randperm(n_items, generator=g)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.n_users, self.batch, self.step = n_users, batch, 0

    def train_step(self) -> float:
        r = torch.rand(self.batch, generator=self.gen, dtype=torch.float64)
        items = self.perm[torch.searchsorted(self.cdf, r).clamp_(max=self.perm.numel() - 1)]
        users = torch.randint(0, self.n_users, (self.batch,), generator=self.gen)
        p = torch.sigmoid((self.hid_users[users] * self.hid_items[items]).sum(-1))
        y = torch.bernoulli(p, generator=self.gen)
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(users, items), y)
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "sparse_opt": self.sparse_opt.state_dict(),
                "dense_opt": self.dense_opt.state_dict(), "data_rng": self.gen.get_state(),
                "step": self.step}


class BigState:
    """A synthetic transformer-shaped fp32 state (params + Adam moments, 12 bytes/param) that
    moves by a random-walk Adam update between saves: every element changes a little."""

    def __init__(self, total_bytes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        n_params = total_bytes // 12
        d = 1024 if n_params >= 32 * 2**20 else 256
        per_layer = 12 * d * d + 4 * d
        layers = max(1, int(0.7 * n_params) // per_layer)
        vocab = max(1, (n_params - layers * per_layer) // d)
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
        for i in range(layers):
            shapes.update({f"layers.{i}.attn.qkv.weight": (3 * d, d),
                           f"layers.{i}.attn.out.weight": (d, d),
                           f"layers.{i}.mlp.fc1.weight": (4 * d, d),
                           f"layers.{i}.mlp.fc2.weight": (d, 4 * d),
                           f"layers.{i}.ln1.weight": (d,), f"layers.{i}.ln1.bias": (d,),
                           f"layers.{i}.ln2.weight": (d,), f"layers.{i}.ln2.bias": (d,)})
        self.params = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        self.m = {k: torch.zeros(s) for k, s in shapes.items()}
        self.v = {k: torch.zeros(s) for k, s in shapes.items()}
        self.step = 0
        self.update()

    def update(self, lr: float = 1e-4) -> None:
        self.step += 1
        for k, p in self.params.items():
            grad = torch.randn(p.shape, generator=self.gen).mul_(1e-3)
            self.m[k].mul_(0.9).add_(grad, alpha=0.1)
            self.v[k].mul_(0.999).addcmul_(grad, grad, value=0.001)
            p.addcdiv_(self.m[k], self.v[k].sqrt().add_(1e-8), value=-lr)

    def state(self) -> dict[str, object]:
        keys = list(self.params)
        return {"model": self.params, "optimizer": {
            "state": {i: {"step": torch.tensor(float(self.step)), "exp_avg": self.m[k],
                          "exp_avg_sq": self.v[k]} for i, k in enumerate(keys)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": 0.0, "params": list(range(len(keys)))}]},
            "step": self.step}


@dataclass
class Workload:
    key: str
    title: str
    checkpoints: Callable[[], Iterator[tuple[int, Any]]]
    describe: str = ""
    saves: int = 0


def make_workloads(quick: bool, scale: float, saves: int | None, every: int | None
                   ) -> list[Workload]:
    cfg = gpt_cfg(quick, scale)
    conf = run_config(quick, scale, saves, every)
    n, ev = conf["saves"], conf["every"]
    big_saves = 2 if quick else 3
    big_bytes = int((48 * MiB if quick else GiB) * scale)
    items = int((20_000 if quick else 200_000) * scale)
    users = int((5_000 if quick else 20_000) * scale)
    gpt = f"GPT layers={cfg.layers} dim={cfg.dim} block={cfg.block}"

    def big() -> Iterator[tuple[int, Any]]:
        s = BigState(big_bytes)
        for _ in range(big_saves):
            s.update()
            yield s.step, s.state()

    return [
        Workload("a", "dense fp32 pre-training",
                 lambda: _checkpoints(Trainer(cfg, total_steps=n * ev), n, ev),
                 f"{gpt}, AdamW, fp32, all params trained; a save every {ev} steps", n),
        Workload("b", "bf16 mixed precision",
                 lambda: _checkpoints(BF16Trainer(cfg, total_steps=n * ev), n, ev),
                 f"{gpt}, bf16 model weights + fp32 master params + AdamW state (forward/"
                 f"backward in fp32 on the bf16-rounded weights); a save every {ev} steps", n),
        Workload("c", "frozen-backbone fine-tuning",
                 lambda: _checkpoints(Trainer(cfg, total_steps=n * ev, freeze_backbone=True),
                                      n, ev),
                 f"{gpt}, only the output head trained; a save every {ev} steps", n),
        Workload("d", "LoRA adapters",
                 lambda: _checkpoints(lora_trainer(cfg, n * ev), n, ev),
                 f"{gpt}, rank-8 LoRA on all linear projections, base frozen, full "
                 f"state_dict saved; a save every {ev} steps", n),
        Workload("e", "recsys sparse embeddings",
                 lambda: _checkpoints(RecSysTrainer(items, users), n, ev),
                 f"item table {items}x32 + user table {users}x32 (sparse, SparseAdam), MLP "
                 f"(Adam), batch 512 Zipf items; a save every {ev} steps", n),
        Workload("f", "large state (throughput)", big,
                 f"synthetic fp32 transformer-shaped params + 2 Adam moments, "
                 f"{big_bytes / MiB:.0f} MiB, random-walk update between saves; "
                 f"{big_saves} saves", big_saves),
    ]


# ------------------------------------------------------------------------------------- runs
@dataclass
class MethodResult:
    name: str
    lossless: bool
    tensors_only: bool
    note: str
    error: str | None = None
    durable: bool = True
    steps: list[int] = field(default_factory=list)
    disk_after: list[int] = field(default_factory=list)    # total bytes after each save
    save_s: list[float] = field(default_factory=list)
    fsync_s: list[float] = field(default_factory=list)     # file methods: fsync afterwards
    stall_s: list[float] = field(default_factory=list)
    save_extra_rss: list[int] = field(default_factory=list)
    exact_saves: list[bool] = field(default_factory=list)  # deltackpt's own flag per save
    kinds: list[str] = field(default_factory=list)         # deltackpt: keyframe / delta
    max_rel_error: float = 0.0
    held_bytes: int = 0                                    # RSS freed by closing the repo
    load_step_s: dict[int, list[float]] = field(default_factory=dict)  # every step, per round
    load_last_s: list[float] = field(default_factory=list)
    load_key_s: list[float] = field(default_factory=list)  # the first saved step (a keyframe)
    load_extra_rss: list[int] = field(default_factory=list)
    exact: dict[int, dict[str, int]] = field(default_factory=dict)


def _err(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno} " \
            f"({tb[-1].name})" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:300] + where


def run_workload(wl: Workload, root: str, repeat: int) -> dict[str, Any]:
    wroot = os.path.join(root, wl.key)
    methods: list[Method | None] = []
    results: list[MethodResult] = []
    for name, factory in make_methods():
        try:
            m = factory()
            m.setup(wroot)
            methods.append(m)
            results.append(MethodResult(name, m.lossless, m.tensors_only, m.note,
                                        durable=m.durable))
        except Exception as exc:  # noqa: BLE001 - e.g. zipnn missing: record, go on
            log(f"  {name}: unavailable: {_err(exc)}")
            methods.append(None)
            results.append(MethodResult(name, True, True, "", error=_err(exc)))
    fps: dict[int, dict[str, tuple[Any, ...]]] = {}
    st_bytes = 0
    t_start = time.perf_counter()
    t_train = 0.0
    it = wl.checkpoints()
    k = 0
    while True:
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # training is not measured: one thread is many times faster
        try:                      # on a busy machine (OpenMP spin-waits); saves/loads get all
            step, state = next(it)
        except StopIteration:
            break
        finally:
            torch.set_num_threads(threads)
        t_train += time.perf_counter() - t0
        fps[step] = fingerprint(state)
        st_bytes = state_bytes(state)
        order = list(range(len(methods)))
        order = order[k % len(order):] + order[:k % len(order)]
        for j in order:
            m, r = methods[j], results[j]
            if m is None or r.error:
                continue
            try:
                with PeakRSS(clean=k == wl.saves - 1) as mem:  # memory: the last save
                    t1 = time.perf_counter()
                    extra = m.save(step, state)
                    dt = time.perf_counter() - t1
                if isinstance(m, FileMethod):  # durable-save time, measured separately
                    t1 = time.perf_counter()
                    m.sync(step)
                    r.fsync_s.append(time.perf_counter() - t1)
                r.steps.append(step)
                r.save_s.append(dt)
                if mem.clean:
                    r.save_extra_rss.append(mem.extra)
                r.disk_after.append(m.disk())
                if "stall_s" in extra:
                    r.stall_s.append(extra["stall_s"])
                if "exact" in extra:
                    r.exact_saves.append(bool(extra["exact"]))
                    r.kinds.append(str(extra["kind"]))
                    r.max_rel_error = max(r.max_rel_error, float(extra["max_rel_error"]))
            except Exception as exc:  # noqa: BLE001
                r.error = f"save of step {step}: {_err(exc)}"
                log(f"  {r.name}: FAILED {r.error}")
        del state
        k += 1
        log(f"  {wl.key}: step {step} saved by all methods")
    t_saves = time.perf_counter() - t_start - t_train
    for m, r in zip(methods, results):
        if m is not None:
            try:
                r.held_bytes = m.finish()
            except Exception as exc:  # noqa: BLE001
                r.error = r.error or f"close: {_err(exc)}"
    steps = sorted(fps)
    last, key = steps[-1], steps[0]  # the first save of a repository is always a keyframe
    # every step in `rounds` interleaved rounds (per-step median: the worst ratio to torch.load;
    # bit-exactness on the first), then the keyframe step and the last step again
    rounds = max(1, min(repeat, 3))
    plan = [(s, i) for _ in range(rounds) for s in steps for i in range(len(methods))]
    plan += [(s, i) for _ in range(max(0, repeat - 1)) for s in dict.fromkeys((key, last))
             for i in range(len(methods))]
    final = {i: n_job for n_job, (s, i) in enumerate(plan)}  # memory: each one's last load
    for n_job, (s, i) in enumerate(plan):
        m, r = methods[i], results[i]
        if m is None or r.error or s not in r.steps:
            continue
        try:
            with PeakRSS(clean=final[i] == n_job) as mem:
                t0 = time.perf_counter()
                obj = m.load(s)
                touch(obj)
                dt = time.perf_counter() - t0
            if s not in r.exact:
                r.exact[s] = compare(fps[s], obj, m.tensors_only)
            if len(r.load_step_s.setdefault(s, [])) < rounds:
                r.load_step_s[s].append(dt)
            if s == last:
                r.load_last_s.append(dt)
            if s == key:
                r.load_key_s.append(dt)
            if mem.clean:
                r.load_extra_rss.append(mem.extra)
            del obj
        except Exception as exc:  # noqa: BLE001
            r.error = f"load of step {s}: {_err(exc)}"
            log(f"  {r.name}: FAILED {r.error}")
    for m in methods:
        if m is not None and getattr(m, "repo", None) is not None:
            m.repo.close()
    shutil.rmtree(wroot, ignore_errors=True)
    log(f"  {wl.key}: done ({t_train:.0f} s training, {t_saves:.0f} s saving, "
        f"{time.perf_counter() - t_start - t_train - t_saves:.0f} s loading)")
    return {"key": wl.key, "title": wl.title, "describe": wl.describe, "steps": steps,
            "key_step": key, "state_bytes": st_bytes, "train_s": t_train,
            "methods": [r.__dict__ for r in results]}


# ---------------------------------------------------------------------------------- summary
def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _spread(xs: list[float]) -> list[float] | None:
    """[min, max, n] of a list of timings."""
    return [min(xs), max(xs), len(xs)] if xs else None


def summarize(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-method figures and ratios of one workload."""
    ms = {m["name"]: m for m in w["methods"]}
    base = ms["torch.save"]
    base_disk = base["disk_after"][-1] if base["disk_after"] else None
    base_save = med(base["save_s"])
    base_durable = med([a + b for a, b in zip(base["save_s"], base["fsync_s"])])
    base_load = med(base["load_last_s"])
    rows = []
    for m in w["methods"]:
        row: dict[str, Any] = {"name": m["name"], "lossless": m["lossless"],
                               "tensors_only": m["tensors_only"], "note": m["note"],
                               "error": m["error"]}
        if m["disk_after"]:
            disk = m["disk_after"][-1]
            per_step = np.diff([0] + m["disk_after"]).tolist()
            row.update(disk=disk, per_step=per_step,
                       disk_ratio=base_disk / disk if base_disk and disk else None)
        s = med(m["save_s"])
        row.update(save_s=s, save_ratio=s / base_save if s and base_save else None)
        durable = med([a + b for a, b in zip(m["save_s"], m["fsync_s"])]) if m["fsync_s"] \
            else s if m.get("durable", True) else None  # deltackpt fsyncs inside its save
        row.update(durable_s=durable, durable_ratio=durable / base_durable
                   if durable and base_durable else None)
        st = med(m["stall_s"])
        row.update(stall_s=st, stall_ratio=st / base_save if st and base_save else None)
        ll = med(m["load_last_s"])
        row.update(load_s=ll, load_ratio=ll / base_load if ll and base_load else None)
        # results from before the keyframe rounds: the key step's every-step rounds
        key_s = m.get("load_key_s") or m["load_step_s"].get(
            str(w["steps"][0]), m["load_step_s"].get(w["steps"][0], []))
        base_key_s = base.get("load_key_s") or base["load_step_s"].get(
            str(w["steps"][0]), base["load_step_s"].get(w["steps"][0], []))
        base_key = med(base_key_s)
        kl = med(key_s)
        row.update(key_load_s=kl, key_load_ratio=kl / base_key if kl and base_key else None,
                   key_kind=m["kinds"][0] if m.get("kinds") else None)
        worst = worst_step = None
        for s_, ts in m["load_step_s"].items():
            b = med(base["load_step_s"].get(s_) or [])
            if b and ts and med(ts) / b > (worst or 0.0):
                worst, worst_step = med(ts) / b, s_
        row.update(worst_load_ratio=worst, worst_load_step=worst_step)
        row["spread"] = {k: _spread(m.get(k) or []) for k in
                         ("save_s", "stall_s", "load_last_s")}
        row["spread"]["load_key_s"] = _spread(key_s)
        if m["fsync_s"]:
            row["spread"]["durable_s"] = _spread([a + b for a, b in zip(m["save_s"],
                                                                      m["fsync_s"])])
        ex = m["exact"]
        n_steps = len(ex)
        exact_steps = sum(1 for e in ex.values()
                          if e["tensor_mismatch"] == 0 and e["value_mismatch"] == 0)
        row.update(checked=n_steps, exact_steps=exact_steps,
                   values_not_stored=max((e["values_not_stored"] for e in ex.values()),
                                         default=0),
                   tensors=max((e["tensors"] for e in ex.values()), default=0),
                   max_rel_error=m["max_rel_error"],
                   save_rss=max(m["save_extra_rss"], default=None),
                   load_rss=max(m["load_extra_rss"], default=None),
                   held=m["held_bytes"])
        rows.append(row)
    return rows


def _mib(b: float | None) -> str:
    if b is None:
        return "–"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    return f"{b / MiB:.1f} MiB" if b >= 0.1 * MiB else f"{b / 1024:.0f} KiB"


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.2f} s" if s >= 10 else f"{s * 1e3:.0f} ms"


def _x(r: float | None, bold: bool = False) -> str:
    if r is None:
        return "–"
    t = f"{r:.2f}x"
    return f"**{t}**" if bold else t


def _exact_cell(r: dict[str, Any]) -> str:
    if not r["checked"]:
        return "–"
    ok = r["exact_steps"] == r["checked"]
    s = f"{'yes' if ok else 'no'} ({r['exact_steps']}/{r['checked']} steps)"
    if r["values_not_stored"]:
        s += f"; tensors only ({r['values_not_stored']} non-tensor values not stored)"
    if not r["lossless"] and r["max_rel_error"]:
        s += f"; max rel. err {r['max_rel_error']:.1e}"
    return s


def method_label(r: dict[str, Any]) -> str:
    return r["name"] + ("" if r["lossless"] else " (LOSSY)")


def workload_table(w: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"### ({w['key']}) {w['title']}", "",
             f"{w['describe']}. Tensor bytes per checkpoint: {_mib(w['state_bytes'])}; "
             f"{len(w['steps'])} checkpoints (steps {w['steps'][0]}..{w['steps'][-1]}).", "",
             "| method | disk total | vs torch.save (x smaller) | save (median) | vs torch.save "
             "| save incl. fsync | vs torch.save+fsync | async stall | vs torch.save "
             "| load last step (median) | vs torch.load | worst step load vs torch.load "
             "| restore bit-exact | peak RSS save / load (extra) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"] and "disk" not in r:
            lines.append(f"| {method_label(r)} | {r['error']} |" + " |" * 12)
            continue
        cells = [method_label(r), _mib(r.get("disk")), _x(r.get("disk_ratio"), True),
                 _ms(r["save_s"]), _x(r["save_ratio"]), _ms(r["durable_s"]),
                 _x(r["durable_ratio"]), _ms(r["stall_s"]),
                 _x(r["stall_ratio"]), _ms(r["load_s"]), _x(r["load_ratio"]),
                 _x(r["worst_load_ratio"]), _exact_cell(r),
                 f"{_mib(r['save_rss'])} / {_mib(r['load_rss'])}"]
        if r["error"]:
            cells[-2] = "FAILED: " + r["error"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_config(quick: bool, scale: float, saves: int | None, every: int | None
               ) -> dict[str, Any]:
    """The run's sizes with every default resolved: what a baseline must match."""
    return {"quick": bool(quick), "scale": float(scale), "saves": saves or (5 if quick else 12),
            "every": every or (2 if quick else 3)}


def _config_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A results file's run configuration (older files: parsed from the command it records)."""
    if meta.get("config"):
        return meta["config"]
    import shlex
    try:
        argv = shlex.split(meta.get("command", ""))[2:]
        a = _parser().parse_args([x for x in argv if x != "--rerender"])
    except (SystemExit, ValueError):
        return None
    return run_config(a.quick, a.scale, a.saves, a.every)


def load_baseline(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lossless bytes of the previous default format (``BASELINE_FILE``) for this run's
    configuration, else the entry of the same kind (quick or full) to compare ratios with
    (``"same_config": False``); None when the file or a fitting entry is missing."""
    try:
        with open(BASELINE_FILE, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError):
        return None
    if config is None:
        return None
    for entry in runs:
        if entry["config"] == config:
            return {**entry, "same_config": True}
    for entry in runs:
        if entry["config"]["quick"] == config["quick"]:
            return {**entry, "same_config": False}
    return None


def _size_check(w: dict[str, Any], r: dict[str, Any], baseline: dict[str, Any] | None,
                torch_disk: int | None) -> tuple[bool | None, str]:
    """(met, text): lossless bytes against the previous default format's."""
    b = (baseline or {}).get("workloads", {}).get(w["key"])
    if not b or not r.get("disk"):
        return None, "no baseline for this workload/configuration in " + \
            os.path.relpath(BASELINE_FILE)
    src = f"previous default format at {baseline['format_commit']}"
    if baseline["same_config"] and torch_disk == b["torch_bytes"]:
        met = r["disk"] <= b["deltackpt_bytes"]
        return met, (f"{r['disk']:,} bytes vs {b['deltackpt_bytes']:,} ({src}, same run "
                     f"configuration and torch.save bytes): "
                     f"{100 * (1 - r['disk'] / b['deltackpt_bytes']):+.2f}% fewer bytes; "
                     f"{r['disk_ratio']:.3f}x fewer than torch.save (baseline "
                     f"{b['disk_ratio']:.3f}x)")
    why = "different run configuration" if not baseline["same_config"] else \
        "same configuration but different torch.save bytes"
    met = r["disk_ratio"] >= b["disk_ratio"]
    return met, (f"{r['disk_ratio']:.3f}x fewer bytes than torch.save vs {b['disk_ratio']:.3f}x "
                 f"for the baseline ({src}; {why}: ratios compared, not like-for-like)")


def _timing(r: dict[str, Any], key: str, spread_key: str) -> str:
    sp = (r.get("spread") or {}).get(spread_key)
    if r.get(key) is None:
        return "–"
    if not sp:
        return _ms(r[key])
    return f"{_ms(r[key])} [{_ms(sp[0])}..{_ms(sp[1])}, n={sp[2]}]"


def check_targets(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]],
                  chunk_window: int, baseline: dict[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """The targets of workloads (a) and (f), each against the same run's torch figures.

    ``met`` is True, False, or None where this run lacks a figure (e.g. no baseline)."""
    def row(k: str, name: str) -> dict[str, Any] | None:
        return next((r for r in rows.get(k, []) if r["name"] == name), None)

    out: list[dict[str, Any]] = []

    def add(k: str, target: str, met: bool | None, measured: str) -> None:
        out.append({"workload": k, "target": f"({k}) {target}", "met": met,
                    "measured": measured})

    for w in ws:
        k = w["key"]
        if k not in TARGET_WORKLOADS:
            continue
        torch_row, dc, asy = row(k, "torch.save"), row(k, "deltackpt"), row(k, "deltackpt async")
        if torch_row is None or dc is None or dc["error"] and not dc.get("disk"):
            add(k, "deltackpt lossless", False, f"no figures: {dc and dc['error']}")
            continue
        size_met, size_text = _size_check(w, dc, baseline, torch_row.get("disk"))
        add(k, "lossless size >= the previous default format's", size_met, size_text)
        d = dc.get("durable_ratio")
        if d is not None:
            add(k, f"lossless save <= {TARGET_SAVE}x torch.save followed by fsync (moonshot <= "
                f"{MOONSHOT_SAVE}x), with no loss in size",
                d <= TARGET_SAVE and size_met is not False,
                f"{d:.2f}x: deltackpt {_timing(dc, 'durable_s', 'save_s')} vs torch.save+fsync "
                f"{_timing(torch_row, 'durable_s', 'durable_s')} (medians [min..max]); "
                f"moonshot {'MET' if d <= MOONSHOT_SAVE else 'MISSED'}; "
                f"{dc['save_ratio']:.2f}x torch.save without fsync; size "
                + ("not worse" if size_met else "WORSE" if size_met is False else "unchecked"))
        if asy and asy.get("stall_ratio") is not None:
            add(k, f"save(blocking=False) stall <= {TARGET_STALL}x torch.save",
                asy["stall_ratio"] <= TARGET_STALL,
                f"{asy['stall_ratio']:.2f}x: stall {_timing(asy, 'stall_s', 'stall_s')} vs "
                f"torch.save {_timing(torch_row, 'save_s', 'save_s')}")
        if dc.get("key_load_ratio") is not None:
            kind = "" if dc.get("key_kind") == "keyframe" else \
                f" (WARNING: that step was saved as {dc.get('key_kind')!r})"
            add(k, f"load of a keyframe step <= {TARGET_LOAD_KEY}x torch.load (step "
                f"{w.get('key_step', w['steps'][0])}, the first saved; fresh reader, median)",
                dc["key_load_ratio"] <= TARGET_LOAD_KEY,
                f"{dc['key_load_ratio']:.2f}x: {_timing(dc, 'key_load_s', 'load_key_s')} vs "
                f"torch.load {_timing(torch_row, 'key_load_s', 'load_key_s')}{kind}")
        if dc.get("load_ratio") is not None:
            add(k, f"load of the latest step <= {TARGET_LOAD_LAST}x torch.load (step "
                f"{w['steps'][-1]}; fresh reader, median)", dc["load_ratio"] <= TARGET_LOAD_LAST,
                f"{dc['load_ratio']:.2f}x: {_timing(dc, 'load_s', 'load_last_s')} vs torch.load "
                f"{_timing(torch_row, 'load_s', 'load_last_s')}")
        if dc.get("worst_load_ratio") is not None:
            rounds = max((len(v) for v in
                          next(m for m in w["methods"] if m["name"] == "deltackpt")
                          ["load_step_s"].values()), default=0)
            add(k, f"load of every saved step <= {TARGET_LOAD_ANY}x torch.load of that step "
                f"(worst of {len(w['steps'])} steps)", dc["worst_load_ratio"] <= TARGET_LOAD_ANY,
                f"worst {dc['worst_load_ratio']:.2f}x at step {dc.get('worst_load_step')} "
                f"(per-step medians of {rounds} interleaved rounds, fresh reader)")
    mems = []
    for w in ws:
        r = row(w["key"], "deltackpt")
        if r and r["save_rss"] is not None:
            bound = w["state_bytes"] + chunk_window
            used = r["held"] + r["save_rss"]
            mems.append((w["key"], used, bound, w["state_bytes"]))
    if mems:
        out.append({"workload": "all", "target": "(all) peak memory <= state + reference + "
                    "bounded buffer (lossless save; the state itself is the trainer's)",
                    "met": all(u <= b for _, u, b, _s in mems),
                    "measured": ", ".join(
                        f"{k}: {u / s:.2f}x state (bound {b / s:.2f}x)" for k, u, b, s in mems)})
    return out


def _list(items: list[tuple[str, float]], fmt: str = "{:.2f}x") -> str:
    return ", ".join(f"({k}) " + fmt.format(v) for k, v in items)


def narrative(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]]) -> str:
    """Where deltackpt wins and loses, from this run's numbers only."""
    def get(k: str, name: str) -> dict[str, Any] | None:
        return next((r for r in rows[k] if r["name"] == name and not r["error"]), None)

    keys = [w["key"] for w in ws]
    dc = {k: r for k in keys if (r := get(k, "deltackpt")) is not None}
    parts = []
    disk = sorted(((k, r["disk_ratio"]) for k, r in dc.items() if r.get("disk_ratio")),
                  key=lambda kv: -kv[1])
    if disk:
        title = {w["key"]: w["title"] for w in ws}
        parts.append("**Disk.** Lossless deltackpt stored " + _list(disk) + " fewer bytes than "
                     f"torch.save: most on ({disk[0][0]}) {title[disk[0][0]]}, least on "
                     f"({disk[-1][0]}) {title[disk[-1][0]]}.")
        wins, losses = [], []
        for k, ratio in disk:
            others = [r for r in rows[k] if r["lossless"] and r.get("disk_ratio")
                      and not r["name"].startswith("deltackpt") and not r["error"]]
            if others:
                top = max(others, key=lambda r: r["disk_ratio"])
                if ratio >= top["disk_ratio"]:
                    wins.append(f"({k}) {ratio / top['disk_ratio']:.2f}x less than {top['name']}")
                else:
                    losses.append(f"({k}) {top['disk_ratio'] / ratio:.2f}x more than "
                                  f"{top['name']}")
        if wins:
            parts.append("Against the best per-file lossless compressor of each workload it "
                         "stored " + ", ".join(wins) + ".")
        if losses:
            parts.append("It stored MORE than a per-file compressor on " + ", ".join(losses)
                         + ".")
    sv = [(k, r["save_ratio"]) for k, r in dc.items() if r["save_ratio"]]
    dv = [(k, r["durable_ratio"]) for k, r in dc.items() if r["durable_ratio"]]
    if sv:
        slower = [kv for kv in sv if kv[1] > 1]
        parts.append("**Save time.** A blocking lossless save took " + _list(sv) + " the time "
                     "of torch.save (which does not fsync), and " + _list(dv) + " of torch.save "
                     "followed by fsync; " + (f"it was slower than torch.save on {len(slower)} "
                     f"of {len(sv)} workloads." if slower else "it was never slower."))
    st = [(k, r["stall_ratio"]) for k in keys if (r := get(k, "deltackpt async"))
          and r["stall_ratio"]]
    if st:
        parts.append("**Async.** `save(blocking=False)` stalled the caller for " + _list(st)
                     + " of a torch.save (a private copy of every tensor), the encode and "
                     "commit then ran in the background.")
    ld = [(k, r["worst_load_ratio"]) for k, r in dc.items() if r["worst_load_ratio"]]
    if ld:
        parts.append("**Load.** Rebuilding a step (opening the repository, replaying its delta "
                     "chain, checking digests) took up to " + _list(ld) + " a torch.load of the "
                     "same step.")
    mem = []
    for w in ws:
        r = dc.get(w["key"])
        if r and r["save_rss"] is not None and w["state_bytes"]:
            mem.append((w["key"], r["held"] / w["state_bytes"], r["save_rss"] / w["state_bytes"]))
    if mem:
        parts.append("**Memory.** Between saves deltackpt held " + ", ".join(
            f"({k}) {h:.2f}x" for k, h, _ in mem) + " the state's tensor bytes (its delta "
            "reference); a save needed up to " + ", ".join(f"({k}) {e:.2f}x" for k, _, e in mem)
            + " more on top of that" + (
                " (about one more copy of the state: consistent with the writer building the "
                "new reference before it drops the old one)" if max(e for *_, e in mem) > 0.5
                else "") + ".")
    for preset in ("balanced", "archive"):
        lr = [(k, r) for k in keys if (r := get(k, f"deltackpt {preset}")) and r.get("disk_ratio")]
        if lr:
            parts.append(f"**Lossy `{preset}`.** " + _list([(k, r["disk_ratio"]) for k, r in lr])
                         + " fewer bytes than torch.save, restoring bit-exactly "
                         + ", ".join(f"({k}) {r['exact_steps']}/{r['checked']}" for k, r in lr)
                         + " steps, worst recorded relative error "
                         + f"{max(r['max_rel_error'] for _, r in lr):.1e}.")
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------ plots
COLORS = {"torch.save": "#444444", "safetensors": "#8c8c8c", "safetensors+zstd": "#1f77b4",
          "zipnn": "#9467bd", "deltackpt": "#d62728", "deltackpt async": "#ff9896",
          "deltackpt fast-load": "#8c564b", "deltackpt no-fsync": "#e377c2",
          "deltackpt balanced": "#2ca02c", "deltackpt archive": "#98df8a"}


def plots(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]], out: str
          ) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as exc:  # noqa: BLE001
        log(f"no plots: {exc}")
        return []
    names = []
    ncol = 3
    nrow = math.ceil(len(ws) / ncol)
    for fname, title, ylabel, series in (
            ("suite_bytes_per_step.png", "Bytes written per save", "MiB (log)",
             lambda m: np.diff([0] + m["disk_after"]) / MiB),
            ("suite_cumulative.png", "Cumulative disk over the run", "MiB (log)",
             lambda m: np.asarray(m["disk_after"]) / MiB)):
        fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
        for ax, w in zip(axes.flat, ws):
            for m in w["methods"]:
                if not m["disk_after"] or m["name"] == "deltackpt async":
                    continue  # async writes the same repository as deltackpt
                ls = "--" if not m["lossless"] else "-"
                ax.plot(m["steps"], series(m), ls, marker="o", ms=3, label=m["name"],
                        color=COLORS.get(m["name"]))
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(f"({w['key']}) {w['title']}", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        for ax in list(axes.flat)[len(ws):]:
            ax.axis("off")
        h, lab = axes.flat[0].get_legend_handles_labels()
        fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=8)
        fig.suptitle(title + " (dashed: lossy)")
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    for fname, title, key, extra in (
            ("suite_save_time.png", "Save time (median; async: stall hatched)", "save_s",
             "stall_s"),
            ("suite_load_time.png", "Load time of the last step (median, fresh reader)",
             "load_s", None)):
        fig, ax = plt.subplots(figsize=(14, 4.5))
        mnames = [m["name"] for m in ws[0]["methods"]]
        width = 0.8 / len(mnames)
        for j, name in enumerate(mnames):
            xs, ys, ss = [], [], []
            for i, w in enumerate(ws):
                r = next(r for r in rows[w["key"]] if r["name"] == name)
                if r.get(key):
                    xs.append(i + (j - len(mnames) / 2 + 0.5) * width)
                    ys.append(r[key])
                    ss.append(r.get(extra) if extra else None)
            ax.bar(xs, ys, width, label=name, color=COLORS.get(name))
            if extra and name == "torch.save":
                ds = [next(r for r in rows[w["key"]] if r["name"] == name).get("durable_s")
                      for w in ws]
                ax.scatter([x for x, d in zip(xs, ds) if d], [d for d in ds if d], marker="_",
                           s=300, color="black", zorder=3, label="torch.save + fsync")
            if extra and any(ss):
                ax.bar([x for x, s in zip(xs, ss) if s], [s for s in ss if s], width,
                       color="white", hatch="///", edgecolor=COLORS.get(name),
                       label=f"{name} stall")
        ax.set_xticks(range(len(ws)))
        ax.set_xticklabels([f"({w['key']}) {w['title']}" for w in ws], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=7, ncol=5)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


# ------------------------------------------------------------------------------------- main
def caveats(ws: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    out = ["- Checkpoints here are a few training steps apart (see each workload) so that a run "
           "fits in minutes on 2 cores. A real run that saves every few hundred steps moves each "
           "trained weight further between saves, so its lossless deltas are larger and the "
           "ratios on the dense workloads (a, b) are an upper bound; where few elements change "
           "at all (frozen backbone, LoRA, sparse rows) the interval matters much less."]
    kf = []
    recorded = meta.get("policies") or _policies()  # older results: the policies of today
    for name, pol in (("deltackpt", "lossless"), ("balanced", "balanced"),
                      ("archive", "archive")):
        kf.append((name, recorded[pol]["keyframe_every"]))
    for w in ws:
        m = next((m for m in w["methods"] if m["name"] == "deltackpt"), None)
        if m and m.get("kinds"):
            n = m["kinds"].count("keyframe")
            kf_note = f"{n} keyframes in ({w['key']})'s {len(m['kinds'])} saves"
            break
    else:
        n_saves = max((len(w["steps"]) for w in ws), default=0)
        kf_note = (f"up to {math.ceil(n_saves / kf[0][1])} keyframes in a run of {n_saves} "
                   "saves")
    out.append("- Keyframes: a keyframe every " + ", ".join(f"{e} saves ({n})" for n, e in kf)
               + f"; lossless wrote {kf_note}. A keyframe is a full compressed copy, so on the "
               "workloads that change little it is most of deltackpt's total; the ratio after N "
               "saves depends on N and on keyframe_every.")
    out.append("- Loads read files just written (warm page cache) for every method. deltackpt's "
               "load time grows with the step's delta-chain depth (reference=\"previous\" "
               "replays up to keyframe_every - 1 deltas); `load last step` is one point on that "
               "curve, `worst step load` the deepest.")
    out.append("- The machine was shared with other jobs (load average above); medians and "
               "same-run ratios damp, but do not remove, that noise.")
    return out


def target_status(met: bool | None) -> str:
    return "N/A" if met is None else "MET" if met else "MISSED"


def to_markdown(meta: dict[str, Any], ws: list[dict[str, Any]],
                rows: dict[str, list[dict[str, Any]]], targets: list[dict[str, Any]],
                pngs: list[str]) -> str:
    commit = f" (commit {meta['deltackpt_commit']})" if meta.get("deltackpt_commit") else ""
    L = ["# Storage-cost suite: deltackpt vs torch.save, safetensors, zstd, ZipNN", "",
         f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}, deltackpt "
         f"{meta['deltackpt']}{commit}, safetensors {meta['safetensors']}, zstandard "
         f"{meta['zstandard']}, zipnn {meta['zipnn']}, Python {meta['python']}. "
         f"Load average at start: {meta['loadavg']} (the machine was shared; timings are "
         "medians of this run and every claim is a ratio between methods in the same run).",
         "", f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min in all).", "",
         "## Targets", ""]
    L += ["Workloads (a) and (f), each against the same run's torch.save / torch.load; "
          "deltackpt is the lossless default policy, fsynced (torch.save is timed with its fsync "
          "for the save target). Timings: medians [min..max, n samples]. Size baseline: "
          + (f"the previous default format's bytes at {meta['baseline']['format_commit']} "
             f"({meta['baseline']['source']})" if meta.get("baseline") else
             f"none found in {os.path.relpath(BASELINE_FILE)}") + ".", ""]
    for t in targets:
        L.append(f"- **{target_status(t['met'])}**: {t['target']} — {t['measured']}.")
    L += ["", "## Where deltackpt wins and loses", "", narrative(ws, rows), "",
          "## Disk, x smaller than torch.save (all workloads)", "",
          "| method | " + " | ".join(f"({w['key']}) {w['title']}" for w in ws) + " |",
          "|---|" + "---|" * len(ws)]
    for j, m in enumerate(ws[0]["methods"]):
        cells = []
        for w in ws:
            r = rows[w["key"]][j]
            cells.append(_x(r.get("disk_ratio")) if r.get("disk_ratio") else (
                "failed" if r["error"] else "–"))
        L.append(f"| {method_label(rows[ws[0]['key']][j])} | " + " | ".join(cells) + " |")
    L += ["", "## Per workload", "",
          "Disk totals are every checkpoint of the run (files, or the whole repository "
          "directory); `x smaller` is torch.save's total over the method's. Save/load times "
          "are wall-clock medians; ratios are to torch.save / torch.load in this run (torch.save "
          "without fsync, as users call it; deltackpt fsyncs its packs and manifest). `async "
          "stall` is how long `save(..., blocking=False)` blocked; its row's save time runs "
          "until `wait()` returned. `worst step load` times every saved step in up to 3 "
          "interleaved rounds (fresh reader each time) and takes the largest ratio of per-step "
          "medians to torch.load of the same step. Bit-exact: every saved step was loaded "
          "and its tensors (dtype, shape, bytes) and non-tensor values compared with "
          "fingerprints taken at save time. Peak RSS: extra memory over the RSS before the "
          f"call ({PeakRSS.method}, after malloc_trim), on each method's last save and its last "
          "load of the last step.", ""]
    for w in ws:
        L += workload_table(w, rows[w["key"]]) + [""]
        held = [(r["name"], r["held"]) for r in rows[w["key"]] if r["held"]]
        if held:
            L += ["Memory deltackpt holds between saves (RSS freed by closing the repository): "
                  + ", ".join(f"{n} {_mib(b)}" for n, b in held) + f" (state: "
                  f"{_mib(w['state_bytes'])}).", ""]
    L += ["## Caveats", ""] + caveats(ws, meta) + [""]
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [
        "", "## Method notes", "",
        "- torch.save / torch.load(weights_only=True): one `.pt` per checkpoint.",
        "- safetensors: `safetensors.torch.save_file` of the state's tensors flattened by path; "
        "non-tensor values (step counters, scheduler fields, hyper-parameters) are not stored, "
        "so a restore is bit-exact for tensors only.",
        "- safetensors+zstd: the same bytes through zstd level 3 with all cores "
        "(`ZstdCompressor(level=3, threads=-1)`).",
        "- zipnn: `ZipNN(input_format=\"torch\").compress` per float tensor (fp32/bf16/fp16, the "
        "usage its README shows); int/bool tensors via zstd-3; in one container file. zipnn "
        f"{meta['zipnn']} compresses in place (it scrambles the buffer it is given), so each "
        "tensor is cloned first; the clone is part of its save time.",
        "- deltackpt: `deltackpt.open(dir)` (lossless default), `policy=\"balanced\"` and "
        "`policy=\"archive\"` (lossy presets: bit-exact only at keyframes and every "
        "`exact_every`-th save); `deltackpt async` writes a second, identical lossless "
        "repository with `blocking=False`.",
        f"- Memory bound used for the target: state bytes (one reference copy) + "
        f"{_mib(meta['chunk_window'])} (the encoder's in-flight window: 4 x workers chunks of "
        "`chunk_bytes`, each with its encoded frame), against held-between-saves + peak extra "
        "during a save.", ""]
    return "\n".join(L)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, few saves (CI smoke, ~2.5 min); writes to a temp dir")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies model width^2, table rows and the big state's size")
    ap.add_argument("--saves", type=int, help="checkpoints per run (workloads a-e)")
    ap.add_argument("--every", type=int, help="training steps between checkpoints")
    ap.add_argument("--repeat", type=int, help="loads of the last step per method (median)")
    ap.add_argument("--workloads", default="abcdef", help="subset, e.g. 'ae'")
    ap.add_argument("--out", help="results folder (default: benchmarks/results; --quick: a "
                                  "temp dir)")
    ap.add_argument("--rerender", action="store_true",
                    help="measure nothing: rebuild suite.md and the plots from the suite.json "
                         "in --out (or benchmarks/results)")
    ap.add_argument("--write-baseline", metavar="SUITE_JSON",
                    help="measure nothing: record the lossless bytes of workloads a and f in "
                         "SUITE_JSON (a run of the format to compare against) as the size "
                         "baseline for that run's configuration, in results/suite_baseline.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.write_baseline:
        return write_baseline(args.write_baseline)
    if args.rerender:
        return rerender(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    t_all = time.perf_counter()
    out = args.out or (tempfile.mkdtemp(prefix="deltackpt-suite-out-") if args.quick else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(out, exist_ok=True)
    repeat = args.repeat or (2 if args.quick else 3)
    wls = [w for w in make_workloads(args.quick, args.scale, args.saves, args.every)
           if w.key in args.workloads]
    config = run_config(args.quick, args.scale, args.saves, args.every)
    baseline = load_baseline(config)
    root = tempfile.mkdtemp(prefix="deltackpt-suite-", dir=os.environ.get("BENCH_TMP"))
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    commit, policies = _git_commit(), _policies()  # as imported, before anything runs
    gc.collect()
    gc.freeze()  # keep the interpreter's and torch's objects out of later collections
    ws: list[dict[str, Any]] = []
    cmd = "python benchmarks/suite.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:]))

    def report(final: bool) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        rows = {w["key"]: summarize(w) for w in ws}
        pol = deltackpt.Policy()
        chunk_window = 2 * 4 * pol.workers * pol.chunk_bytes
        targets = check_targets(ws, rows, chunk_window, baseline)
        meta = {"config": config, "baseline": _baseline_meta(baseline),
                "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"{platform.system()} {platform.release()}",
                "python": platform.python_version(), "deltackpt": deltackpt.__version__,
                "safetensors": _pkg_version("safetensors"),
                "zstandard": zstandard.__version__, "zipnn": _pkg_version("zipnn"),
                "loadavg": loadavg, "command": cmd, "rss_method": PeakRSS.method,
                "chunk_window": chunk_window, "complete": final,
                "deltackpt_commit": commit, "policies": policies,
                "wall_min": (time.perf_counter() - t_all) / 60}
        pngs = plots(ws, rows, out)
        md = to_markdown(meta, ws, rows, targets, pngs)
        if not final:
            md = md.replace("\n## Targets", "\n**PARTIAL: the run is still going (done: "
                            + ", ".join(w["key"] for w in ws) + ").**\n\n## Targets", 1)
        with open(os.path.join(out, "suite.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out, "suite.json"), "w") as f:
            json.dump({"meta": meta, "targets": targets, "summary": rows, "workloads": ws}, f,
                      indent=1, default=str)
        if final:
            print(md)
        return rows, targets

    try:
        for i, w in enumerate(wls):
            log(f"workload ({w.key}) {w.title}: {w.describe}")
            torch.manual_seed(0)
            ws.append(run_workload(w, root, repeat if w.key != "f" else min(repeat, 2)))
            if i < len(wls) - 1:
                report(final=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, targets = report(final=True)
    log(f"wrote {out}/suite.md, suite.json and plots")
    for t in targets:
        log(f"target {target_status(t['met'])}: {t['target']}: {t['measured']}")
    bad = [r["name"] for rs in rows.values() for r in rs
           if r["lossless"] and r["checked"] and r["exact_steps"] != r["checked"]]
    if bad:
        log(f"NOT BIT-EXACT although lossless: {sorted(set(bad))}")
    # deltackpt failing a save or load is a crash; another method missing (zipnn not
    # installed) is not. A missed target is never a failure.
    broken = sorted({f"{k}: {r['name']}: {r['error']}" for k, rs in rows.items() for r in rs
                     if r["name"].startswith("deltackpt") and r["error"]})
    for b in broken:
        log(f"DELTACKPT FAILED: {b}")
    return 1 if bad or broken else 0


def _baseline_meta(baseline: dict[str, Any] | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    return {k: baseline[k] for k in ("format_commit", "source", "config", "same_config")}


def write_baseline(path: str) -> int:
    """Record ``path``'s (a suite.json) lossless bytes of workloads a and f as the baseline of
    its run configuration (replacing an entry of the same configuration)."""
    with open(path) as f:
        doc = json.load(f)
    meta = doc["meta"]
    config = _config_of(meta)
    if config is None:
        log(f"{path}: cannot tell the run configuration from its meta")
        return 2
    wls = {}
    for w in doc["workloads"]:
        ms = {m["name"]: m for m in w["methods"]}
        t, d = ms.get("torch.save"), ms.get("deltackpt")
        if w["key"] in TARGET_WORKLOADS and t and d and t["disk_after"] and d["disk_after"]:
            wls[w["key"]] = {"torch_bytes": t["disk_after"][-1],
                             "deltackpt_bytes": d["disk_after"][-1],
                             "disk_ratio": t["disk_after"][-1] / d["disk_after"][-1],
                             "saves": len(d["disk_after"]), "state_bytes": w["state_bytes"]}
    try:
        with open(BASELINE_FILE, encoding="utf-8") as f:
            base = json.load(f)
    except OSError:
        base = {"about": "Lossless bytes of the previous default format (workloads a and f of "
                         "benchmarks/suite.py), one entry per run configuration: the size "
                         "target compares a run against the entry of its configuration. "
                         "Written by `suite.py --write-baseline SUITE_JSON`.", "runs": []}
    base["runs"] = [r for r in base["runs"] if r["config"] != config] + [{
        "config": config, "format_commit": meta.get("deltackpt_commit", "?"),
        "measured": meta.get("date", "?"), "source": os.path.relpath(path),
        "command": meta.get("command", "?"), "workloads": wls}]
    with open(BASELINE_FILE, "w", encoding="utf-8") as f:
        json.dump(base, f, indent=1)
        f.write("\n")
    log(f"baseline for {config} ({sorted(wls)}) written to {BASELINE_FILE}")
    return 0


def rerender(out: str) -> int:
    with open(os.path.join(out, "suite.json")) as f:
        doc = json.load(f)
    ws, meta = doc["workloads"], doc["meta"]
    rows = {w["key"]: summarize(w) for w in ws}
    baseline = load_baseline(_config_of(meta))
    meta["baseline"] = _baseline_meta(baseline)
    targets = check_targets(ws, rows, meta["chunk_window"], baseline)
    pngs = plots(ws, rows, out)
    md = to_markdown(meta, ws, rows, targets, pngs)
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write(md)
    doc["summary"], doc["targets"] = rows, targets
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"re-rendered {out}/suite.md and plots from suite.json (measured {meta['date']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
