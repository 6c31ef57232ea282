"""Lightning integration: a ``CheckpointIO`` plugin that stores checkpoints in a deltackpt
repository instead of one ``torch.save`` file each.

>>> from deltackpt.integrations.lightning import DeltaCheckpointIO
>>> trainer = Trainer(plugins=[DeltaCheckpointIO("runs/exp1.dckpt")],
...                   callbacks=[ModelCheckpoint(every_n_train_steps=100, save_last=True)])
>>> trainer.fit(model, ckpt_path="last")      # resumes from the repository

How paths map to steps: a checkpoint is stored as step ``checkpoint["global_step"]`` (else the
``step=N`` in its file name). A small index in the repository (``integrations/lightning.json``,
checksummed JSON) maps each checkpoint path to its step, so any file name works, and at the path
itself a tiny JSON *pointer file* is written: Lightning looks for files (``ckpt_path="last"``,
``ModelCheckpoint``'s name versioning and ``save_last="link"`` symlinks), and a pointer moved
with its directory still finds its step. Pointer files are not torch checkpoints: read them with
:func:`load` (or this plugin), not ``torch.load``.

Several paths at one step (``ModelCheckpoint`` writes ``epoch=..-step=N.ckpt`` and
``last.ckpt`` at the same step) share the stored tensors: the later path is an alias that only
records its own plain values where they differ (callback state), after checking that its tensors
are bit-identical to the stored ones. A checkpoint with *different* tensors at a step that is
already stored (a rerun from an earlier step) replaces that step, with a warning.

``remove_checkpoint`` (``ModelCheckpoint(save_top_k=k)`` dropping a worse checkpoint) removes
the path and pointer, and deletes the step once no path refers to it (dependent steps are
rebased first, so they stay loadable). With ``delete_removed=False`` steps stay in the
repository and deltackpt's retention/``gc`` decides instead.

The checkpoint a run resumed from (loaded before the run's first save: the Trainer restoring
``fit(ckpt_path=...)``) is never deleted by the plugin during that run. Lightning means
``ModelCheckpoint`` never to remove that ``ckpt_path``, but on a remote filesystem it does
(Lightning issue #21813): ``remove_checkpoint`` of that path keeps path, pointer and step (a
warning says so). When its path is overwritten instead (``last.ckpt`` saved again), its step
stays in the repository, loadable by step number (``deltackpt log``/``export``,
``Repository.load``) once no path names it.

Values deltackpt cannot store without pickle: mappings other than dict/OrderedDict (such as
Lightning's ``AttributeDict`` or ``argparse.Namespace`` in hyperparameters) are stored as plain
dicts, list and tuple subclasses (namedtuples) as lists and tuples. Anything else (a class, a
function, a custom object in ``hyper_parameters`` or in a callback's state) raises
:class:`~deltackpt.UnsupportedValueError` naming its path, or, with ``unsupported="drop"``, is
left out of the stored checkpoint (a warning and the step's ``meta["dropped"]`` list the
paths). Resuming a fit never needs ``hyper_parameters``; only
``LightningModule.load_from_checkpoint`` does.

Requires ``pip install deltackpt[lightning]``; importing :mod:`deltackpt` never imports
lightning, and :func:`load` works without it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..engine.policy import Policy
from ..errors import DeltaCkptError, RepositoryNotFoundError, UnsupportedValueError
from ..format import checksum
from ..format.tree import Leaf, flatten, unflatten
from ..interop.pointer import POINTER_KIND, read_pointer
from ..repository import Repository
from ..store.location import is_object_store, resolve
from ..store.manifest import Manifest

if TYPE_CHECKING:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

INDEX_NAME = "integrations/lightning.json"
INDEX_VERSION = 1
_STEP_IN_NAME = re.compile(r"step=(\d+)")
_DROP = object()


# ---------------------------------------------------------------------------------- helpers
def _key(path: str | os.PathLike[str]) -> str:
    """The index key of a checkpoint path: absolute and normalised (URLs as given)."""
    p = os.fspath(path)
    return p if "://" in p else os.path.normpath(os.path.abspath(p))


def _raw_digest(value: torch.Tensor | np.ndarray) -> bytes:
    """xxh3-128 of a tensor's raw bytes, as the repository digests what it stores."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        raw: Any = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    else:
        a = np.ascontiguousarray(value)
        raw = a.reshape(-1).view(np.uint8) if a.size else b""
    return checksum.digest(raw)


