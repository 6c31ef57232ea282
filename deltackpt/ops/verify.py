"""Prove that steps restore bit-exactly, and report every problem found instead of the first.

Checks, in order: every index file (checksum, bounds), every pack's framing against its index
(when all steps are verified), every manifest (checksum, schema), and every tensor of every step
rebuilt chunk by chunk against the digests taken at save time, then the state tree decoded as
``load()`` decodes it (torch.Generator states included), so a step verify passes loads. Only one
chunk chain is held in memory at a time, never a whole step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..engine.outputs import finish
from ..errors import (
    CorruptFileError,
    DeltaCkptError,
    StepNotFoundError,
    StorageError,
    UnsupportedValueError,
)
from ..format.tree import MAX_GENERATOR_STATE, leaf_indices, unflatten
from ..store.packs import scan_pack

if TYPE_CHECKING:
    import torch

    from ..repository import Repository
    from ..store.manifest import Manifest
else:
    from ..runtime.lazy import torch


@dataclass(frozen=True)
class Problem:
    step: int | None
    path: str | None
    cause: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class VerifyReport:
    steps: list[int] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: steps that restore what the lossy decoder produced, not what was saved: step -> the
    #: worst recorded relative error (max |error| / max |value|) of its lossy tensors
    lossy_steps: dict[int, float] = field(default_factory=dict)
    #: steps intact but not loadable on this machine, step -> why: a torch.Generator of a
    #: device whose backend is absent here (load raises UnsupportedValueError; not damage)
    unsupported: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_steps(self) -> list[int]:
        return sorted({p.step for p in self.problems if p.step is not None})

    def add(self, exc: BaseException, step: int | None = None, path: str | None = None) -> None:
        step = getattr(exc, "step", None) if getattr(exc, "step", None) is not None else step
        path = getattr(exc, "path", None) if getattr(exc, "path", None) is not None else path
        cause = getattr(exc, "cause", None) or type(exc).__name__
        self.problems.append(Problem(step, path, cause, str(exc)))


def verify(repo: Repository, step: int | None = None, *,
           progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
    """``progress(stage, done, total)`` is called as steps are checked."""
    report = VerifyReport()
    if step is None:
        steps = repo.steps()
        _verify_store(repo, report)
    else:
        steps = [step]
    repo.cache.clear()
    seen = _listing(repo)
    for done, s in enumerate(steps):
        if progress is not None:
            progress("verify", done, len(steps))
        sub = VerifyReport()
        try:
            _verify_step(repo, s, sub)
            if sub.problems and _listing(repo) != seen:
                # a writer deleted, rebased or repacked since we read manifests and indexes:
                # look again from disk, once (real damage fails the same way again)
                seen = _listing(repo)
                repo.refresh()
                sub = VerifyReport()
                _verify_step(repo, s, sub)
        except StepNotFoundError:
            if step is not None:
                raise
            continue  # deleted by a writer while we verified: not damage
        report.steps.append(s)
        report.tensors += sub.tensors
        report.bytes += sub.bytes
        report.problems += sub.problems
        report.lossy_steps.update(sub.lossy_steps)
        report.unsupported.update(sub.unsupported)
    repo.cache.clear()
    if progress is not None:
        progress("verify", len(steps), len(steps))
    return report


def _listing(repo: Repository) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Index and step file names: every delete, sweep and repack changes them."""
    return tuple(repo.backend.list("index")), tuple(repo.backend.list("steps"))


