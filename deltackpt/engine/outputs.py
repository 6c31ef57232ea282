"""The values a load hands back: an empty tensor or array to rebuild a stored tensor into, and
its finishing touches (dtype view, device, ``Parameter``, ``requires_grad``).

Shared by ``Repository.load`` and ``verify`` (which decodes generator states as a load does).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..format.dtypes import TORCH_DTYPES, element_type, storage_dtype
from ..runtime import hugepages
from ..store.manifest import TensorEntry

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch


def allocate(entry: TensorEntry) -> tuple[torch.Tensor | np.ndarray, np.ndarray]:
    """An uninitialised output value for ``entry`` and a flat uint8 view of its bytes."""
    value: torch.Tensor | np.ndarray
    if entry.kind == "numpy":
        arr = np.empty(entry.shape, dtype=storage_dtype(element_type("numpy", entry.dtype)))
        value, flat = arr, arr.reshape(-1).view(np.uint8)
    else:
        et = element_type(entry.kind, entry.dtype)
        tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[et.name])
        value = tensor
        flat = (tensor.reshape(-1).view(torch.uint8).numpy() if entry.nbytes
                else np.empty(0, np.uint8))
    hugepages.advise(flat)
    return value, flat


def finish(value: torch.Tensor | np.ndarray, entry: TensorEntry,
           map_location: str | torch.device | None) -> torch.Tensor | np.ndarray:
    """``value`` (rebuilt from ``entry``'s bytes) as the load returns it: an array in its
    recorded dtype, or a tensor moved to ``map_location``, as a ``Parameter`` or with
    ``requires_grad`` where it was saved so."""
    if isinstance(value, np.ndarray):
        return value if value.dtype.str == entry.dtype else value.astype(entry.dtype)
    if map_location is not None:
        value = value.to(map_location)
    if entry.parameter:
        return torch.nn.Parameter(value, requires_grad=entry.requires_grad)
    if entry.requires_grad:
        value.requires_grad_(True)
    return value
