"""Generate the committed golden fixtures under tests/golden/ (run from anywhere):

    python tests/golden/make_golden.py            # everything (repository + codec fixtures)
    python tests/golden/make_golden.py --codecs   # codec fixtures only (e.g. after adding one)

Only rerun this when the on-disk format changes ON PURPOSE (a new format version gets a new
directory, v3/, ...; old ones stay so every later reader keeps restoring them), or to add the
fixture of a newly registered codec. It writes the directory of the version this deltackpt
writes (VERSION) and never touches older ones. Everything is deterministic (fixed seeds, one
writer thread) except what the format itself randomises: manifest timestamps, txn ids and pack
ids. Codec fixtures are append-only: cases already committed stay as stored, new ones (a new
codec, a new option variant) are added after them.

Layout:
  v1/repo/                     written by deltackpt before manifest version 2 (JSON manifests,
                               version 1); kept as committed, never regenerated
  v2/repo/                     the same phases and states written by this deltackpt (binary
                               manifests, version 2; chunk frames version 2, rANS-coded planes;
                               the same chunk ids as v1, config as in v1)
  v<N>/expected/tensors.safetensors
  v<N>/expected/states.json    every step's expected state, in a format that does NOT depend on
                               deltackpt: tensors by key in the safetensors file, plain values as
                               tagged JSON (floats as big-endian IEEE-754 hex), plus facts
                               recorded at generation time (zstd version, policy phases)
  codecs/<codec id>.json       per registered codec: inputs, payload, frame, decoded bytes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = 2  # the manifest version this deltackpt writes: the directory main() (re)writes
VERSION_DIR = os.path.join(HERE, f"v{VERSION}")
REPO_DIR = os.path.join(VERSION_DIR, "repo")
EXPECTED_DIR = os.path.join(VERSION_DIR, "expected")
CODEC_DIR = os.path.join(HERE, "codecs")

COMMON = dict(chunk_bytes=256, workers=1, zstd_level=1)
#: (steps, policy) phases, each one writer session; together: keyframes, diff and xor deltas
#: against the previous step, deltas against the keyframe, a reopened writer resuming its chain
PHASES: list[tuple[list[int], dict[str, Any]]] = [
    ([0, 1], dict(codec="diff", keyframe_every=4)),
    ([2, 3], dict(codec="xor", keyframe_every=6)),
    ([4], dict(codec="diff", keyframe_every=1)),
    ([5, 6], dict(codec="diff", reference="keyframe", keyframe_every=10)),
]
STEPS = [s for steps, _ in PHASES for s in steps]


def _f64(bits_hex_le: str) -> float:
    return struct.unpack("<d", bytes.fromhex(bits_hex_le))[0]


def build_state(step: int) -> Any:
    """The state saved at ``step``: a small model + optimizer + assorted plain values."""
    g = torch.Generator().manual_seed(20240601)
    w = torch.randn(8, 16, generator=g)                               # f32, 2 chunks
    emb = torch.randn(8, 16, generator=g).to(torch.bfloat16)          # bf16, shared below
    h = torch.randn(40, generator=g).to(torch.float16)
    f8a = torch.randn(48, generator=g).to(torch.float8_e4m3fn)
    f8b = torch.randn(48, generator=g).to(torch.float8_e5m2)
    i64 = torch.arange(24, dtype=torch.int64) * 1_000_003 - 5
    i8 = torch.randint(-128, 128, (40,), generator=g, dtype=torch.int8)
    mask = torch.rand(50, generator=g) > 0.5
    c64 = torch.complex(torch.randn(10, generator=g), torch.randn(10, generator=g))
    rng = np.random.default_rng(7)
    arr = rng.standard_normal(30).astype(np.float32)
    arr_i = np.arange(12, dtype=np.int16).reshape(3, 4) * -3

    # sparse, step-dependent changes (deltas stay small)
    k = step
    w[k % 8, :4] += 0.001 * (k + 1)
    emb[k % 8, k % 16] += 0.5 * k
    h[k] = float(k)
    f8a[k] = float(k) / 4
    i64[k % 24] += k
    i8[k] = (k * 37) % 128
    mask[k] = not bool(mask[k])
    c64[k % 10] += complex(k, -k)
    arr[k] += np.float32(0.25 * k)
    exp_avg = w * 0.1

    model = OrderedDict([("layer.weight", torch.nn.Parameter(w, requires_grad=True)),
                         ("embed.weight", emb),
                         ("head.weight", emb),            # tied: the same tensor object
                         ("norm.scale", h)])
    model._metadata = OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    state = {
        "model": model,
        "optimizer": {"state": {0: {"step": torch.tensor(float(k + 1)), "exp_avg": exp_avg}},
                      "param_groups": [{"lr": 0.1 * 0.9 ** k, "betas": (0.9, 0.999),
                                        "eps": 1e-8, "params": [0]}]},
        "dtypes": {"f8_e4m3": f8a, "f8_e5m2": f8b, "i64": i64, "i8": i8, "mask": mask,
                   "c64": c64, "empty": torch.empty(0, 3),
                   "scalar": torch.tensor(k, dtype=torch.int32)},
        "numpy": {"arr": arr, "arr_i16": arr_i, "f32": np.float32(1.25), "i64": np.int64(-k)},
        "plain": {
            "step": k, "big": 2**100 + k, "neg": -7, "half": 0.5, "neg_zero": -0.0,
            "inf": float("inf"), "nan_payload": _f64("0100000000f8ff7f"),
            "text": "ünïcödé ✓ / %", "blob": bytes([0, 255, k]), "ba": bytearray(b"ab"),
            "cplx": complex(1.5, -k), "none": None, "flags": (True, False),
            "nested": [1, [2, (3, {"deep": ["x"]})]], 1: "int key", "1": "str key",
            ("t", 2): "tuple key", 2.5: "float key",
            "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
        },
    }
    return state


def write_repo(path: str) -> None:
    """Write every phase into a new repository at ``path`` (no lock file left behind)."""
    import deltackpt

    for steps, policy in PHASES:
        with deltackpt.open(path, "a", **COMMON, **policy) as repo:
            for s in steps:
                repo.save(s, build_state(s), meta={"phase": policy})
    for leftover in ("lock",):
        try:
            os.remove(os.path.join(path, leftover))
        except FileNotFoundError:
            pass
    for d in ("tmp", "txn"):
        p = os.path.join(path, d)
        if os.path.isdir(p):
            assert not os.listdir(p), f"{d}/ not empty after a clean close"
            os.rmdir(p)   # empty directories are not committed by git anyway


# ------------------------------------------------------------------------ expected values
def _bits(x: float) -> str:
    return struct.pack(">d", x).hex()


class _Encoder:
    """Plain values as tagged JSON; tensors and arrays by key into one safetensors file."""

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prefix = prefix
        self.tensors = tensors
        self.ids: dict[int, str] = {}

    def _tensor_key(self, value: Any, store: torch.Tensor) -> str:
        key = self.ids.get(id(value))
        if key is None:
            key = self.ids[id(value)] = f"{self.prefix}/{len(self.ids)}"
            self.tensors[key] = store.detach().clone().contiguous()
        return key

    def enc(self, v: Any) -> Any:
        t = type(v)
        if isinstance(v, torch.Tensor):
            return {"T": "tensor", "key": self._tensor_key(v, v),
                    "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                    "parameter": t is torch.nn.Parameter, "requires_grad": v.requires_grad}
        if t is np.ndarray:
            raw = torch.from_numpy(np.ascontiguousarray(v).reshape(-1).view(np.uint8).copy())
            return {"T": "ndarray", "key": self._tensor_key(v, raw), "dtype": v.dtype.str,
                    "shape": list(v.shape)}
        if v is None:
            return {"T": "none"}
        if t is bool:
            return {"T": "bool", "v": v}
        if t is int:
            return {"T": "int", "v": str(v)}
        if t is float:
            return {"T": "float", "bits": _bits(v)}
        if t is str:
            return {"T": "str", "v": v}
        if t in (bytes, bytearray):
            return {"T": t.__name__, "hex": bytes(v).hex()}
        if t is complex:
            return {"T": "complex", "re": _bits(v.real), "im": _bits(v.imag)}
        if isinstance(v, np.generic):
            return {"T": "npscalar", "dtype": v.dtype.str, "hex": v.tobytes().hex()}
        if t is torch.dtype:
            return {"T": "torch_dtype", "v": str(v).removeprefix("torch.")}
        if t is torch.Size:
            return {"T": "size", "v": list(v)}
        if t is torch.device:
            return {"T": "device", "v": str(v)}
        if t in (list, tuple):
            return {"T": t.__name__, "items": [self.enc(x) for x in v]}
        if t in (dict, OrderedDict):
            out = {"T": "dict" if t is dict else "odict",
                   "items": [[self.enc(k), self.enc(x)] for k, x in v.items()]}
            if t is OrderedDict:
                meta = getattr(v, "_metadata", None)
                out["metadata"] = None if meta is None else self.enc(meta)
            return out
        raise TypeError(f"make_golden cannot describe {t}")


def write_expected(out_dir: str) -> None:
    import zstandard
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    states = {str(s): _Encoder(f"s{s}", tensors).enc(build_state(s)) for s in STEPS}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "tensors.safetensors"))
    doc = {"format": VERSION, "steps": STEPS, "phases": [[s, p] for s, p in PHASES],
           "common": COMMON, "zstd_version": list(zstandard.ZSTD_VERSION),
           "torch_version": torch.__version__, "states": states}
    with open(os.path.join(out_dir, "states.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------------------- codec fixtures
_CANDIDATES = [  # (dtype name, kind) of the inputs each codec is tried on
    ("float32", "torch"), ("bfloat16", "torch"), ("float16", "torch"), ("float64", "torch"),
    ("int32", "torch"), ("uint8", "torch"), ("bool", "torch"), ("complex64", "torch"),
]


def _codec_inputs(dtype: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = getattr(torch, dtype)
    if d == torch.bool:
        ref = torch.rand(32, generator=g) > 0.5
        cur = ref.clone()
        cur[::9] = ~cur[::9]
    elif d.is_floating_point or d.is_complex:
        base = torch.randn(4, 8, generator=g, dtype=torch.float32)
        ref = base.to(d) if not d.is_complex else torch.complex(base, base.flip(0)).to(d)
        cur = ref.clone()
        cur[1, :] += 0.01
        cur[3, 3] -= 1.0
    else:
        ref = torch.randint(0, 100, (4, 8), generator=g).to(d)
        cur = ref.clone()
        cur[2, :4] += 3
    return cur, ref


def _case(codec: Any, dtype: str, kind: str, seed: int) -> dict[str, Any] | None:
    from deltackpt.codecs import NotApplicable
    from deltackpt.errors import CodecError
    from deltackpt.format.dtypes import torch_type
    from deltackpt.format.frame import encode_frame

    cur, ref = _codec_inputs(dtype, seed)
    if getattr(codec, "domain", "linear") == "log" and cur.is_floating_point():
        cur, ref = cur.abs(), ref.abs()  # the log domain takes non-negative values only
    et = torch_type(cur.dtype)
    data = cur.reshape(-1).view(torch.uint8).numpy().copy()
    refb = ref.reshape(-1).view(torch.uint8).numpy().copy() if codec.uses_reference else None
    try:
        payload, word = codec.encode(data, refb, et)
    except (NotApplicable, CodecError):
        return None
    payload = np.ascontiguousarray(payload, dtype=np.uint8)
    decoded = codec.decode(payload.copy(), refb, et, data.size)
    if codec.lossless:
        assert np.array_equal(decoded, data), f"{codec!r} is not lossless on {dtype}"
    return {"kind": kind, "dtype": et.name, "config": codec.get_config(), "word": int(word),
            "data": data.tobytes().hex(), "ref": None if refb is None else refb.tobytes().hex(),
            "payload": payload.tobytes().hex(),
            # a frame_reference codec's frame is coded against the reference chunk
            "frame": encode_frame(payload, int(word), 1,
                                  ref=refb if codec.frame_reference else None).hex(),
            "decoded": np.asarray(decoded, dtype=np.uint8).tobytes().hex()}


def _configs(cls: Any) -> list[Any]:
    """The default instance, plus a few option variants for codecs that take options."""
    out = [cls()]
    variants = {"quant": [dict(bits=4, block=16), dict(bits=8, domain="log"),
                          dict(bits=8, block=16, step=0.05),
                          dict(bits=8, block=8, step=1.5, unit="block"),
                          dict(bits=4, block=8, step=0.5, domain="log"),
                          dict(bits=8, block=8, step=1.0, unit="chunk"),
                          dict(bits=8, block=8, step=1.0, unit="block", predict="scaled"),
                          dict(bits=4, block=16, predict="scaled"),
                          dict(bits=8, block=8, step=0.5, domain="log", rounding="stochastic"),
                          dict(bits=8, block=8, step=0.5, domain="log", predict="scaled"),
                          dict(bits=8, block=8, step=1.0, unit="weighted", predict="scaled"),
                          dict(bits=8, block=8, step=1.0, unit="block", predict="scaled",
                               scales="log"),
                          dict(bits=4, block=16, scales="log"),
                          dict(bits=8, block=8, step=0.5, domain="log", predict="scaled",
                               scales="log")],
                "sparse": [dict(block=8)],
                "squant": [dict(bits=2, block=8, keep=0.5), dict(bits=8, block=16, keep=1.0),
                           dict(bits=4, block=8, keep=0.3, levels="log"),
                           dict(bits=4, block=16, keep=0.5, domain="log")],
                "lowrank": [dict(cols=8), dict(cols=8, rank=1),
                            dict(cols=8, rank=1, residual_bits=4, block=16)]}
    for kw in variants.get(cls.codec_id, []):
        try:
            out.append(cls(**kw))
        except TypeError:
            pass
    return out


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps([case["config"], case["dtype"], case["kind"], case["data"], case["ref"]],
                      sort_keys=True)


def _append_only(path: str, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases already in ``path`` as stored, then the new ones: a fixture is a promise that
    those payloads decode, so it is never rewritten (an encoder may round differently on
    another machine, e.g. lowrank's SVD) and never loses a case."""
    if not os.path.exists(path):
        return cases
    with open(path, encoding="utf-8") as f:
        old = json.load(f)["cases"]
    known = {_case_key(c) for c in old}
    return old + [c for c in cases if _case_key(c) not in known]


