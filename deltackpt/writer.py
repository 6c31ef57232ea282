"""Encode one step: choose, chunk by chunk, between copying the reference, a raw chunk and a
delta, and write new chunks to the store from a pool of worker threads.

Per chunk, in order of preference (spec/FORMAT.md, "Writing a step"):
1. unchanged since the reference (same raw digest): reuse the reference's chunk record, free;
2. the raw chunk is already stored (dedup), or this is a keyframe: a self-contained raw record;
3. otherwise a delta against the reference chunk, unless the raw frame is clearly smaller
   (the delta frame is over ``delta_gain`` of both the chunk and the raw frame).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from .codecs import get_codec
from .codecs.base import Codec
from .dtypes import ElementType, numpy_type, torch_type
from .frame import encode_frame
from .manifest import ChunkRef, TensorEntry
from .policy import Policy
from .store.packs import ChunkStore
from .tree import Leaf

RAW_CONFIG = {"id": "raw"}
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class RefTensor:
    entry: TensorEntry
    data: np.ndarray  # raw bytes of the reference value (an owned copy)


@dataclass
class RefState:
    """What the writer keeps in memory of the step that deltas are taken against."""

    step: int
    keyframe: int
    delta_index: int
    tensors: dict[str, RefTensor]


def raw_bytes(value: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ElementType]:
    """A 1-D uint8 view (a copy for non-contiguous or non-CPU values) of ``value``'s bytes."""
    if isinstance(value, torch.Tensor):
        et = torch_type(value.dtype)
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            # copy as same-width integers: torch has no copy kernel for some dtypes (int1..7)
            same = _SAME_WIDTH.get(t.element_size())
            t = (t.view(same) if same is not None else t).contiguous()
        if t.numel() == 0:
            return np.empty(0, np.uint8), et
        return t.reshape(-1).view(torch.uint8).numpy(), et
    et = numpy_type(value.dtype)
    arr = np.ascontiguousarray(value, dtype=np.dtype(et.name))
    return arr.reshape(-1).view(np.uint8), et


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
                window: int) -> Iterator[Any]:
    """``map`` over a pool with at most ``window`` tasks in flight; results in input order."""
    pending: list[Future[Any]] = []
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for fut in pending:
            fut.cancel()


@dataclass
class _Tensor:
    leaf: Leaf
    data: np.ndarray
    etype: ElementType
    chunk_bytes: int
    base: RefTensor | None
    n_chunks: int
    chunks: list[ChunkRef] = field(default_factory=list)


@dataclass
class EncodedStep:
    entries: list[TensorEntry]
    codecs: list[dict[str, Any]]
    new_chunks: int
    reused_chunks: int
    written_bytes: int
    reference: dict[str, RefTensor] | None  # the new in-memory reference, if one is kept