def _same_tensors(m: Manifest, leaves: list[Leaf]) -> bool:
    """Whether every tensor of ``leaves`` is stored at ``m``'s step, bit for bit, by path."""
    stored = {e.path: e for e in m.tensors}
    for lf in leaves:
        e = stored.get(lf.path)
        if e is None or e.dropped or list(lf.value.shape) != list(e.shape):
            return False
        expected = bytes.fromhex(e.lossy["source_digest"]) if e.lossy else e.digest
        if _raw_digest(lf.value) != expected:
            return False
    return True


def _normalize(v: Any, path: str, drop: bool, dropped: list[str]) -> Any:
    """``v`` with foreign mappings as dicts; unstorable leaves dropped (``drop``) or refused."""
    t = type(v)
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v
    if t is dict or t is OrderedDict or isinstance(v, (Mapping, argparse.Namespace)):
        items = vars(v).items() if isinstance(v, argparse.Namespace) else v.items()
        out = OrderedDict() if t is OrderedDict else {}
        for k, x in items:
            y = _normalize(x, f"{path}/{k}" if path else str(k), drop, dropped)
            if y is not _DROP:
                out[k] = y
        if t is OrderedDict and hasattr(v, "_metadata"):
            out._metadata = v._metadata  # type: ignore[attr-defined]  # noqa: SLF001
        return out
    if t is list or t is tuple or isinstance(v, (list, tuple)):
        items = [_normalize(x, f"{path}/{i}", drop, dropped) for i, x in enumerate(v)]
        kept = [y for y in items if y is not _DROP]
        return kept if isinstance(v, list) else tuple(kept)
    try:
        flatten(v)
    except UnsupportedValueError as exc:
        if not drop:
            raise UnsupportedValueError(str(exc).split("] ", 1)[-1], path=path) from None
        dropped.append(path)
        return _DROP
    return v


