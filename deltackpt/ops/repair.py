"""Repair guidance: which steps are damaged, whether each damage can be undone, and undoing it.

:func:`plan` (read-only) looks at every index, pack and step and returns a :class:`RepairPlan`:
one :class:`Action` per damage, saying what is damaged (step, tensor, chunk, pack) and how it can
be recovered. :func:`apply` (writer only) carries out the recoverable actions and plans again.

What can be recovered, because an intact copy of the bytes exists in the repository:

* ``reindex``: an index file is damaged, has another pack's content or is missing, while its pack
  is intact: the index is rebuilt from the pack (only frames that decode to their id are listed).
* ``repoint``: a chunk cannot be rebuilt (its frame is damaged or missing, or its delta chain
  is broken) but the bytes it rebuilds to are stored intact elsewhere as a raw chunk -- content
  addressing makes that chunk's id equal to the record's digest. The record (at the damaged link
  of the chain, so every step replaying through it heals) is re-pointed at that raw chunk by
  committing a new manifest of its step, exactly like a rebase: what the step restores does not
  change.
* ``rederive``: as ``repoint``, but no raw copy is stored: another record with the same digest
  (another step, tensor or chunk whose chain rebuilds to the very same bytes) still rebuilds, so
  the bytes are rebuilt from it, stored as a raw chunk, and the damaged record re-pointed.
* ``repack``: a pack's framing (header, entry headers, trailer) or some of its frames are
  damaged: its intact live frames are copied into a new pack (as ``gc`` repacks) and the old
  pack goes, so that readers find the good copy of a chunk stored twice and rebuilt chunks can
  be stored again. (The data lost with damaged frames is accounted for by chunk actions.)
* ``unindex``: an index whose pack is missing is removed (it points at nothing).

Everything else is ``lost``: a damaged manifest (a step's tree and metadata exist nowhere else),
a chunk with no intact copy of its bytes. A step with lost chunks can still be partly loaded
(``load(step, select=...)`` of the subtrees without them); any lost step can be restored from a
backup or deleted (``delete`` rebases its dependents first; dependents that need the lost bytes
were unloadable already, stay as they are and are listed in the report's ``damaged_steps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DeltaCkptError, StepNotFoundError
from ..format.frame import frame_length
from ..store.manifest import ChunkRef, Manifest, TensorEntry
from ..store.packs import (
    MAX_CHUNK_BYTES,
    Location,
    decode_index,
    encode_index,
    frame_matches,
    index_name,
    is_pack_id,
    pack_name,
    read_pack_entries,
    scan_pack,
)
from .rewrite import with_raw_records

if TYPE_CHECKING:
    from ..repository import Repository


@dataclass(frozen=True)
class Action:
    """One damage and what to do about it. ``kind``: reindex, repoint, repack or lost."""

    kind: str
    detail: str
    step: int | None = None
    path: str | None = None
    chunk: int | None = None
    pack: str | None = None
    source: bytes | None = None    # repoint/rederive: the raw chunk id (= the record's digest)
    #: rederive: the (step, tensor path, chunk) whose chain rebuilds to the same bytes
    origin: tuple[int, str, int] | None = None

    @property
    def recoverable(self) -> bool:
        return self.kind != "lost"

    def __str__(self) -> str:
        where = [f"step {self.step}"] if self.step is not None else []
        where += [f"tensor {self.path!r}"] if self.path is not None else []
        where += [f"chunk {self.chunk}"] if self.chunk is not None else []
        where += [f"pack {self.pack}"] if self.pack is not None and self.step is None else []
        verdict = "recoverable" if self.recoverable else "LOST"
        return f"[{', '.join(where)}] {verdict} ({self.kind}): {self.detail}"


@dataclass
class RepairPlan:
    actions: list[Action] = field(default_factory=list)
    #: steps that do not load now, and those of them that no action can bring back
    damaged_steps: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing is damaged."""
        return not self.actions and not self.damaged_steps

    @property
    def lost_steps(self) -> list[int]:
        return sorted({a.step for a in self.actions if a.kind == "lost" and a.step is not None})

    @property
    def recoverable(self) -> bool:
        """Every damage has an action that undoes it."""
        return all(a.recoverable for a in self.actions)

    def __str__(self) -> str:
        if self.ok:
            return "nothing to repair"
        lines = [f"damaged steps {self.damaged_steps}; "
                 + (f"lost for good: steps {self.lost_steps}" if self.lost_steps
                    else "every damage is recoverable")]
        lines += [f"  - {a}" for a in self.actions]
        todo = [a for a in self.actions if a.recoverable]
        if todo:
            lines.append("  recover with deltackpt.ops.repair.apply(deltackpt.open(path, 'a')), "
                         "then verify again")
        unreadable = sorted({a.step for a in self.actions if a.kind == "lost"
                             and a.step is not None and a.path is None})
        partial = [s for s in self.lost_steps if s not in unreadable]
        if unreadable:
            lines.append(f"  steps {unreadable} have no readable manifest: restore them from a "
                         f"backup, or delete them (repo.delete({', '.join(map(str, unreadable))})"
                         "; their dependents that still load are rebased first)")
        if partial:
            for s in partial:
                paths = sorted({a.path for a in self.actions if a.kind == "lost"
                                and a.step == s and a.path is not None})
                lines.append(f"  step {s} lost data in {paths}: load(step, select=...) still "
                             "restores the subtrees without them; restore it from a backup, "
                             "or delete it")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- the plan
