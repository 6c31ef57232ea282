"""``torch.distributed.checkpoint`` storage backed by deltackpt repositories.

>>> import torch.distributed.checkpoint as dcp
>>> import deltackpt.dcp
>>> dcp.save(state_dict, storage_writer=deltackpt.dcp.Writer("runs/exp1", step))
>>> dcp.load(state_dict, storage_reader=deltackpt.dcp.Reader("runs/exp1", step))

Layout (spec: "torch.distributed.checkpoint layering" in spec/FORMAT.md): the directory ``R`` is
an ordinary deltackpt repository, owned by the coordinator. Rank ``r`` writes its own shards as
step ``step`` of the ordinary repository ``R/dcp/rank-{r:05d}/``, so each rank delta-encodes its
shards against its own previous shards. After every rank has written, the coordinator commits
step ``step`` of ``R`` holding DCP's ``Metadata`` as plain values: that manifest rename is the
commit point of the whole DCP step. Rank steps without a committed top-level step are orphans;
each rank deletes its own when it next writes.

Nothing here pickles on load. Non-tensor values (DCP ``BYTE_IO`` items) are stored as deltackpt
state values (the original object, not ``torch.save`` bytes) and are handed back to DCP's default
load planner directly; a custom planner receives bytes serialized in-process from the decoded
value, never bytes read from disk.
"""
from __future__ import annotations

import atexit
import dataclasses
import io
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future

from ..engine.policy import Policy
from ..errors import (
    BrokenChainError,
    CorruptFileError,
    DeltaCkptError,
    FormatVersionError,
    RepositoryNotFoundError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedValueError,
)
from ..format.dtypes import ALL_TORCH_DTYPES
from ..format.tree import escape_key
from ..repository import Repository
from ..store.location import identity, is_object_store, join, open_backend, resolve
from ..store.manifest import MAX_STEP, manifest_name

try:  # DCP's own version string for the metadata it writes (FileSystemWriter does the same)
    from torch.distributed.checkpoint.filesystem import (
        CURRENT_DCP_VERSION as _DCP_VERSION,
    )
except ImportError:  # pragma: no cover - older torch
    _DCP_VERSION = "1.0.0"  # type: ignore[misc]

try:  # how DefaultLoadPlanner.load_bytes places a value; used to skip its torch.load
    from torch.distributed.checkpoint._traverse import set_element as _set_element
except ImportError:  # pragma: no cover
    _set_element = None  # type: ignore[assignment]

__all__ = ["Writer", "Reader", "StorageInfo", "close", "prune", "rank_path", "DOC_FORMAT",
           "DOC_VERSION"]

DOC_FORMAT = "deltackpt.dcp"
DOC_VERSION = 1
DCP_DIR = "dcp"
#: bytes of stored shards :class:`Reader` rebuilds at once (per batch of one rank's items)
READ_BATCH_BYTES = 256 * 2**20

_LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc",
                                            "sparse_bsr", "sparse_bsc", "jagged")
            if hasattr(torch, n)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last",
                                                  "channels_last_3d", "preserve_format")}


def rank_path(path: str | os.PathLike[str], rank: int) -> str:
    """The sub-repository of ``rank`` under repository ``path``: ``path/dcp/rank-NNNNN``
    ('/'-joined under an object-store URL)."""
    return join(resolve(path), DCP_DIR, f"rank-{rank:05d}")


@dataclass(frozen=True)
class StorageInfo:
    """Where one DCP item lives: in rank ``rank``'s sub-repository, at the same step, under
    ``key`` of the ``"tensors"`` or ``"objects"`` dict of that step's state."""

    rank: int
    kind: str  # "tensor" or "object"
    key: str
    nbytes: int = 0

    @property
    def select(self) -> str:
        """The ``Repository.load(select=...)`` path of this item."""
        return f"{self.kind}s/{escape_key(self.key)}"


@dataclass(frozen=True)
class _RankPlan:
    """``SavePlan.storage_data`` set by the coordinator: the rank's index and the save id."""

    rank: int
    save_id: str


def _tensor_key(index: MetadataIndex) -> str:
    off = ",".join(str(int(o)) for o in (index.offset or ()))
    return f"{index.fqn}@{off}"


def _check_step(step: Any) -> int:
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int in [0, 2**63), got {step!r}")
    return step


