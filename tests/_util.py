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
