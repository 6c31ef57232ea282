"""Encode one step: choose, chunk by chunk, between copying the reference, a raw chunk and a
delta, and write new chunks to the store from a pool of worker threads.

Per chunk, in order of preference (spec/FORMAT.md, "Writing a step"):
1. unchanged since the reference (same raw digest): reuse the reference's chunk record, free;
2. the raw chunk is already stored (dedup), or this is a keyframe: a self-contained raw record;
3. otherwise a delta against the reference chunk, unless the raw frame is clearly smaller
   (the delta frame is over ``delta_gain`` of both the chunk and the raw frame).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..codecs import RAW_CONFIG, NotApplicable, get_codec
from ..codecs.base import Codec
from ..codecs.floats import is_float, to_float
from ..format.checksum import digest as xxh3_digest
from ..format.dtypes import ElementType, numpy_type, storage_dtype, torch_type
from ..format.frame import encode_frame, needs_reference
from ..format.tree import Leaf
from ..runtime.scratch import scratch
from ..store.manifest import ChunkRef, TensorEntry
from ..store.packs import ChunkStore, frame_id
from .policy import DROP, LOSSLESS, Policy
from .sensitivity import sensitivities

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch


@dataclass
class RefTensor:
    entry: TensorEntry
    data: np.ndarray  # raw bytes of the reference value as stored (an owned copy)
    step: int         # the step whose entry this is


@dataclass
class RefState:
    """What the writer keeps in memory of the step that deltas are taken against."""

    step: int
    keyframe: int
    delta_index: int
    tensors: dict[str, RefTensor]
    #: the most deltas a rebuild of this step replays (its deepest record's depth, less one)
    links: int = 0


def raw_bytes(value: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ElementType]:
    """A 1-D uint8 view (a copy for non-contiguous or non-CPU values) of ``value``'s bytes."""
    if isinstance(value, torch.Tensor):
        et = torch_type(value.dtype)
        t = value.detach() if value.requires_grad else value
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            # copy as same-width integers: torch has no copy kernel for some dtypes (int1..7)
            same = {1: torch.uint8, 2: torch.int16, 4: torch.int32,
                    8: torch.int64}.get(t.element_size())
            t = (t.view(same) if same is not None else t).contiguous()
        if t.numel() == 0:
            return np.empty(0, np.uint8), et
        flat = t.reshape(-1)
        if flat.stride(0) != 1:  # torch calls any 1-element tensor contiguous, whatever its stride
            flat = flat.as_strided((1,), (1,))
        return flat.view(torch.uint8).numpy(), et
    et = numpy_type(value.dtype)
    arr = np.ascontiguousarray(value, dtype=storage_dtype(et))
    return arr.reshape(-1).view(np.uint8), et


SMALL_CHUNK = 64 * 1024  # items below this are handed to a worker in batches, not one by one
BATCH_BYTES = 4 * SMALL_CHUNK


def _tasks(items: Iterable[Any], size: Callable[[Any], int] | None) -> Iterator[list[Any]]:
    """Group consecutive small items (``size`` below SMALL_CHUNK) into one task, up to
    BATCH_BYTES (or 256 items) each; a large item is a task of its own."""
    batch: list[Any] = []
    total = 0
    for item in items:
        n = SMALL_CHUNK if size is None else size(item)
        if n >= SMALL_CHUNK:
            if batch:
                yield batch
                batch, total = [], 0
            yield [item]
            continue
        batch.append(item)
        total += n
        if total >= BATCH_BYTES or len(batch) >= 256:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
                window: int, size: Callable[[Any], int] | None = None) -> Iterator[Any]:
    """``map`` over a pool with at most ``window`` tasks in flight; results in input order.

    Small items (by ``size``, in bytes) go to a worker in batches: a hand-off per tiny item
    costs more than the item, and doing them in the calling thread instead makes it compete
    with the workers for the GIL while it should be feeding them.
    """
    def run(batch: list[Any]) -> list[Any]:
        return [fn(item) for item in batch]

    pending: list[Future[list[Any]]] = []
    try:
        for batch in _tasks(items, size):
            pending.append(pool.submit(run, batch))
            if len(pending) >= window:
                yield from pending.pop(0).result()
        while pending:
            yield from pending.pop(0).result()
    finally:  # on error, no task may outlive the call (it could write after an abort)
        for fut in pending:
            fut.cancel()
        wait(pending)


