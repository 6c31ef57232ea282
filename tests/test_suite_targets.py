"""benchmarks/suite.py's target section, computed from the committed full run (no measuring):
every target of workloads a and f is reported with its figure, and the size target compares
exact bytes against results/suite_baseline.json."""
from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def suite() -> Any:
    sys.path.insert(0, BENCH)
    try:
        from suitekit.config import config_of
        from suitekit.report import summarize
        from suitekit.targets import check_targets, load_baseline
    finally:
        sys.path.pop(0)
    return SimpleNamespace(summarize=summarize, config_of=config_of, check_targets=check_targets,
                           load_baseline=load_baseline)


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    with open(os.path.join(BENCH, "results", "suite.json")) as f:
        return json.load(f)


def _targets(suite: Any, doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {w["key"]: suite.summarize(w) for w in doc["workloads"]}
    baseline = suite.load_baseline(suite.config_of(doc["meta"]))
    return suite.check_targets(doc["workloads"], rows, doc["meta"]["chunk_window"], baseline)


def test_every_target_of_a_and_f_is_reported(suite: Any, committed: dict[str, Any]) -> None:
    targets = _targets(suite, committed)
    for k in ("a", "f"):
        mine = [t["target"] for t in targets if t["workload"] == k]
        for what in ("lossless size", "followed by fsync (moonshot", "stall <= 0.15x",
                     "keyframe step <= 1.0x", "latest step <= 1.2x", "every saved step <= 2.0x"):
            assert any(what in t for t in mine), (k, what, mine)
    assert all(t["met"] in (True, False) for t in targets), targets
    assert all(t["measured"] for t in targets)


def test_size_is_compared_byte_for_byte(suite: Any, committed: dict[str, Any]) -> None:
    """Against the baseline of the same configuration: its bytes exactly are no loss; one byte
    more is a loss (and fails the save target with it)."""
    config = suite.config_of(committed["meta"])
    assert config == {"quick": False, "scale": 1.0, "saves": 12, "every": 3}
    base = suite.load_baseline(config)
    assert base["same_config"] and base["format_commit"] == "69c38e4"
    for extra, met in ((0, True), (1, False)):
        doc = copy.deepcopy(committed)
        for w in doc["workloads"]:
            if w["key"] in ("a", "f"):
                dc = next(m for m in w["methods"] if m["name"] == "deltackpt")
                dc["disk_after"][-1] = base["workloads"][w["key"]]["deltackpt_bytes"] + extra
        got = _targets(suite, doc)
        size = [t for t in got if "lossless size" in t["target"]]
        assert [t["met"] for t in size] == [met, met], size
        assert all("same run configuration" in t["measured"] for t in size)
        if not met:
            assert not any(t["met"] for t in got if "fsync (moonshot" in t["target"])


def test_other_configurations_compare_ratios(suite: Any) -> None:
    base = suite.load_baseline({"quick": True, "scale": 2.0, "saves": 5, "every": 2})
    assert base is not None and base["same_config"] is False
    assert suite.load_baseline(None) is None
