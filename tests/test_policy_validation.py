"""Policy, Rule and retention options are checked by type and range when built: a wrong value
raises PolicyError (a ValueError and a DeltaCkptError) naming the option and the value."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.engine.policy import Policy, Rule, preset
from deltackpt.engine.retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepNewerThan,
    KeepSteps,
)
from deltackpt.errors import DeltaCkptError, PolicyError

#: option -> a strategy of values of a type the option does not take
_INTS = st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                  st.lists(st.integers(), max_size=2))
_STRS = st.one_of(st.integers(), st.booleans(), st.none(), st.floats(), st.binary(max_size=3))
WRONG_TYPES: dict[str, Any] = {
    "codec": _STRS, "reference": _STRS, "resume": _STRS,
    "keyframe_every": _INTS, "max_chain": _INTS, "chunk_bytes": _INTS, "zstd_level": _INTS, "workers": _INTS,
    "max_pack_bytes": _INTS, "cache_bytes": _INTS, "async_buffers": _INTS,
    "exact_every": _INTS,
    "delta_gain": st.one_of(st.booleans(), st.text(max_size=3), st.none(),
                            st.lists(st.floats(), max_size=2)),
    "lossy_budget": st.one_of(st.booleans(), st.text(max_size=3), st.none(),
                              st.lists(st.floats(), max_size=2)),
    "fsync": st.one_of(st.integers(), st.none(), st.text(max_size=3), st.floats()),
    "contexts": st.one_of(st.integers(), st.none(), st.text(max_size=3), st.floats()),
    "rules": st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.booleans(),
                       st.lists(st.integers(), min_size=1, max_size=2)),
}
OUT_OF_RANGE: dict[str, list[Any]] = {
    "keyframe_every": [0, -1], "max_chain": [-1], "chunk_bytes": [63, (1 << 30) + 1], "zstd_level": [0, 23],
    "workers": [0], "max_pack_bytes": [0], "cache_bytes": [-1], "async_buffers": [0],
    "exact_every": [-1], "delta_gain": [0, 0.0, 1.5, float("nan"), float("inf")],
    "lossy_budget": [-0.1, float("nan"), float("inf"), 100.5],
    "reference": ["prev", ""], "resume": ["Rebuild"], "codec": ["raw", "quant", "nope"],
}


def test_every_field_is_covered() -> None:
    from dataclasses import fields
    assert set(WRONG_TYPES) == {f.name for f in fields(Policy)}


def _assert_names(exc: PolicyError, option: str, value: Any) -> None:
    assert isinstance(exc, ValueError) and isinstance(exc, DeltaCkptError)
    assert option in str(exc) and repr(value) in str(exc), str(exc)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(WRONG_TYPES)).flatmap(
    lambda name: st.tuples(st.just(name), WRONG_TYPES[name])))
def test_wrong_types_are_refused_naming_the_option(case: tuple[str, Any]) -> None:
    option, value = case
    for build in (lambda: Policy(**{option: value}),
                  lambda: Policy.from_kwargs(None, {option: value}),
                  lambda: Policy.from_kwargs("balanced", {option: value}),
                  lambda: Policy.from_dict({"preset": "archive", option: value})):
        with pytest.raises(PolicyError) as info:
            build()
        if option != "rules":  # a bad rule names the rule's own option
            _assert_names(info.value, option, value)


@pytest.mark.parametrize("option,value", [(o, v) for o, vs in OUT_OF_RANGE.items() for v in vs])
def test_out_of_range_values_are_refused(option: str, value: Any) -> None:
    with pytest.raises(PolicyError) as info:
        Policy(**{option: value})
    _assert_names(info.value, option, value)


def test_the_issue_str_keyframe_every(tmp_path: Path) -> None:
    """The reported case: a str was accepted and failed later with a raw TypeError."""
    with pytest.raises(PolicyError, match=r"keyframe_every='10' \(str\).*an int >= 1"):
        deltackpt.open(tmp_path / "r", keyframe_every="10")
    with pytest.raises(PolicyError, match="keyframe_every=True"):
        deltackpt.open(tmp_path / "r", keyframe_every=True)
    assert not (tmp_path / "r").exists()


def test_unknown_options_suggest_the_closest() -> None:
    with pytest.raises(PolicyError, match="'keyframe_evry' \\(did you mean 'keyframe_every'") as i:
        Policy.from_kwargs(None, {"keyframe_evry": 5})
    assert isinstance(i.value, TypeError)  # like any unknown keyword argument
    with pytest.raises(PolicyError, match="did you mean 'chunk_bytes'"):
        Policy.from_dict({"chunk_byte": 4096})
    with pytest.raises(PolicyError, match="did you mean 'balanced'"):
        preset("balance")
    with pytest.raises(PolicyError, match="did you mean 'codec'"):
        Policy(rules=({"pattern": "*", "codek": "drop"},))
    with pytest.raises(PolicyError, match="policy"):
        Policy.from_kwargs(3, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", [
    Rule, lambda p, c: Policy(rules=((p, c),)), lambda p, c: Policy(rules=({"pattern": p,
                                                                             "codec": c},)),
    lambda p, c: Policy.from_dict({"rules": [{"pattern": p, "codec": c}]})])
def test_bad_rules_are_refused(rule: Any) -> None:
    for pattern, codec, option in [
            (3, "drop", "pattern"), ("", "drop", "pattern"), ("*", "dorp", "codec"),
            ("*", [], "codec"), ("*", {"bits": 4}, "codec"), ("*", {"id": "nope"}, "codec"),
            ("*", {"id": "raw"}, "codec"), ("*", {"id": "quant", "bits": "x"}, "codec"),
            ("*", ["drop"], "codec"), ("*", None, "codec")]:
        with pytest.raises(PolicyError, match=option):
            rule(pattern, codec)


def test_valid_policies_still_build() -> None:
    for name in ("lossless", "balanced", "archive"):
        assert Policy.from_dict(preset(name).to_dict()) == preset(name)
    p = Policy(delta_gain=1, rules=[("*", ["drop"][0]), {"pattern": "m/*", "codec": "lossless"}])
    assert p.rules == (Rule("*", "drop"), Rule("m/*", "lossless"))


@pytest.mark.parametrize("build,option", [
    (lambda: KeepLast("3"), "n"), (lambda: KeepLast(-1), "n"), (lambda: KeepLast(True), "n"),
    (lambda: KeepEvery(0), "m"), (lambda: KeepEvery(2.0), "m"),
    (lambda: KeepSteps([1, "2"]), "steps"), (lambda: KeepSteps(5), "steps"),
    (lambda: KeepBest(3), "key"), (lambda: KeepBest("loss", 0), "n"),
    (lambda: KeepBest("loss", mode="mni"), "mode"),
    (lambda: KeepNewerThan(3600), "age"), (lambda: AnyOf((KeepLast(1), 3)), "policies")])
def test_retention_arguments_are_checked(build: Any, option: str) -> None:
    with pytest.raises(PolicyError, match=option):
        build()


def test_retention_or_with_a_non_policy_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        KeepLast(1) | 3  # type: ignore[operator]
    assert (KeepLast(1) | KeepEvery(2)).keep([]) == set()
    assert KeepNewerThan(timedelta(days=-1)).age < timedelta(0)


def test_numpy_integers_are_ints():
    """An option computed with numpy (``np.int64``) is an integer like any other, kept as int."""
    import numpy as np

    from deltackpt.engine.policy import Policy
    from deltackpt.engine.retention import KeepEvery, KeepLast, KeepSteps

    p = Policy(keyframe_every=np.int64(10), chunk_bytes=np.int32(1 << 20))
    assert p.keyframe_every == 10 and type(p.keyframe_every) is int
    assert type(p.chunk_bytes) is int
    assert type(KeepLast(np.int64(3)).n) is int and type(KeepEvery(np.uint8(5)).m) is int
    assert KeepSteps([np.int64(4)]).steps == frozenset({4})
    with pytest.raises(PolicyError, match="keyframe_every"):
        Policy(keyframe_every=np.bool_(True))
