"""Error budgets: ``quant``'s ``step`` (a scale floor in units of the values' or the change's
RMS, the symbols entropy-coded by the frame) and ``Policy(lossy_budget=...)``, which picks such
codecs for every path no explicit rule names."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _util import check_lossy_round_trip, flat_leaves, train_adamw
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.codecs import get_codec
from deltackpt.engine.policy import MAX_BUDGET, Policy, Rule, budget_rules, preset
from deltackpt.errors import CodecError, CorruptChunkError, PolicyError
from deltackpt.format.dtypes import torch_type
from deltackpt.format.frame import encode_frame

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
STEP_CONFIGS = [
    {"id": "quant", "bits": 8, "block": 64, "step": 0.1},
    {"id": "quant", "bits": 8, "block": 1024, "step": 1.5, "unit": "block"},
    {"id": "quant", "bits": 4, "block": 7, "step": 0.5, "unit": "block"},
    {"id": "quant", "bits": 8, "block": 32, "step": 1.0, "unit": "chunk"},
    {"id": "quant", "bits": 8, "block": 32, "step": 1.0, "unit": "block", "predict": "scaled"},
    {"id": "quant", "bits": 4, "block": 16, "predict": "scaled"},
    {"id": "quant", "bits": 8, "block": 64, "step": 0.5, "rounding": "stochastic"},
    {"id": "quant", "bits": 2, "block": 8, "rounding": "stochastic", "prune": 0.5},
    {"id": "quant", "bits": 2, "block": 16, "step": 3.0, "prune": 0.5},
    {"id": "quant", "bits": 8, "block": 32, "step": 1.0, "unit": "block", "predict": "scaled",
     "scales": "log"},
    {"id": "quant", "bits": 4, "block": 7, "scales": "log"},
    {"id": "quant", "bits": 8, "block": 64, "step": 0.5, "unit": "value", "scales": "log"},
]


def _b(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def _code(cfg, cur, ref):
    codec, et = get_codec(cfg), torch_type(cur.dtype)
    data, refb = _b(cur), _b(ref)
    payload, word = codec.encode(data.copy(), refb.copy(), et)
    out = codec.decode(payload.copy(), refb.copy(), et, data.size)
    return codec, et, data, refb, payload, word, out


@settings(max_examples=80, deadline=None)
@given(cfg=st.sampled_from(STEP_CONFIGS), dtype=st.sampled_from(DTYPES),
       shape=st.sampled_from([(), (0,), (1,), (7,), (64,), (65,), (15, 17), (3, 1024)]),
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 100.0]),
       positive=st.booleans())
def test_step_round_trip_within_recorded_bound(cfg, dtype, shape, seed, scale, positive):
    """Deterministic encode and decode; every element within the error bound, in both domains,
    including an unchanged chunk (scale 0) and changes far above the step."""
    check_lossy_round_trip(cfg, dtype, shape, seed, scale, positive)


@pytest.mark.parametrize("unit", ["value", "block", "chunk"])
@pytest.mark.parametrize("step", [0.05, 0.5, 2.0])
def test_step_is_an_error_budget(unit, step):
    """No element errs by more than step/2 x the unit (the RMS of the values or of the
    block's change), or half of 1/127 of its block's largest change where that is more (a
    change must fit in 8 bits); small changes round to zero."""
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 0.05, 50_000)
    cur = ref + rng.laplace(0, 2e-3, ref.size)
    cfg = {"id": "quant", "bits": 8, "block": 1024, "step": step, "unit": unit}
    *_, out = _code(cfg, torch.from_numpy(cur.astype(np.float32)),
                    torch.from_numpy(ref.astype(np.float32)))
    x = cur.astype(np.float32).astype(np.float64)
    r = ref.astype(np.float32).astype(np.float64)
    d = np.zeros(-(-x.size // 1024) * 1024)
    d[:x.size] = x - r
    blocks = d.reshape(-1, 1024)
    per_block = lambda v: np.repeat(v, 1024)[:x.size]  # noqa: E731
    u = {"value": lambda: np.sqrt(np.mean(np.square(x))),
         "chunk": lambda: np.sqrt(np.mean(np.square(x - r))),
         "block": lambda: per_block(np.sqrt(np.mean(np.square(blocks), axis=1)))}[unit]()
    fit = per_block(np.abs(blocks).max(axis=1) / 127)
    err = np.abs(out.view(np.float32).astype(np.float64) - x)
    assert (err <= np.maximum(step * u, fit) / 2 * (1 + 1e-5) + 1e-9).all()
    assert (step * u > fit).mean() > 0.9 if step >= 0.5 else True
    # a budget under the changes' size moves most elements; one far above moves none
    moved = np.mean(out.view(np.float32) != ref.astype(np.float32))
    if unit != "value":
        assert moved > 0.4 if step <= 0.5 else moved < 0.5


def test_chunk_unit_spends_bits_where_the_chunk_moved():
    """With unit "chunk" one step serves the whole chunk: blocks that hardly moved round to
    zero (the closed loop carries them), the block that moved most keeps its detail; with unit
    "block" every block spends about the same bits. Same worst error, fewer bytes."""
    rng = np.random.default_rng(11)
    ref = rng.normal(0, 0.05, 64 * 256).astype(np.float32)
    size = np.repeat(np.geomspace(1e-6, 1e-2, 64), 256)  # blocks moving over four decades
    cur = (ref + rng.normal(0, 1, ref.size) * size).astype(np.float32)
    by = {}
    for unit in ("block", "chunk"):
        cfg = {"id": "quant", "bits": 8, "block": 256, "step": 1.0, "unit": unit}
        codec, et, data, refb, payload, _, out = _code(cfg, torch.from_numpy(cur),
                                                       torch.from_numpy(ref))
        moved = (out.view(np.float32) != ref).reshape(64, 256).mean(axis=1)
        by[unit] = (len(encode_frame(payload, 1, 1)), moved)
    assert by["block"][1].min() > 0.5  # every block moved
    assert by["chunk"][1][:32].max() == 0 and by["chunk"][1][-1] > 0.5
    assert by["chunk"][0] < 0.6 * by["block"][0]


def test_log_domain_value_step_bounds_relative_error():
    """In the log domain with unit "value" the step is in binades: half a step bounds the
    relative error of every element, whatever its magnitude."""
    rng = np.random.default_rng(3)
    ref = np.exp(rng.normal(-12, 4, 20_000)).astype(np.float32)
    cur = (ref * np.exp(rng.normal(0, 0.05, ref.size))).astype(np.float32)
    *_, out = _code({"id": "quant", "step": 0.1, "domain": "log", "block": 1024},
                    torch.from_numpy(cur), torch.from_numpy(ref))
    rel = np.abs(out.view(np.float32).astype(np.float64) / cur - 1)
    assert rel.max() <= 0.05 * 1.0001 and rel.max() > 0.005


def _entropy_bits(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * symbols.size)


@pytest.mark.parametrize("step", [0.5, 1.5, 4.0])
def test_symbols_cost_about_their_entropy(step):
    """A framed step payload costs the symbols' order-0 entropy plus its scales and a little
    coder overhead (3 % + 0.03 bit per element), not 8 bits a symbol: a mostly-zero stream
    costs a fraction of a bit a symbol."""
    rng = np.random.default_rng(11)
    n = 1 << 20
    ref = rng.normal(0, 0.05, n).astype(np.float32)
    cur = (ref + rng.normal(0, 1e-3, n)).astype(np.float32)
    codec, _, _, _, payload, word, _ = _code(
        {"id": "quant", "bits": 8, "block": 1024, "step": step, "unit": "block"},
        torch.from_numpy(cur), torch.from_numpy(ref))
    nb = n // 1024
    symbols = payload[4 * nb:]
    frame = encode_frame(payload, word, 1)
    floor = _entropy_bits(symbols) / 8 + 4 * nb
    # rANS tables and lane states per 64 KiB block: ~0.03 bit per element at most
    assert len(frame) <= floor * 1.03 + n / 256, (len(frame), floor)
    assert 8 * len(frame) / n < {0.5: 3.3, 1.5: 1.8, 4.0: 0.6}[step]


@pytest.mark.parametrize("cfg", [{"step": -1}, {"step": float("nan")}, {"step": 1e3},
                                 {"step": 1, "unit": "values"}, {"step": "x"}])
def test_bad_step_options_are_refused(cfg):
    with pytest.raises(CodecError):
        get_codec({"id": "quant", **cfg})


def test_step_config_round_trips_and_old_configs_read_the_same():
    c = get_codec({"id": "quant", "step": 0.5, "unit": "block"})
    assert get_codec(c.get_config()) == c
    assert {"step", "unit"}.isdisjoint(get_codec({"id": "quant"}).get_config())


# ---------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), MAX_BUDGET * 2, True, "1",
                                 None])
def test_lossy_budget_is_validated(bad):
    with pytest.raises(PolicyError, match="lossy_budget"):
        Policy(lossy_budget=bad)


def test_budget_fills_in_where_no_rule_matches():
    p = Policy(lossy_budget=0.5, rules=[Rule("model/*", "lossless")])
    assert p.lossy
    assert p.rule_for("model/w") == "lossless"
    moving = {"id": "quant", "bits": 8, "block": 256, "unit": "block", "predict": "scaled",
              "scales": "log"}
    assert p.rule_for("optimizer/state/0/exp_avg") == {**moving, "step": 1.25}
    assert p.rule_for("optimizer/state/0/momentum_buffer") == {**moving, "step": 1.0}
    sq = p.rule_for("optimizer/state/0/exp_avg_sq", 3)  # at every save: never held
    assert sq["domain"] == "log" and sq["unit"] == "value" and sq["step"] == 0.4
    assert sq["scales"] == "log"
    assert not Policy().lossy and Policy().rule_for("x") == "lossless"
    assert budget_rules(0.5) is budget_rules(0.5)  # built once per budget


def test_budget_policy_round_trips_through_json():
    p = Policy(lossy_budget=0.25, keyframe_every=50)
    d = p.to_dict()
    assert d["lossy_budget"] == 0.25 and d["rules"] == []
    assert Policy.from_dict(d) == p
    assert Policy.from_kwargs("archive", {"lossy_budget": 0.1}).lossy_budget == 0.1


def test_budget_run_records_honest_errors_and_trades_size_for_error(tmp_path):
    """Over a training run: every lossy step's recorded error bounds the measured one, the
    keyframe stays bit-exact, and a larger budget stores fewer bytes with a larger error."""
    sizes, worst = {}, {}
    for budget in (0.1, 1.0):
        states, total = {}, 0
        path = tmp_path / f"b{budget}"
        with deltackpt.open(path, keyframe_every=100, lossy_budget=budget, workers=1) as repo:
            for step, state in enumerate(train_adamw(12)):
                total += repo.save(step, state).stored_bytes
                states[step] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in flat_leaves(state).items()}
        worst[budget] = 0.0
        with deltackpt.open(path, "r") as repo:
            for step, orig in states.items():
                got, m = flat_leaves(repo.load(step)), repo.manifest(step)
                entries = {e.path: e for e in m.tensors}
                for k, v in orig.items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if m.exact or not v.is_floating_point():
                        assert torch.equal(got[k], v), (step, k)
                        continue
                    err = (got[k].double() - v.double()).abs().max().item()
                    rec = entries[k].lossy
                    assert err <= (rec["max_abs"] if rec else 0.0), (step, k)
                    worst[budget] = max(worst[budget], err)
        sizes[budget] = total
    assert sizes[1.0] < sizes[0.1] and worst[1.0] > worst[0.1] > 0


@pytest.mark.parametrize("rules", [None, [Rule("*", {"id": "quant", "step": 3, "unit": "chunk"})],
                                   [Rule("*", {"id": "quant", "bits": 8}, every=2)]])
def test_scalars_are_stored_exactly_under_any_lossy_rule(tmp_path, rules):
    """Adam's ``step`` count (a 0-d float tensor) under the budget's catch-all rule once came
    back as 5.16 for 5: a scalar is a counter, not a field of values, so no lossy rule (nor a
    held cadence) applies to it; the tensors beside it stay lossy."""
    kw = {"lossy_budget": 0.75} if rules is None else {"rules": rules}
    rng = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=rng)
    with deltackpt.open(tmp_path / "r", keyframe_every=100, workers=1, **kw) as repo:
        for k in range(4):
            state = {"optimizer": {"state": {0: {"step": torch.tensor(5.0 * k + 5),
                                                 "exp_avg": w * (k + 1)}}},
                     "one": torch.tensor([0.1 * k]), "w": w + 0.01 * k}
            repo.save(k, state)
        for k in range(1, 4):
            got, m = repo.load(k), repo.manifest(k)
            lossy = {e.path for e in m.tensors if e.lossy}
            assert got["optimizer"]["state"][0]["step"].item() == 5.0 * k + 5
            assert got["one"].item() == torch.tensor([0.1 * k]).item()
            assert not any(p.endswith(("/step", "one")) for p in lossy), lossy
            assert k % 2 and rules and rules[0].every == 2 or "w" in lossy, (k, lossy)


def test_presets_are_points_on_the_budget_curve():
    assert preset("archive").lossy_budget > preset("balanced").lossy_budget > 0
    assert not math.isnan(preset("archive").lossy_budget)


def test_scaled_prediction_codes_a_renewed_chunk_smaller():
    """Adam's first moment is mostly renewed between saves (0.9**5 of it survives five steps):
    predicting it as c x the reference (c fitted per chunk, stored in the payload) codes the
    same error budget in fewer bytes than a delta against the reference itself; where the
    chunk barely moved (a weight), c is about 1 and nothing is lost."""
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 1e-3, 100_000).astype(np.float32)
    cases = {"renewed": (0.2 * ref + rng.normal(0, 1e-3, ref.size)).astype(np.float32),
             "moved a little": (ref + rng.normal(0, 1e-5, ref.size)).astype(np.float32)}
    for name, cur in cases.items():
        sizes, errs = {}, {}
        for predict in ("none", "scaled"):
            cfg = {"id": "quant", "step": 0.5, "unit": "value", "predict": predict}
            *_, payload, _, out = _code(cfg, torch.from_numpy(cur), torch.from_numpy(ref))
            sizes[predict] = len(encode_frame(payload, 1, 1))
            errs[predict] = np.abs(out.view(np.float32).astype(np.float64) - cur).max()
            if predict == "scaled":
                c = payload[:4].copy().view(np.float32)[0]
        unit = np.sqrt(np.mean(np.square(cur.astype(np.float64))))
        assert max(errs.values()) <= 0.25 * unit * (1 + 1e-4), name  # the same budget
        if name == "renewed":
            # var(x - r) / var(x - 0.2 r) = 1.64: about half its log2, 0.36 bit per element
            assert abs(c - 0.2) < 0.01
            assert (sizes["none"] - sizes["scaled"]) * 8 / cur.size > 0.25
        else:
            assert abs(c - 1) < 1e-3 and sizes["scaled"] <= sizes["none"] * 1.01 + 8


@pytest.mark.parametrize("factor", [1.5, -0.25, float("nan"), float("inf")])
def test_scaled_prediction_refuses_a_bad_factor(factor):
    cfg = {"id": "quant", "step": 1.0, "unit": "block", "predict": "scaled"}
    cur, ref = torch.randn(300), torch.randn(300)
    codec, et, data, refb, payload, _, _ = _code(cfg, cur, ref)
    bad = payload.copy()
    bad[:4] = np.frombuffer(np.float32(factor).tobytes(), np.uint8)
    with pytest.raises(CorruptChunkError, match="prediction factor"):
        codec.decode(bad, refb, et, data.size)


def test_scaled_prediction_options_are_checked():
    with pytest.raises(CodecError, match="predict"):
        get_codec({"id": "quant", "predict": "linear"})
    assert "predict" not in get_codec({"id": "quant"}).get_config()
    assert get_codec({"id": "quant", "predict": "scaled"}).get_config()["predict"] == "scaled"


@pytest.mark.parametrize("domain", ["linear", "log"])
def test_unbiased_where_nearest_lags(domain):
    """Every value drifts the same way by a fifth of a step: rounding to the nearest leaves
    them all where they were (each a fifth of a step behind, all in the same direction);
    stochastic rounding moves a fifth of them a whole step, so the mean error is about 0,
    while no element errs by a whole step or more (as the recorded bound says)."""
    rng = np.random.default_rng(2)
    ref = np.exp(rng.normal(-10, 2, 50_000)).astype(np.float32)
    cfg = {"id": "quant", "step": 0.5, "unit": "value", "domain": domain}
    if domain == "log":  # a step is half a binade
        cur = (ref * np.float32(2 ** (-0.2 * 0.5))).astype(np.float32)
        in_steps = lambda y: np.log2(y / cur) / 0.5  # noqa: E731
    else:  # a step is half the values' RMS
        s = 0.5 * np.sqrt(np.mean(np.square(ref.astype(np.float64))))
        cur = (ref - np.float32(0.2 * s)).astype(np.float32)
        s = 0.5 * np.sqrt(np.mean(np.square(cur.astype(np.float64))))
        in_steps = lambda y: (y - cur) / s  # noqa: E731
    errs, sizes = {}, {}
    for how in ({"rounding": "nearest"}, {"rounding": "stochastic"}, {"predict": "scaled"}):
        codec, et, data, refb, payload, _, out = _code({**cfg, **how}, torch.from_numpy(cur),
                                                       torch.from_numpy(ref))
        got = out.view(np.float32).astype(np.float64)
        assert (np.abs(got - cur) <= codec.error_bound(data, refb, et, payload)).all()
        key = next(iter(how.values()))
        errs[key], sizes[key] = in_steps(got), len(encode_frame(payload, 1, 1))
    assert abs(errs["nearest"].mean() - 0.2) < 0.01           # all of it lags, the same way
    assert abs(errs["stochastic"].mean()) < 0.02              # unbiased
    assert np.abs(errs["stochastic"]).max() < 1.0 + 1e-3      # within a whole step
    if domain == "log":  # a common factor is an offset of the bit patterns: the scaled
        # prediction takes it out, unbiased at no cost (stochastic rounding pays for a fifth
        # of ±1s); in the linear domain this drift is a shift, which no factor predicts
        assert abs(errs["scaled"].mean()) < 0.02 and np.abs(errs["scaled"]).max() <= 0.5 + 1e-3
        assert sizes["scaled"] < 0.5 * sizes["stochastic"]
