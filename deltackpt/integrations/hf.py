"""Hugging Face ``Trainer`` integration: every checkpoint folder the Trainer writes is stored in a
deltackpt repository, and older folders are removed from disk.

>>> from deltackpt.integrations.hf import DeltaCheckpointCallback, restore_checkpoint
>>> cb = DeltaCheckpointCallback("runs/exp1.dckpt", keep_folders=1)
>>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
>>> trainer.train(resume_from_checkpoint=restore_checkpoint("runs/exp1.dckpt", args.output_dir))

Each ``checkpoint-{global_step}`` folder becomes step ``global_step`` (a folder state, see
:func:`deltackpt.interop.files.read_folder`): safetensors weights, ``optimizer.pt``, ``scheduler.pt``
and other ``weights_only``-loadable torch files as tensors (so steps store as deltas), JSON as
text, and files ``torch.load(weights_only=True)`` refuses (``training_args.bin``,
``rng_state.pth``) as raw bytes that deltackpt never unpickles. :func:`materialize` writes a
step back as a folder the Trainer can resume from (``deltackpt export REPO DIR --format
hf-folder --step N`` on the command line).

Requires ``pip install deltackpt[hf]``; importing :mod:`deltackpt` never imports transformers.
:func:`materialize` and :func:`restore_checkpoint` work without transformers installed.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Any

from ..engine.policy import Policy
from ..errors import DeltaCkptError, RepositoryNotFoundError
from ..interop.files import FolderReport, is_folder_state, read_folder, write_folder
from ..repository import Repository
from ..store.location import local_path, resolve

_FOLDER = re.compile(r"checkpoint-(\d+)")

if TYPE_CHECKING:
    from transformers import TrainerCallback


def _folder_steps(output_dir: str) -> dict[int, str]:
    """Trainer checkpoint folders in ``output_dir``: step → path."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        m = _FOLDER.fullmatch(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            out[int(m.group(1))] = path
    return out


def materialize(repo_path: str | os.PathLike[str] | Repository, step: int | None,
                out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                storage_options: dict[str, Any] | None = None) -> FolderReport:
    """Write ``step`` (default: the latest) of a repository back as a Trainer checkpoint
    folder at ``out_dir``, usable with ``trainer.train(resume_from_checkpoint=out_dir)``.
    ``repo_path`` may be an object-store URL (``storage_options`` for its client).

    Text and raw files come back byte-identical (checked against the digest taken at save
    time); safetensors and torch files load to identical tensors and values, and the returned
    report says per file whether the bytes matched the original too. ``out_dir`` is a local
    directory (or a ``file://`` URL): any other URL raises
    :class:`~deltackpt.errors.LocationError` before anything is read or written.
    """
    out_dir = local_path(out_dir)  # never a directory named "s3:" here
    owned = not isinstance(repo_path, Repository)
    repo = repo_path if isinstance(repo_path, Repository) \
        else Repository(repo_path, "r", storage_options=storage_options)
    try:
        if step is None:
            step = _latest_folder_step(repo)
            if step is None:
                raise DeltaCkptError(f"repository {repo.path!r} holds no checkpoint folders")
        state = repo.load(step)
        if not is_folder_state(state):
            raise DeltaCkptError("this step was not stored from a checkpoint folder "
                                 "(export it as pt or safetensors)", step=step)
        return write_folder(state, out_dir, overwrite=overwrite, step=step)
    finally:
        if owned:
            repo.close()


def _latest_folder_step(repo: Repository) -> int | None:
    for record in reversed(repo.history()):
        if record.meta.get("format") == "hf-folder":
            return record.step
    return None


def restore_checkpoint(repo_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       step: int | None = None, *,
                       storage_options: dict[str, Any] | None = None) -> str | None:
    """Make ``output_dir/checkpoint-{step}`` exist for resuming (``step`` default: the latest
    folder step in the repository) and return its path; ``None`` when the repository does not
    exist or holds no folders (start from scratch). A folder already on disk is used as is.
    ``repo_path`` may be an object-store URL (``storage_options`` for its client);
    ``output_dir`` is local, as the Trainer's is (a ``file://`` URL too; any other URL raises
    :class:`~deltackpt.errors.LocationError`).

    >>> trainer.train(resume_from_checkpoint=restore_checkpoint(repo, args.output_dir))
    """
    output_dir = local_path(output_dir)
    try:  # through the backend: a URL's repository is no local file to look for
        opened = Repository(repo_path, "r", storage_options=storage_options)
    except RepositoryNotFoundError:
        return None
    with opened as repo:
        if step is None:
            step = _latest_folder_step(repo)
            if step is None:
                return None
        target = os.path.join(output_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(target, "trainer_state.json")):
            return target
        materialize(repo, step, target, overwrite=True)
    return target


