"""Content-addressed chunk store: frames appended to pack files, located through index files.

A save writes O(1) files: one pack (more only past ``max_pack_bytes``) and one index per pack.
Chunk ids are xxh3-128 of the chunk's *payload* (the bytes a frame decodes to), so a chunk is
stored once however many tensors, steps or runs contain it, and every read is checked against
its id. Byte grammars: spec/FORMAT.md, "Pack file" and "Index file".
"""
from __future__ import annotations

import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import (
    CorruptChunkError,
    CorruptFileError,
    FormatVersionError,
    MissingChunkError,
)
from ..format.checksum import digest
from ..format.frame import decode_frame, encode_frame, needs_reference, parse_frame
from .backend import Backend

PACK_MAGIC = b"DCKPACK\x00"
PACK_END_MAGIC = b"DCKPEND\x00"
INDEX_MAGIC = b"DCKINDX\x00"
PACK_VERSION = 1
INDEX_VERSION = 1
PACK_HEAD = struct.Struct("<8sII")          # magic, version, reserved
ENTRY_HEAD = struct.Struct("<16sQ")         # chunk id, frame length
PACK_TAIL = struct.Struct("<8s16s")         # end magic, xxh3-128 of every byte before it
#: bytes every pack holds besides its entries (header and trailer)
PACK_OVERHEAD = PACK_HEAD.size + PACK_TAIL.size
_INDEX_HEAD = struct.Struct("<8sII16s")     # magic, version, count, pack id
_INDEX_ENTRY = struct.Struct("<16sQQQ")     # chunk id, frame offset, frame length, payload length
#: a prefetch joins frames of one pack less than this many bytes apart into one request ...
READ_GAP = 1 << 20
#: ... of at most this many bytes (a window arrives as parallel requests of this size)
READ_GROUP = 8 << 20
#: packs fetched at once by a prefetch, index files read at once by a refresh (``batch_reads``)
PACK_READERS = 8
INDEX_READERS = 16
MAX_CHUNK_BYTES = 1 << 31                   # readers refuse larger declared payloads
MAX_PACK_END = 1 << 60                      # frames past this offset are refused (pread's off_t)
_PACK_ID = re.compile(r"[0-9a-f]{32}")


def is_pack_id(pid: object) -> bool:
    """Whether ``pid`` has the form of a pack id (32 lowercase hex digits): the only names a
    reader or writer turns into file names, so no journal or directory entry can name a file
    outside ``packs/`` and ``index/``."""
    return isinstance(pid, str) and _PACK_ID.fullmatch(pid) is not None


def chunk_id(payload: np.ndarray | bytes | memoryview) -> bytes:
    """The id of a self-contained chunk: the digest of its payload."""
    return digest(payload)


def frame_id(frame: bytes | memoryview) -> bytes:
    """The chunk id of a frame coded against a reference chunk: the hash of its bytes (what
    it decodes to depends on the reference, so only the frame itself can be checked alone)."""
    return xxhash.xxh3_128(frame).digest()


def frame_matches(cid: bytes, frame: bytes | memoryview, payload_length: int) -> bool:
    """Whether ``frame`` is chunk ``cid``: its bytes hash to ``cid`` when it needs a reference,
    else it decodes to ``payload_length`` bytes hashing to ``cid``. Raises CorruptChunkError
    on a frame that does not parse or decode."""
    if needs_reference(frame):
        parse_frame(frame, payload_length)
        return frame_id(frame) == cid
    return chunk_id(decode_frame(frame, payload_length)) == cid


def pack_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}.pack"


def index_name(pack_id: str) -> str:
    return f"index/{pack_id}.idx"


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int
    payload_length: int


def encode_index(pack_id: str, entries: list[tuple[bytes, int, int, int]]) -> bytes:
    body = b"".join([_INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, len(entries),
                                      bytes.fromhex(pack_id)),
                     *(_INDEX_ENTRY.pack(*e) for e in entries)])
    return body + xxhash.xxh3_128(body).digest()