def _intact(repo: Repository, pid: str, cid: bytes, off: int, length: int,
            plen: int | None = None) -> int | None:
    """The payload length of the frame at ``off`` if it decodes to bytes hashing to ``cid``."""
    try:
        frame = repo.backend.read_range(pack_name(pid), off, length)
        if len(frame) != length:
            return None
        n = frame_length(frame) if plen is None else plen
        if n > MAX_CHUNK_BYTES:
            return None
        return n if frame_matches(cid, frame, n) else None
    except (OSError, DeltaCkptError):
        return None


def _pack_ids(repo: Repository) -> list[str]:
    backend = repo.backend
    out = []
    for sub in backend.list_dirs("packs"):
        out += [f[:-5] for f in backend.list(f"packs/{sub}")
                if f.endswith(".pack") and is_pack_id(f[:-5]) and f[:2] == sub]
    for f in backend.list("index"):   # (backends that cannot list directories)
        if f.endswith(".idx") and is_pack_id(f[:-4]) and f[:-4] not in out:
            out.append(f[:-4])
    return sorted(out)


def _scan_store(repo: Repository, plan: RepairPlan) -> dict[bytes, Location]:
    """Check every pack against its index (or without one); returns every intact frame."""
    backend = repo.backend
    intact: dict[bytes, Location] = {}
    for pid in _pack_ids(repo):
        if not backend.exists(pack_name(pid)):
            if backend.exists(index_name(pid)):
                plan.actions.append(Action("unindex", f"pack {pid} is missing: remove its "
                                           "index (the chunks it held are accounted for "
                                           "below)", pack=pid))
            continue
        entries = None
        try:
            named, entries = decode_index(backend.read(index_name(pid)), index_name(pid))
            if named != pid:
                entries = None
        except FileNotFoundError:
            pass
        except DeltaCkptError:
            entries = None
        if entries is None:  # no usable index: walk the pack itself
            try:
                walked, complete = read_pack_entries(backend, pid)
            except (OSError, DeltaCkptError):
                walked, complete = [], False
            good = []
            for cid, off, length in walked:
                n = _intact(repo, pid, cid, off, length)
                if n is not None:
                    good.append((cid, off, length, n))
                    intact.setdefault(cid, Location(pid, off, length, n))
            if not good:
                continue  # nothing to save (a crash leftover is empty of live data too)
            had = backend.exists(index_name(pid))
            plan.actions.append(Action(
                "reindex", f"index/{pid}.idx is {'damaged' if had else 'missing'}; pack {pid} "
                f"holds {len(good)} intact frame(s) of {len(walked)}"
                + ("" if complete else " (its framing is damaged too)")
                + ": rebuild the index from the pack", pack=pid))
            continue
        bad_frames = 0
        for cid, off, length, plen in entries:
            if _intact(repo, pid, cid, off, length, plen) is not None:
                intact.setdefault(cid, Location(pid, off, length, plen))
            else:
                bad_frames += 1
        problems = scan_pack(backend, pid, entries)
        if problems or bad_frames:
            plan.actions.append(Action(
                "repack", "; ".join(problems) + (f"; {bad_frames} damaged frame(s)"
                                                 if bad_frames else "")
                + f": copy the {len(entries) - bad_frames} intact frame(s) into a new pack",
                pack=pid))
    return intact