def _numeric_meta(state: Any) -> dict[str, float]:
    """Numbers from the Trainer's latest log entries (loss, eval_loss, ...) for the step's
    meta, so retention such as ``KeepBest("eval_loss")`` can use them."""
    meta: dict[str, float] = {}
    for entry in getattr(state, "log_history", None) or []:
        if entry.get("step") != state.global_step:
            continue
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                meta[k] = v
    if getattr(state, "epoch", None) is not None:
        meta["epoch"] = float(state.epoch)
    return meta


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _Callback:
    """Implementation of :class:`DeltaCheckpointCallback` (mixed into ``TrainerCallback``)."""

    def __init__(self, repo_path: str | os.PathLike[str], keep_folders: int = 1, *,
                 policy: Policy | str | None = None,
                 storage_options: dict[str, Any] | None = None, **policy_kwargs: Any) -> None:
        if type(keep_folders) is not int or keep_folders < 0:
            raise ValueError(f"keep_folders must be an int >= 0, got {keep_folders!r}")
        # an unknown URL scheme is refused here, not at the first save; object stores work
        self.repo_path = resolve(repo_path)
        self.storage_options = dict(storage_options) if storage_options else None
        self.keep_folders = keep_folders
        self._policy = policy
        self._policy_kwargs = dict(policy_kwargs)
        Policy.from_kwargs(policy, self._policy_kwargs)  # validate now, not at the first save
        self.repo: Repository | None = None
        self.saved: list[int] = []  #: steps stored by this callback

    # -- storage -------------------------------------------------------------------------------
    def _open(self) -> Repository:
        if self.repo is None:
            self.repo = Repository(self.repo_path, "a", self._policy,
                                   storage_options=self.storage_options, **self._policy_kwargs)
        return self.repo

    def close(self) -> None:
        """Release the repository (its writer lock). Called at the end of training."""
        if self.repo is not None:
            try:
                self.repo.close()
            finally:
                self.repo = None

    def store(self, folder: str, step: int, meta: dict[str, Any] | None = None) -> bool:
        """Store ``folder`` as ``step``; returns False when that step already holds a
        byte-identical folder. A different folder at an existing step replaces it (warning)."""
        repo = self._open()
        state = read_folder(folder)
        meta = {"format": "hf-folder", "imported_from": os.path.basename(folder),
                **(meta or {})}
        if step in repo:
            old = repo.load(step)
            same = is_folder_state(old) and {k: v.get("xxh3") for k, v in old["files"].items()} \
                == {k: v["xxh3"] for k, v in state["files"].items()}
            if same:
                return False
            warnings.warn(f"deltackpt: step {step} is already in {self.repo_path!r} with other "
                          "content; replacing it", stacklevel=2)
            repo.delete(step)
        repo.save(step, state, meta=meta)
        self.saved.append(step)
        return True

    def prune(self, output_dir: str, best: str | None = None) -> list[str]:
        """Delete Trainer folders in ``output_dir`` beyond the newest ``keep_folders`` whose
        step is in the repository (never the best model's folder); returns those deleted."""
        repo = self._open()
        folders = _folder_steps(output_dir)
        keep = set(sorted(folders)[-self.keep_folders:]) if self.keep_folders else set()
        best_abs = os.path.abspath(best) if best else None
        removed = []
        for step, path in sorted(folders.items()):
            if step in keep or step not in repo or os.path.abspath(path) == best_abs:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    # -- TrainerCallback hooks -------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        _barrier()  # every rank has written its files (rng_state_{rank}.pth, shards)
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isdir(folder):
                raise DeltaCkptError(f"the Trainer's checkpoint folder {folder!r} is missing "
                                     "(hyperparameter-search trials are not supported)",
                                     step=state.global_step)
            self.store(folder, state.global_step, _numeric_meta(state))
            best = state.best_model_checkpoint if getattr(
                args, "load_best_model_at_end", False) else None
            self.prune(args.output_dir, best)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.close()
        return control


_DOC = """A ``transformers.TrainerCallback`` storing each checkpoint folder in a deltackpt
repository (step = ``global_step``) and keeping only the newest ``keep_folders`` folders on
disk.

``keep_folders=0`` removes every folder once stored: resume with
``trainer.train(resume_from_checkpoint=restore_checkpoint(repo_path, output_dir))``, which
writes the latest step back as a folder first. The best model's folder
(``load_best_model_at_end``) is never removed, and folders whose step is not in the repository
(written before the callback was added) are left alone. Keyword arguments are
:class:`deltackpt.Policy` options (``policy="balanced"``, ``keyframe_every=20``, ...). The
repository's writer lock is held from the first save until training ends (or :meth:`close`).
``repo_path`` may be an object-store URL (``s3://bucket/prefix``; ``storage_options=`` for its
client); the Trainer's own folders stay on the local ``output_dir``.
"""
_classes: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """Build :class:`DeltaCheckpointCallback` on first use, so that importing this module (for
    :func:`materialize`) does not import transformers."""
    if name != "DeltaCheckpointCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _classes:
        try:
            from transformers import TrainerCallback as base
        except ImportError as exc:
            raise ImportError("DeltaCheckpointCallback needs transformers: "
                              "pip install 'deltackpt[hf]'") from exc
        _classes[name] = type(name, (_Callback, base), {"__doc__": _DOC, "__module__": __name__,
                                                        "__qualname__": name})
    return _classes[name]


if TYPE_CHECKING:
    class DeltaCheckpointCallback(_Callback, TrainerCallback):  # noqa: D101
        ...


__all__ = ["DeltaCheckpointCallback", "materialize", "restore_checkpoint"]
