"""``quant``'s ``unit="weighted"``: a block's step set by the loss's sensitivity (Adam's second
moment for a weight, uniform for its first moment), and the writer's pairing of each tensor
with those weights (deltackpt.engine.sensitivity)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import flat_leaves
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.codecs import get_codec
from deltackpt.codecs.quant import WEIGHTED_RANGE
from deltackpt.engine.policy import Rule
from deltackpt.engine.sensitivity import sensitivities
from deltackpt.format.dtypes import torch_type
from deltackpt.format.frame import encode_frame
from deltackpt.format.tree import flatten

F32 = torch_type(torch.float32)
WEIGHTED = {"id": "quant", "bits": 8, "block": 256, "step": 1.5, "unit": "weighted"}
BLOCK = {**WEIGHTED, "unit": "block"}


def _scales(payload: np.ndarray, nb: int) -> np.ndarray:
    return payload[:4 * nb].copy().view(np.float32).astype(np.float64)


def _synthetic(seed: int = 3, nb: int = 64):
    """A chunk whose blocks all move alike, and weights spanning four decades by block."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 0.05, nb * 256).astype(np.float32)
    cur = (ref + rng.normal(0, 1e-3, ref.size)).astype(np.float32)
    w = np.repeat(np.geomspace(1e-4, 1.0, nb), 256) * rng.uniform(0.5, 1.5, ref.size)
    return cur, ref, w


def _weighted_error(cur, ref, w, cfg, weights):
    codec = get_codec(cfg)
    data, refb = cur.view(np.uint8), ref.view(np.uint8)
    if weights is not None:
        unit = np.sqrt(codec.weighted_energy(data, refb, F32, weights) / cur.size)
        codec = codec.weighted(weights, unit)
    payload, _ = codec.encode(data, refb, F32)
    out = get_codec(cfg).decode(payload, refb, F32, data.size).view(np.float32)
    bound = get_codec(cfg).error_bound(data, refb, F32, payload)
    e = out.astype(np.float64) - cur
    assert (np.abs(e) <= bound).all()  # the recorded bound holds whatever the weights were
    return payload, float(np.sum(w * e * e)), len(encode_frame(payload, 1, 1))


def test_weighted_steps_follow_the_sensitivity_within_range():
    """Blocks where the loss is flat (small weights) get coarser steps, sensitive ones finer,
    each within WEIGHTED_RANGE x its "block" step; decoding needs no weights."""
    cur, ref, w = _synthetic()
    p_block, *_ = _weighted_error(cur, ref, w, BLOCK, None)
    p_w, *_ = _weighted_error(cur, ref, w, WEIGHTED, w)
    s_block, s_w = _scales(p_block, 64), _scales(p_w, 64)
    ratio = s_w / s_block
    lo, hi = WEIGHTED_RANGE
    assert (ratio >= lo * (1 - 1e-6)).all() and (ratio <= hi * (1 + 1e-6)).all()
    thirds = [ratio[k:k + 21].mean() for k in (0, 21, 42)]
    assert thirds[0] > thirds[1] > thirds[2]  # coarser as the weight falls
    assert ratio[0] == pytest.approx(hi) and ratio[-1] < 1


def test_weighted_spends_fewer_bytes_for_the_same_weighted_error():
    """Against unit "block" at the same step: less weighted error; at a coarser step the same
    weighted error or less, in far fewer bytes (the allocation minimizing sum w e^2 per bit)."""
    cur, ref, w = _synthetic()
    _, e_block, n_block = _weighted_error(cur, ref, w, BLOCK, None)
    _, e_same, _ = _weighted_error(cur, ref, w, WEIGHTED, w)
    assert e_same < e_block
    _, e_coarse, n_coarse = _weighted_error(cur, ref, w, {**WEIGHTED, "step": 2.0}, w)
    assert e_coarse <= e_block and n_coarse < 0.6 * n_block


def test_without_weights_it_codes_as_block_and_uniform_weights_as_one_step():
    cur, ref, _ = _synthetic()
    data, refb = cur.view(np.uint8), ref.view(np.uint8)
    plain = get_codec(WEIGHTED).encode(data, refb, F32)[0]
    assert np.array_equal(plain, get_codec(BLOCK).encode(data, refb, F32)[0])
    codec = get_codec(WEIGHTED)
    unit = np.sqrt(codec.weighted_energy(data, refb, F32, None) / cur.size)
    s = _scales(codec.weighted(None, unit).encode(data, refb, F32)[0], 64)
    assert np.allclose(s, 1.5 * unit, rtol=1e-6)  # blocks alike: one step, inside the range
    assert get_codec(BLOCK).weighted(None, unit) is not None
    assert not get_codec(BLOCK).wants_weights() and get_codec(WEIGHTED).wants_weights()


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       n=st.sampled_from([1, 7, 256, 300, 1024]), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.0, 1e-4, 1.0]), domain=st.sampled_from(["linear", "log"]),
       special=st.sampled_from([None, 0.0, np.nan, np.inf, -1.0]), uniform=st.booleans())
