"""``squant`` (sparse quantized closed-loop deltas) and ``hold`` with rules' ``every=k``:
round trips over float types and shapes, error bounds, policy validation, and a short training
run whose every lossy step's recorded error bounds the measured one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import assert_bitexact, check_lossy_round_trip, flat_leaves, train_adamw
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.codecs import NotApplicable, get_codec
from deltackpt.engine.policy import Policy, Rule, preset
from deltackpt.errors import CodecError, CorruptChunkError, PolicyError
from deltackpt.format.dtypes import torch_type

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [
    {"id": "squant"},
    {"id": "squant", "bits": 2, "block": 8, "keep": 0.5},
    {"id": "squant", "bits": 8, "block": 16, "keep": 1.0},
    {"id": "squant", "bits": 4, "block": 3, "keep": 0.3, "levels": "log"},
    {"id": "squant", "bits": 2, "block": 64, "keep": 0.05, "levels": "log"},
]


def _b(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().copy()


@settings(max_examples=60, deadline=None)
@given(cfg=st.sampled_from(CONFIGS), dtype=st.sampled_from(DTYPES),
       shape=st.sampled_from([(), (0,), (1,), (7,), (8,), (9,), (15, 17), (1024,), (1025,),
                              (3, 1024)]),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]),
       positive=st.booleans())
def test_round_trip_within_bound(cfg, dtype, shape, seed, scale, positive):
    check_lossy_round_trip(cfg, dtype, shape, seed, scale, positive)


def test_keep_is_a_fraction_per_block_with_ties_to_the_lower_index():
    codec, et = get_codec({"id": "squant", "bits": 8, "block": 4, "keep": 0.5}), \
        torch_type(torch.float32)
    ref = np.zeros(8, np.float32)
    x = np.array([1, 3, 3, 2, 0, 0, 5, 0], np.float32)  # ties 3 and 3: both kept (k=2)
    payload, _ = codec.encode(x.view(np.uint8), ref.view(np.uint8), et)
    y = codec.decode(payload, ref.view(np.uint8), et, x.nbytes).view(np.float32)
    assert np.flatnonzero(y).tolist() == [1, 2, 6]       # the zeros are never kept
    x2 = np.array([2, 2, 2, 2, 0, 0, 0, 0], np.float32)
    p2, _ = codec.encode(x2.view(np.uint8), ref.view(np.uint8), et)
    y2 = codec.decode(p2, ref.view(np.uint8), et, x2.nbytes).view(np.float32)
    assert np.flatnonzero(y2).tolist() == [0, 1]         # equal magnitudes: lower index first


def test_pruned_updates_feed_back_closed_loop():
    """A small steady drift that one save prunes is stored once it has accumulated."""
    codec, et = get_codec({"id": "squant", "bits": 4, "block": 16, "keep": 0.25}), \
        torch_type(torch.float32)
    rng = np.random.default_rng(0)
    drift = rng.uniform(0.5, 1.0, 64).astype(np.float32) * 1e-3
    x = np.zeros(64, np.float32)
    recon = x.copy()
    worst = []
    for _ in range(40):
        x = (x + drift).astype(np.float32)
        p, _ = codec.encode(x.view(np.uint8), recon.view(np.uint8), et)
        recon = codec.decode(p, recon.view(np.uint8), et, x.nbytes).view(np.float32).copy()
        worst.append(float(np.abs(recon - x).max()))
    # bounded by a few saves' drift (1/keep saves), never growing with the chain
    assert max(worst[10:]) < 8 * float(drift.max())
    assert max(worst[-10:]) <= max(worst[10:20]) * 1.5


def test_malformed_payloads_are_corrupt():
    codec, et = get_codec({"id": "squant", "bits": 4, "block": 8, "keep": 0.5}), \
        torch_type(torch.float32)
    ref = np.zeros(10, np.float32)
    x = np.arange(10, dtype=np.float32)
    p, _ = codec.encode(x.view(np.uint8), ref.view(np.uint8), et)
    bad = p.copy()
    bad[8 + 1] |= 0x80    # a bitmap bit past the chunk's 10 elements
    with pytest.raises(CorruptChunkError):
        codec.decode(bad, ref.view(np.uint8), et, x.nbytes)
    bad = p.copy()
    bad[:4] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    with pytest.raises(CorruptChunkError):
        codec.decode(bad, ref.view(np.uint8), et, x.nbytes)
    with pytest.raises(CorruptChunkError):
        codec.decode(p[:-1], ref.view(np.uint8), et, x.nbytes)


@pytest.mark.parametrize("cfg, words", [
    ({"id": "squant", "bits": 3}, "bits"), ({"id": "squant", "keep": 0}, "keep"),
    ({"id": "squant", "keep": 1.5}, "keep"), ({"id": "squant", "levels": "kmeans"}, "levels"),
    ({"id": "squant", "bits": 8, "levels": "log"}, "levels='log'"),
    ({"id": "squant", "domain": "ln"}, "domain"), ({"id": "squant", "block": 0}, "block"),
    ({"id": "squant", "kep": 0.1}, "unknown"), ({"id": "hold", "bits": 4}, "no options")])
def test_bad_codec_options_are_refused(cfg, words):
    with pytest.raises(CodecError, match=words):
        get_codec(cfg)
    with pytest.raises(PolicyError, match="rule"):
        Rule("*", cfg)


def test_rule_every_is_validated():
    q4 = {"id": "quant", "bits": 4}
    assert Rule("*", q4, 3).every == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(PolicyError, match="every"):
            Rule("*", q4, bad)
    for codec in ("lossless", "drop", {"id": "xor"}):
        with pytest.raises(PolicyError, match="every"):
            Rule("*", codec, 2)
    p = Policy.from_dict({"rules": [{"pattern": "*exp_avg_sq", "codec": q4, "every": 4}]})
    assert p.rules[0].every == 4
    assert Policy.from_dict(p.to_dict()) == p
    with pytest.raises(PolicyError, match="every"):
        Policy.from_dict({"rules": [{"pattern": "*", "codec": q4, "evry": 4}]})
    assert p.rule_for("optimizer/state/0/exp_avg_sq", 4) == q4
    assert p.rule_for("optimizer/state/0/exp_avg_sq", 5) == {"id": "hold"}


def test_hold_decodes_to_its_reference_and_declines_non_floats():
    codec = get_codec("hold")
    et = torch_type(torch.float32)
    x, r = np.ones(5, np.float32), np.zeros(5, np.float32)
    p, _ = codec.encode(x.view(np.uint8), r.view(np.uint8), et)
    assert p.size == 0
    assert np.array_equal(codec.decode(p, r.view(np.uint8), et, x.nbytes), r.view(np.uint8))
    assert np.array_equal(codec.error_bound(x.view(np.uint8), r.view(np.uint8), et, p),
                          np.ones(5))
    with pytest.raises(NotApplicable):
        codec.encode(np.zeros(4, np.uint8), np.zeros(4, np.uint8), torch_type(torch.int32))


@pytest.mark.parametrize("policy", ["archive", Policy(keyframe_every=8, exact_every=4, rules=(
    Rule("*exp_avg_sq", {"id": "squant", "bits": 4, "keep": 0.5, "domain": "log"}, 3),
    Rule("*", {"id": "squant", "bits": 2, "keep": 0.2, "levels": "log", "block": 64})))])
def test_training_run_records_honest_errors(tmp_path, policy):
    """Every lossy step's recorded max error bounds the measured one (held tensors included);
    exact steps (keyframes, exact_every) stay bit-exact."""
    states = {}
    with deltackpt.open(tmp_path / "r", policy=policy, chunk_bytes=4096, workers=1) as repo:
        for step, state in enumerate(train_adamw(14)):
            repo.save(step, state)
            states[step] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                            for k, v in flat_leaves(state).items()}
    held = 0
    with deltackpt.open(tmp_path / "r", "r") as repo:
        for step, orig in states.items():
            m = repo.manifest(step)
            before = {e.path: e for e in repo.manifest(step - 1).tensors} if step else {}
            got = flat_leaves(repo.load(step))
            if m.exact:
                for k, v in orig.items():
                    if isinstance(v, torch.Tensor):
                        assert_bitexact(got[k], v)
                continue
            entries = {e.path: e for e in m.tensors}
            for k, v in orig.items():
                if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()):
                    continue
                err = (got[k].double() - v.double()).abs().max().item()
                rec = entries[k].lossy
                assert err <= (rec["max_abs"] if rec else 0.0), (step, k)
                # held: lossy, and the very chunk records of the step before (no bytes)
                held += bool(rec) and [c.id for c in entries[k].chunks] == \
                    [c.id for c in before[k].chunks]
        assert any(not repo.manifest(s).exact for s in states)
    pol = preset(policy) if isinstance(policy, str) else policy
    assert held or not any(r.every > 1 for r in pol.rules)


def test_archive_preset_keeps_its_keyframes():
    p = preset("archive")
    assert p.keyframe_every == 100 and p.exact_every == 0 and p.lossy
    assert [r.every for r in p.effective_rules] == [1, 1, 1]  # exp_avg_sq never held
    assert p.lossy_budget == 0.95
    assert p.rule_for("optimizer/state/3/exp_avg_sq", 7)["step"] == 0.76
    assert p.rule_for("optimizer/state/3/exp_avg", 7)["step"] == 2.375
    assert p.rule_for("model/w", 7)["step"] == 1.9
    assert all(p.rule_for(path, 7)["scales"] == "log" for path in (
        "optimizer/state/3/exp_avg_sq", "optimizer/state/3/exp_avg", "model/w"))