# --------------------------------------------------------------------------- open repositories
_OPEN: dict[tuple[str, int | None], Repository] = {}
_OPEN_LOCK = threading.Lock()


@contextmanager
def _writable(path: str, rank: int | None, keep_open: bool, policy: Policy | str | None,
              policy_kwargs: dict[str, Any],
              storage_options: dict[str, Any] | None = None) -> Iterator[Repository]:
    """The top-level repository (``rank`` None) or a rank sub-repository, opened mode 'a'.

    With ``keep_open`` it stays open (writer lock and in-memory delta reference kept) for the
    next save in this process, until :func:`close` or interpreter exit.
    """
    where = path if rank is None else rank_path(path, rank)
    if not keep_open:
        with Repository(where, "a", policy, storage_options=storage_options,
                        **policy_kwargs) as repo:
            yield repo
        return
    key = (identity(path), rank)
    want = Policy.from_kwargs(policy, dict(policy_kwargs))
    with _OPEN_LOCK:
        kept = _OPEN.get(key)
        if kept is not None and (kept.closed or kept.policy != want):
            _OPEN.pop(key)
            kept.close()
            kept = None
        if kept is None:
            kept = _OPEN[key] = Repository(where, "a", policy, storage_options=storage_options,
                                           **policy_kwargs)
    yield kept


def close(path: str | os.PathLike[str] | None = None) -> None:
    """Close the repositories :class:`Writer` kept open in this process (all, or ``path``'s),
    releasing their writer locks."""
    real = None if path is None else identity(os.fspath(path))
    with _OPEN_LOCK:
        keys = [k for k in _OPEN if real is None or k[0] == real]
        repos = [_OPEN.pop(k) for k in keys]
    errors = []
    for repo in repos:
        try:
            repo.close()
        except Exception as exc:  # noqa: BLE001 - close every one, report the first
            errors.append(exc)
    if errors:
        raise errors[0]


atexit.register(close)


# ------------------------------------------------------------------------------ liveness rule
_WORLD: dict[tuple[str, int], tuple[tuple[int, ...] | None, int | None]] = {}


def _live_steps(path: str, steps: Sequence[int], rank: int,
                storage_options: dict[str, Any] | None = None) -> set[int]:
    """Those of ``steps`` (of ``rank``'s sub-repository) that a committed top-level DCP step
    refers to. A top-level manifest that cannot be read counts as referring (kept). A missing
    top-level repository is an error, never "nothing is live" (e.g. a rank on a node that
    does not share the file system must not delete its steps)."""
    try:
        top = Repository(path, "r", storage_options=storage_options)
    except RepositoryNotFoundError:
        raise RepositoryNotFoundError(
            f"rank {rank} cannot see the top-level repository {path!r}; every rank must "
            "reach the same directory (a shared file system)") from None
    try:
        committed = set(top.steps())
        live = set()
        real = identity(path)
        for s in steps:
            if s not in committed:
                continue
            # cached by file identity: a re-saved step is a new file (a backend that cannot
            # tell is asked every time)
            ident = top.backend.fingerprint(manifest_name(s)) if top.backend.fingerprints \
                else None
            if ident is None and not top.backend.exists(manifest_name(s)):
                continue  # deleted meanwhile
            cached = _WORLD.get((real, s))
            if ident is not None and cached is not None and cached[0] == ident:
                ws = cached[1]
            else:
                try:
                    info = top.manifest(s).meta.get("dcp")
                    ws = info.get("world_size") if isinstance(info, dict) else None
                    ws = ws if type(ws) is int else None
                except DeltaCkptError:
                    ws = None
                _WORLD[(real, s)] = (ident, ws)
            if ws is None or rank < ws:
                live.add(s)
        return live
    finally:
        top.close()


def _remove_orphans(sub: Repository, path: str, rank: int,
                    storage_options: dict[str, Any] | None = None) -> list[int]:
    steps = sub.steps()
    live = _live_steps(path, steps, rank, storage_options)
    orphans = [s for s in steps if s not in live]
    if orphans:
        sub.delete(*orphans)
    return orphans