def chunk_size(chunk_bytes: int, nbytes: int) -> int:
    """The bytes of a tensor's (first) chunk: the work one chunk job does."""
    return min(chunk_bytes, nbytes)


def _job_size(job: tuple[_Tensor, int]) -> int:
    return chunk_size(job[0].chunk_bytes, job[0].data.size)


@dataclass
class _Tensor:
    leaf: Leaf
    data: np.ndarray
    etype: ElementType
    chunk_bytes: int
    base: RefTensor | None
    n_chunks: int
    lossy: list[Codec] = field(default_factory=list)  # rule codecs for changed chunks
    dropped: bool = False
    recon: np.ndarray | None = None      # the reconstruction, when any chunk is lossy
    #: where this step's value goes as the next reference, chunk by chunk as chunks finish:
    #: the old reference's own buffer when the layout is unchanged (no second copy of the state)
    ref_out: np.ndarray | None = None
    chunks: list[ChunkRef] = field(default_factory=list)
    error: list[tuple[float, float, float, int]] = field(default_factory=list)
    #: for codecs that take sensitivity weights: the tensor holding them (None: uniform)
    wsource: _Tensor | None = None
    #: position in ``lossy`` -> the rule's weighted RMS change, for codecs given weights
    wunits: dict[int, float] = field(default_factory=dict)

    def weights(self, lo: int, hi: int) -> np.ndarray | None:
        """The sensitivity weights (float64) of the elements in byte range [lo, hi)."""
        src = self.wsource
        if src is None:
            return None
        a, b = lo // self.etype.itemsize, hi // self.etype.itemsize
        isz = src.etype.itemsize
        return to_float(src.data[a * isz:b * isz], src.etype).astype(np.float64)

    def span(self, i: int) -> tuple[int, int]:
        """Byte range of chunk ``i``."""
        return i * self.chunk_bytes, min(self.data.size, (i + 1) * self.chunk_bytes)


@dataclass
class EncodedStep:
    entries: list[TensorEntry]
    codecs: list[dict[str, Any]]
    new_chunks: int
    reused_chunks: int
    written_bytes: int
    reference: dict[str, RefTensor]  # the new in-memory reference (empty if none is kept)
    exact: bool


def _error(orig: np.ndarray, recon: np.ndarray, etype: ElementType) -> tuple[float, float,
                                                                                float, int]:
    """(max |error|, sum of squared error, max |value|, n) of one chunk."""
    x, y = to_float(orig, etype).astype(np.float64), to_float(recon, etype).astype(np.float64)
    err = np.abs(y - x)
    return float(err.max(initial=0.0)), float(np.sum(err * err)), \
        float(np.abs(x).max(initial=0.0)), x.size