def decode_index(data: bytes, name: str = "index") -> tuple[str, list[tuple[bytes, int, int, int]]]:
    """Parse and checksum an index file; raises CorruptFileError/FormatVersionError."""
    if len(data) < _INDEX_HEAD.size + 16:
        raise CorruptFileError(f"{name}: index file too short ({len(data)} bytes)")
    body, digest = data[:-16], data[-16:]
    if xxhash.xxh3_128(body).digest() != digest:
        raise CorruptFileError(f"{name}: index checksum mismatch")
    magic, version, count, pid = _INDEX_HEAD.unpack_from(body, 0)
    if magic != INDEX_MAGIC:
        raise CorruptFileError(f"{name}: not an index file")
    if version != INDEX_VERSION:
        raise FormatVersionError(f"{name}: index version {version} is not supported "
                                 f"(this deltackpt reads version {INDEX_VERSION})")
    if len(body) != _INDEX_HEAD.size + count * _INDEX_ENTRY.size:
        raise CorruptFileError(f"{name}: index length does not match its entry count")
    entries = [_INDEX_ENTRY.unpack_from(body, _INDEX_HEAD.size + i * _INDEX_ENTRY.size)
               for i in range(count)]
    for cid, off, length, plen in entries:
        if off < PACK_HEAD.size + ENTRY_HEAD.size or plen > MAX_CHUNK_BYTES \
                or length > plen + 64 + 9 * 255 + (plen >> 4) or off + length > MAX_PACK_END:
            raise CorruptFileError(f"{name}: implausible entry for chunk {cid.hex()}")
    return pid.hex(), entries


def entry_size(frame_length: int) -> int:
    """Bytes a frame of ``frame_length`` bytes takes in a pack (its entry header included)."""
    return ENTRY_HEAD.size + frame_length


class PackWriter:
    """A pack being written: entries appended in order, then :meth:`commit` seals it with its
    trailer and writes its index. Nothing is visible under the pack's name before that."""

    def __init__(self, backend: Backend, pack_id: str) -> None:
        self.backend = backend
        self.id = pack_id
        self.stream = backend.create_stream(pack_name(pack_id))
        #: (chunk id, frame offset, frame length, payload length), as the index lists them
        self.entries: list[tuple[bytes, int, int, int]] = []
        #: the size of the index file, once :meth:`commit` has written it
        self.index_bytes = 0
        self._hash = xxhash.xxh3_128()
        self._write(PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, 0))

    def _write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.stream.write(data)

    def tell(self) -> int:
        return self.stream.tell()

    def append(self, cid: bytes, frame: bytes | memoryview, payload_length: int) -> Location:
        """Append one entry; the caller vouches that ``frame`` is chunk ``cid``."""
        self._write(ENTRY_HEAD.pack(cid, len(frame)))
        offset = self.stream.tell()
        self._write(frame)
        self.entries.append((cid, offset, len(frame), payload_length))
        return Location(self.id, offset, len(frame), payload_length)

    def commit(self) -> None:
        """Append the trailer (lets ``verify`` detect a change to any byte), commit the pack
        durably, then its index: an index never names a pack that is not whole."""
        self.stream.write(PACK_TAIL.pack(PACK_END_MAGIC, self._hash.digest()))
        self.stream.commit()
        index = encode_index(self.id, self.entries)
        self.backend.write_atomic(index_name(self.id), index)
        self.index_bytes = len(index)

    def abort(self) -> None:
        """Discard the pack if it was not committed (its index, if written, stays)."""
        self.stream.abort()


