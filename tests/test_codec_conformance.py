"""Every registered codec against the shipped conformance kit (:mod:`deltackpt.testing.codecs`),
and proof that the kit fails a codec that breaks its contract."""
from __future__ import annotations

import sys
from typing import Any, ClassVar

import numpy as np
import pytest

from deltackpt.codecs import Codec, register_codec, registered_codecs, unregister_codec
from deltackpt.codecs.quant import Quant
from deltackpt.codecs.raw import Raw
from deltackpt.codecs.xor import Xor
from deltackpt.format.dtypes import ElementType, torch_type
from deltackpt.testing.codecs import CodecTests, default_configs

#: option variants of the built-in codecs, besides every registered codec's defaults
VARIANTS: list[dict[str, Any]] = [
    {"id": "sparse", "block": 1},
    {"id": "sparse", "block": 7},
    {"id": "quant", "bits": 4, "block": 16},
    {"id": "quant", "bits": 2, "block": 5, "prune": 0.5},
    {"id": "quant", "bits": 8, "domain": "log"},
    {"id": "quant", "bits": 8, "block": 64, "step": 0.05},
    {"id": "quant", "bits": 8, "block": 64, "step": 1.5, "unit": "block"},
    {"id": "quant", "bits": 8, "block": 32, "step": 2.0, "unit": "block"},
    {"id": "quant", "bits": 2, "block": 5, "step": 0.3, "prune": 0.5, "unit": "block"},
    {"id": "quant", "bits": 4, "block": 16, "step": 0.2, "domain": "log"},
    {"id": "quant", "bits": 8, "block": 16, "step": 1.5, "unit": "chunk"},
    {"id": "quant", "bits": 4, "block": 8, "step": 0.5, "unit": "chunk", "domain": "log"},
    {"id": "quant", "bits": 8, "block": 16, "step": 1.0, "unit": "block", "predict": "scaled"},
    {"id": "quant", "bits": 8, "block": 16, "step": 1.5, "unit": "weighted", "predict": "scaled"},
    {"id": "quant", "bits": 2, "block": 5, "prune": 0.5, "predict": "scaled"},
    {"id": "quant", "bits": 8, "block": 16, "step": 0.5, "domain": "log", "rounding": "stochastic"},
    {"id": "quant", "bits": 2, "block": 5, "rounding": "stochastic", "predict": "scaled"},
    {"id": "quant", "bits": 8, "block": 16, "step": 0.5, "domain": "log", "predict": "scaled"},
    {"id": "quant", "bits": 4, "block": 7, "domain": "log", "predict": "scaled"},
    {"id": "quant", "bits": 8, "block": 16, "step": 1.0, "unit": "block", "predict": "scaled",
     "scales": "log"},
    {"id": "quant", "bits": 2, "block": 5, "prune": 0.5, "scales": "log"},
    {"id": "quant", "bits": 8, "block": 16, "step": 0.5, "domain": "log", "predict": "scaled",
     "scales": "log"},
    {"id": "quant", "bits": 4, "block": 3, "step": 0.7, "unit": "chunk", "scales": "log"},
    {"id": "squant", "bits": 2, "block": 5, "keep": 0.5},
    {"id": "squant", "bits": 8, "block": 16, "keep": 1.0},
    {"id": "squant", "bits": 4, "block": 16, "keep": 0.25, "levels": "log"},
    {"id": "squant", "bits": 2, "block": 7, "keep": 0.3, "levels": "log"},
    {"id": "squant", "bits": 4, "keep": 0.5, "domain": "log"},
    {"id": "lowrank", "rank": 1},
    {"id": "lowrank", "rank": 1, "residual_bits": 4, "block": 16},
    {"id": "lowrank", "energy": 0.99, "residual_bits": 8},
]


class TestRegisteredCodecs(CodecTests):
    """Every codec registered when the tests are collected (a new one is covered with its
    defaults without being named here), plus option variants."""

    configs = default_configs() + [v for v in VARIANTS if v["id"] in registered_codecs()]


def test_every_registered_codec_is_covered() -> None:
    assert {c["id"] for c in TestRegisteredCodecs.configs} == set(registered_codecs())


def test_importing_deltackpt_does_not_import_pytest() -> None:
    import subprocess
    code = "import sys, deltackpt, deltackpt.codecs; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


class BrokenXor(Xor):
    """``xor`` whose in-place decode forgets that ``out`` may be its reference."""

    codec_id = "broken-xor-for-the-kit"

    def decode_into(self, payload: np.ndarray, ref: np.ndarray | None, out: np.ndarray,
                    etype: ElementType) -> None:
        out[...] = 0  # wipes the reference when out is ref
        super().decode_into(payload, ref, out, etype)


class BoastfulQuant(Quant):
    """``quant`` declaring half the error it makes."""

    codec_id = "boastful-quant-for-the-kit"

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        bound = super().error_bound(data, ref, etype, payload)
        return None if bound is None else bound / 2


class ShortRaw(Raw):
    """``raw`` declaring payloads shorter than it writes."""

    codec_id = "short-raw-for-the-kit"

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return nbytes - 1


@pytest.mark.parametrize(("cls", "fails"), [
    (BrokenXor, ["test_decode_into_onto_its_reference"]),
    (BoastfulQuant, ["test_round_trip"]),
    (ShortRaw, ["test_payload_within_declared_bounds"]),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_the_kit_fails_a_broken_codec(cls: type[Codec], fails: list[str]) -> None:
    """A codec registered here that breaks one promise fails the kit's check of it, and only
    that one: the kit is not vacuous."""
    import torch

    class Kit(CodecTests):
        configs: ClassVar[list[dict[str, Any]]] = [{"id": cls.codec_id}]
        etypes: ClassVar[list[ElementType]] = [torch_type(torch.float32),
                                               torch_type(torch.bfloat16),
                                               torch_type(torch.uint8)]

    register_codec(cls)
    try:
        kit = Kit()
        failed = []
        for name in sorted(n for n in dir(kit) if n.startswith("test_")):
            try:
                getattr(kit, name)(dict(Kit.configs[0]))
            except AssertionError:
                failed.append(name)
        assert failed == fails
    finally:
        unregister_codec(cls.codec_id)
    assert cls.codec_id not in registered_codecs()
