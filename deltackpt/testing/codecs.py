"""The codec conformance kit: what every :class:`~deltackpt.codecs.Codec` must do, as pytest tests.

Subclass :class:`CodecTests` in a test module, name the configs it covers, and pytest runs every
check once per config (zarr's store tests work the same way)::

    from deltackpt.testing.codecs import CodecTests

    class TestMyCodec(CodecTests):
        configs = [{"id": "mycodec"}, {"id": "mycodec", "level": 3}]

Each check runs over every element type the codec :meth:`~Codec.supports` (by default every
storable torch dtype and a spread of numpy ones, see :func:`element_types`), chunks of several
shapes, and four kinds of input (unchanged, a small low-rank change, a small change of positive
values, arbitrary bytes), and
checks: the config round-trips through JSON; encode is deterministic (with torch's generator
seeded: see :func:`seeded`), leaves its inputs alone and agrees with ``encode_into``; every
decode entry point (``decode``, ``decode_inplace``, ``decode_into`` into a slice and onto the
reference itself) gives the same bytes; lossless codecs restore every bit, lossy ones stay
within their :meth:`~Codec.error_bound`; payloads keep the declared bounds and a wrong-sized
payload or reference is refused; and what the engine relies on (``stores_value``,
``plane_replay``, ``frame_reference``) holds.

Importing this module imports pytest, numpy and torch; ``import deltackpt`` imports none of it.
"""
from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from ..codecs import Codec, NotApplicable, get_codec, registered_codecs
from ..codecs.floats import from_float, is_float, to_float
from ..errors import CodecError, CorruptChunkError
from ..format.dtypes import TORCH_DTYPES, ElementType, numpy_type, torch_type
from ..format.frame import MODE_LITERAL, MODE_XOR, decode_plane, encode_frame, parse_frame
from ..format.planes import merge, split
from ..runtime.lazy import torch

#: numpy element types tried besides torch's: every kind and width, and a big-endian order
NUMPY_TYPES = ("?", "i1", "u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8",
               "<c8", "<c16", "<M8[ns]", "<m8[s]", ">i4", ">f8")
#: chunk shapes tried, (rows, row length): one element, an odd count, and whole matrices
SHAPES = ((1, 1), (1, 7), (16, 8), (40, 13))
PATTERNS = ("unchanged", "small change", "positive change", "arbitrary bytes")


def element_types() -> list[ElementType]:
    """Every storable torch element type (:data:`~deltackpt.format.dtypes.TORCH_DTYPES`), then
    the numpy types of :data:`NUMPY_TYPES`."""
    return [torch_type(d) for d in TORCH_DTYPES.values()] + \
        [numpy_type(np.dtype(n)) for n in NUMPY_TYPES]


def default_configs() -> list[dict[str, Any]]:
    """The default config of every registered codec."""
    return [cls().get_config() for _, cls in sorted(registered_codecs().items())]