def test_weighted_round_trip_within_bound(dtype, n, seed, scale, domain, special, uniform):
    """Whatever the weights (zeros, NaN, infinities, negatives, or none), a weighted encode
    decodes without them, deterministically, within the codec's error bound."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g, dtype=torch.float64)
    cur = ref + scale * torch.randn(n, generator=g, dtype=torch.float64)
    if domain == "log":
        ref, cur = ref.abs() + 1e-3, cur.abs() + 1e-3
    et = torch_type(dtype)
    data, refb = (t.to(dtype).view(torch.uint8).numpy().copy() for t in (cur, ref))
    w = None if uniform else np.random.default_rng(seed).lognormal(0, 3, n)
    if w is not None and special is not None:
        w[::3] = special
    cfg = {**WEIGHTED, "block": 64, "domain": domain, "predict": "scaled"}
    codec = get_codec(cfg)
    energy = codec.weighted_energy(data, refb, et, w)
    assert energy >= 0
    enc = codec.weighted(w, max(np.sqrt(energy / n), 1e-30))
    payload, _ = enc.encode(data.copy(), refb.copy(), et)
    assert np.array_equal(payload, enc.encode(data.copy(), refb.copy(), et)[0])
    out = get_codec(cfg).decode(payload.copy(), refb.copy(), et, data.size)
    bound = get_codec(cfg).error_bound(data, refb, et, payload)
    x = cur.to(dtype).double().numpy()
    y = torch.from_numpy(out.copy()).view(dtype).double().numpy()
    assert (np.abs(y - x) <= bound).all()


def test_config_round_trips_and_is_encoder_only():
    c = get_codec(WEIGHTED)
    assert c.get_config()["unit"] == "weighted" and get_codec(c.get_config()) == c


# --------------------------------------------------------------------------------- pairing
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _step(model, opt):
    model(torch.randn(16, 8)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _pairs(state):
    tree, leaves = flatten(state)
    path = {leaf.index: leaf.path for leaf in leaves}
    return {p: None if w.source is None else path[w.source]
            for p, w in sensitivities(tree, leaves).items()}


@pytest.mark.parametrize("named", [True, False])
def test_parameters_pair_with_their_second_moment(named):
    """By ``param_names`` where the optimizer has them, else in order (BatchNorm's buffers,
    which share shapes with parameters, skipped); first moments get uniform weights."""
    m = _model()
    opt = torch.optim.AdamW(m.named_parameters() if named else m.parameters())
    _step(m, opt)
    pairs = _pairs({"model": m.state_dict(), "optim": opt.state_dict()})
    names = [n for n, _ in m.named_parameters()]
    for i, n in enumerate(names):
        assert pairs[f"model/{n}"] == f"optim/state/{i}/exp_avg_sq"
        assert pairs[f"optim/state/{i}/exp_avg"] is None
    assert not any(k.startswith("model/1.running") for k in pairs)
    assert not any(k.endswith("exp_avg_sq") for k in pairs)


def test_prefixed_names_pair_and_ambiguous_ones_do_not():
    m = _model()
    opt = torch.optim.Adam(m.named_parameters())
    _step(m, opt)
    sd = m.state_dict()
    state = {"sd": {f"net.{k}": v for k, v in sd.items()}, "opt": opt.state_dict()}
    assert _pairs(state)["sd/net.0.weight"] == "opt/state/0/exp_avg_sq"
    twice = {"a": sd, "b": {k: v.clone() for k, v in sd.items()}, "opt": opt.state_dict()}
    assert not any(k.startswith(("a/", "b/")) for k in _pairs(twice))


def test_no_pairing_without_names_for_two_optimizers_or_missing_state():
    g, d = _model(), _model()
    og, od = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    _step(g, og)
    _step(d, od)
    state = {"g": g.state_dict(), "d": d.state_dict(), "og": og.state_dict(),
             "od": od.state_dict()}
    assert all(v is None for v in _pairs(state).values())  # moments only: uniform
    fresh = _model()
    assert _pairs({"model": fresh.state_dict(),
                   "opt": torch.optim.Adam(fresh.parameters()).state_dict()}) == {}
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    _step(fresh, sgd)
    assert _pairs({"model": fresh.state_dict(), "opt": sgd.state_dict()}) == {}


# ---------------------------------------------------------------------------------- writer
def _train_states(n: int):
    """A model where half the layers see gradients 1000x smaller (flat for the loss)."""
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256),
                            torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(m.named_parameters(), lr=1e-3)
    x = torch.randn(64, 64)
    for _ in range(n):
        for _ in range(3):
            out = m[2](m[1](m[0](x)) * 1e-3 + m[0](x).detach())
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
        yield {"model": m.state_dict(), "opt": opt.state_dict()}


def test_writer_weighs_parameters_by_their_second_moment(tmp_path):
    """A weighted rule stores fewer bytes than the same step per block, its errors (worse
    where the loss is flat) bounded by what the manifest records; exact keyframe kept."""
    rule = {"id": "quant", "bits": 8, "block": 256, "step": 2.0, "predict": "scaled"}
    sizes, flat_err = {}, {}
    for unit in ("block", "weighted"):
        rules = [Rule("*exp_avg_sq", "lossless"), Rule("*", {**rule, "unit": unit})]
        originals = {}
        with deltackpt.open(tmp_path / unit, rules=rules, keyframe_every=100,
                            workers=1) as repo:
            for k, state in enumerate(_train_states(6)):
                originals[k] = {p: v.clone() for p, v in flat_leaves(state).items()
                                if isinstance(v, torch.Tensor)}
                info = repo.save(k, state)
                sizes[unit] = sizes.get(unit, 0) + (info.stored_bytes if k else 0)
            for k, orig in originals.items():
                got, m = flat_leaves(repo.load(k)), repo.manifest(k)
                entries = {e.path: e for e in m.tensors}
                for p, v in orig.items():
                    if k == 0 or not v.is_floating_point() or v.numel() <= 1:
                        assert torch.equal(got[p], v), (k, p)
                        continue
                    err = (got[p].double() - v.double()).abs().max().item()
                    assert err <= (entries[p].lossy or {"max_abs": 0.0})["max_abs"], (k, p)
            last = flat_leaves(repo.load(5))
            flat_err[unit] = (last["model/1.weight"] - originals[5]["model/1.weight"]).abs().max()
    assert sizes["weighted"] < 0.9 * sizes["block"], sizes
    assert flat_err["weighted"] > flat_err["block"]  # the flat layer took the error
