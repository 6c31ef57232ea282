"""deltackpt: training checkpoints as lossless deltas in a content-addressed store.

>>> import deltackpt
>>> with deltackpt.open("runs/exp1") as repo:
...     repo.save(100, {"model": model.state_dict(), "rng": deltackpt.rng_state()})
>>> state = deltackpt.open("runs/exp1", mode="r").load()        # latest step
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .errors import (
    BrokenChainError,
    CodecError,
    CorruptChunkError,
    CorruptFileError,
    DeltaCkptError,
    DeltaCkptWarning,
    DigestMismatchError,
    FormatVersionError,
    IntegrityError,
    LocationError,
    LockedError,
    MissingChunkError,
    PolicyError,
    ReadOnlyError,
    RepositoryNotFoundError,
    SelectionError,
    StepExistsError,
    StepNotFoundError,
    StorageError,
    UnsupportedValueError,
)

if TYPE_CHECKING:
    from .codecs import Codec, get_codec, register_codec
    from .engine.policy import Policy
    from .ops.verify import Problem, VerifyReport
    from .repository import Repository, SaveInfo
    from .runtime.rng import rng_state, set_rng_state

#: names imported on first use (PEP 562), so ``deltackpt --help`` starts without numpy or torch
_LAZY = {"Codec": "codecs", "get_codec": "codecs", "register_codec": "codecs",
         "Policy": "engine.policy", "Repository": "repository", "SaveInfo": "repository",
         "rng_state": "runtime.rng", "set_rng_state": "runtime.rng", "Problem": "ops.verify",
         "VerifyReport": "ops.verify"}

__version__ = "0.1.0"


def open(path: str | os.PathLike[str], mode: str = "a", policy: Policy | str | None = None,
         *, storage_options: dict[str, Any] | None = None,
         **kwargs: Any) -> Repository:  # noqa: A001 - mirrors builtins.open on purpose
    """Open (mode='a': create if missing, take the writer lock) or read (mode='r') a repository.

    ``path``: a local directory, a ``file://`` URL, or an object-store URL (``s3://bucket/
    prefix``; ``gs://``, ``az://``/``abfs://``), which needs ``pip install "deltackpt[s3]"``.
    ``storage_options``: settings of the object-store client (``endpoint``, ``region``,
    credentials, ... as obstore names them); the usual environment variables (``AWS_*``,
    ...) work without them. Any other URL scheme raises :class:`LocationError`.

    Keyword arguments are :class:`Policy` fields, e.g. ``keyframe_every=20, codec="xor"``, and
    ``retention=`` (the default policy of ``gc()``) with ``auto_gc=True`` to apply it after
    every save.
    """
    from .repository import Repository

    return Repository(path, mode, policy, storage_options=storage_options, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BrokenChainError", "Codec", "CodecError", "CorruptChunkError", "CorruptFileError",
    "DeltaCkptError", "DeltaCkptWarning", "DigestMismatchError", "FormatVersionError",
    "IntegrityError", "LocationError", "LockedError", "MissingChunkError", "Policy", "PolicyError", "Problem",
    "ReadOnlyError", "Repository", "RepositoryNotFoundError", "SaveInfo", "SelectionError",
    "StepExistsError", "StepNotFoundError", "StorageError", "UnsupportedValueError",
    "VerifyReport", "get_codec", "open", "register_codec", "rng_state", "set_rng_state",
]