def _chain(repo: Repository, step: int, entry: TensorEntry, i: int
           ) -> list[tuple[int, TensorEntry]]:
    """The links of chunk ``i`` from ``step`` down, as far as manifests can be read."""
    out = [(step, entry)]
    seen = {step}
    s, e = step, entry
    while len(out) < 100_000:
        ref = e.chunks[i].ref
        if ref is None or ref in seen:
            break
        seen.add(ref)
        try:
            base = repo.manifest(ref).tensor(entry.path)
        except DeltaCkptError:
            break
        if base is None or base.dropped or i >= len(base.chunks) \
                or base.chunk_bytes != entry.chunk_bytes or base.nbytes != entry.nbytes:
            break
        s, e = ref, base
        out.append((s, e))
    return out


def _raw_source(intact: dict[bytes, Location], rec: ChunkRef, span: int) -> bytes | None:
    loc = intact.get(rec.digest)
    return rec.digest if loc is not None and loc.payload_length == span else None


def plan(repo: Repository) -> RepairPlan:
    """What is damaged and what can be recovered (reads everything once; changes nothing)."""
    out = RepairPlan()
    intact = _scan_store(repo, out)
    twins: dict[bytes, list[tuple[int, TensorEntry, int]]] = {}   # digest -> records
    for s in repo.steps():
        for t in _tensors(repo, s):
            for i, c in enumerate(t.chunks):
                twins.setdefault(c.digest, []).append((s, t, i))
    repoints: dict[tuple[int, str, int], Action] = {}
    damaged: set[int] = set()
    repo.cache.clear()
    for s in repo.steps():
        try:
            m = repo.manifest(s)
        except StepNotFoundError:
            continue
        except DeltaCkptError as exc:
            damaged.add(s)
            out.actions.append(Action("lost", f"the manifest is unreadable ({exc}); the step's "
                                      "tree and metadata exist nowhere else", step=s))
            continue
        for entry in m.tensors:
            if entry.dropped:
                continue
            for i in range(len(entry.chunks)):
                try:
                    repo.reconstructor.chunk(s, entry, i)
                except DeltaCkptError as exc:
                    error = exc
                else:
                    heal = _decodable_damage(repo, intact, s, entry, i)
                    if heal is not None:
                        damaged.add(s)
                        repoints.setdefault((heal.step, heal.path, heal.chunk), heal)  # type: ignore[arg-type]
                    continue
                damaged.add(s)
                action = _fix(repo, intact, twins, s, entry, i, error)
                if action is None:
                    continue  # every payload is intact somewhere: a reindex brings it back
                key = (action.step, action.path, action.chunk)
                if action.kind in ("repoint", "rederive"):
                    repoints.setdefault(key, action)  # type: ignore[arg-type]
                else:
                    out.actions.append(action)
    out.actions[:0] = list(repoints.values())
    out.damaged_steps = sorted(damaged)
    repo.cache.clear()
    return out


