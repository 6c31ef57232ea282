"""Generate the committed chunk-frame fixtures (version 2; needs the C extensions):

    python tests/golden/frames/make.py

Each fixture is ``<name>.frame`` (a frame as a writer stores it), ``<name>.ref`` for a reference
frame (the reference chunk it is coded against), and an entry in ``index.json``: payload length,
word, whether it needs its reference, and the xxh3-128 of the payload. tests/test_frame.py
decodes every frame on each run (with and without the C extensions), so a reader change that
breaks version-2 frames fails there. Rerun only to add a fixture or on a deliberate format
change (with a new frame version). Inputs come from xxh3 in counter mode, not a library RNG.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

from deltackpt.format.frame import encode_frame, needs_reference, parse_frame  # noqa: E402

# the rANS fixtures' input generator (xxh3 in counter mode), loaded by path: both scripts are
# called make.py
_spec = importlib.util.spec_from_file_location(
    "entropy_make", os.path.join(HERE, "..", "entropy", "make.py"))
assert _spec is not None and _spec.loader is not None
_entropy_make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_entropy_make)
_bytes = _entropy_make._bytes


def _normal(seed: int, n: int) -> np.ndarray:
    """float32 values of many magnitudes (Box-Muller on hash bytes, then a wide scale)."""
    u = (_bytes(seed, 8 * n).view(np.uint32).astype(np.float64) + 0.5) / 2**32
    z = np.sqrt(-2 * np.log(u[:n])) * np.cos(2 * np.pi * u[n:])
    return (z * np.exp(8 * u[:n] - 6)).astype(np.float32)


def cases() -> dict[str, tuple[np.ndarray, int, np.ndarray | None]]:
    n = 1 << 15
    ref = _normal(1, n)
    step = (_normal(2, n) * 1e-3).astype(np.float32)  # one absolute step size, as Adam's
    cur = (ref + np.abs(step) * np.sign(_normal(3, n))).astype(np.float32)
    big = (ref + _normal(4, n)).astype(np.float32)
    return {
        "keyframe_f32": (ref.view(np.uint8), 4, None),
        "pxor_f32_contexts": (cur.view(np.uint8), 4, ref.view(np.uint8)),
        "pxor_f32_mixed": (big.view(np.uint8), 4, ref.view(np.uint8)),
        "pxor_bf16": (cur.astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16)
                      .view(np.uint8), 2,
                      ref.view(np.uint32).__rshift__(16).astype(np.uint16).view(np.uint8)),
        "word1_runs": (np.repeat(_bytes(5, 64), 512), 1, None),
        "word4_repeats": (np.tile(_bytes(6, 1004), 64), 4, None),  # zstd's matches win
    }


def main() -> None:
    index = {}
    for name, (payload, word, ref) in cases().items():
        frame = encode_frame(np.ascontiguousarray(payload), word, 1, ref=ref)
        f = parse_frame(frame, payload.size)
        with open(os.path.join(HERE, f"{name}.frame"), "wb") as fh:
            fh.write(frame)
        if needs_reference(frame):
            with open(os.path.join(HERE, f"{name}.ref"), "wb") as fh:
                fh.write(np.ascontiguousarray(ref).tobytes())
        index[name] = {"n": int(payload.size), "word": word,
                       "needs_reference": needs_reference(frame),
                       "planes": [[p.method, p.mode, p.context] for p in f.planes],
                       "payload_xxh3_128": xxhash.xxh3_128(payload.tobytes()).hexdigest()}
    with open(os.path.join(HERE, "index.json"), "w") as fh:
        json.dump(index, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
