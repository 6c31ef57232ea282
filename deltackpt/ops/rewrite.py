"""New chunk records for a committed step: what a rebase (gc) and a re-pointing (repair) commit.

Both replace some chunk records of a step by *raw* records of the same bytes (a self-contained
chunk whose id is the record's digest) and commit the result with
``Repository.rewrite_manifest``; everything the step restores (tree, digests, meta, time) stays
as it was (spec/FORMAT.md, "Ordering invariants", rule 6).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..codecs.raw import RAW_CONFIG
from ..store.manifest import ChunkRef, Manifest, TensorEntry

#: ``raw_id(tensor, index, record)``: the id of the raw chunk that replaces the record, or None
RawId = Callable[[TensorEntry, int, ChunkRef], "bytes | None"]


def with_records(m: Manifest, tensors: list[TensorEntry], codecs: list[dict[str, Any]],
                 txn: str) -> Manifest:
    """``m`` with new chunk records (a rebase or a repair) in a new transaction; everything
    the step restores (tree, digests, meta, time) stays as it was."""
    from ..codecs import get_codec

    self_contained = all(c.ref is None for t in tensors for c in t.chunks)
    new = Manifest(step=m.step, time=m.time,
                   kind="keyframe" if self_contained else m.kind,
                   keyframe=m.step if self_contained else m.keyframe,
                   parent=None if self_contained else m.parent,
                   delta_index=0 if self_contained else m.delta_index, meta=m.meta,
                   codecs=codecs, tree=m.tree, tensors=tensors, stats=dict(m.stats),
                   txn=txn, packs=[])
    objs = [get_codec(c) for c in codecs]
    for t in new.tensors:
        t.codecs = objs
    return new


def with_raw_records(m: Manifest, txn: str, raw_id: RawId) -> Manifest:
    """``m`` (for transaction ``txn``) with every chunk record for which ``raw_id`` names a
    chunk replaced by a raw record of that chunk (same digest, depth 1); the raw codec is
    added to the step's codecs if it is not there. ``raw_id`` is called once per record, in
    order (it may store the chunk it names)."""
    codecs = list(m.codecs)
    if RAW_CONFIG not in codecs:
        codecs.append(dict(RAW_CONFIG))
    raw = codecs.index(RAW_CONFIG)
    tensors = []
    for t in m.tensors:
        chunks = []
        for i, c in enumerate(t.chunks):
            cid = raw_id(t, i, c)
            chunks.append(c if cid is None else ChunkRef(cid, raw, None, c.digest, 1))
        tensors.append(t.__class__(**{**t.__dict__, "chunks": chunks}))
    return with_records(m, tensors, codecs, txn)