class StepEncoder:
    """Encodes the leaves of one step; one instance per save.

    At inexact steps (see :meth:`Policy.is_exact`), tensors matched by a lossy rule are encoded
    *closed loop*: each chunk's delta is taken against the reference's reconstruction, and the
    reconstruction (not the original) becomes the next reference, so errors never accumulate.
    """

    def __init__(self, store: ChunkStore, pool: ThreadPoolExecutor, policy: Policy,
                 keyframe: bool, ref: RefState | None, step: int, exact: bool = True,
                 delta_index: int = 0) -> None:
        self.store = store
        self.delta_index = delta_index  # saves since the keyframe: picks held tensors
        self.step = step
        self.pool = pool
        self.policy = policy
        self.keyframe = keyframe or ref is None
        self.exact = exact or self.keyframe
        self.ref = ref
        self.delta: Codec = get_codec(policy.codec)
        self.codecs: list[dict[str, Any]] = [RAW_CONFIG]
        #: whether this step becomes the next reference (kept in memory)
        self.keep_copy = policy.reference == "previous" or self.keyframe

    def _codec_index(self, cfg: dict[str, Any]) -> int:
        if cfg not in self.codecs:
            self.codecs.append(cfg)
        return self.codecs.index(cfg)

    def _lossy_codec(self, leaf: Leaf, et: ElementType) -> tuple[list[Codec], bool, int]:
        """(codecs to try in order for changed chunks, dropped, row length to align chunks to).

        Chunks are aligned to rows whenever the tensor's rule names a row codec (one with a
        ``row_option``, e.g. ``lowrank``), at exact steps too, so that chunk layouts match
        between exact and lossy steps.
        """
        rule = self.policy.rule_for(leaf.path, self.delta_index)
        if rule == DROP:
            return [], not self.exact, 1
        if rule == LOSSLESS or int(np.prod(tuple(leaf.value.shape))) <= 1:
            # a scalar (Adam's step count, a loss scale) is a counter, not a field of values:
            # no lossy codec's error is meaningful for it, and its bytes do not matter
            return [], False, 1
        assert not isinstance(rule, str)  # "drop" and "lossless" are the only strings
        cfgs = [dict(c) for c in (rule if isinstance(rule, list) else [rule])]
        shape = tuple(leaf.value.shape)
        row = 1
        usable = []
        for cfg in cfgs:
            codec = get_codec(cfg)
            option = codec.row_option
            if option is not None:
                rlen = int(np.prod(shape[1:])) if len(shape) >= 2 else 0
                if not rlen or not codec.supports(et) \
                        or rlen * et.itemsize > self.policy.chunk_bytes:
                    continue  # not a matrix of a type it takes, or rows longer than a chunk
                row = rlen
                cfg[option] = cfg.get(option) or rlen
                codec = get_codec(cfg)
            if codec.lossless:  # a lossless rule codec (e.g. sparse) applies at every delta
                if not self.keyframe and cfg != self.delta.get_config():
                    usable.append(codec)
            elif not self.exact and is_float(et):
                usable.append(codec)
        return usable, False, row

    def _prepare(self, leaf: Leaf) -> _Tensor:
        data, et = raw_bytes(leaf.value)
        lossy, dropped, row = self._lossy_codec(leaf, et)
        unit = et.itemsize * row
        chunk_bytes = max(1, self.policy.chunk_bytes // unit) * unit
        base = None if self.ref is None else self.ref.tensors.get(leaf.path)
        if base is not None and (base.entry.kind != et.kind or base.entry.dtype != et.name
                                 or base.entry.nbytes != data.size
                                 or base.entry.chunk_bytes != chunk_bytes):
            if lossy and base.entry.nbytes == data.size \
                    and base.entry.kind == et.kind and base.entry.dtype == et.name:
                chunk_bytes = base.entry.chunk_bytes  # keep the reference's chunking
            else:
                base = None  # dtype, size or chunking changed: no chunk-wise reference
        if base is None:
            lossy = []  # the first entry of a tensor is always exact
        t = _Tensor(leaf, data, et, chunk_bytes, base, 0 if dropped else
                    -(-data.size // chunk_bytes), lossy, dropped)
        if lossy:
            t.recon = np.empty_like(data)
        elif self.keep_copy and not dropped:
            t.ref_out = base.data if base is not None and base.data.size == data.size \
                and base.data.flags.writeable else np.empty_like(data)
        return t

    def _chunk(self, job: tuple[_Tensor, int]) -> tuple[ChunkRef | tuple[Any, ...], int]:
        """Runs in a worker. Returns (record or record template, bytes written)."""
        result = self._encode_chunk(job)
        t, i = job
        # only after the chunk is encoded: ref_out may be the buffer its delta was taken from;
        # a chunk reused unchanged from that very buffer already holds these bytes
        unchanged = not isinstance(result[0], ChunkRef) and result[0][0] == "copy"
        in_place = t.base is not None and t.ref_out is t.base.data
        if t.ref_out is not None and not (unchanged and in_place):
            lo, hi = t.span(i)
            t.ref_out[lo:hi] = t.data[lo:hi]
        return result

    def _encode_chunk(self, job: tuple[_Tensor, int]) -> tuple[ChunkRef | tuple[Any, ...], int]:
        t, i = job
        pol, store = self.policy, self.store
        lo, hi = t.span(i)
        chunk = t.data[lo:hi]
        prev = t.base.entry.chunks[i] if t.base is not None else None
        if t.lossy and t.recon is not None:
            assert t.base is not None and prev is not None
            ref_chunk = t.base.data[lo:hi]
            if np.array_equal(chunk, ref_chunk):
                t.recon[lo:hi] = chunk
                t.error.append((0.0, 0.0, 0.0, 0))
                return ("copy", prev, t.base.entry.codecs[prev.codec]), 0
            for k, codec in enumerate(t.lossy):  # the first codec that takes the chunk wins
                if k in t.wunits:
                    codec = codec.weighted(t.weights(lo, hi), t.wunits[k])
                try:
                    payload, word = codec.encode(chunk, ref_chunk, t.etype)
                    recon = codec.decode(payload, ref_chunk, t.etype, chunk.size)
                except NotApplicable:
                    continue
                t.recon[lo:hi] = recon
                if not codec.lossless:
                    t.error.append(_error(chunk, recon, t.etype))
                rdigest = xxh3_digest(recon)
                if rdigest == prev.digest:  # quantized to no change at all
                    return ("copy", prev, t.base.entry.codecs[prev.codec]), 0
                pid, written = store.put(payload, word, pol.zstd_level)
                return ("delta", pid, prev.depth + 1, rdigest, codec), written
            t.recon[lo:hi] = chunk  # the codec declined: store this chunk exactly
        digest = xxh3_digest(chunk)
        if prev is not None and prev.digest == digest and (not self.keyframe or prev.ref is None):
            return ("copy", prev, t.base.entry.codecs[prev.codec]), 0  # type: ignore[union-attr]
        if prev is None or self.keyframe or store.has(digest):
            cid, written = store.put(chunk, t.etype.word, pol.zstd_level, cid=digest)
            return ChunkRef(cid, 0, None, digest, 1), written
        assert t.base is not None
        if self.delta.frame_reference:
            return self._plane_delta(t, chunk, t.base.data[lo:hi], prev, digest)
        payload, word = self.delta.encode_into(chunk, t.base.data[lo:hi], t.etype,
                                               scratch(chunk.size, "delta"))
        pid = xxh3_digest(payload)
        delta_rec = ("delta", pid, prev.depth + 1, digest, self.delta)
        if store.has(pid):
            return delta_rec, 0
        dframe = encode_frame(payload, word, pol.zstd_level)
        if len(dframe) > pol.delta_gain * chunk.size:  # the delta hardly pays: try raw
            rframe = encode_frame(chunk, t.etype.word, pol.zstd_level)
            if len(dframe) > pol.delta_gain * len(rframe):
                return ChunkRef(digest, 0, None, digest, 1), store.put_frame(digest, rframe,
                                                                             chunk.size)
        return delta_rec, store.put_frame(pid, dframe, payload.size)

    def _plane_delta(self, t: _Tensor, chunk: np.ndarray, ref: np.ndarray, prev: ChunkRef,
                     digest: bytes) -> tuple[ChunkRef | tuple[Any, ...], int]:
        """A chunk framed against its reference plane by plane (codec ``pxor``). The frame
        already chose, per plane, the cheaper of the plane itself and its XOR, so no raw frame
        is tried; one that uses the reference in no plane *is* the raw chunk's frame."""
        frame = encode_frame(chunk, t.etype.word, self.policy.zstd_level, ref=ref,
                             contexts=self.policy.contexts)
        if not needs_reference(frame):
            return ChunkRef(digest, 0, None, digest, 1), self.store.put_frame(digest, frame,
                                                                               chunk.size)
        fid = frame_id(frame)
        return ("delta", fid, prev.depth + 1, digest, self.delta), \
            self.store.put_frame(fid, frame, chunk.size)

    def _record(self, t: _Tensor, rec: ChunkRef | tuple[Any, ...]) -> ChunkRef:
        if isinstance(rec, ChunkRef):
            return rec
        if rec[0] == "copy":
            prev, codec = rec[1], rec[2]
            return ChunkRef(prev.id, self._codec_index(codec.get_config()), prev.ref,
                            prev.digest, prev.depth)
        assert t.base is not None
        _, pid, depth, digest, codec = rec
        return ChunkRef(pid, self._codec_index(codec.get_config()), t.base.step, digest, depth)

    def _weigh(self, tensors: list[_Tensor], tree: Any) -> None:
        """Pair the tensors whose codecs take sensitivity weights with them, and sum each
        rule's weighted squared change over its tensors (in the pool) into its unit."""
        wanting = [t for t in tensors if any(c.wants_weights() for c in t.lossy)]
        if not wanting or tree is None:
            return
        sens = sensitivities(tree, [t.leaf for t in tensors])
        by_index = {t.leaf.index: t for t in tensors}
        jobs: list[tuple[_Tensor, int, int, str]] = []
        for t in wanting:
            w = sens.get(t.leaf.path)
            if w is None:
                continue  # nothing says where its error matters: coded per block
            src = None if w.source is None else by_index.get(w.source)
            if w.source is not None and (src is None or not is_float(src.etype)
                                         or src.data.size // src.etype.itemsize
                                         != t.data.size // t.etype.itemsize):
                continue
            t.wsource = src
            for k, codec in enumerate(t.lossy):
                if codec.wants_weights():
                    key = json.dumps(codec.get_config(), sort_keys=True)
                    jobs.extend((t, k, i, key) for i in range(t.n_chunks))

        def energy(job: tuple[_Tensor, int, int, str]) -> tuple[float, int]:
            t, k, i, _ = job
            lo, hi = t.span(i)
            assert t.base is not None
            chunk, ref = t.data[lo:hi], t.base.data[lo:hi]
            if np.array_equal(chunk, ref):
                return 0.0, chunk.size // t.etype.itemsize
            try:
                return t.lossy[k].weighted_energy(chunk, ref, t.etype, t.weights(lo, hi)), \
                    chunk.size // t.etype.itemsize
            except NotApplicable:
                return 0.0, 0
        sums: dict[str, list[float]] = {}
        for job, (e, n) in zip(jobs, self.pool.map(energy, jobs)):
            acc = sums.setdefault(job[3], [0.0, 0.0])
            acc[0] += e
            acc[1] += n
        for t, k, _, key in jobs:
            total, count = sums[key]
            if total > 0 and count > 0 and np.isfinite(total):
                t.wunits[k] = float(np.sqrt(total / count))

    def encode(self, leaves: list[Leaf], tree: Any = None) -> EncodedStep:
        """Encode and store every chunk (``tree``, the state's flattened tree, tells where
        errors matter for codecs that ask; see :mod:`.sensitivity`). On error the old
        reference may be half overwritten: the caller must drop it (:class:`Repository`
        rebuilds it from disk)."""
        keep_copy = self.keep_copy
        tensors: list[_Tensor] = []

        # all torch calls first, before any worker runs: each releases and retakes the GIL,
        # which interleaved with busy workers costs far more than the call itself
        tensors.extend(self._prepare(leaf) for leaf in leaves)
        self._weigh(tensors, tree)
        jobs = [(t, i) for t in tensors for i in range(t.n_chunks)]
        new = reused = written_total = cur = 0
        for (rec, written) in bounded_map(self.pool, self._chunk, jobs,
                                          4 * self.policy.workers, _job_size):
            written_total += written
            if written:
                new += 1
            else:
                reused += 1
            # results come back in job order: the first tensor still missing chunks owns it
            while len(tensors[cur].chunks) == tensors[cur].n_chunks:
                cur += 1
            tensors[cur].chunks.append(self._record(tensors[cur], rec))
        entries: list[TensorEntry] = []
        reference: dict[str, RefTensor] = {}
        step_exact = True
        for t in tensors:
            value = t.leaf.value
            is_torch = isinstance(value, torch.Tensor)
            shape = list(value.shape)
            lossy_info = None
            if t.recon is None and len(t.chunks) == 1:
                source = t.chunks[0].digest  # one chunk: the worker already hashed these bytes
            else:
                source = xxh3_digest(t.data)
            digest = source if t.recon is None else xxh3_digest(t.recon)
            if digest != source:
                max_abs = max(e[0] for e in t.error)
                n = max(1, sum(e[3] for e in t.error))
                peak = max(e[2] for e in t.error)
                lossy_info = {"source_digest": source.hex(),
                              "max_abs": max_abs, "rms": (sum(e[1] for e in t.error) / n) ** 0.5,
                              "max_rel": max_abs / peak if peak else 0.0}
            step_exact &= lossy_info is None and not t.dropped
            entry = TensorEntry(
                path=t.leaf.path, kind=t.etype.kind, dtype=t.etype.name, shape=shape,
                nbytes=t.data.size, chunk_bytes=t.chunk_bytes,
                digest=digest, chunks=t.chunks, global_shape=shape,
                offset=[0] * len(shape), device=str(value.device) if is_torch else "cpu",
                requires_grad=bool(isinstance(value, torch.Tensor) and value.requires_grad),
                parameter=isinstance(value, torch.nn.Parameter), lossy=lossy_info,
                dropped=t.dropped)
            entries.append(entry)
            if t.dropped:
                if t.base is not None and keep_copy:
                    reference[entry.path] = t.base  # keep deltas against the last stored value
            elif keep_copy:
                data = t.recon if t.recon is not None else t.ref_out
                assert data is not None
                reference[entry.path] = RefTensor(entry, data, self.step)
        codecs = [get_codec(c) for c in self.codecs]
        for e in entries:
            e.codecs = codecs
        return EncodedStep(entries, self.codecs, new, reused, written_total, reference,
                           step_exact)