def prune(path: str | os.PathLike[str], *, dry_run: bool = False,
          storage_options: dict[str, Any] | None = None) -> dict[int, list[int]]:
    """Delete every rank sub-repository step that no committed top-level DCP step refers to
    (left by a crashed save, or by ``delete``/``gc`` of top-level steps) and free its space.

    Needs the writer lock of every sub-repository (run it while no job writes ``path``).
    Returns ``{rank: [deleted steps]}``. ``path`` may be an object-store URL.
    """
    path = resolve(path)
    out: dict[int, list[int]] = {}
    if is_object_store(path) or os.path.isdir(path):
        _label, backend = open_backend(path, storage_options)
        try:
            names = backend.list_dirs(DCP_DIR)
        finally:
            backend.close()
    else:
        return out
    for name in names:
        if not (name.startswith("rank-") and name[5:].isdigit() and len(name) == 10):
            continue
        rank = int(name[5:])
        if dry_run:
            with Repository(rank_path(path, rank), "r", storage_options=storage_options) as sub:
                steps = sub.steps()
                live = _live_steps(path, steps, rank, storage_options)
                out[rank] = [s for s in steps if s not in live]
        else:
            close(path)  # our own cached writers would hold the locks
            with Repository(rank_path(path, rank), "a", storage_options=storage_options) as sub:
                out[rank] = _remove_orphans(sub, path, rank, storage_options)
    return out


# ---------------------------------------------------------------------- Metadata <-> document
def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if ALL_TORCH_DTYPES.get(name) is not dtype:
        raise UnsupportedValueError(f"dtype {dtype} is not supported")
    return name


def _enum_name(table: dict[str, Any], value: Any, what: str) -> str:
    for name, v in table.items():
        if v == value:
            return name
    raise UnsupportedValueError(f"{what} {value!r} is not supported")


def metadata_to_doc(metadata: Metadata, world_size: int, save_id: str) -> dict[str, Any]:
    """DCP ``Metadata`` (with ``storage_data`` of :class:`StorageInfo`) as plain values."""
    entries: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            p = md.properties
            entries[fqn] = {
                "type": "tensor", "dtype": _dtype_name(p.dtype),
                "size": [int(x) for x in md.size],
                "layout": _enum_name(_LAYOUTS, p.layout, "layout"),
                "requires_grad": bool(p.requires_grad),
                "memory_format": _enum_name(_MEMORY_FORMATS, p.memory_format, "memory format"),
                "pin_memory": bool(p.pin_memory),
                "chunks": [{"offsets": [int(x) for x in c.offsets],
                            "sizes": [int(x) for x in c.sizes]} for c in md.chunks]}
        elif isinstance(md, BytesStorageMetadata):
            entries[fqn] = {"type": "object"}
        else:
            raise UnsupportedValueError(f"unknown DCP storage metadata {type(md).__name__}",
                                        path=fqn)
    storage = []
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(info, StorageInfo):
            raise DeltaCkptError(f"storage data for {index.fqn!r} is not a deltackpt "
                                 "StorageInfo")
        storage.append({"fqn": index.fqn,
                        "offset": None if index.offset is None else [int(x) for x in
                                                                      index.offset],
                        "index": index.index, "rank": info.rank, "kind": info.kind,
                        "key": info.key, "nbytes": info.nbytes})
    sm = metadata.storage_meta
    return {
        "format": DOC_FORMAT, "version": DOC_VERSION, "world_size": world_size,
        "save_id": save_id, "dcp_version": metadata.version,
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "modules": [str(m) for m in sm.modules]},
        "entries": entries, "storage": storage, "planner_data": metadata.planner_data}


