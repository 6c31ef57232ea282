"""Generate the committed rANS body fixtures (run from anywhere; needs the C extension):

    python tests/golden/entropy/make.py

Each fixture is ``<name>.body`` (an encoded plane), ``<name>.ctx`` when it has contexts, and an
entry in ``index.json``: plane length, context count, block size, and the xxh3-128 of the plane
and of the body. tests/test_entropy.py decodes every body with every decoder on each run, so a
reader change that breaks version-1 bodies fails there. Only rerun this when the body format
changes ON PURPOSE (with a new version byte), or to add a fixture. The inputs are fixed by the
code below (bytes from a counter-mode hash, not a library RNG), so reruns give the same files.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

from deltackpt.format import entropy  # noqa: E402


def _bytes(seed: int, n: int) -> np.ndarray:
    """n pseudo-random bytes from xxh3-128 in counter mode: stable across numpy versions."""
    out = b"".join(xxhash.xxh3_128(i.to_bytes(8, "little"), seed=seed).digest()
                   for i in range(-(-n // 16)))
    return np.frombuffer(out[:n], np.uint8).copy()


def _skewed(seed: int, n: int, levels: int) -> np.ndarray:
    """Values 0..levels-1 with probability halving per level (like an exponent delta)."""
    r = _bytes(seed, n)
    return np.minimum(np.floor(-np.log2((r.astype(np.int64) + 1) / 257.0)),
                      levels - 1).astype(np.uint8)


def fixtures() -> dict[str, tuple[np.ndarray, np.ndarray | None, int, int]]:
    """name -> (plane, ctx or None, nctx, block_log2)."""
    fx: dict[str, tuple[np.ndarray, np.ndarray | None, int, int]] = {}
    fx["empty"] = (np.empty(0, np.uint8), None, 1, 16)
    fx["one_byte"] = (np.array([0x3F], np.uint8), None, 1, 16)
    fx["order0_skewed"] = (_skewed(1, 3000, 8), None, 1, 10)
    mixed = np.concatenate([np.full(1024, 0x7F, np.uint8), _bytes(2, 1024),
                            _skewed(3, 1024, 4) + 0x3C, _skewed(4, 100, 3)])
    fx["order0_const_raw_rans"] = (mixed, None, 1, 10)
    every = _skewed(5, 4096, 8)
    every[:256] = np.arange(256, dtype=np.uint8)  # all 256 symbols: the bitmap table form
    fx["order0_all_symbols"] = (every, None, 1, 12)
    ctx = _bytes(6, 5000) % 4
    plane = ((_skewed(7, 5000, 3) + ctx * 3) ^ np.where(ctx == 3, 0, 0x80)).astype(np.uint8)
    plane[ctx == 2] = 0x40  # one context constant: a one-symbol table
    fx["ctx4"] = (plane, ctx.astype(np.uint8), 4, 11)
    ctx16 = (_bytes(8, 3333) % 16).astype(np.uint8)
    fx["ctx16_predictive"] = ((ctx16 * 16 + _skewed(9, 3333, 2)).astype(np.uint8), ctx16, 16, 10)
    return fx


def main() -> int:
    if not entropy.can_encode():
        print("needs the C extension (python setup.py build_ext --inplace)", file=sys.stderr)
        return 1
    index = {}
    for name, (plane, ctx, nctx, block_log2) in fixtures().items():
        body = entropy.encode(plane, ctx, nctx, block_log2=block_log2)
        with open(os.path.join(HERE, f"{name}.body"), "wb") as f:
            f.write(body)
        if ctx is not None:
            with open(os.path.join(HERE, f"{name}.ctx"), "wb") as f:
                f.write(ctx.tobytes())
        index[name] = {"n": int(plane.size), "nctx": nctx, "block_log2": block_log2,
                       "plane_xxh3": xxhash.xxh3_128_hexdigest(plane.tobytes()),
                       "body_xxh3": xxhash.xxh3_128_hexdigest(body), "body_bytes": len(body)}
    with open(os.path.join(HERE, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
