"""The state-tree decoder's fast pass (no paths, whole tree) against the full decoder.

``unflatten(tree, leaf)`` and ``leaf_indices(tree)`` without ``select`` first decode without
tracking paths and fall back to the full decoder on anything unusual; with ``select=[""]``
(everything) the full decoder runs directly. Both must return the same values and raise the
same errors (type and message, naming the same path) on every tree, genuine or mutated.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from _util import assert_bitexact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import _mutate, rich_state, trees

from deltackpt.errors import DeltaCkptError
from deltackpt.format.tree import flatten, leaf_indices, unflatten

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


def _leaf(i: int) -> Any:
    if i > 50:
        raise KeyError(i)  # like load()'s values.__getitem__ for a tensor it lacks
    return torch.full((2,), float(i))


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except DeltaCkptError as exc:
        return type(exc).__name__, str(exc)


def _same(tree: Any) -> None:
    fast = _outcome(lambda: unflatten(tree, _leaf))
    full = _outcome(lambda: unflatten(tree, _leaf, [""]))
    assert fast[0] == full[0], (fast, full)
    if fast[0] == "ok":
        assert_bitexact(fast[1], full[1])
    else:
        assert fast[1] == full[1]
    assert _outcome(lambda: leaf_indices(tree)) == _outcome(lambda: leaf_indices(tree, [""]))


def _states() -> list[Any]:
    od: OrderedDict[str, Any] = OrderedDict(w=torch.ones(3), n=np.zeros(2))
    od._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    return [rich_state(3), {"model": od, 1: "int key", -2: [0x10, -(2**70), 2**20000]},
            [1.5, float("nan"), -0.0, (1, (2, [3]))], torch.zeros(2), None, "s",
            {("a", 1): {True: None, 2.5: b"x"}}]


def test_genuine_trees_decode_the_same():
    for state in _states():
        tree, leaves = flatten(state)
        assert_bitexact(unflatten(tree, lambda i, leaves=leaves: leaves[i].value), state)
        _same(tree)


@SETTINGS
@given(data=st.data())
def test_mutated_trees_decode_or_fail_the_same(data):
    tree, _ = flatten(data.draw(st.sampled_from(_states())))
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, 3))):
        tree = _mutate(tree, data)
    _same(tree)


@SETTINGS
@given(tree=trees())
def test_arbitrary_nodes_decode_or_fail_the_same(tree):
    _same(tree)


def test_deep_trees_fail_the_same():
    node: Any = ["none"]
    for _ in range(205):
        node = ["list", [node]]
    _same(node)
    node = ["str", "x"]
    for _ in range(199):
        node = ["dict", [[["str", "k"], node]]]
    _same(node)
