"""Move states between deltackpt and the files other tools read: ``.safetensors`` and ``.pt``.

Export of ``.safetensors`` keeps the whole state: tensors are stored under their state paths and
the state tree (plain values, nesting, key types) rides in the header metadata, so importing the
file back restores the identical state. Import of ``.pt`` uses ``torch.load(weights_only=True)``,
which refuses pickled code.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import torch

from .errors import DeltaCkptError, UnsupportedValueError
from .tree import flatten, unflatten

_TREE_KEY = "deltackpt.tree"
_LEAVES_KEY = "deltackpt.leaves"
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def export_state(state: Any, path: str, step: int | None = None) -> None:
    """Write ``state`` to ``path``; the suffix picks the format."""
    if path.endswith(".safetensors"):
        _export_safetensors(state, path, step)
    elif path.endswith(PT_SUFFIXES):
        torch.save(state, path)
    else:
        raise DeltaCkptError(f"cannot tell the export format of {path!r}: use a .safetensors "
                             "or .pt file name")


def _export_safetensors(state: Any, path: str, step: int | None) -> None:
    from safetensors.torch import save_file

    tree, leaves = flatten(state)
    tensors: dict[str, torch.Tensor] = {}
    kinds = []
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "mM":
                raise UnsupportedValueError("safetensors cannot hold datetime arrays",
                                            path=leaf.path)
            v = torch.from_numpy(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")))
            kinds.append(["numpy", leaf.path])
        else:
            kinds.append(["torch", leaf.path])
        # safetensors refuses tensors sharing memory; copies are fine, the tree re-ties them
        tensors[leaf.path] = v.detach().cpu().contiguous().clone()
    meta = {_TREE_KEY: json.dumps(tree), _LEAVES_KEY: json.dumps(kinds), "format": "pt"}
    if step is not None:
        meta["deltackpt.step"] = str(step)
    try:
        save_file(tensors, path, metadata=meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise UnsupportedValueError(f"safetensors cannot store this state: {exc}") from None


def read_file(path: str) -> Any:
    """Read a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file as a state."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        if _TREE_KEY not in meta or _LEAVES_KEY not in meta:
            return tensors
        kinds = json.loads(meta[_LEAVES_KEY])
        leaves = [tensors[name].numpy() if kind == "numpy" else tensors[name]
                  for kind, name in kinds]
        return unflatten(json.loads(meta[_TREE_KEY]), leaves.__getitem__)
    if path.endswith(PT_SUFFIXES):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError/RuntimeError variants
            raise UnsupportedValueError(
                f"{path}: torch.load(weights_only=True) refused it ({exc}); deltackpt never "
                "unpickles arbitrary objects") from None
    raise DeltaCkptError(f"{path}: not a .pt/.pth/.bin/.ckpt or .safetensors file")


def step_from_name(path: str) -> int | None:
    """The step number in a checkpoint's name: ``ckpt-1200.pt``, ``epoch=3-step=1200.ckpt``,
    or the folder of ``checkpoint-500/pytorch_model.bin``."""
    parts = os.path.normpath(path).split(os.sep)
    found = re.findall(r"\d+", parts[-1].split(".")[0])
    if found:
        return int(found[-1])
    if len(parts) > 1:
        m = re.search(r"(?:checkpoint|step|ckpt)[-_=]?(\d+)$", parts[-2])
        if m:
            return int(m.group(1))
    return None