@dataclass(frozen=True, eq=False)
class Case:
    """One encoded input: the codec (its row option filled in), the chunk and its reference
    (read-only), and what encode returned (``declined``: it raised NotApplicable instead)."""

    codec: Codec
    etype: ElementType
    data: np.ndarray
    ref: np.ndarray | None
    payload: np.ndarray
    word: int
    label: str
    declined: bool = False

    def copies(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Writable copies of the chunk and its reference."""
        return self.data.copy(), None if self.ref is None else self.ref.copy()

    def same_ref(self, ref: np.ndarray | None) -> bool:
        """Whether ``ref`` (a copy handed to the codec) still holds the reference."""
        if ref is None or self.ref is None:
            return ref is None and self.ref is None
        return np.array_equal(ref, self.ref)


def _values(rng: np.random.Generator, etype: ElementType, rows: int, cols: int,
            pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(chunk, reference) raw bytes of ``rows × cols`` elements of ``etype``."""
    n, size = rows * cols, rows * cols * etype.itemsize
    ref = rng.integers(0, 256, size, dtype=np.uint8)
    if pattern == "arbitrary bytes":
        return rng.integers(0, 256, size, dtype=np.uint8), ref
    if pattern == "unchanged":
        return ref.copy(), ref
    if is_float(etype) and pattern == "positive change":  # as Adam's second moments change
        ref = from_float(np.abs(rng.standard_normal(n)) + 1e-3, etype).copy()
        factor = np.exp(0.1 * rng.standard_normal(n))
        return from_float(to_float(ref, etype) * factor, etype).copy(), ref
    if is_float(etype):  # finite values with a low-rank change, as training makes them
        ref = from_float(rng.standard_normal(n), etype).copy()
        delta = 0.1 * np.outer(rng.standard_normal(rows), rng.standard_normal(cols))
        delta = delta.reshape(-1) + 1e-3 * rng.standard_normal(n)
        return from_float(to_float(ref, etype) + delta, etype).copy(), ref
    data = ref.copy()  # a tenth of the elements get new bytes
    words = data.reshape(n, etype.itemsize)
    changed = rng.random(n) < 0.1
    words[changed] = rng.integers(0, 256, (int(changed.sum()), etype.itemsize), dtype=np.uint8)
    return data, ref


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """torch's random generator seeded, and restored afterwards: a codec may draw from it
    (``lowrank``'s randomized SVD), so the kit compares encodes under the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _with_rows(config: Mapping[str, Any], cols: int) -> Codec:
    """The codec of ``config``, with its row option filled in as the writer fills it."""
    codec = get_codec(dict(config))
    option = codec.row_option
    if option is None or config.get(option):
        return codec
    return get_codec({**config, option: cols})


@functools.lru_cache(maxsize=64)
def _cases(config_json: str, etypes: tuple[ElementType, ...],
           shapes: tuple[tuple[int, int], ...], seed: int) -> tuple[Case, ...]:
    config = json.loads(config_json)
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        codec = _with_rows(config, shape[1])
        for et in etypes:
            if not codec.supports(et):
                continue
            for pattern in PATTERNS:
                data, ref = _values(rng, et, *shape, pattern)
                use_ref = ref if codec.uses_reference else None
                label = f"{codec!r} on {et.kind} {et.name} {shape[0]}x{shape[1]}, {pattern}"
                try:
                    with seeded(seed):
                        payload, word = codec.encode(data.copy(), None if use_ref is None
                                                     else use_ref.copy(), et)
                    payload = np.array(payload, dtype=np.uint8, copy=True)
                    declined = False
                except NotApplicable:
                    payload, word, declined = np.zeros(0, np.uint8), 0, True
                for a in (data, use_ref, payload):
                    if a is not None:
                        a.flags.writeable = False
                out.append(Case(codec, et, data, use_ref, payload, int(word), label, declined))
    return tuple(out)


class CodecTests:
    """The shared checks; a subclass sets :attr:`configs` (and may narrow :attr:`etypes` or
    :attr:`shapes`). Its name does not start with ``Test``, so pytest collects only subclasses.
    """

    #: the codec configs to check, each as a manifest names it (a row codec's row option may be
    #: left out: it is filled in per chunk shape, as the writer does)
    configs: ClassVar[Sequence[Mapping[str, Any]]] = ()
    #: element types to try (those the codec does not support are checked to be declined);
    #: None: :func:`element_types`
    etypes: ClassVar[Sequence[ElementType] | None] = None
    #: chunk shapes to try, (rows, row length)
    shapes: ClassVar[Sequence[tuple[int, int]]] = SHAPES
    seed: ClassVar[int] = 0

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize every check by :attr:`configs` (pytest calls this on the class)."""
        if "config" in metafunc.fixturenames:
            configs = [dict(c) for c in self.configs]
            metafunc.parametrize("config", configs,
                                 ids=[json.dumps(c, sort_keys=True) for c in configs])

    # ------------------------------------------------------------------ helpers
    def element_types(self) -> tuple[ElementType, ...]:
        return tuple(self.etypes if self.etypes is not None else element_types())

    def cases(self, config: Mapping[str, Any]) -> tuple[Case, ...]:
        """Every input tried for ``config``, encoded (cached across the checks)."""
        shapes = tuple((rows, cols) for rows, cols in self.shapes)
        return _cases(json.dumps(dict(config), sort_keys=True), self.element_types(), shapes,
                      self.seed)

    def encoded(self, config: Mapping[str, Any]) -> list[Case]:
        """The cases the codec encoded (it must encode at least one)."""
        done = [c for c in self.cases(config) if not c.declined]
        assert done, f"{config}: the codec declined every input the kit tried"
        return done

    @staticmethod
    def decode(case: Case, payload: np.ndarray | None = None) -> np.ndarray:
        """``case``'s payload decoded with :meth:`Codec.decode`, on copies."""
        p = case.payload if payload is None else payload
        ref = None if case.ref is None else case.ref.copy()
        return np.asarray(case.codec.decode(p.copy(), ref, case.etype, case.data.size))

    # ------------------------------------------------------------------ config and registry
    def test_config_round_trips_through_json(self, config: dict[str, Any]) -> None:
        codec = get_codec(config)
        cfg = codec.get_config()
        assert cfg["id"] == codec.codec_id == config["id"]
        again = get_codec(json.loads(json.dumps(cfg)))
        assert type(again) is type(codec) and again == codec and again.get_config() == cfg
        assert hash(again) == hash(codec)
        assert registered_codecs()[codec.codec_id] is type(codec)

    def test_unknown_option_is_refused(self, config: dict[str, Any]) -> None:
        with pytest.raises(CodecError):
            get_codec({**config, "no such option": 1})

    def test_declared_attributes_are_consistent(self, config: dict[str, Any]) -> None:
        codec = get_codec(config)
        if codec.frame_reference:  # its frames are coded against the reference chunk
            assert codec.uses_reference, "frame_reference needs uses_reference"
        if codec.row_option is not None:
            assert codec.row_option in codec.get_config(), "the row option must be an option"

    # ------------------------------------------------------------------ encode
    def test_encodes_something(self, config: dict[str, Any]) -> None:
        self.encoded(config)

    def test_encode_leaves_its_inputs_and_is_deterministic(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            data, ref = case.copies()
            with seeded(self.seed):
                payload, word = case.codec.encode(data, ref, case.etype)
            assert np.array_equal(data, case.data), f"{case.label}: encode changed the chunk"
            assert case.same_ref(ref), \
                f"{case.label}: encode changed the reference"
            assert isinstance(payload, np.ndarray) and payload.dtype == np.uint8 \
                and payload.ndim == 1, f"{case.label}: the payload is not a 1-D uint8 array"
            assert word == case.word and np.array_equal(payload, case.payload), \
                f"{case.label}: encode is not deterministic"

    def test_encode_into_agrees_with_encode(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            data, ref = case.copies()
            scratch = np.full(case.data.size, 0x5A, np.uint8)  # the writer's reused buffer
            with seeded(self.seed):
                got, word = case.codec.encode_into(data, ref, case.etype, scratch)
            got = np.array(got, np.uint8)  # before anything reuses the scratch buffer
            expected, expected_word = case.payload, case.word
            assert np.array_equal(data, case.data) and case.same_ref(ref), \
                f"{case.label}: encode_into changed its inputs"
            assert word == expected_word and np.array_equal(got, expected), \
                f"{case.label}: encode_into and encode disagree"

    # ------------------------------------------------------------------ decode
    def test_decode_entry_points_agree(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            codec, et, n = case.codec, case.etype, case.data.size
            payload, ref = case.payload.copy(), None if case.ref is None else case.ref.copy()
            a = codec.decode(payload, ref, et, n)
            assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (n,), \
                f"{case.label}: decode returned {type(a).__name__} {getattr(a, 'shape', '')}"
            a = a.copy()
            assert np.array_equal(payload, case.payload), f"{case.label}: decode changed the payload"
            assert case.same_ref(ref), f"{case.label}: decode changed the reference"
            b = codec.decode_inplace(case.payload.copy(), case.copies()[1], et, n)
            assert np.array_equal(b, a), f"{case.label}: decode_inplace differs from decode"
            # into a slice of a larger output, as the reader rebuilds a tensor chunk by chunk
            big = np.full(n + 16, 0xA5, np.uint8)
            codec.decode_into(case.payload.copy(), case.copies()[1], big[8:8 + n], et)
            assert np.array_equal(big[8:8 + n], a), f"{case.label}: decode_into differs"
            assert (big[:8] == 0xA5).all() and (big[8 + n:] == 0xA5).all(), \
                f"{case.label}: decode_into wrote outside its output"

    def test_decode_into_onto_its_reference(self, config: dict[str, Any]) -> None:
        """The reader applies a chain of deltas in place: ``out`` is the very array ``ref`` is."""
        for case in self.encoded(config):
            if case.ref is None:
                continue
            expected = self.decode(case)
            big = np.full(case.data.size + 16, 0xA5, np.uint8)
            out = big[8:8 + case.data.size]
            out[...] = case.ref
            case.codec.decode_into(case.payload.copy(), out, out, case.etype)
            assert np.array_equal(out, expected), \
                f"{case.label}: decode_into onto its own reference differs from decode"
            assert (big[:8] == 0xA5).all() and (big[8 + case.data.size:] == 0xA5).all(), \
                f"{case.label}: decode_into wrote outside its output"

    def test_round_trip(self, config: dict[str, Any]) -> None:
        """Lossless: every bit of every supported type. Lossy: within the declared bound."""
        for case in self.encoded(config):
            got = self.decode(case)
            if case.codec.lossless:
                assert np.array_equal(got, case.data), f"{case.label}: not restored bit-exactly"
                continue
            bound = case.codec.error_bound(*case.copies(), case.etype, case.payload.copy())
            if bound is None:
                continue
            x = to_float(case.data, case.etype).astype(np.float64)
            y = to_float(got, case.etype).astype(np.float64)
            assert bound.shape == x.shape, f"{case.label}: error_bound has the wrong shape"
            err = np.abs(y - x)
            bad = ~(err <= bound)  # NaN fails too
            assert not bad.any(), (
                f"{case.label}: {int(bad.sum())} element(s) beyond the declared error, e.g. "
                f"error {err[bad][0]!r} > bound {bound[bad][0]!r}")

    # ------------------------------------------------------------------ payload bounds
    def test_payload_within_declared_bounds(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            codec, n, size = case.codec, case.data.size, case.payload.size
            low, high = codec.min_payload(n, case.etype), codec.max_payload(n, case.etype)
            assert low <= size, f"{case.label}: payload {size} < min_payload {low}"
            assert high is None or size <= high, f"{case.label}: payload {size} > max_payload {high}"
            assert case.word >= 1 and size % case.word == 0, \
                f"{case.label}: payload of {size} bytes is not whole words of {case.word}"

    def test_wrong_payload_size_is_corrupt(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            longer = np.append(case.payload, np.uint8(0))
            shorter = [case.payload[:-1]] if case.payload.size else []
            for wrong in [longer, *shorter]:
                with pytest.raises(CorruptChunkError):
                    self.decode(case, wrong)
                    pytest.fail(f"{case.label}: a {wrong.size}-byte payload decoded")

    def test_missing_or_wrong_reference_is_refused(self, config: dict[str, Any]) -> None:
        for case in self.encoded(config):
            if case.ref is None:
                continue
            codec, et, n = case.codec, case.etype, case.data.size
            for bad in (None, np.append(case.ref, case.ref[:et.itemsize])):
                with pytest.raises(CodecError):
                    codec.encode(case.data.copy(), bad, et)
                    pytest.fail(f"{case.label}: encode took a bad reference")
                with pytest.raises(CodecError):
                    codec.decode(case.payload.copy(), bad, et, n)
                    pytest.fail(f"{case.label}: decode took a bad reference")

    def test_unsupported_types_are_declined(self, config: dict[str, Any]) -> None:
        """The writer tries a rule's codec on any chunk: one it cannot take is declined."""
        rng = np.random.default_rng(self.seed)
        codec = get_codec(config)
        for et in self.element_types():
            if codec.supports(et):
                continue
            data, ref = _values(rng, et, 4, 4, "small change")
            with pytest.raises(NotApplicable):
                codec.encode(data, ref if codec.uses_reference else None, et)
                pytest.fail(f"{codec!r} encoded {et.name}, which it says it does not support")

    # ------------------------------------------------------------------ what the engine relies on
    def test_stores_value(self, config: dict[str, Any]) -> None:
        """``stores_value``: the payload is the chunk, and decodes as itself."""
        for case in self.encoded(config):
            if case.codec.stores_value:
                assert np.array_equal(case.payload, case.data), \
                    f"{case.label}: stores_value, but the payload is not the chunk"
                assert np.array_equal(self.decode(case), case.data), case.label

    def test_plane_replay(self, config: dict[str, Any]) -> None:
        """``plane_replay``: the frame's planes, XORed onto the reference's where
        :meth:`Codec.replay_modes` says, regroup into the chunk."""
        for case in self.encoded(config):
            codec = case.codec
            if not codec.plane_replay:
                continue
            n = case.data.size
            assert case.payload.size == n, f"{case.label}: plane_replay needs a chunk-sized payload"
            frame = parse_frame(encode_frame(case.payload, case.word, 1,
                                             ref=case.ref if codec.frame_reference else None), n)
            p = len(frame.planes)
            modes = codec.replay_modes(frame)
            assert len(modes) == p and set(modes) <= {MODE_LITERAL, MODE_XOR}, case.label
            refp = None if case.ref is None else split(case.ref, p, np.empty(n, np.uint8))
            planes = []
            for k in range(p):
                plane = np.array(decode_plane(frame, k, None if refp is None else refp[p - 1]))
                if modes[k] == MODE_XOR:
                    assert refp is not None, f"{case.label}: an XOR plane without a reference"
                    plane ^= refp[k]
                planes.append(plane)
            got = merge(planes, p, np.empty(n, np.uint8))
            assert np.array_equal(got, case.data), \
                f"{case.label}: replaying its planes does not rebuild the chunk"

