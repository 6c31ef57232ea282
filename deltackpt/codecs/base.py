"""The codec seam: a codec turns one chunk (and optionally its reference chunk) into a payload.

Modelled on numcodecs: a ``codec_id``, a JSON config (``get_config``/``from_config``) and a
registry, so a manifest names each codec by config and a new codec is one new module. The payload
is then framed (byte planes + zstd, see :mod:`deltackpt.format.frame`) and content-addressed by the store.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import CodecError
from ..format.dtypes import ElementType

if TYPE_CHECKING:
    from ..format.frame import Frame

_REGISTRY: dict[str, type[Codec]] = {}


class Codec(ABC):
    """Encode a chunk of raw element bytes into a payload and back.

    ``data`` and ``ref`` are 1-D uint8 arrays holding whole elements of ``etype``. Lossless
    codecs must return exactly ``data`` from ``decode``; lossy codecs (``lossless = False``)
    must be deterministic, so a digest of their output taken at save time can be verified.

    Whatever the engine does differently for some codecs is declared here (the class
    attributes and the methods with defaults below), never decided by comparing codec ids;
    :class:`deltackpt.testing.codecs.CodecTests` checks a codec keeps what it declares.
    """

    codec_id: ClassVar[str]
    lossless: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = False
    #: the payload is the chunk's own bytes (``decode`` returns it unchanged): a reader decodes
    #: a self-contained frame of it straight into the output, and a record whose chunk id is
    #: its digest was already checked by the store, which hashes what the frame decodes to
    stores_value: ClassVar[bool] = False
    #: the payload is the chunk and the *frame* is coded against the reference chunk's planes
    #: (``encode_frame(..., ref=)``); such frames are identified by the hash of their bytes
    frame_reference: ClassVar[bool] = False
    #: a chain of this codec's links may be replayed plane by plane, in byte-plane space, as
    #: :meth:`replay_modes` says (XOR commutes with byte-plane grouping): the payload is the
    #: chunk's length and its frame's planes are the chunk's, or their XOR with the reference's
    plane_replay: ClassVar[bool] = False
    #: the name of the option holding the tensor's row length, for a codec that views a chunk
    #: as whole rows of a matrix (``lowrank``: ``"cols"``): the writer aligns such a tensor's
    #: chunks to rows and fills the option in where a policy leaves it 0. None: flat chunks
    row_option: ClassVar[str | None] = None

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        extra = set(config) - {"id"}
        if extra:
            raise CodecError(f"codec {cls.codec_id!r} takes no options, got {sorted(extra)}")
        return cls()

    @abstractmethod
    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        """Return ``(payload, word)``: a 1-D uint8 payload and its byte-plane width."""

    def encode_into(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    out: np.ndarray) -> tuple[np.ndarray, int]:
        """:meth:`encode`, free to build the payload in ``out`` (a scratch buffer of
        ``data.size`` bytes the writer reuses chunk after chunk) and return a view of it."""
        return self.encode(data, ref, etype)

    @abstractmethod
    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        """Return the chunk's ``nbytes`` raw bytes as a 1-D uint8 array."""

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        """The most payload bytes that can decode into a chunk of ``nbytes`` (None: no bound).

        Readers refuse an index entry declaring more before reading or decompressing anything,
        so a hostile repository cannot make them inflate a small chunk into gigabytes.
        """
        return None

    def min_payload(self, nbytes: int, etype: ElementType) -> int:
        """The fewest payload bytes that can decode into a chunk of ``nbytes``."""
        return 0

    def supports(self, etype: ElementType) -> bool:
        """Whether chunks of ``etype`` are this codec's to encode at all (``encode`` may still
        decline one chunk with :class:`NotApplicable`). The writer aligns chunks to rows only
        for a row codec that supports the tensor's type."""
        return True

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        """Per element of ``data``, the most the decoded ``payload`` (which ``encode(data,
        ref)`` returned) may differ from it, in the values' own units (float64); zeros for a
        lossless codec. None: a lossy codec that declares no bound (its error is only
        measured, and recorded in the manifest)."""
        return np.zeros(data.size // max(1, etype.itemsize)) if self.lossless else None

    def wants_weights(self) -> bool:
        """Whether the encoder spends its error by per-element weights of the loss's
        sensitivity (:meth:`weighted`); the writer pairs a tensor with them where the state
        says how (see :mod:`deltackpt.engine.sensitivity`). Decoding never depends on them."""
        return False

    def weighted_energy(self, data: np.ndarray, ref: np.ndarray, etype: ElementType,
                        weights: np.ndarray | None) -> float:
        """For :meth:`wants_weights` codecs: the sum over the chunk of weight x the squared
        change the encoder would code (weights None: all 1); the writer sums it over a rule's
        tensors into the rule's weighted RMS change, the unit of :meth:`weighted`."""
        raise NotImplementedError(f"codec {self.codec_id!r} takes no weights")

    def weighted(self, weights: np.ndarray | None, unit: float) -> Codec:
        """The encoder for one chunk given its ``weights`` (float64 per element, None: all 1)
        and its rule's weighted RMS change ``unit`` (> 0); itself where it takes none."""
        return self

    def replay_modes(self, frame: Frame) -> list[int]:
        """For a :attr:`plane_replay` codec, how the byte planes of a payload ``frame`` rebuild
        the chunk's planes, one mode per plane: ``MODE_LITERAL`` (the plane is the chunk's own)
        or ``MODE_XOR`` (XOR it onto the reference chunk's plane). A chain of such links is
        replayed plane by plane, each plane only from the newest link storing it literally.
        The default, the frame's own modes, is right where the payload is the chunk."""
        return [plane.mode for plane in frame.planes]

    def decode_inplace(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                       nbytes: int) -> np.ndarray:
        """:meth:`decode`, free to overwrite (and return) ``payload``'s memory.

        The reader owns each payload it decodes; codecs whose inverse is elementwise override
        this to spare an allocation and a pass over memory per chain link.
        """
        return self.decode(payload, ref, etype, nbytes)

    def decode_into(self, payload: np.ndarray, ref: np.ndarray | None, out: np.ndarray,
                    etype: ElementType) -> None:
        """Write the decoded chunk into ``out``, which may be the very array ``ref`` is (the
        reader applies a chain of deltas in place); may overwrite ``payload``."""
        if ref is not None and np.shares_memory(ref, out):
            ref = ref.copy()
        out[...] = self.decode_inplace(payload, ref, etype, out.size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available under its ``codec_id``."""
    existing = _REGISTRY.get(cls.codec_id)
    if existing is not None and existing is not cls:
        raise CodecError(f"codec id {cls.codec_id!r} is already registered by {existing}")
    _REGISTRY[cls.codec_id] = cls
    return cls


def unregister_codec(codec_id: str) -> None:
    """Remove the codec registered under ``codec_id`` (for tests and plugins that register one
    for a while); repositories naming it can no longer be read until it is registered again."""
    if _REGISTRY.pop(codec_id, None) is None:
        raise CodecError(f"codec id {codec_id!r} is not registered")


def get_codec(config: dict[str, Any] | str) -> Codec:
    """Instantiate a codec from its JSON config (or a bare id)."""
    if isinstance(config, str):
        config = {"id": config}
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError(f"codec config must be an object with a string 'id', got {config!r}")
    cls = _REGISTRY.get(config["id"])
    if cls is None:
        raise CodecError(f"unknown codec {config['id']!r}; known: {sorted(_REGISTRY)}")
    return cls.from_config(config)


def registered_codecs() -> dict[str, type[Codec]]:
    """Every registered codec class by id (a copy)."""
    return dict(_REGISTRY)


def check_reference(codec: Codec, data_len: int, ref: np.ndarray | None) -> np.ndarray:
    if ref is None:
        raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
    if ref.size != data_len:
        raise CodecError(f"codec {codec.codec_id!r}: reference has {ref.size} bytes, "
                         f"chunk has {data_len}")
    return ref


class NotApplicable(Exception):
    """Raised by ``encode`` when a codec cannot (or should not) handle this chunk, for example
    a quantizer given non-finite values; the writer then stores the chunk losslessly."""