def _verify_step(repo: Repository, s: int, report: VerifyReport) -> None:
    """Check one step into ``report``; raises StepNotFoundError if it is not (or no longer)
    committed."""
    try:
        m = repo.manifest(s)
    except StepNotFoundError:
        raise
    except DeltaCkptError as exc:
        report.add(exc, step=s)
        return
    if not m.exact:
        report.lossy_steps[s] = m.max_rel_error
    generators: list[int] | None = None
    try:
        wanted = leaf_indices(m.tree)
        if wanted and max(wanted) >= len(m.tensors):
            raise CorruptFileError("state tree refers to a tensor the manifest lacks",
                                   step=s)
        found = _generator_leaves(m.tree)
        for i in found:  # the decoder's rule, checked before anything is rebuilt
            e = m.tensors[i]
            if e.kind != "torch" or e.dtype != "uint8" or len(e.shape) != 1 or e.dropped \
                    or e.nbytes > MAX_GENERATOR_STATE:
                raise CorruptFileError(f"state tree: a torch.Generator's state is tensor "
                                       f"{e.path!r}, which is not a 1-D uint8 tensor of at "
                                       f"most {MAX_GENERATOR_STATE} bytes", step=s)
        generators = found
    except DeltaCkptError as exc:
        report.add(exc, step=s)
    damaged = set()
    for entry in m.tensors:
        if entry.dropped:
            continue
        report.tensors += 1
        try:
            repo.reconstructor.tensor_digest(s, entry)
            report.bytes += entry.nbytes
        except DeltaCkptError as exc:
            damaged.add(entry.path)
            # the error names the step of the damaged link; say which step it breaks too
            if exc.step is not None and exc.step != s:
                report.problems.append(Problem(s, entry.path, exc.cause,
                                               f"[step {s}, tensor {entry.path!r}] "
                                               f"depends on a damaged entry: {exc}"))
            else:
                report.add(exc, step=s, path=entry.path)
    if generators is None or any(m.tensors[i].path in damaged for i in generators):
        return  # already reported
    try:
        _decode_tree(repo, s, m, generators)
    except UnsupportedValueError as exc:
        report.unsupported[s] = str(exc)
    except DeltaCkptError as exc:
        report.add(exc, step=s)


def _decode_tree(repo: Repository, s: int, m: Manifest, generators: list[int]) -> None:
    """Decode the state tree as ``load()`` does, with the generator states rebuilt (every other
    node's decoding does not look at the tensor it holds): whatever makes a load fail after
    its tensors were rebuilt fails here too."""
    values: dict[int, torch.Tensor] = {}
    for i in generators:
        e = m.tensors[i]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        repo.reconstructor.tensor_into(s, e, buf.numpy())
        values[i] = finish(buf, e, None)  # type: ignore[assignment]
    unflatten(m.tree, values.get)


def _generator_leaves(tree: object) -> list[int]:
    """Leaf indices of the tree's ``generator`` nodes (the tree is already known to decode)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            if len(node) == 3 and node[0] == "generator" and type(node[2]) is int:
                found.append(node[2])
            stack.extend(node)
    return found


def _verify_store(repo: Repository, report: VerifyReport) -> None:
    from ..store.packs import decode_index, index_name, is_pack_id

    backend = repo.backend
    for fname in backend.list("index"):
        if not fname.endswith(".idx"):
            continue
        pid = fname[:-4]
        if not is_pack_id(pid):
            report.problems.append(Problem(None, None, "stray file",
                                           f"index/{fname}: not named after a pack id (32 "
                                           "lowercase hex digits); never read: move it away"))
            continue
        try:
            named, entries = decode_index(backend.read(index_name(pid)), index_name(pid))
        except FileNotFoundError:
            continue  # deleted since it was listed (a writer's gc)
        except DeltaCkptError as exc:
            report.add(exc)
            continue
        if named != pid:
            report.problems.append(Problem(None, None, "corrupt index",
                                           f"{index_name(pid)} names pack {named}"))
            continue
        try:
            problems = scan_pack(backend, pid, entries)
        except StorageError as exc:  # the store refused the read: no damage seen, say so
            report.add(exc)
            continue
        except DeltaCkptError as exc:  # e.g. the pack is not a file
            problems = [str(exc)]
        if problems and not backend.exists(index_name(pid)):
            continue  # the pack went with its index meanwhile (a writer's gc)
        for msg in problems:
            report.problems.append(Problem(None, None, "corrupt pack", msg))
