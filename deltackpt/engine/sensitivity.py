"""Where a lossy encoder may spend its error: per tensor, the weights of the loss's sensitivity.

For ``unit="weighted"`` codecs (see :mod:`deltackpt.codecs.quant`) the writer pairs tensors of a
step with what measures how much an error in them costs, found in the state itself:

* a model parameter: Adam's ``exp_avg_sq`` of it, the diagonal of the empirical Fisher (an
  error where the gradients are small moves the loss little);
* Adam's ``exp_avg``: uniform weights (an error ``e`` in it moves the next updates by about
  ``lr e / sqrt(v)``, which costs ``v`` x that squared: ``lr**2 e**2``, whatever ``v`` is).

A parameter is paired with its optimizer entry by ``param_groups[..]["param_names"]`` (torch
records them for optimizers built from ``named_parameters()``): the state leaf whose key is the
name, or ends in ``.``-name, unique and of the same shape. Without names, and with exactly one
optimizer in the state, entries are matched in order to the state's other tensors of the same
shape (``model.parameters()`` order is ``state_dict()`` order, buffers skipped); a pairing
that does not match every entry is dropped whole. A wrong pairing only misplaces the error,
which stays bounded and recorded as for any lossy step; no pairing codes as ``unit="block"``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..format.tree import Leaf, escape_key, skeleton


@dataclass(frozen=True)
class Weights:
    """A tensor's sensitivity weights: the leaf whose values they are, None for uniform."""

    source: int | None


@dataclass(frozen=True)
class _At:
    """Where tensor leaf ``index`` sits in the state's :func:`skeleton`."""

    index: int


def _walk(obj: Any) -> Iterator[Any]:
    """``obj`` and every container and value under it (the skeleton holds no cycles)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        yield o
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


@dataclass
class _Optimizer:
    entries: dict[int, dict[str, int]]   # param id -> {state name: leaf index}
    order: list[int]                     # param ids, group by group
    names: dict[int, str]                # param id -> name, where recorded
    leaves: set[int]                     # every leaf under the optimizer's node


def _optimizers(state: Any) -> list[_Optimizer]:
    found = []
    for node in _walk(state):
        if not (isinstance(node, dict) and isinstance(node.get("state"), dict)
                and isinstance(node.get("param_groups"), list)):
            continue
        entries = {pid: {str(n): t.index for n, t in sub.items() if isinstance(t, _At)}
                   for pid, sub in node["state"].items()
                   if type(pid) is int and isinstance(sub, dict)}
        order: list[int] = []
        names: dict[int, str] = {}
        for group in node["param_groups"]:
            if not isinstance(group, dict):
                continue
            ids = group.get("params")
            ids = ids if isinstance(ids, list) else []
            order.extend(i for i in ids if type(i) is int)
            labels = group.get("param_names")
            if isinstance(labels, list) and len(labels) == len(ids) \
                    and all(isinstance(n, str) for n in labels):
                names.update((i, n) for i, n in zip(ids, labels) if type(i) is int)
        inside = {o.index for o in _walk(node) if isinstance(o, _At)}
        found.append(_Optimizer(entries, order, names, inside))
    return found


def _shape(leaf: Leaf) -> tuple[int, ...]:
    return tuple(int(s) for s in leaf.value.shape)


def _by_name(opt: _Optimizer, others: list[Leaf], leaves: list[Leaf]) -> dict[int, int]:
    last: dict[str, list[Leaf]] = {}
    for leaf in others:
        last.setdefault(leaf.path.rsplit("/", 1)[-1], []).append(leaf)
    out = {}
    for pid, name in opt.names.items():
        v = opt.entries.get(pid, {}).get("exp_avg_sq")
        if v is None:
            continue
        key = escape_key(name)
        hits = [leaf for label, group in last.items()
                if label == key or label.endswith("." + key) for leaf in group
                if _shape(leaf) == _shape(leaves[v])]
        if len(hits) == 1:
            out[hits[0].index] = v
    return out


def _in_order(opt: _Optimizer, others: list[Leaf], leaves: list[Leaf]) -> dict[int, int]:
    out: dict[int, int] = {}
    pos = 0
    for pid in opt.order:
        v = opt.entries.get(pid, {}).get("exp_avg_sq")
        if v is None:
            return {}  # an entry without state (not stepped yet): its shape is unknown
        while pos < len(others) and _shape(others[pos]) != _shape(leaves[v]):
            pos += 1
        if pos == len(others):
            return {}
        out[others[pos].index] = v
        pos += 1
    return out


def sensitivities(tree: Any, leaves: list[Leaf]) -> dict[str, Weights]:
    """Leaf path -> its sensitivity weights, for the tensors of ``tree`` (a flattened state,
    see :func:`deltackpt.format.tree.flatten`) that have any."""
    by_index = {leaf.index: leaf for leaf in leaves}
    if len(by_index) != len(leaves) or set(by_index) != set(range(len(leaves))):
        return {}
    opts = _optimizers(skeleton(tree, _At))
    inside = set().union(*(o.leaves for o in opts)) if opts else set()
    others = [leaf for leaf in leaves if leaf.index not in inside
              and getattr(leaf.value, "is_floating_point", lambda: False)()]
    out: dict[str, Weights] = {}
    for opt in opts:
        for entry in opt.entries.values():
            if "exp_avg_sq" in entry and "exp_avg" in entry:
                out[leaves[entry["exp_avg"]].path] = Weights(None)
        pairs = _by_name(opt, others, leaves) if opt.names else \
            _in_order(opt, others, leaves) if len(opts) == 1 else {}
        for param, v in pairs.items():
            out.setdefault(leaves[param].path, Weights(v))
    return out