class _Doc:
    """Checks a stored document field by field; any violation is a ``CorruptFileError``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def fail(self, msg: str, path: str | None = None) -> CorruptFileError:
        return CorruptFileError(f"DCP metadata: {msg}", step=self.step, path=path)

    def get(self, d: Any, key: str, typ: type | tuple[type, ...], where: str = "") -> Any:
        if not isinstance(d, dict) or key not in d:
            raise self.fail(f"{where or 'document'} lacks {key!r}")
        v = d[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, (int,))):
            raise self.fail(f"{where or 'document'}: {key!r} has the wrong type "
                            f"{type(v).__name__}")
        return v

    def ints(self, v: Any, where: str) -> torch.Size:
        if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
            raise self.fail(f"{where} is not a list of non-negative ints")
        return torch.Size(v)

    def name(self, table: Mapping[str, Any], v: Any, what: str) -> Any:
        if not isinstance(v, str) or v not in table:
            raise self.fail(f"unknown {what} {v!r}")
        return table[v]


def doc_to_metadata(doc: Any, step: int) -> Metadata:
    """Rebuild DCP ``Metadata`` from a stored document (checked; no pickle involved)."""
    d = _Doc(step)
    if not isinstance(doc, dict) or doc.get("format") != DOC_FORMAT:
        raise DeltaCkptError("not a torch.distributed.checkpoint step (saved by plain "
                             "Repository.save? load it with deltackpt.open)", step=step)
    if doc.get("version") != DOC_VERSION:
        raise FormatVersionError(f"DCP document version {doc.get('version')!r} is not "
                                 f"supported (reads {DOC_VERSION})", step=step)
    world = d.get(doc, "world_size", int)
    sdm: dict[str, Any] = {}
    for fqn, e in d.get(doc, "entries", dict).items():
        where = f"entry {fqn!r}"
        if not isinstance(fqn, str):
            raise d.fail("entry name is not a string")
        kind = d.get(e, "type", str, where)
        if kind == "object":
            sdm[fqn] = BytesStorageMetadata()
            continue
        if kind != "tensor":
            raise d.fail(f"{where} has unknown type {kind!r}")
        size = d.ints(d.get(e, "size", list, where), f"{where} size")
        chunks = []
        for c in d.get(e, "chunks", list, where):
            off = d.ints(d.get(c, "offsets", list, where), f"{where} chunk offsets")
            sz = d.ints(d.get(c, "sizes", list, where), f"{where} chunk sizes")
            if len(off) != len(size) or len(sz) != len(size) or any(
                    o + s > n for o, s, n in zip(off, sz, size, strict=True)):
                raise d.fail(f"{where} has a chunk outside the tensor")
            chunks.append(ChunkStorageMetadata(offsets=off, sizes=sz))
        props = TensorProperties(
            dtype=d.name(ALL_TORCH_DTYPES, d.get(e, "dtype", str, where), "dtype"),
            layout=d.name(_LAYOUTS, d.get(e, "layout", str, where), "layout"),
            requires_grad=d.get(e, "requires_grad", bool, where),
            memory_format=d.name(_MEMORY_FORMATS, d.get(e, "memory_format", str, where),
                                 "memory format"),
            pin_memory=d.get(e, "pin_memory", bool, where))
        sdm[fqn] = TensorStorageMetadata(properties=props, size=size, chunks=chunks)
    storage: dict[MetadataIndex, StorageInfo] = {}
    for s in d.get(doc, "storage", list):
        fqn = d.get(s, "fqn", str, "storage record")
        where = f"storage record of {fqn!r}"
        s_off = s.get("offset") if isinstance(s, dict) else None
        hint = s.get("index") if isinstance(s, dict) else None
        if hint is not None and type(hint) is not int:
            raise d.fail(f"{where}: index is not an int")
        rank = d.get(s, "rank", int, where)
        kind = d.get(s, "kind", str, where)
        if not 0 <= rank < world or kind not in ("tensor", "object") or fqn not in sdm:
            raise d.fail(f"{where} names rank {rank}, kind {kind!r} or an unknown entry")
        index = MetadataIndex(fqn, None if s_off is None else d.ints(s_off, f"{where} offset"),
                              hint)
        storage[index] = StorageInfo(rank, kind, d.get(s, "key", str, where),
                                     d.get(s, "nbytes", int, where))
    sm = doc.get("storage_meta")
    storage_meta = StorageMeta()
    if isinstance(sm, dict):
        cid, sid = sm.get("checkpoint_id"), sm.get("save_id")
        mods = sm.get("modules", [])
        storage_meta = StorageMeta(
            checkpoint_id=cid if isinstance(cid, str) else None,
            save_id=sid if isinstance(sid, str) else None,
            modules=[m for m in mods if isinstance(m, str)] if isinstance(mods, list) else [])
    version = doc.get("dcp_version")
    return Metadata(state_dict_metadata=sdm, planner_data=doc.get("planner_data"),
                    storage_data=storage, storage_meta=storage_meta,
                    version=version if isinstance(version, str) else None)


# -------------------------------------------------------------------------------------- writer
class Writer(StorageWriter):
    """A ``StorageWriter`` that commits one DCP checkpoint as step ``step`` of repository
    ``path``. Keyword arguments are :class:`deltackpt.Policy` fields for the rank
    sub-repositories (e.g. ``keyframe_every=20``).

    ``meta``: a JSON object recorded in the top-level step (``deltackpt log`` shows it).
    ``keep_open``: keep this process's repositories open between saves (the writer lock and
    the in-memory delta reference stay; reopening would rebuild the reference from disk);
    :func:`close` releases them. One save at a time per repository: wait for an
    ``async_save`` future before the next save to the same path.
    ``path`` may be an object-store URL (``s3://bucket/prefix``; ``storage_options`` for its
    client); every rank then reaches the same repository without a shared file system.
    """

    def __init__(self, path: str | os.PathLike[str], step: int, *,
                 meta: dict[str, Any] | None = None, keep_open: bool = True,
                 policy: Policy | str | None = None,
                 storage_options: dict[str, Any] | None = None, **policy_kwargs: Any) -> None:
        super().__init__()
        self.path = resolve(path)  # an unknown URL scheme is refused here, before any save
        self.storage_options = dict(storage_options) if storage_options else None
        self.step = _check_step(step)
        self.meta = dict(meta or {})
        if "dcp" in self.meta:
            raise ValueError("meta key 'dcp' is reserved")
        Policy.from_kwargs(policy, dict(policy_kwargs))  # bad options fail here, not mid-save
        self.policy, self.policy_kwargs = policy, dict(policy_kwargs)
        self.keep_open = keep_open
        self.save_id = str(uuid.uuid4())
        self.rank: int | None = None
        self.is_coordinator = False

    # -- StorageWriter -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; ``checkpoint_id`` (if given) is the repository path."""
        if checkpoint_id:
            self.path = resolve(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise DeltaCkptError("deltackpt.dcp.Writer needs use_collectives=True: the "
                                 "coordinator commits the step for every rank", step=self.step)
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: create the repository if needed, refuse a committed step, and tell
        each rank its index and the save id."""
        with _writable(self.path, None, self.keep_open, None, {},
                       self.storage_options) as top:
            if self.step in top:
                raise StepExistsError(f"step {self.step} is already saved in {self.path!r}",
                                      step=self.step)
        return [dataclasses.replace(p, storage_data=_RankPlan(i, self.save_id))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Every rank: drop its orphan steps, then save its items as its own step."""
        rp = plan.storage_data
        if isinstance(rp, _RankPlan):
            rank, save_id = rp.rank, rp.save_id
        else:  # a plan that did not pass our prepare_global_plan (should not happen)
            rank, save_id = (self.rank or 0), self.save_id
        tensors: dict[str, Any] = {}
        objects: dict[str, Any] = {}
        results = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                objects[item.index.fqn] = self._object(item, planner)
                info = StorageInfo(rank, "object", item.index.fqn, 0)
            else:
                t = self._tensor(item, planner)
                key = _tensor_key(item.index)
                tensors[key] = t
                info = StorageInfo(rank, "tensor", key, t.numel() * t.element_size())
            results.append(WriteResult(index=item.index, size_in_bytes=info.nbytes,
                                       storage_data=info))
        with _writable(self.path, rank, self.keep_open, self.policy, self.policy_kwargs,
                       self.storage_options) as sub:
            _remove_orphans(sub, self.path, rank, self.storage_options)
            if self.step in sub:  # committed at top level after all: never overwrite
                raise StepExistsError(f"rank {rank} already holds step {self.step}",
                                      step=self.step)
            sub.save(self.step, {"tensors": tensors, "objects": objects},
                     meta={"dcp_save_id": save_id, "dcp_rank": rank})
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: commit the top-level step (the commit point of the whole checkpoint)."""
        metadata.version = _DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = self.storage_meta()
        doc = metadata_to_doc(metadata, len(results), self.save_id)
        meta = {**self.meta, "dcp": {"world_size": len(results), "save_id": self.save_id}}
        with _writable(self.path, None, self.keep_open, None, {},
                       self.storage_options) as top:
            top.save(self.step, {"dcp": doc}, meta=meta)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid_path(checkpoint_id)

    # -- items ---------------------------------------------------------------------------------
    def _tensor(self, item: WriteItem, planner: SavePlanner) -> torch.Tensor:
        data = planner.resolve_data(item)
        key = _tensor_key(item.index)
        if not isinstance(data, torch.Tensor):
            raise UnsupportedValueError(f"planner resolved a tensor item to "
                                        f"{type(data).__name__}", step=self.step, path=key)
        t = data.detach()
        td = item.tensor_data
        if td is not None and (tuple(t.shape) != tuple(td.chunk.sizes)
                               or t.dtype != td.properties.dtype):
            raise UnsupportedValueError(
                f"resolved tensor {tuple(t.shape)} {t.dtype} does not match its plan "
                f"{tuple(td.chunk.sizes)} {td.properties.dtype}", step=self.step, path=key)
        return t

    def _object(self, item: WriteItem, planner: SavePlanner) -> Any:
        """The non-tensor value itself: from the default planner without serializing it,
        otherwise by ``torch.load(weights_only=True)`` of the bytes the planner just made."""
        cls = type(planner)
        if isinstance(planner, DefaultSavePlanner) \
                and cls.resolve_data is DefaultSavePlanner.resolve_data \
                and cls.transform_object is DefaultSavePlanner.transform_object:  # type: ignore[attr-defined]
            return planner.lookup_object(item.index)
        data = planner.resolve_data(item)
        raw = data.getvalue() if isinstance(data, io.BytesIO) else data
        try:
            return torch.load(io.BytesIO(raw), weights_only=True)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - anything a restricted unpickler refuses
            raise UnsupportedValueError(
                f"non-tensor value from a custom planner cannot be stored without pickle "
                f"({exc})", step=self.step, path=item.index.fqn) from None


def _valid_path(checkpoint_id: Any) -> bool:
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    p = os.fspath(checkpoint_id)
    if not isinstance(p, str):
        return False
    if is_object_store(p):
        return True
    if "://" in p:
        return False
    return not os.path.exists(p) or os.path.isdir(p)


# -------------------------------------------------------------------------------------- reader
class Reader(StorageReader):
    """A ``StorageReader`` for step ``step`` (default: the latest) of repository ``path``.

    Reads without any lock, never unpickles anything from disk, and checks every rebuilt
    shard against its save-time digest (an ``IntegrityError`` otherwise). Loading on any
    number of ranks (resharding) works as with DCP's own reader.
    """

    def __init__(self, path: str | os.PathLike[str], step: int | None = None, *,
                 read_batch_bytes: int = READ_BATCH_BYTES,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = resolve(path)  # an unknown URL scheme is refused here
        self.storage_options = dict(storage_options) if storage_options else None
        self.step = None if step is None else _check_step(step)
        self.read_batch_bytes = read_batch_bytes
        self.load_id = str(uuid.uuid4())
        self.storage_data: dict[MetadataIndex, StorageInfo] = {}
        self._metadata: Metadata | None = None
        self._resolved: int | None = None
        self._save_id: str | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = resolve(checkpoint_id)
        self.storage_data = {}
        self._resolved = None
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's ``Metadata``, rebuilt from the top-level step (no pickle)."""
        if kwargs.get("rank") is not None:
            raise DeltaCkptError("deltackpt.dcp writes no rank-local metadata")
        with Repository(self.path, "r", storage_options=self.storage_options) as top:
            step = self.step if self.step is not None else top.latest
            if step is None:
                raise StepNotFoundError(f"repository {self.path!r} has no steps yet")
            state = top.load(step)
        doc = state.get("dcp") if isinstance(state, dict) else None
        md = doc_to_metadata(doc, step)
        assert doc is not None  # doc_to_metadata refuses anything but a document
        self._resolved, self._save_id = step, doc.get("save_id")
        md.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        data = metadata.storage_data
        if not isinstance(data, dict) or not all(isinstance(v, StorageInfo)
                                                 for v in data.values()):
            raise DeltaCkptError("metadata does not come from deltackpt.dcp.Reader")
        self.storage_data = data
        self._metadata = metadata
        if self._resolved is None:  # metadata read by another instance
            self._resolved = self.step

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        step = self._resolved
        if step is None:
            raise DeltaCkptError("read_data before read_metadata")
        by_rank: dict[int, list[tuple[ReadItem, StorageInfo]]] = {}
        for req in plan.items:
            info = self.storage_data.get(req.storage_index)
            if info is None:
                raise CorruptFileError(f"no storage record for {req.storage_index.fqn!r}",
                                       step=step, path=req.storage_index.fqn)
            by_rank.setdefault(info.rank, []).append((req, info))
        for rank in sorted(by_rank):
            try:
                sub = Repository(rank_path(self.path, rank), "r",
                                 storage_options=self.storage_options)
            except RepositoryNotFoundError:
                raise BrokenChainError(f"rank {rank}'s sub-repository is missing",
                                       step=step) from None
            with sub:
                self._read_rank(sub, rank, step, by_rank[rank], planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_rank(self, sub: Repository, rank: int, step: int,
                   reqs: list[tuple[ReadItem, StorageInfo]], planner: LoadPlanner) -> None:
        try:
            sid = sub.manifest(step).meta.get("dcp_save_id")
        except StepNotFoundError:
            raise BrokenChainError(f"rank {rank}'s sub-repository lacks the step",
                                   step=step) from None
        if self._save_id is not None and sid != self._save_id:
            raise BrokenChainError(f"rank {rank}'s step was written by save {sid!r}, the "
                                   f"committed checkpoint by save {self._save_id!r}", step=step)
        for batch in _batches(reqs, self.read_batch_bytes):
            paths = sorted({info.select for _req, info in batch})
            state = sub.load(step, select=paths)
            for req, info in batch:
                value = state.get(f"{info.kind}s", {}).get(info.key, _MISSING) \
                    if isinstance(state, dict) else _MISSING
                if value is _MISSING:
                    raise BrokenChainError(f"rank {rank}'s step lacks {info.key!r}",
                                           step=step, path=info.key)
                if req.type == LoadItemType.BYTE_IO:
                    _deliver_object(planner, req, value)
                else:
                    self._deliver_tensor(planner, req, info, value, step)

    def _deliver_tensor(self, planner: LoadPlanner, req: ReadItem, info: StorageInfo,
                        value: Any, step: int) -> None:
        if not isinstance(value, torch.Tensor):
            why = "was dropped at this step by the policy" if value is None else \
                f"is a {type(value).__name__}"
            raise CorruptFileError(f"stored shard {why}", step=step, path=info.key)
        md = self._metadata.state_dict_metadata.get(req.storage_index.fqn) \
            if self._metadata is not None else None
        if isinstance(md, TensorStorageMetadata) and value.dtype != md.properties.dtype:
            raise CorruptFileError(f"stored shard is {value.dtype}, metadata says "
                                   f"{md.properties.dtype}", step=step, path=info.key)
        tensor = narrow_tensor_by_index(value, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CorruptFileError(f"shard region {tuple(tensor.size())} does not match the "
                                   f"destination {tuple(target.size())}", step=step,
                                   path=info.key)
        target.copy_(tensor)
        planner.commit_tensor(req, target)

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _valid_path(checkpoint_id) and (is_object_store(os.fspath(checkpoint_id))
                                               or os.path.isdir(os.fspath(checkpoint_id)))


_MISSING = object()


def _batches(reqs: list[tuple[ReadItem, StorageInfo]],
             budget: int) -> Iterator[list[tuple[ReadItem, StorageInfo]]]:
    """Consecutive groups of requests whose distinct stored items stay under ``budget``."""
    batch: list[tuple[ReadItem, StorageInfo]] = []
    seen: set[str] = set()
    size = 0
    for req, info in sorted(reqs, key=lambda ri: (ri[1].kind, ri[1].key)):
        new = info.select not in seen
        if batch and new and size + info.nbytes > budget:
            yield batch
            batch, seen, size = [], set(), 0
        if info.select not in seen:
            seen.add(info.select)
            size += info.nbytes
        batch.append((req, info))
    if batch:
        yield batch


def _deliver_object(planner: LoadPlanner, req: ReadItem, value: Any) -> None:
    """Hand a non-tensor value to the planner. DCP's default planner would ``torch.load``
    (``weights_only=False``) the bytes; it gets the value placed directly instead. Any other
    planner gets ``torch.save`` bytes made here from the decoded value (never disk bytes)."""
    cls = type(planner)
    if isinstance(planner, DefaultLoadPlanner) and _set_element is not None \
            and cls.load_bytes is DefaultLoadPlanner.load_bytes:
        fqn = req.dest_index.fqn
        if planner.flatten_state_dict:
            _set_element(planner.original_state_dict, planner.mappings[fqn], value)
        else:
            planner.state_dict[fqn] = value
        return
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    planner.load_bytes(req, buf)
