"""One error hierarchy for deltackpt: every failure a user can see is a ``DeltaCkptError``.

Errors about data carry the step, the tensor path and the cause, so a message alone tells the
user what is broken and where, without a traceback.
"""
from __future__ import annotations

import copy
from typing import TypeVar

_E = TypeVar("_E", bound="DeltaCkptError")


class DeltaCkptError(Exception):
    """Root of every error deltackpt raises on purpose."""

    def __init__(self, message: str, *, step: int | None = None, path: str | None = None,
                 cause: str | None = None) -> None:
        self.step = step
        self.path = path
        self.cause = cause or type(self).__name__
        where = []
        if step is not None:
            where.append(f"step {step}")
        if path is not None:
            where.append(repr(path) if path else "the state's root")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)

    def located(self: _E, message: str, *, step: int | None, path: str | None) -> _E:
        """This error again, same type and attributes (a :class:`StorageError`'s ``key``, ...),
        with ``message`` at ``step`` and ``path``: how a layer that knows where adds it."""
        out = copy.copy(self)
        DeltaCkptError.__init__(out, message, step=step, path=path, cause=self.cause)
        return out


class DeltaCkptWarning(UserWarning):
    """Something the user should know that did not stop the operation (e.g. a save that
    started a keyframe because the latest step is damaged)."""


# --- repository and usage ---------------------------------------------------------------------
class RepositoryNotFoundError(DeltaCkptError):
    """The path is not a deltackpt repository (and mode does not allow creating one)."""


class FormatVersionError(DeltaCkptError):
    """The repository or one of its files uses a format version this reader does not know."""


class LocationError(DeltaCkptError, ValueError):
    """A repository location deltackpt cannot open: a URL whose scheme it does not support
    (it is never taken for a local path), or a ``file://`` URL that is not a local path."""


class LockedError(DeltaCkptError):
    """Another writer holds the repository lock."""


class StorageError(DeltaCkptError):
    """A storage service refused an operation for good, or kept failing it after every retry:
    permission or authentication denied, a bad request or configuration, a server that still
    answers 5xx when the retry budget is spent. ``key`` names the object and the message the
    cause (missing objects raise :class:`FileNotFoundError`, as on a local disk)."""

    def __init__(self, message: str, *, key: str | None = None, cause: str | None = None) -> None:
        self.key = key
        super().__init__(message, cause=cause)


class ReadOnlyError(DeltaCkptError):
    """A write was attempted on a repository opened with mode='r' (or already closed)."""


class StepNotFoundError(DeltaCkptError, KeyError):
    """The requested step is not committed in the repository (never saved, or deleted)."""

    __str__ = Exception.__str__


class SelectionError(DeltaCkptError, KeyError):
    """``load(step, select=...)`` named a path that is not in the step's state."""

    __str__ = Exception.__str__


class StepExistsError(DeltaCkptError):
    """A save targeted a step that is already committed."""


class UnsupportedValueError(DeltaCkptError, TypeError):
    """The state holds a value deltackpt cannot store without pickle."""


class CodecError(DeltaCkptError):
    """Unknown codec id, or a codec configuration that cannot be used."""


# --- integrity: the data on disk is not what was written ----------------------------------------
class IntegrityError(DeltaCkptError):
    """Base of every 'the bytes on disk are wrong or missing' error."""


class CorruptFileError(IntegrityError):
    """A metadata file (config, manifest, index) fails its checksum or does not parse."""


class CorruptChunkError(IntegrityError):
    """A chunk's bytes do not hash to its id, or its frame does not decode."""


class MissingChunkError(IntegrityError):
    """A chunk a step needs is in no index, or its pack file is missing or short."""


class BrokenChainError(IntegrityError):
    """A delta's reference step or tensor is missing, or does not match what the delta expects."""


class DigestMismatchError(IntegrityError):
    """A reconstructed tensor or chunk does not hash to the digest taken at save time."""


class PolicyError(DeltaCkptError, ValueError):
    """A write policy, rule or retention option has the wrong type or an out-of-range value;
    the message names the option, the value given and what is accepted."""