def _decodable_damage(repo: Repository, intact: dict[bytes, Location], step: int,
                      entry: TensorEntry, i: int) -> Action | None:
    """A 'rederive' for a chunk that rebuilds to its digest although a link of its chain is a
    damaged frame (bytes changed that no plane it needs reads): store the rebuilt bytes raw
    before a repack drops that frame. At the damaged link's step where that link rebuilds
    itself (which heals every step above it), else at ``step``; None if nothing is damaged."""
    for s_k, e_k in _chain(repo, step, entry, i):
        if intact.get(e_k.chunks[i].id) is not None:
            continue
        target = (step, entry)
        if s_k != step:
            try:
                repo.reconstructor.chunk(s_k, e_k, i)
                target = (s_k, e_k)
            except DeltaCkptError:
                pass
        t_step, t_entry = target
        return Action("rederive", "a frame of its chain is damaged but still rebuilds it to "
                      "its save-time digest: store the rebuilt bytes raw", step=t_step,
                      path=t_entry.path, chunk=i, source=t_entry.chunks[i].digest,
                      origin=(t_step, t_entry.path, i))
    return None


def _fix(repo: Repository, intact: dict[bytes, Location],
         twins: dict[bytes, list[tuple[int, TensorEntry, int]]], step: int, entry: TensorEntry,
         i: int, error: DeltaCkptError) -> Action | None:
    """The repoint that heals chunk ``i`` of ``entry`` at ``step``, else a 'lost' action;
    None when every link's payload is intact (only an index is missing: a reindex heals it).

    Walk the chain from the top: the first link whose payload is not intact (or whose chain
    breaks below it) is where the damage is; re-point the lowest link at or above it whose
    rebuilt bytes exist intact as a raw chunk (links above it decode from intact payloads)."""
    links = _chain(repo, step, entry, i)
    first_bad = None
    for k, (_s, e) in enumerate(links):
        rec = e.chunks[i]
        broken_below = rec.ref is not None and k == len(links) - 1
        loc = intact.get(rec.id)
        indexed = loc is not None and repo.store.has(rec.id)
        if loc is None or broken_below:
            first_bad = k
            break
        if not indexed:
            continue  # intact in a pack whose index is rebuilt by a reindex action
    if first_bad is None:
        if all(repo.store.has(e.chunks[i].id) for _s, e in links):
            first_bad = len(links) - 1  # payloads intact and indexed, yet it fails: look
        else:                           # for a raw copy of what some link rebuilds to
            return None
    for k in range(first_bad, -1, -1):
        s_k, e_k = links[k]
        lo, hi = e_k.chunk_span(i)
        source = _raw_source(intact, e_k.chunks[i], hi - lo)
        if source is not None:
            return Action("repoint", f"rebuild from the intact raw chunk {source.hex()} in "
                          f"pack {intact[source].pack} (same bytes, stored for another step "
                          "or tensor)", step=s_k, path=entry.path, chunk=i, source=source)
    for k in range(first_bad, -1, -1):
        s_k, e_k = links[k]
        digest = e_k.chunks[i].digest
        for s2, t2, i2 in twins.get(digest, []):
            if (s2, t2.path, i2) == (s_k, entry.path, i) or t2.chunk_span(i2)[1] \
                    - t2.chunk_span(i2)[0] != e_k.chunk_span(i)[1] - e_k.chunk_span(i)[0]:
                continue
            try:
                repo.reconstructor.chunk(s2, t2, i2)
            except DeltaCkptError:
                continue
            return Action("rederive", f"rebuild it from step {s2}, tensor {t2.path!r}, chunk "
                          f"{i2}, whose chain yields the same bytes (digest {digest.hex()}), "
                          "and store them raw", step=s_k, path=entry.path, chunk=i,
                          source=digest, origin=(s2, t2.path, i2))
    return Action("lost", f"no intact copy of its bytes: {error}", step=step, path=entry.path,
                  chunk=i)


