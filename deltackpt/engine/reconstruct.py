"""Rebuild tensors of any step by replaying each chunk's delta chain from its self-contained base.

Every payload read is checked against its chunk id by the store, and every rebuilt chunk against
the raw digest recorded at save time, at *each* link of the chain, so an error names the exact
step where the bytes went wrong.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import xxhash

from ..errors import (
    BrokenChainError,
    CorruptChunkError,
    DeltaCkptError,
    DigestMismatchError,
    IntegrityError,
    StepNotFoundError,
)
from ..format.checksum import digest
from ..format.frame import (
    CTX_REFERENCE,
    METHOD_STORED,
    MODE_LITERAL,
    Frame,
    decode_plane,
    parse_frame,
)
from ..format.planes import merge
from ..runtime.scratch import scratch as buffer
from ..store.manifest import Manifest, TensorEntry
from ..store.packs import ChunkStore

MAX_CHAIN = 100_000
#: a load from a backend with ``batch_reads`` fetches its frames ahead in windows of about
#: this many bytes: at most two windows are in memory, one being decoded, the next arriving
PREFETCH_WINDOW = 64 << 20
J = TypeVar("J")


class ChunkCache:
    """LRU of rebuilt chunks keyed by (step, path, index), bounded in bytes.

    Sequential loads and verification of consecutive steps share most of their chains; the
    cache turns O(steps × depth) decoding into O(steps).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str, int]) -> np.ndarray | None:
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
            return v

    def put(self, key: tuple[int, str, int], value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self._size += value.nbytes
            while self._size > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._size -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0


class Reconstructor:
    """Rebuilds chunks and tensors. ``manifest(step)`` must raise StepNotFoundError if absent."""

    def __init__(self, store: ChunkStore, manifest: Callable[[int], Manifest],
                 cache: ChunkCache) -> None:
        self.store = store
        self.manifest = manifest
        self.cache = cache

    def _link(self, step: int, entry: TensorEntry, i: int, ref: int) -> TensorEntry:
        try:
            m = self.manifest(ref)
        except StepNotFoundError:
            raise BrokenChainError(f"chunk {i} is a delta against step {ref}, which is missing",
                                   step=step, path=entry.path, cause="broken chain") from None
        except DeltaCkptError as exc:  # damaged, or a version this reader does not know
            raise BrokenChainError(f"chunk {i} is a delta against step {ref}, whose manifest "
                                   f"is damaged: {exc}", step=step, path=entry.path,
                                   cause="broken chain") from None
        base = m.tensor(entry.path)
        if base is None or base.dropped or base.kind != entry.kind or base.dtype != entry.dtype \
                or base.nbytes != entry.nbytes or base.chunk_bytes != entry.chunk_bytes:
            raise BrokenChainError(f"chunk {i} is a delta against step {ref}, which has no "
                                   "matching tensor", step=step, path=entry.path,
                                   cause="broken chain")
        return base

    def _chain(self, step: int, entry: TensorEntry, i: int, cached: bool = True
               ) -> tuple[list[tuple[int, TensorEntry]], np.ndarray | None]:
        """The links to decode for chunk ``i``, latest first, down to its self-contained base
        or (``cached``) to the first link found in the cache (returned with its cached value)."""
        chain: list[tuple[int, TensorEntry]] = []
        s, e = step, entry
        seen: set[int] = set()
        while True:
            value = self.cache.get((s, e.path, i)) if cached else None
            if value is not None:
                return chain, value
            chain.append((s, e))
            rec = e.chunks[i]
            if rec.ref is None:
                return chain, None
            if rec.ref in seen or len(chain) > MAX_CHAIN:
                raise BrokenChainError(f"chunk {i}: delta chain loops through step {rec.ref}",
                                       step=step, path=entry.path, cause="broken chain")
            seen.add(s)
            e = self._link(s, e, i, rec.ref)
            if e.chunks[i].depth >= rec.depth:  # depths fall along a chain (rebasing may
                # shorten it, so only strictly-decreasing is required, never equality)
                raise BrokenChainError(f"chunk {i} (depth {rec.depth}) refers to step {rec.ref}, "
                                       f"whose chunk has depth {e.chunks[i].depth}", step=s,
                                       path=entry.path, cause="broken chain")
            s = rec.ref

    def chain_ids(self, step: int, entry: TensorEntry, i: int) -> list[bytes]:
        """The ids of the frames rebuilding chunk ``i`` reads (down to a cached link); none
        where the chain is broken (the rebuild itself reports that)."""
        try:
            chain, _value = self._chain(step, entry, i)
        except DeltaCkptError:
            return []
        return [e.chunks[i].id for _s, e in chain]

    def _decode_link(self, s: int, e: TensorEntry, i: int, ref: np.ndarray | None,
                     out: np.ndarray | None) -> np.ndarray:
        """Decode one link of a chain onto ``ref`` (into ``out`` when given, which may be
        ``ref`` itself) and check it against the digest recorded at save time."""
        rec = e.chunks[i]
        lo, hi = e.chunk_span(i)
        codec = e.codecs[rec.codec]
        try:
            bound = codec.max_payload(hi - lo, e.etype)
            if codec.frame_reference:
                value = codec.decode_inplace(self.store.get(rec.id, bound, out=out, ref=ref),
                                             ref, e.etype, hi - lo)
            elif out is None:
                value = codec.decode_inplace(self.store.get(rec.id, bound), ref, e.etype,
                                             hi - lo)
            elif ref is None and codec.stores_value:
                value = self.store.get(rec.id, bound, out=out)  # frames decode straight in
            else:
                # the payload goes into a per-thread scratch buffer, reused chunk after chunk
                # (a fresh array per link costs a page fault per 4 KiB)
                scratch = buffer(self.store.locate(rec.id).payload_length, "payload")
                payload = self.store.get(rec.id, bound, out=scratch)
                codec.decode_into(payload, ref, out, e.etype)
                value = out
        except DeltaCkptError as exc:
            raise exc.located(f"chunk {i}: {exc}", step=s, path=e.path) from None
        # a record of the value itself whose id is its digest: the store just checked these
        # very bytes' hash (a frame coded against the reference is hashed as it is stored)
        hashed = codec.stores_value and not codec.frame_reference and rec.id == rec.digest \
            and value.size == hi - lo
        if value.size != hi - lo or not hashed and digest(value) != rec.digest:
            raise DigestMismatchError(
                f"chunk {i} rebuilt with codec {codec.codec_id!r} does not match the digest "
                "taken at save time", step=s, path=e.path, cause="digest mismatch")
        return value

    def precheck(self, step: int, entry: TensorEntry) -> None:
        """Before the output is allocated: every chunk the entry names directly is indexed and
        its payload fits its span (a manifest declaring a huge tensor over small chunks fails
        here, before any allocation or read)."""
        for i, rec in enumerate(entry.chunks):
            lo, hi = entry.chunk_span(i)
            codec = entry.codecs[rec.codec]
            try:
                loc = self.store.locate(rec.id)
            except DeltaCkptError as exc:
                raise exc.located(f"chunk {i}: {exc}", step=step, path=entry.path) from None
            bound = codec.max_payload(hi - lo, entry.etype)
            if bound is not None and loc.payload_length > bound \
                    or loc.payload_length < codec.min_payload(hi - lo, entry.etype):
                raise CorruptChunkError(
                    f"chunk {i}: its payload is {loc.payload_length} bytes, which codec "
                    f"{codec.codec_id!r} cannot decode into a {hi - lo}-byte chunk", step=step,
                    path=entry.path, cause="corrupt chunk")

    def chunk(self, step: int, entry: TensorEntry, i: int) -> np.ndarray:
        """The raw bytes of chunk ``i`` of ``entry`` at ``step`` (read-only array); every link
        rebuilt is cached."""
        chain, value = self._chain(step, entry, i)
        cached = value
        try:
            for s, e in reversed(chain):
                value = self._decode_link(s, e, i, value, None)
                value.flags.writeable = False
                self.cache.put((s, e.path, i), value)
        except IntegrityError:
            # a link is damaged only in planes a later link stores literal (or in frame bytes
            # no plane reads): the target rebuilds bit-exactly (checked against its digest) as
            # a load rebuilds it, so it is intact. Plane replay starts at the self-contained
            # base, so a chain cut short by the cache is walked again in full.
            out = self._replay_full(step, entry, i, chain if cached is None else None)
            if out is not None:
                out.flags.writeable = False
                self.cache.put((step, entry.path, i), out)
                return out
            raise
        assert value is not None
        return value

    def chunk_into(self, step: int, entry: TensorEntry, i: int, out: np.ndarray) -> None:
        """Rebuild chunk ``i`` straight into ``out`` (its 1-D uint8 slice of the output),
        applying each delta in place: no intermediate copies, nothing added to the cache."""
        chain, value = self._chain(step, entry, i)
        cut = value is not None   # the cache cut the chain short: plane replay not tried yet
        if not cut and len(chain) > 1 and self._replay_planes(chain, i, out):
            return
        if cut:
            out[...] = value
        try:
            for s, e in reversed(chain):
                value = self._decode_link(s, e, i, value if value is None else out, out)
        except IntegrityError:
            full = self._replay_full(step, entry, i, None) if cut else None
            if full is None:
                raise
            out[...] = full

    def _replay_full(self, step: int, entry: TensorEntry, i: int,
                     chain: list[tuple[int, TensorEntry]] | None) -> np.ndarray | None:
        """Chunk ``i`` rebuilt by plane replay of its whole chain (``chain`` if already walked
        without the cache), or None where that does not rebuild it to its digest."""
        if chain is None:
            try:
                chain = self._chain(step, entry, i, cached=False)[0]
            except IntegrityError:
                return None
        if len(chain) < 2:
            return None
        lo, hi = entry.chunk_span(i)
        out = np.empty(hi - lo, np.uint8)
        return out if self._replay_planes(chain, i, out) else None

    def _replay_planes(self, chain: list[tuple[int, TensorEntry]], i: int,
                       out: np.ndarray) -> bool:
        """Replay a chain plane by plane where every link's codec allows it (``plane_replay``:
        ``raw``, ``xor``, ``pxor``; :meth:`Codec.replay_modes`); False where the chain does not
        qualify or the result is wrong (the caller then replays link by link, naming the broken
        link).

        XOR commutes with byte-plane grouping, so planes are XORed as stored and regrouped into
        words once at the end, instead of once per link. A plane is replayed only from the
        newest link that stores it literally (for float32 the two low planes usually come from
        the last link alone); the top plane also from wherever a later plane's contexts need
        it. Per-link checks are skipped: the rebuilt chunk is checked against the target's
        save-time digest, which any wrong link would fail.
        """
        n = out.size
        links: list[tuple[list[int], Frame]] = []
        for _, e in reversed(chain):  # the base first
            rec = e.chunks[i]
            codec = e.codecs[rec.codec]
            if not codec.plane_replay or (rec.ref is None) == codec.uses_reference:
                return False
            try:
                frame, loc = self.store.read_frame(rec.id, n)
                if loc.payload_length != n:
                    return False
                f = parse_frame(frame, n)
            except DeltaCkptError:
                return False
            if f.needs_reference and not codec.frame_reference:
                return False
            modes = codec.replay_modes(f)
            links.append((modes, f))
        p = len(links[0][1].planes)
        if any(len(f.planes) != p for _, f in links):
            return False
        top = p - 1
        # plane k is rebuilt from the newest link storing it literally (the base always does)
        start = [max(j for j, (modes, _) in enumerate(links) if modes[k] == MODE_LITERAL)
                 for k in range(p)]
        need_top = [j - 1 for j, (_, f) in enumerate(links) for k in range(p)
                    if j >= start[k] and f.planes[k].context == CTX_REFERENCE]
        if need_top and min(need_top) < start[top]:
            start[top] = max(j for j, (modes, _) in enumerate(links)
                             if modes[top] == MODE_LITERAL and j <= min(need_top))
        m = n // p
        acc = buffer(n, "planes").reshape(p, m)
        rows: list[np.ndarray] = list(acc)  # a literal stored plane is used where it lies
        tmp = buffer(m, "plane")
        lane = np.uint64 if m % 8 == 0 else np.uint8
        try:
            for j, (modes, f) in enumerate(links):
                ref_top = rows[top] if j else None
                for k in range(p):
                    if j < start[k]:
                        continue
                    stored = f.planes[k].method == METHOD_STORED
                    if modes[k] == MODE_LITERAL:
                        if stored:
                            rows[k] = decode_plane(f, k)  # a view of the frame just read
                        elif k == top and ref_top is not None:  # its own context source
                            rows[k] = acc[k]
                            acc[k] = decode_plane(f, k, ref_top, out=tmp)
                        else:
                            rows[k] = decode_plane(f, k, ref_top, out=acc[k])
                        continue
                    delta = decode_plane(f, k, ref_top, out=None if stored else tmp)
                    if rows[k] is not acc[k]:
                        acc[k] = rows[k]
                        rows[k] = acc[k]
                    row = acc[k].view(lane)
                    np.bitwise_xor(row, delta.view(lane), out=row)
        except DeltaCkptError:
            return False
        merge(rows, p, out)
        return digest(out) == chain[0][1].chunks[i].digest

    @staticmethod
    def proven_by_chunks(entry: TensorEntry) -> bool:
        """Whether checking every chunk (as :meth:`chunk_into` does) already checked the
        tensor: a one-chunk tensor whose digest is its chunk's (hashing it again is a second
        pass over the same bytes)."""
        return len(entry.chunks) == 1 and entry.chunks[0].digest == entry.digest \
            and entry.chunk_span(0) == (0, entry.nbytes)

    def check(self, step: int, entry: TensorEntry, data: np.ndarray) -> None:
        """Raise DigestMismatchError unless ``data`` hashes to the tensor's save-time digest."""
        if digest(data) != entry.digest:
            raise DigestMismatchError("rebuilt tensor does not match the digest taken at save "
                                      "time", step=step, path=entry.path, cause="digest mismatch")

    def tensor_into(self, step: int, entry: TensorEntry, out: np.ndarray) -> None:
        """Fill ``out`` (1-D uint8, ``entry.nbytes`` long) and check the tensor digest."""
        for i in range(len(entry.chunks)):
            lo, hi = entry.chunk_span(i)
            out[lo:hi] = self.chunk(step, entry, i)
        self.check(step, entry, out)

    def tensor_digest(self, step: int, entry: TensorEntry) -> None:
        """Rebuild chunk by chunk, hashing as it goes (never holds the whole tensor)."""
        h = xxhash.xxh3_128()
        for i in range(len(entry.chunks)):
            h.update(self.chunk(step, entry, i).data)
        if h.digest() != entry.digest:
            raise DigestMismatchError("rebuilt tensor does not match the digest taken at save "
                                      "time", step=step, path=entry.path, cause="digest mismatch")



def prefetch_windows(store: ChunkStore, jobs: Sequence[J], ids: Callable[[J], list[bytes]],
                     budget: int | None = None) -> Iterator[list[J]]:
    """``jobs`` in consecutive windows of about ``budget`` frame bytes (default
    :data:`PREFETCH_WINDOW`; ``ids(job)``: the frames a job reads), each window's frames
    fetched ahead with :meth:`ChunkStore.prefetch`: the next window's arrive while the caller
    works on the current one, whose frames are released once the caller asks for the next.
    For backends where every request is a round trip (``batch_reads``); prefetching is best
    effort, so a job still reads what is missing."""
    budget = PREFETCH_WINDOW if budget is None else budget
    windows: list[tuple[list[J], set[bytes]]] = []
    cur: list[J] = []
    cur_ids: set[bytes] = set()
    cur_bytes = 0
    for job in jobs:
        wanted = set(ids(job))
        size = sum(store.frame_bytes(c) for c in wanted - cur_ids)
        if cur and cur_bytes + size > budget:
            windows.append((cur, cur_ids))
            cur, cur_ids, cur_bytes = [], set(), 0
            size = sum(store.frame_bytes(c) for c in wanted)
        cur.append(job)
        cur_ids |= wanted
        cur_bytes += size
    if cur:
        windows.append((cur, cur_ids))
    mine = set().union(*(w[1] for w in windows)) if windows else set()
    with ThreadPoolExecutor(1, thread_name_prefix="deltackpt-prefetch") as ahead:
        fut: Future[int] | None = None
        try:
            if windows:
                fut = ahead.submit(store.prefetch, windows[0][1])
            for k, (window, wids) in enumerate(windows):
                if fut is not None:
                    fut.result()
                following = windows[k + 1][1] if k + 1 < len(windows) else set()
                fut = ahead.submit(store.prefetch, following) if following else None
                yield window
                store.release(wids - following)
        finally:
            if fut is not None:
                fut.cancel()
                try:
                    fut.result()
                except Exception:  # noqa: BLE001, S110 - best effort; cancelled or failed
                    pass
            store.release(mine)
