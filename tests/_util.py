"""Bit-exact comparison of states: values, dtypes, shapes, container and key types, order."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.numel():
        return b""
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # a 1-element tensor may keep any stride
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8).numpy().tobytes()


def assert_bitexact(a: Any, b: Any, path: str = "") -> None:
    """Raise AssertionError naming the first path where ``a`` and ``b`` differ in any way."""
    where = path or "<root>"
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        assert _bits(a) == _bits(b), f"{where}: tensor bits differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), \
            f"{where}: array bits differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, (dict, OrderedDict)):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for ka, kb in zip(a.keys(), b.keys()):
            assert type(ka) is type(kb), f"{where}: key {ka!r} type differs"
            assert_bitexact(a[ka], b[kb], f"{path}/{ka}")
        if isinstance(a, OrderedDict):
            ma, mb = getattr(a, "_metadata", None), getattr(b, "_metadata", None)
            assert (ma is None) == (mb is None), f"{where}: _metadata presence differs"
            if ma is not None:
                assert_bitexact(ma, mb, f"{path}/<_metadata>")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitexact(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert np.complex128(a).tobytes() == np.complex128(b).tobytes(), f"{where}: {a} != {b}"
    elif isinstance(a, torch.Generator):
        assert torch.equal(a.get_state(), b.get_state()), f"{where}: generator state differs"
        assert a.device == b.device, f"{where}: generator device differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def train_adamw(steps: int, seed: int = 0) -> Any:
    """States of a small MLP trained with AdamW, one per step (the live tensors: copy them)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield {"model": model.state_dict(), "optimizer": opt.state_dict()}


def flat_leaves(state: Any) -> dict[str, Any]:
    """Path -> leaf value of a nested state."""
    from deltackpt.format.tree import flatten
    return {leaf.path: leaf.value for leaf in flatten(state)[1]}


def check_lossy_round_trip(cfg: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...],
                           seed: int, scale: float, positive: bool) -> None:
    """Encode a random chunk against a reference ``scale`` away (both non-negative and the
    codec in the log domain when ``positive``): word 1, payload within its declared size,
    deterministic encode and decode, every element within ``error_bound``."""
    from deltackpt.codecs import get_codec
    from deltackpt.codecs.floats import to_float
    from deltackpt.format.dtypes import torch_type

    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(shape, generator=g, dtype=torch.float64)
    cur = ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        ref, cur = ref.abs() + 1e-3, cur.abs() + 1e-3
        cfg = {**cfg, "domain": "log"}
    codec, et = get_codec(cfg), torch_type(dtype)
    data, refb = (t.to(dtype).reshape(-1).view(torch.uint8).numpy().copy() for t in (cur, ref))
    payload, word = codec.encode(data.copy(), refb.copy(), et)
    assert word == 1
    assert codec.min_payload(data.size, et) <= payload.size <= codec.max_payload(data.size, et)
    out = codec.decode(payload.copy(), refb.copy(), et, data.size)
    assert np.array_equal(out, codec.decode(payload.copy(), refb.copy(), et, data.size))
    assert np.array_equal(codec.encode(data.copy(), refb.copy(), et)[0], payload)
    bound = codec.error_bound(data, refb, et, payload)
    x, y = to_float(data, et).astype(np.float64), to_float(out, et).astype(np.float64)
    assert (np.abs(y - x) <= bound).all()
    if positive:
        assert (y >= 0).all()
