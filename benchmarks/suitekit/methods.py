"""The checkpoint methods compared: torch.save, safetensors, safetensors+zstd, ZipNN and
deltackpt's variants, each a ``Method`` that saves and loads a state."""
from __future__ import annotations

import gc
import json
import math
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import torch
import zstandard

import deltackpt

from .common import pkg_version
from .measure import flat_tensors, rss, trim


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
        self.version = pkg_version("zipnn")

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