class StepEncoder:
    """Encodes the leaves of one step; one instance per save."""

    def __init__(self, store: ChunkStore, pool: ThreadPoolExecutor, policy: Policy,
                 keyframe: bool, ref: RefState | None) -> None:
        self.store = store
        self.pool = pool
        self.policy = policy
        self.keyframe = keyframe or ref is None
        self.ref = ref
        self.delta: Codec = get_codec(policy.codec)
        self.codecs: list[dict[str, Any]] = [RAW_CONFIG]

    def _codec_index(self, cfg: dict[str, Any]) -> int:
        if cfg not in self.codecs:
            self.codecs.append(cfg)
        return self.codecs.index(cfg)

    def _prepare(self, leaf: Leaf) -> _Tensor:
        data, et = raw_bytes(leaf.value)
        chunk_bytes = max(1, self.policy.chunk_bytes // et.itemsize) * et.itemsize
        base = None if self.ref is None else self.ref.tensors.get(leaf.path)
        if base is not None and (base.entry.kind != et.kind or base.entry.dtype != et.name
                                 or base.entry.nbytes != data.size
                                 or base.entry.chunk_bytes != chunk_bytes):
            base = None  # dtype, size or chunking changed: no chunk-wise reference
        return _Tensor(leaf, data, et, chunk_bytes, base, -(-data.size // chunk_bytes))

    def _chunk(self, job: tuple[_Tensor, int]) -> tuple[ChunkRef | tuple[Any, ...], int]:
        """Runs in a worker. Returns (record or record template, bytes written)."""
        t, i = job
        pol, store = self.policy, self.store
        lo, hi = i * t.chunk_bytes, min(t.data.size, (i + 1) * t.chunk_bytes)
        chunk = t.data[lo:hi]
        digest = xxhash.xxh3_128(chunk).digest()
        prev = t.base.entry.chunks[i] if t.base is not None else None
        if prev is not None and prev.digest == digest and (not self.keyframe or prev.ref is None):
            return ("copy", prev, t.base.entry.codecs[prev.codec]), 0  # type: ignore[union-attr]
        if prev is None or self.keyframe or store.has(digest):
            cid, written = store.put(chunk, t.etype.word, pol.zstd_level, cid=digest)
            return ChunkRef(cid, 0, None, digest, 1), written
        assert t.base is not None
        payload, word = self.delta.encode(chunk, t.base.data[lo:hi], t.etype)
        pid = xxhash.xxh3_128(payload).digest()
        delta_rec = ("delta", pid, prev.depth + 1, digest)
        if store.has(pid):
            return delta_rec, 0
        dframe = encode_frame(payload, word, pol.zstd_level)
        if len(dframe) > pol.delta_gain * chunk.size:  # the delta hardly pays: try raw
            rframe = encode_frame(chunk, t.etype.word, pol.zstd_level)
            if len(dframe) > pol.delta_gain * len(rframe):
                return ChunkRef(digest, 0, None, digest, 1), store.put_frame(digest, rframe,
                                                                             chunk.size)
        return delta_rec, store.put_frame(pid, dframe, payload.size)

    def _record(self, rec: ChunkRef | tuple[Any, ...]) -> ChunkRef:
        if isinstance(rec, ChunkRef):
            return rec
        if rec[0] == "copy":
            prev, codec = rec[1], rec[2]
            return ChunkRef(prev.id, self._codec_index(codec.get_config()), prev.ref,
                            prev.digest, prev.depth)
        assert self.ref is not None
        return ChunkRef(rec[1], self._codec_index(self.delta.get_config()), self.ref.step,
                        rec[3], rec[2])

    def encode(self, leaves: list[Leaf]) -> EncodedStep:
        keep_copy = self.policy.reference == "previous" or self.keyframe
        tensors: list[_Tensor] = []

        def jobs() -> Iterator[tuple[_Tensor, int]]:
            for leaf in leaves:
                t = self._prepare(leaf)
                tensors.append(t)
                for i in range(t.n_chunks):
                    yield t, i

        new = reused = written_total = cur = 0
        for (rec, written) in bounded_map(self.pool, self._chunk, jobs(),
                                          4 * self.policy.workers):
            written_total += written
            if written:
                new += 1
            else:
                reused += 1
            # results come back in job order: the first tensor still missing chunks owns it
            while len(tensors[cur].chunks) == tensors[cur].n_chunks:
                cur += 1
            tensors[cur].chunks.append(self._record(rec))
        entries, reference = [], {} if keep_copy else None
        for t in tensors:
            value = t.leaf.value
            is_torch = isinstance(value, torch.Tensor)
            shape = list(value.shape)
            entry = TensorEntry(
                path=t.leaf.path, kind=t.etype.kind, dtype=t.etype.name, shape=shape,
                nbytes=t.data.size, chunk_bytes=t.chunk_bytes,
                digest=xxhash.xxh3_128(t.data).digest(), chunks=t.chunks, global_shape=shape,
                offset=[0] * len(shape), device=str(value.device) if is_torch else "cpu",
                requires_grad=bool(is_torch and value.requires_grad),
                parameter=isinstance(value, torch.nn.Parameter))
            entries.append(entry)
            if reference is not None:
                reference[entry.path] = RefTensor(entry, np.array(t.data, copy=True))
        codecs = [get_codec(c) for c in self.codecs]
        for e in entries:
            e.codecs = codecs
        return EncodedStep(entries, self.codecs, new, reused, written_total, reference)