class ChunkStore:
    """Reads and writes chunks of one repository through a :class:`Backend`.

    Writes are thread-safe: workers may call :meth:`put` concurrently; a given id is written
    once. Nothing written is visible to readers until :meth:`flush` has committed the pack and
    its index *and* a manifest referencing the chunks has been committed by the caller.
    """

    def __init__(self, backend: Backend, *, max_pack_bytes: int = 1 << 30,
                 on_new_pack: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.max_pack_bytes = max_pack_bytes
        self.on_new_pack = on_new_pack
        self._index: dict[bytes, Location] = {}
        self.bad_indexes: dict[str, Exception] = {}
        self._loaded: set[str] = set()
        self._lock = threading.RLock()
        self._pending: dict[bytes, Location] = {}
        self._open: PackWriter | None = None
        self._written: list[str] = []
        self._index_bytes: dict[str, int] = {}
        self._ahead: dict[bytes, tuple[Location, bytes | memoryview]] = {}
        self.refresh()

    # -- index ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load index files that appeared since the last call (other writers, new saves); on
        a backend with ``batch_reads`` (each request a round trip) they are fetched in parallel.

        A damaged index does not stop the repository from opening: it is remembered in
        ``bad_indexes`` and named by any chunk lookup that fails, and by ``verify``.
        """
        new = []
        for fname in self.backend.list("index"):
            if not fname.endswith(".idx"):
                continue
            pid = fname[:-4]
            if pid in self._loaded or pid in self.bad_indexes or not is_pack_id(pid):
                continue  # (verify reports index files whose name is not a pack id)
            new.append(pid)
        def fetch(pid: str) -> bytes | Exception | None:
            try:
                return self._fetch_index(pid)
            except (CorruptFileError, FormatVersionError) as exc:  # e.g. not a regular file
                return exc

        if self.backend.batch_reads and len(new) > 1:
            with ThreadPoolExecutor(min(INDEX_READERS, len(new))) as ex:
                fetched = list(ex.map(fetch, new))
        else:
            fetched = [fetch(pid) for pid in new]
        for pid, data in zip(new, fetched):
            if isinstance(data, Exception):
                self.bad_indexes[pid] = data
            elif data is not None:
                try:
                    self._install_index(pid, data)
                except (CorruptFileError, FormatVersionError) as exc:
                    self.bad_indexes[pid] = exc

    def _fetch_index(self, pid: str) -> bytes | None:
        try:
            return self.backend.read(index_name(pid))
        except FileNotFoundError:
            return None

    def _install_index(self, pid: str, data: bytes) -> list[tuple[bytes, int, int, int]]:
        name = index_name(pid)
        got, entries = decode_index(data, name)
        if got != pid:
            raise CorruptFileError(f"{name}: names pack {got}, not {pid}")
        with self._lock:
            for cid, off, length, plen in entries:
                self._index.setdefault(cid, Location(pid, off, length, plen))
            self._loaded.add(pid)
        return entries

    def load_index(self, pid: str) -> list[tuple[bytes, int, int, int]]:
        data = self._fetch_index(pid)
        return [] if data is None else self._install_index(pid, data)

    def reload(self) -> None:
        """Forget every loaded index and read them all again (after packs moved)."""
        with self._lock:
            self._index.clear()
            self._loaded.clear()
            self.bad_indexes.clear()
        self.refresh()

    def forget_pack(self, pid: str) -> None:
        with self._lock:
            self._loaded.discard(pid)
            for cid in [c for c, loc in self._index.items() if loc.pack == pid]:
                del self._index[cid]

    def has(self, cid: bytes) -> bool:
        return cid in self._index or cid in self._pending

    def locate(self, cid: bytes) -> Location:
        loc = self._index.get(cid) or self._pending.get(cid)
        if loc is None:
            self.refresh()
            loc = self._index.get(cid)
        if loc is None:
            bad = f" (damaged index files: {sorted(self.bad_indexes)})" if self.bad_indexes else ""
            raise MissingChunkError(f"chunk {cid.hex()} is in no index{bad}",
                                    cause="missing chunk")
        return loc

    def known_ids(self) -> Iterator[bytes]:
        return iter(list(self._index))

    def packs(self) -> list[str]:
        return sorted(self._loaded)

    # -- read ----------------------------------------------------------------------------------
    def read_frame(self, cid: bytes, max_length: int | None = None
                   ) -> tuple[bytes | memoryview, Location]:
        """The stored frame of chunk ``cid`` and its location, *not* yet checked against the id
        (:meth:`get` decodes and checks it; a caller using this must check what it builds).

        ``max_length``: see :meth:`get`.
        """
        loc = self.locate(cid)
        if max_length is not None and loc.payload_length > max_length:
            raise CorruptChunkError(f"chunk {cid.hex()} in pack {loc.pack}: the index declares "
                                    f"a {loc.payload_length}-byte payload where at most "
                                    f"{max_length} can be used", cause="corrupt chunk")
        ahead = self._ahead.get(cid)
        if ahead is not None and ahead[0] == loc:
            return ahead[1], loc
        try:
            frame = self.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
        except FileNotFoundError:
            # a writer may have repacked it since we read the index: reload every index, once
            self.reload()
            moved = self._index.get(cid)
            if moved is None or moved.pack == loc.pack:
                raise MissingChunkError(f"pack {loc.pack} holding chunk {cid.hex()} is "
                                        "missing", cause="missing pack") from None
            loc = moved
            try:
                frame = self.backend.read_range(pack_name(loc.pack), loc.offset, loc.length)
            except FileNotFoundError:
                raise MissingChunkError(f"pack {loc.pack} holding chunk {cid.hex()} is "
                                        "missing", cause="missing pack") from None
        if len(frame) != loc.length:
            raise MissingChunkError(f"pack {loc.pack} is truncated at chunk {cid.hex()}",
                                    cause="truncated pack")
        return frame, loc

    def get(self, cid: bytes, max_length: int | None = None, *,
            out: np.ndarray | None = None, ref: np.ndarray | None = None) -> np.ndarray:
        """The payload of chunk ``cid``, verified against its id.

        ``max_length``: the most payload bytes the caller can use; an index entry declaring
        more is refused before any byte is read or decompressed (decompression bombs).
        ``out``: decode into this 1-D uint8 array (its length must equal the payload's; it may
        be ``ref`` itself) and return it; on any error its contents are undefined.
        ``ref``: the reference chunk, for a frame coded against one (whose id is the hash of
        the frame; the caller checks what it decodes to against the record's digest).
        """
        frame, loc = self.read_frame(cid, max_length)
        try:
            if out is not None and out.size != loc.payload_length:
                raise CorruptChunkError(f"payload is {loc.payload_length} bytes, the chunk "
                                        f"{out.size}")
            if needs_reference(frame):
                if ref is None:
                    raise CorruptChunkError("its frame is coded against a reference chunk, but "
                                            "the record reading it names none")
                if frame_id(frame) != cid:
                    raise CorruptChunkError("its frame does not match its id (bytes changed "
                                            "on disk)")
                return decode_frame(frame, loc.payload_length, out, ref)
            payload = decode_frame(frame, loc.payload_length, out)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"chunk {cid.hex()} in pack {loc.pack}: {exc}",
                                    cause="corrupt chunk") from None
        if chunk_id(payload) != cid:
            raise CorruptChunkError(f"chunk {cid.hex()} in pack {loc.pack} does not match its "
                                    "id (bytes changed on disk)", cause="corrupt chunk")
        return payload

    def index_bytes(self, pid: str) -> int:
        """The size of pack ``pid``'s index file: known without a request for a pack this
        store wrote (once: the commit that follows its flush asks), else asked of the backend."""
        known = self._index_bytes.pop(pid, None)
        return known if known is not None else self.backend.size(index_name(pid))

    def frame_bytes(self, cid: bytes) -> int:
        """The stored size of chunk ``cid``'s frame (0 if it is in no loaded index)."""
        loc = self._index.get(cid)
        return loc.length if loc is not None else 0

    def prefetch(self, cids: Iterable[bytes]) -> int:
        """Fetch the frames of ``cids`` ahead, for :meth:`read_frame` to serve until
        :meth:`release`; returns the bytes fetched.

        Per pack, frames less than :data:`READ_GAP` apart are joined into requests of at most
        :data:`READ_GROUP` bytes, all fetched with one ``read_ranges`` call; packs are fetched
        in parallel. Best effort: an id in no index, or a request that fails, is left to the
        read that needs it, which reports it (prefetched frames are checked like read ones).
        """
        by_pack: dict[str, list[tuple[Location, bytes]]] = {}
        for cid in set(cids):
            loc = self._index.get(cid)
            if loc is not None and cid not in self._ahead:
                by_pack.setdefault(loc.pack, []).append((loc, cid))
        if not by_pack:
            return 0
        if len(by_pack) == 1:
            return self._prefetch_pack(*next(iter(by_pack.items())))
        with ThreadPoolExecutor(min(PACK_READERS, len(by_pack))) as ex:
            return sum(ex.map(lambda kv: self._prefetch_pack(*kv), by_pack.items()))

    def _prefetch_pack(self, pid: str, frames: list[tuple[Location, bytes]]) -> int:
        frames.sort(key=lambda f: f[0].offset)
        groups: list[list[tuple[Location, bytes]]] = []
        for f in frames:
            if groups:
                first, last = groups[-1][0][0], groups[-1][-1][0]
                end = max(last.offset + last.length, f[0].offset + f[0].length)
                if f[0].offset - (last.offset + last.length) <= READ_GAP \
                        and end - first.offset <= READ_GROUP:
                    groups[-1].append(f)
                    continue
            groups.append([f])
        spans = [(g[0][0].offset, max(loc.offset + loc.length for loc, _ in g) - g[0][0].offset)
                 for g in groups]
        try:
            got = self.backend.read_ranges(pack_name(pid), spans)
        except Exception:  # noqa: BLE001 - best effort: the reads that need them report it
            return 0
        fetched = 0
        for g, (start, _n), buf in zip(groups, spans, got):
            view = memoryview(buf)
            fetched += len(view)
            for loc, cid in g:
                part = view[loc.offset - start:loc.offset - start + loc.length]
                if len(part) == loc.length:
                    self._ahead[cid] = (loc, part)
        return fetched

    def release(self, cids: Iterable[bytes] | None = None) -> None:
        """Forget prefetched frames (``cids``, or all)."""
        if cids is None:
            self._ahead.clear()
            return
        for cid in cids:
            self._ahead.pop(cid, None)

    # -- write ---------------------------------------------------------------------------------
    def put(self, payload: np.ndarray, word: int, level: int,
            cid: bytes | None = None) -> tuple[bytes, int]:
        """Store ``payload`` unless present; returns ``(id, bytes newly written)``."""
        cid = chunk_id(payload) if cid is None else cid
        if self.has(cid):
            return cid, 0
        return cid, self.put_frame(cid, encode_frame(payload, word, level), payload.size)

    def put_frame(self, cid: bytes, frame: bytes, payload_length: int) -> int:
        """Append an already-encoded frame under ``cid`` unless present; returns bytes written.

        The caller vouches that ``frame`` decodes to ``payload_length`` bytes hashing to ``cid``.
        """
        with self._lock:
            if cid in self._index or cid in self._pending:
                return 0
            pack = self._pack_for(len(frame))
            self._pending[cid] = pack.append(cid, frame, payload_length)
        return entry_size(len(frame))

    def _pack_for(self, nbytes: int) -> PackWriter:
        if self._open is not None and self._open.tell() + nbytes > self.max_pack_bytes \
                and self._open.entries:
            self._finish(self._open)
            self._open = None
        if self._open is None:
            pid = os.urandom(16).hex()
            if self.on_new_pack is not None:
                self.on_new_pack(pid)
            self._open = PackWriter(self.backend, pid)
        return self._open

    def _finish(self, pack: PackWriter) -> None:
        self._written.append(pack.id)  # from here on abort() deletes it, index or not
        pack.commit()
        self._index_bytes[pack.id] = pack.index_bytes

    def flush(self) -> list[str]:
        """Commit open packs and their indexes durably; returns the pack ids written since the
        last flush/abort."""
        with self._lock:
            if self._open is not None:
                self._finish(self._open)
                self._open = None
            for cid, loc in self._pending.items():
                self._index.setdefault(cid, loc)
            self._loaded.update(self._written)
            self._pending.clear()
            written, self._written = self._written, []
            return written

    def abort(self) -> list[str]:
        """Drop everything written since the last flush; returns pack ids to delete."""
        with self._lock:
            if self._open is not None:
                self._open.abort()
                self._open = None
            self._pending.clear()
            written, self._written = self._written, []
            for pid in written:
                self.backend.delete(index_name(pid))
                self.backend.delete(pack_name(pid))
            return written


def _ranges(backend: Backend, name: str) -> tuple[int, Callable[[int, int], bytes]]:
    """``(size, read(offset, length))`` of a file, read whole once where ranged reads are
    costly (``backend.random_access`` false), else read by range on demand."""
    if backend.random_access:
        return backend.size(name), lambda off, n: backend.read_range(name, off, n)
    data = backend.read(name)
    return len(data), lambda off, n: data[off:off + n]


@dataclass(frozen=True)
class PackWalk:
    """What a pack's own bytes say about it, without its index (:func:`walk_pack`)."""

    size: int
    #: the header has this format's magic and version
    header_ok: bool
    #: (chunk id, frame offset, frame length) from the entry headers, in file order, up to the
    #: first that does not fit
    entries: list[tuple[bytes, int, int]]
    #: the entries tile the file from its header up to exactly one trailer
    tiled: bool
    #: ``tiled``, and the trailer's digest matches every byte before it
    complete: bool


def walk_pack(backend: Backend, pid: str) -> PackWalk:
    """Walk a pack's entry headers and check its trailer; frames are not decoded. The one
    reader of a pack's framing: ``verify`` compares it with the index (:func:`scan_pack`), gc
    and repair use it when an index is missing or damaged. Raises FileNotFoundError if the
    pack is absent."""
    name = pack_name(pid)
    size, read = _ranges(backend, name)
    if read(0, PACK_HEAD.size) != PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, 0):
        return PackWalk(size, False, [], False, False)
    out: list[tuple[bytes, int, int]] = []
    pos = PACK_HEAD.size
    while pos + ENTRY_HEAD.size + PACK_TAIL.size <= size:
        head = read(pos, ENTRY_HEAD.size)
        if len(head) != ENTRY_HEAD.size:
            return PackWalk(size, True, out, False, False)
        cid, length = ENTRY_HEAD.unpack(head)
        end = pos + entry_size(length)
        if end + PACK_TAIL.size > size:
            return PackWalk(size, True, out, False, False)
        out.append((cid, pos + ENTRY_HEAD.size, length))
        pos = end
    if pos + PACK_TAIL.size != size:
        return PackWalk(size, True, out, False, False)
    h = xxhash.xxh3_128()
    done = 0
    while done < pos:
        block = read(done, min(8 << 20, pos - done))
        if not block:
            return PackWalk(size, True, out, True, False)
        h.update(block)
        done += len(block)
    return PackWalk(size, True, out, True,
                    read(pos, PACK_TAIL.size) == PACK_TAIL.pack(PACK_END_MAGIC, h.digest()))


def read_pack_entries(backend: Backend, pid: str) -> tuple[list[tuple[bytes, int, int]], bool]:
    """``(entries, complete)`` of :func:`walk_pack`: for gc and repair, when an index is
    missing or damaged."""
    walk = walk_pack(backend, pid)
    return walk.entries, walk.complete


def scan_pack(backend: Backend, pid: str,
              entries: list[tuple[bytes, int, int, int]]) -> list[str]:
    """Check a whole pack against its index ``entries``: header, that the entries tile it as
    the index says, and the trailer digest over every byte. Returns the problems found (does
    not decode frames)."""
    try:
        walk = walk_pack(backend, pid)
    except FileNotFoundError:
        return [f"pack {pid} is missing"]
    except CorruptFileError as exc:  # e.g. not a regular file
        return [f"pack {pid}: {exc}"]
    if not walk.header_ok:
        return [f"pack {pid}: bad header"]
    problems = []
    indexed = sorted(((cid, off, length) for cid, off, length, _plen in entries),
                     key=lambda e: e[1])
    for i, (cid, off, length) in enumerate(indexed):
        if i >= len(walk.entries) or walk.entries[i] != (cid, off, length):
            problems.append(f"pack {pid}: entry header of chunk {cid.hex()} at offset "
                            f"{off - ENTRY_HEAD.size} is damaged or the entries do not tile "
                            "the file as its index says")
            break
    if not walk.tiled or len(walk.entries) != len(indexed):
        end = indexed[-1][1] + indexed[-1][2] if indexed else PACK_HEAD.size
        problems.append(f"pack {pid}: {walk.size - end} bytes after its last entry, expected "
                        f"a {PACK_TAIL.size}-byte trailer")
    elif not walk.complete:
        problems.append(f"pack {pid}: trailer digest mismatch (bytes changed on disk)")
    return problems


def copy_entries(backend: Backend, source: str, entries: list[tuple[bytes, int, int, int]],
                 target: str) -> list[tuple[bytes, int, int, int]]:
    """Write pack ``target`` and its index holding ``entries`` (index entries) of pack
    ``source``: gc's repack, which keeps a pack's live chunks and drops the rest. Each frame is
    checked against its id before it is copied (a damaged frame is never copied: this very
    frame, not another copy of the id) and raises CorruptChunkError; on any error nothing of
    ``target`` is left. Returns the new pack's index entries."""
    pack = PackWriter(backend, target)
    try:
        _size, read = _ranges(backend, pack_name(source))
        for cid, off, length, plen in entries:
            frame = read(off, length)
            if len(frame) != length or not frame_matches(cid, frame, plen):
                raise CorruptChunkError(f"chunk {cid.hex()} in pack {source} does not match "
                                        "its id", cause="corrupt chunk")
            pack.append(cid, frame, plen)
        pack.commit()
    except BaseException:
        pack.abort()
        backend.delete(index_name(target))
        backend.delete(pack_name(target))
        raise
    return pack.entries
