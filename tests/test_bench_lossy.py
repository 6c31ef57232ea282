"""benchmarks/bench_lossy.py: its method table is valid and complete, and its quick mode runs
every workload (transformer, recsys, cnn) with the resume and drift checks."""
from __future__ import annotations

import json
import os
import sys
from types import ModuleType

import pytest

import deltackpt
from deltackpt.engine.policy import PRESETS

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, BENCH)
    try:
        import bench_lossy
    finally:
        sys.path.remove(BENCH)
    return bench_lossy


def test_method_table_is_valid_and_includes_every_preset(bench: ModuleType) -> None:
    for name, spec in bench.METHODS.items():
        assert set(spec.workloads) <= set(bench.WORKLOADS), name
        if spec.open_kwargs is not None:
            kw = dict(spec.open_kwargs)
            deltackpt.Policy.from_kwargs(kw.pop("policy", None), kw)
    for w in bench.WORKLOADS:
        names = [m.name for m in bench.methods_for(w)]
        assert names[:2] == ["torch.save", "lossless"], (w, names)
        assert set(PRESETS) <= set(names), (w, names)  # a new preset is measured by itself
    only = bench._only(bench.dedupe(bench.methods_for("transformer")), "q4")
    # the archive preset holds exp_avg_sq between every 10th save: no longer the same as q4
    assert [m.label for m in only] == ["torch.save", "lossless", "q4"]
    twin = bench.Method("q4 again", dict(bench.METHODS["q4"].open_kwargs))
    merged = bench.dedupe([*bench.methods_for("transformer"), twin])
    assert [m.label for m in merged if "q4 again" in m.aliases] == ["q4 = q4 again"]


def test_sweep_table_is_valid(bench: ModuleType) -> None:
    """benchmarks/bench_lossy_sweep.py's settings build valid policies, distinct from each other
    and from the presets (else the sweep would measure a preset twice)."""
    sys.path.insert(0, BENCH)
    try:
        import bench_lossy_sweep as sweep
    finally:
        sys.path.remove(BENCH)
    methods = [bench.Method(n, dict(s.open_kwargs)) for n, s in sweep.SWEEP.items()]
    presets = [bench.Method(p, {"policy": p}) for p in PRESETS]
    keys = [bench.policy_key(m) for m in methods + presets]
    assert len(set(keys)) == len(keys)
    assert all(m.lossy for m in methods)


def test_worst_cycle_is_the_furthest_from_zero(bench: ModuleType) -> None:
    cycles = [{"diff_pct": d} for d in (0.2, -3.5, 7.25, -0.1)]
    assert bench.worst_cycle(cycles) == 7.25
    assert bench.worst_cycle([{"diff_pct": -2.0}, {"diff_pct": 1.0}]) == -2.0
    assert bench.worst_cycle([]) == 0.0
    assert "worst cycle +7.250%" in bench.drift_text({"drift": {"cycles": cycles}})


def test_readme_table_is_the_committed_run(bench: ModuleType) -> None:
    """The README's lossy table is what ``--readme-table`` prints from the committed
    benchmarks/results/lossy.json: no figure in it is typed by hand."""
    root = os.path.dirname(BENCH)
    with open(os.path.join(BENCH, "results", "lossy.json")) as f:
        table = bench.readme_table(json.load(f)["results"])
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    assert len(table) > 4
    for line in table:
        assert line in readme, line


@pytest.mark.slow  # about 1-2 min on 2 cores: run with --runslow
def test_bench_lossy_quick_runs(bench: ModuleType, tmp_path, capsys) -> None:
    """All three workloads, baselines + one lossy preset, drift included; results written only
    to the folder asked for."""
    pytest.importorskip("matplotlib")
    assert bench.main(["--quick", "--methods", "archive", "--out", str(tmp_path)]) == 0
    md = capsys.readouterr().out
    for what in ("## transformer", "## recsys", "## cnn", "Δ acc (pp)", "Repeated resume"):
        assert what in md, what
    with open(tmp_path / "lossy.json") as f:
        doc = json.load(f)
    assert [r["workload"] for r in doc["results"]] == ["transformer", "recsys", "cnn"]
    cnn = doc["results"][-1]
    assert 0 <= cnn["accuracy"] <= 100
    for r in doc["results"]:
        assert not r["failures"], r["failures"]
        rows = {x["method"]: x for x in r["methods"]}
        assert all(c["diff_pct"] == 0 for c in rows["lossless"]["drift"]["cycles"])
        lossy = next(x for x in r["methods"] if x["lossy"])
        assert len(lossy["drift"]["cycles"]) == r["drift_cycles"] == 3
        assert all(c["recorded_bounds_measured"] for c in lossy["drift"]["cycles"])
        if r["workload"] == "cnn":
            assert "accuracy_diff_pp" in lossy["resume"]
            assert all("accuracy_diff_pp" in c for c in lossy["drift"]["cycles"])
    assert sorted(os.listdir(tmp_path)) == ["lossy.json", "lossy.md", "lossy_bytes.png",
                                            "lossy_frontier.png"]
    assert any(line.startswith("| `archive` |") and "(" in line
               for line in bench.readme_table(doc["results"]))