def load(path: str | os.PathLike[str], map_location: str | torch.device | None = None,
         repo_path: str | os.PathLike[str] | None = None, *,
         storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the checkpoint a pointer file (or an indexed path of ``repo_path``) names, without
    Lightning; e.g. to inspect ``last.ckpt``. ``storage_options``: for a repository on an
    object store (``s3://...``) that the environment alone does not configure."""
    key = _key(path)
    pointer = read_pointer(os.fspath(path))
    if repo_path is None:
        if pointer is None:
            raise DeltaCkptError(f"{os.fspath(path)!r} is not a deltackpt pointer file; pass "
                                 "repo_path")
        repo_path = pointer["repository"]
    with Repository(repo_path, "r", storage_options=storage_options) as repo:
        entry = _read_index(repo)["paths"].get(key)
        if entry is None and pointer is not None:
            entry = _read_index(repo)["paths"].get(pointer.get("key")) or \
                {"step": int(pointer["step"])}
        if entry is None:
            raise DeltaCkptError(f"{key!r} is not a checkpoint of repository {repo.path!r}")
        return _load_entry(repo, entry, map_location)


def _read_index(repo: Repository) -> dict[str, Any]:
    if not repo.backend.exists(INDEX_NAME):
        return {"version": INDEX_VERSION, "paths": {}}
    doc = checksum.load(repo.backend.read(INDEX_NAME), INDEX_NAME)
    if doc.get("version") != INDEX_VERSION or not isinstance(doc.get("paths"), dict):
        raise DeltaCkptError(f"{INDEX_NAME}: unsupported index (version {doc.get('version')!r})")
    return doc


def _load_entry(repo: Repository, entry: dict[str, Any],
                map_location: str | torch.device | None) -> dict[str, Any]:
    loc = map_location if isinstance(map_location, (str, torch.device)) else None
    state = repo.load(int(entry["step"]), map_location=loc)
    if "tree" not in entry:
        return state
    _tree, leaves = flatten(state)  # an alias: its own plain values around the stored tensors
    by_path = {lf.path: lf.value for lf in leaves}
    names = entry["leaves"]
    return unflatten(entry["tree"], lambda i: by_path[names[i]])


# ------------------------------------------------------------------------------ the plugin
class _DeltaCheckpointIO:
    """Implementation of :class:`DeltaCheckpointIO` (mixed into Lightning's ``CheckpointIO``)."""

    def __init__(self, repo_path: str | os.PathLike[str], *, delete_removed: bool = True,
                 unsupported: str = "error", policy: Policy | str | None = None,
                 storage_options: dict[str, Any] | None = None,
                 **policy_kwargs: Any) -> None:
        if unsupported not in ("error", "drop"):
            raise ValueError("unsupported must be 'error' or 'drop'")
        # a local path is made absolute; an object-store URL is kept; other URLs raise here
        self.repo_path = _key(resolve(repo_path))
        self.storage_options = dict(storage_options) if storage_options else None
        self.delete_removed = delete_removed
        self.unsupported = unsupported
        self._policy = policy
        self._policy_kwargs = dict(policy_kwargs)
        Policy.from_kwargs(policy, self._policy_kwargs)  # validate now
        self._repo: Repository | None = None
        #: index keys and steps of the checkpoints loaded before the run's first save: the run
        #: resumed from them, so the plugin never deletes them (see the module docstring)
        self._resumed_keys: set[str] = set()
        self._resumed_steps: set[int] = set()

    # -- repository ------------------------------------------------------------------------
    def _writer(self) -> Repository:
        if self._repo is None:
            self._repo = Repository(self.repo_path, "a", self._policy,
                                    storage_options=self.storage_options, **self._policy_kwargs)
        return self._repo

    def _write_index(self, repo: Repository, doc: dict[str, Any]) -> None:
        repo.backend.write_atomic(INDEX_NAME, checksum.dump(doc))

    def teardown(self) -> None:
        """Close the repository (release the writer lock); it reopens on the next save. The
        run is over: what it resumed from is no longer kept from removal."""
        self._resumed_keys.clear()
        self._resumed_steps.clear()
        if self._repo is not None:
            try:
                self._repo.close()
            finally:
                self._repo = None

    def steps(self) -> dict[str, int]:
        """Checkpoint path → step, from the index."""
        repo = self._repo or Repository(self.repo_path, "r",
                                        storage_options=self.storage_options)
        try:
            return {k: int(e["step"]) for k, e in _read_index(repo)["paths"].items()}
        finally:
            if repo is not self._repo:
                repo.close()

    # -- save --------------------------------------------------------------------------------
    def _prepare(self, checkpoint: dict[str, Any], path: str) -> tuple[Any, list[str]]:
        try:
            flatten(checkpoint)
            return checkpoint, []
        except UnsupportedValueError:
            pass
        dropped: list[str] = []
        try:
            state = _normalize(checkpoint, "", self.unsupported == "drop", dropped)
        except UnsupportedValueError as exc:
            raise UnsupportedValueError(
                f"checkpoint {path!r}: {str(exc).split('] ', 1)[-1]}. Keep hyperparameters and "
                "callback states to tensors and plain values, or pass "
                "DeltaCheckpointIO(unsupported='drop') to leave such values out",
                path=exc.path) from None
        if dropped:
            warnings.warn(f"deltackpt: left out of checkpoint {path!r} (not storable without "
                          f"pickle): {', '.join(dropped)}", stacklevel=3)
        return state, dropped

    @staticmethod
    def _step_of(checkpoint: dict[str, Any], path: str, repo: Repository) -> int:
        gs = checkpoint.get("global_step")
        if type(gs) is int and gs >= 0:
            return gs
        m = _STEP_IN_NAME.search(os.path.basename(path))
        if m:
            return int(m.group(1))
        latest = repo.latest
        return 0 if latest is None else latest + 1

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Store ``checkpoint`` as step ``global_step`` and write a pointer file at ``path``."""
        if storage_options is not None:
            raise TypeError("DeltaCheckpointIO.save_checkpoint takes no storage_options, got "
                            f"{storage_options!r}")
        path = os.fspath(path)
        key = _key(path)
        repo = self._writer()
        state, dropped = self._prepare(checkpoint, path)
        step = self._step_of(checkpoint, path, repo)
        tree, leaves = flatten(state)
        index = _read_index(repo)
        paths: dict[str, Any] = index["paths"]
        entry: dict[str, Any] = {"step": step}
        if step in repo:
            m = repo.manifest(step)
            if _same_tensors(m, leaves):
                if tree != m.tree:  # same tensors, other plain values: an alias
                    entry.update(tree=tree, leaves=[lf.path for lf in leaves])
                state = None
            else:
                others = sorted(k for k, e in paths.items() if e["step"] == step and k != key)
                warnings.warn(f"deltackpt: step {step} is already stored with other tensors"
                              + (f" (for {', '.join(others)})" if others else "")
                              + f"; replacing it with {path!r}", stacklevel=2)
                for k in others:  # they now name the new content
                    paths[k] = {"step": step}
                repo.delete(step)
        if state is not None:
            meta: dict[str, Any] = {"format": "lightning", "path": path}
            if isinstance(checkpoint.get("epoch"), int):
                meta["epoch"] = checkpoint["epoch"]
            if dropped:
                meta["dropped"] = dropped
            repo.save(step, state, meta=meta)
        old = paths.get(key)
        paths[key] = entry
        self._write_index(repo, index)
        self._write_pointer(path, key, step)
        if old is not None and int(old["step"]) != step:
            self._release_step(repo, index, int(old["step"]))

    def _write_pointer(self, path: str, key: str, step: int) -> None:
        data = (json.dumps({"kind": POINTER_KIND, "version": 1, "repository": self.repo_path,
                            "repository_id": self._writer().config.get("id"), "step": step,
                            "key": key}, indent=1) + "\n").encode()
        if "://" in path:
            from lightning.fabric.utilities.cloud_io import get_filesystem

            fs = get_filesystem(path)
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _release_step(self, repo: Repository, index: dict[str, Any], step: int) -> None:
        """Delete ``step`` if no path refers to it any more (and deletion is on), unless a run
        resumed from it."""
        if not self.delete_removed or step in self._resumed_steps or step not in repo:
            return
        if any(int(e["step"]) == step for e in index["paths"].values()):
            return
        repo.delete(step)

    # -- load / remove -------------------------------------------------------------------------
    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Rebuild the checkpoint stored for ``path`` (bit-exact; never unpickles). A path this
        plugin did not write is loaded as a plain Lightning checkpoint file.

        A load before the run's first save (the Trainer restoring ``ckpt_path``) marks the
        checkpoint as the one the run resumed from: kept until :meth:`teardown`."""
        path = os.fspath(path)
        key = _key(path)
        repo = self._repo
        starting = repo is None  # no save yet in this run
        if repo is None:
            try:  # a reader: every rank may load at once
                repo = Repository(self.repo_path, "r", storage_options=self.storage_options)
            except RepositoryNotFoundError:
                repo = None
        pointer = read_pointer(path)
        loaded: dict[str, Any] | None = None
        try:
            if repo is not None:
                paths = _read_index(repo)["paths"]
                entry = paths.get(key)
                if entry is None and pointer is not None \
                        and pointer.get("repository_id") == repo.config.get("id"):
                    # our pointer, moved (with the repository or not) since it was written
                    entry = paths.get(pointer.get("key")) or {"step": int(pointer["step"])}
                if entry is not None:
                    loaded = _load_entry(repo, entry, map_location)
                    if starting:
                        self._resumed_steps.add(int(entry["step"]))
        finally:
            if repo is not None and repo is not self._repo:
                repo.close()
        if loaded is None and pointer is not None:
            # another repository's checkpoint: on an object store, read with this plugin's
            # storage_options (the same store, most likely), else with the environment's
            other = os.fspath(pointer.get("repository", ""))
            loaded = load(path, map_location, storage_options=self.storage_options
                          if is_object_store(other) else None)
        if loaded is None:
            from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

            loaded = TorchCheckpointIO().load_checkpoint(path, map_location=map_location,
                                                         weights_only=weights_only)
        if starting:
            self._resumed_keys.add(key)
        return loaded

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Forget ``path`` (and its pointer file); delete its step once no path refers to it."""
        path = os.fspath(path)
        key = _key(path)
        if key in self._resumed_keys:
            warnings.warn(f"deltackpt: kept checkpoint {path!r}, which this run resumed from "
                          "(Lightning asked to remove it: on a remote filesystem "
                          "ModelCheckpoint does, Lightning issue #21813)", stacklevel=2)
            return
        repo = self._writer()
        index = _read_index(repo)
        entry = index["paths"].pop(key, None)
        if entry is not None:
            self._write_index(repo, index)
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(path)
        if fs.exists(path) or os.path.islink(path):
            fs.rm(path, recursive=True)
        if entry is not None:
            self._release_step(repo, index, int(entry["step"]))


_DOC = """A Lightning ``CheckpointIO`` storing checkpoints in a deltackpt repository.

``Trainer(plugins=[DeltaCheckpointIO(repo_path)])``: each checkpoint Lightning saves becomes
step ``global_step`` (bit-exact; consecutive steps store as deltas), a tiny pointer file is
written at the checkpoint path, and ``trainer.fit(model, ckpt_path=...)`` (a path or
``"last"``) resumes from the repository. ``delete_removed`` (default True): a checkpoint
``ModelCheckpoint`` removes deletes its step once no path refers to it. ``unsupported``:
``"error"`` (default) or ``"drop"`` for values deltackpt cannot store without pickle. Other
keyword arguments are :class:`deltackpt.Policy` options. The writer lock is held from the first
save until ``teardown`` (the end of ``fit``). ``repo_path`` may be an object-store URL
(``s3://bucket/prefix``, with ``storage_options=`` for its client if the environment does not
configure it), and Lightning's checkpoint paths may be remote too (pointer files are written
through Lightning's fsspec filesystem).
"""
_classes: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """Build :class:`DeltaCheckpointIO` on first use (importing this module does not import
    lightning)."""
    if name != "DeltaCheckpointIO":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        import importlib

        bases = []  # the CheckpointIO of `lightning` and of the standalone `pytorch_lightning`
        for mod in ("lightning.fabric.plugins.io.checkpoint_io",
                    "lightning_fabric.plugins.io.checkpoint_io"):
            try:
                bases.append(importlib.import_module(mod).CheckpointIO)
            except ImportError:
                pass
        if not bases:
            raise ImportError("DeltaCheckpointIO needs lightning: "
                              "pip install 'deltackpt[lightning]'")
        _classes[name] = type(name, (_DeltaCheckpointIO, *bases),
                              {"__doc__": _DOC, "__module__": __name__, "__qualname__": name})
    return _classes[name]


if TYPE_CHECKING:
    class DeltaCheckpointIO(_DeltaCheckpointIO, CheckpointIO):  # noqa: D101
        ...


__all__ = ["DeltaCheckpointIO", "load"]