def write_codec_fixtures(out_dir: str, only: list[str] | None = None) -> None:
    import zstandard

    from deltackpt.codecs import registered_codecs

    os.makedirs(out_dir, exist_ok=True)
    for cid, cls in sorted(registered_codecs().items()):
        if only and cid not in only:
            continue
        cases = []
        for n, codec in enumerate(_configs(cls)):
            for m, (dtype, kind) in enumerate(_CANDIDATES):
                case = _case(codec, dtype, kind, seed=100 * n + m)
                if case is not None:
                    cases.append(case)
        if not cases:
            raise SystemExit(f"codec {cid!r}: no candidate input encodes; add one to "
                             "_CANDIDATES or _configs")
        cases = _append_only(os.path.join(out_dir, f"{cid}.json"), cases)
        doc = {"codec": cid, "lossless": bool(cls.lossless),
               "uses_reference": bool(cls.uses_reference),
               "zstd_version": list(zstandard.ZSTD_VERSION), "cases": cases}
        with open(os.path.join(out_dir, f"{cid}.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"codecs/{cid}.json: {len(cases)} cases")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", nargs="*", metavar="ID",
                    help="only (re)write codec fixtures (all, or the given ids)")
    args = ap.parse_args(argv)
    if args.codecs is not None:
        write_codec_fixtures(CODEC_DIR, args.codecs or None)
        return
    if os.path.exists(VERSION_DIR):
        shutil.rmtree(VERSION_DIR)
    write_repo(REPO_DIR)
    write_expected(EXPECTED_DIR)
    write_codec_fixtures(CODEC_DIR)
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(REPO_DIR) for f in fs)
    print(f"v{VERSION}/repo: {total} bytes")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the checkout, for deltackpt
    main()