# ------------------------------------------------------------------------------ applying it
def apply(repo: Repository, todo: RepairPlan | None = None, rounds: int = 3) -> RepairPlan:
    """Carry out the recoverable actions of ``todo`` (default: a fresh :func:`plan`) with the
    writer ``repo``, planning again and repeating while that makes progress (a rebuilt index
    can reveal a pack to repack); returns the plan of what is left. Each action is crash-safe:
    indexes are written whole by atomic rename, manifests are committed as rebases, packs as
    repacks."""
    repo.check_open(write=True)
    repo.wait_until_finished()
    return repo.run_exclusive(lambda: _apply(repo, todo, rounds))  # ordered with saves, gc, deletes


def _apply(repo: Repository, todo: RepairPlan | None, rounds: int) -> RepairPlan:
    todo = todo if todo is not None else plan(repo)
    for _ in range(rounds):
        if not any(a.recoverable for a in todo.actions):
            break
        left = _apply_once(repo, todo)
        if [str(a) for a in left.actions] == [str(a) for a in todo.actions]:
            return left
        todo = left
    return todo


def _apply_once(repo: Repository, todo: RepairPlan) -> RepairPlan:
    from .gc import repack_pack

    backend = repo.backend
    for a in todo.actions:
        if a.kind == "reindex" and a.pack is not None:
            walked, _ = read_pack_entries(backend, a.pack)
            good = [(cid, off, length, n) for cid, off, length in walked
                    if (n := _intact(repo, a.pack, cid, off, length)) is not None]
            if good:
                backend.write_atomic(index_name(a.pack), encode_index(a.pack, good))
        elif a.kind == "unindex" and a.pack is not None \
                and not backend.exists(pack_name(a.pack)):
            backend.delete(index_name(a.pack))
    repo.refresh()
    # re-point first: a rederive may rebuild from a damaged frame that the repack then drops
    by_step: dict[int, list[Action]] = {}
    for a in todo.actions:
        if a.kind in ("repoint", "rederive") and a.step is not None:
            by_step.setdefault(a.step, []).append(a)
    for step in sorted(by_step):
        _repoint(repo, step, by_step[step])
    repo.refresh()
    repo.forget_steps(sorted(by_step))
    live = {c.id for s in repo.steps() for t in _tensors(repo, s) for c in t.chunks}
    for a in todo.actions:
        if a.kind == "repack" and a.pack is not None:
            try:
                _, entries = decode_index(backend.read(index_name(a.pack)),
                                          index_name(a.pack))
            except (FileNotFoundError, DeltaCkptError):
                continue
            keep = [e for e in entries if e[0] in live
                    and _intact(repo, a.pack, e[0], e[1], e[2], e[3]) is not None]
            if keep:
                repack_pack(repo, a.pack, keep)
            else:
                repo.store.forget_pack(a.pack)
                backend.delete(index_name(a.pack))
                backend.delete(pack_name(a.pack))
    repo.refresh()
    return plan(repo)


def _tensors(repo: Repository, step: int) -> list[TensorEntry]:
    try:
        return repo.manifest(step).tensors
    except DeltaCkptError:
        return []


def _repoint(repo: Repository, step: int, actions: list[Action]) -> None:
    """Commit a new manifest of ``step`` whose named records are raw records of their source."""
    m = repo.manifest(step)
    fix = {(a.path, a.chunk): a.source for a in actions}

    def build(txn: str) -> tuple[Manifest, int]:
        written = 0
        for a in actions:
            if a.kind == "rederive" and a.origin is not None:
                s2, path2, i2 = a.origin
                t2 = repo.manifest(s2).tensor(path2)
                assert t2 is not None and a.source is not None
                data = repo.reconstructor.chunk(s2, t2, i2)
                _, n = repo.store.put(data, t2.etype.word, repo.policy.zstd_level,
                                      cid=a.source)
                written += n
        return with_raw_records(m, txn, lambda t, i, _c: fix.get((t.path, i))), written

    repo.rewrite_manifest(step, build)
