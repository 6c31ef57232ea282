"""Lossy tiers: closed-loop error bounds, codec selection by policy, and honesty about fidelity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import given
from hypothesis import strategies as st

import deltackpt
from deltackpt.cli.main import main
from deltackpt.codecs import NotApplicable, get_codec
from deltackpt.engine.policy import Policy, Rule, preset
from deltackpt.format.dtypes import torch_type


def _b(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _walk(n_steps: int, shape=(64, 48), seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out = []
    for _ in range(n_steps):
        x = x + scale * torch.randn(shape, generator=g)
        out.append(x.clone())
    return out


QUANT8 = {"id": "quant", "bits": 8, "block": 64}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_closed_loop_error_is_one_quantization_step(tmp_path, bits):
    """Error at every step of a long chain is within half a quantization step of *that* step's
    delta (plus float32 rounding): it does not accumulate along the chain."""
    cfg = {"id": "quant", "bits": bits, "block": 64}
    qmax = (1 << (bits - 1)) - 1
    states = _walk(40)
    with deltackpt.open(tmp_path / "r", rules=(Rule("*", cfg),), keyframe_every=1000) as repo:
        prev_recon = None
        worst_ratio = 0.0
        for step, x in enumerate(states):
            info = repo.save(step, {"w": x})
            y = repo.load(step)["w"]
            if prev_recon is None:
                assert info.exact and torch.equal(y, x)
            else:
                assert not info.exact
                d = (x - prev_recon).reshape(-1, 64).double()
                half_step = d.abs().amax(1, keepdim=True) / qmax / 2
                err = (y - x).reshape(-1, 64).double().abs()
                bound = half_step * (1 + 1e-5) + 2 * torch.finfo(torch.float32).eps * \
                    x.reshape(-1, 64).double().abs()
                assert bool((err <= bound).all()), f"step {step}: error exceeds one step"
                worst_ratio = max(worst_ratio, float((err / bound.clamp_min(1e-30)).max()))
            prev_recon = y
        assert worst_ratio > 0.1  # the bound is tight enough to mean something


def test_recorded_error_matches_actual(tmp_path):
    states = _walk(6, seed=1)
    with deltackpt.open(tmp_path / "r", rules=(Rule("*", {"id": "quant", "bits": 4}),)) as repo:
        for step, x in enumerate(states):
            repo.save(step, {"w": x})
        for step, x in enumerate(states[1:], start=1):
            entry = repo.manifest(step).tensor("w")
            y = repo.load(step)["w"]
            err = (y.double() - x.double()).abs()
            assert entry.lossy is not None
            assert entry.lossy["max_abs"] == pytest.approx(float(err.max()), rel=1e-9)
            assert entry.lossy["rms"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-6)
            assert entry.lossy["max_rel"] == pytest.approx(
                float(err.max() / x.double().abs().max()), rel=1e-9)
            assert entry.lossy["source_digest"] != entry.digest.hex()


def test_lossy_steps_are_never_reported_exact_and_exact_steps_stay_exact(tmp_path, capsys):
    states = _walk(12, seed=2)
    pol = Policy(rules=(Rule("model/*", QUANT8),), exact_every=4, keyframe_every=8)
    with deltackpt.open(tmp_path / "r", policy=pol) as repo:
        infos = [repo.save(s, {"model": {"w": x}, "opt": {"m": x * 2}})
                 for s, x in enumerate(states)]
        for s, (info, x) in enumerate(zip(infos, states)):
            m = repo.manifest(s)
            exact_expected = (m.delta_index % 4 == 0)
            assert info.exact == m.exact == exact_expected, s
            got = repo.load(s)
            assert_bitexact(got["opt"], {"m": x * 2})  # no rule: always exact
            if exact_expected:
                assert_bitexact(got["model"], {"w": x})
            else:
                assert not torch.equal(got["model"]["w"], x)
                assert info.max_rel_error > 0
        report = repo.verify()
        assert report.ok
        lossy = sorted(report.lossy_steps)
        assert lossy == [s for s, i in enumerate(infos) if not i.exact] and lossy
    assert main(["log", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.count(" lossy ") == len(lossy) and "exact" in out
    assert main(["verify", str(tmp_path / "r")]) == 0
    assert "lossy step(s)" in capsys.readouterr().out


def test_policy_selects_codec_per_path_and_dtype(tmp_path):
    pol = Policy(rules=(Rule("*exp_avg_sq", {"id": "quant", "bits": 8, "domain": "log"}),
                        Rule("*exp_avg", {"id": "quant", "bits": 4}),
                        Rule("model/frozen", "lossless"),
                        Rule("*", QUANT8)), keyframe_every=100)
    g = torch.Generator().manual_seed(3)

    def state(i):
        return {"model": {"w": torch.randn(32, 32, generator=g), "frozen": torch.ones(64) * i,
                          "ids": torch.arange(100) * i},
                "opt": {"state": {0: {"exp_avg": torch.randn(500, generator=g),
                                      "exp_avg_sq": torch.rand(500, generator=g)}}}}

    with deltackpt.open(tmp_path / "r", policy=pol) as repo:
        repo.save(0, state(0))
        repo.save(1, state(1))
        m = repo.manifest(1)

        def codec_ids(path):
            t = m.tensor(path)
            return {t.codecs[c.codec].get_config()["id"] for c in t.chunks}, t

        ids, t = codec_ids("opt/state/0/exp_avg_sq")
        assert ids == {"quant"} and t.codecs[t.chunks[0].codec].get_config()["domain"] == "log"
        ids, t = codec_ids("opt/state/0/exp_avg")
        assert ids == {"quant"} and t.codecs[t.chunks[0].codec].get_config()["bits"] == 4
        assert codec_ids("model/w")[0] == {"quant"}
        assert codec_ids("model/frozen")[0] <= {pol.codec, "raw"}
        assert codec_ids("model/ids")[0] <= {pol.codec, "raw"}  # integers are never quantized
        assert m.tensor("model/frozen").lossy is None and m.tensor("model/ids").lossy is None
        assert_bitexact(repo.load(1, select="model/ids"), {"model": {"ids": torch.arange(100)}})


def test_log_domain_keeps_zeros_and_sign(tmp_path):
    g = torch.Generator().manual_seed(4)
    v = torch.rand(4096, generator=g) ** 4
    v[::5] = 0
    with deltackpt.open(tmp_path / "r", rules=(Rule("*", {"id": "quant", "bits": 4,
                                                          "domain": "log"}),)) as repo:
        repo.save(0, {"v": v})
        prev = v
        for s in range(1, 6):
            v = 0.999 * v + 0.001 * torch.rand(4096, generator=g) ** 2
            v[::5] = 0
            repo.save(s, {"v": v})
            y = repo.load(s)["v"]
            assert bool((y >= 0).all())
            assert torch.equal(y[::5], torch.zeros_like(y[::5]))
            # the bound holds in the bit-pattern ("log") domain: half a 4-bit step of the
            # block's delta between the values' bit patterns, plus rounding
            nz = v != 0
            vb = v.view(torch.int32).double()
            pb = prev.view(torch.int32).double()
            yb = y.view(torch.int32).double()
            d = torch.where(nz, vb - pb, 0).reshape(-1, 256)
            half = d.abs().amax(1, keepdim=True) / 7 / 2 * (1 + 1e-6) + 1
            assert bool(((yb - vb).reshape(-1, 256).abs() <= half).all())
            prev = y


def test_drop_rule_omits_tensors_at_inexact_steps(tmp_path):
    states = _walk(6, seed=5)
    pol = Policy(rules=(Rule("optimizer/*", "drop"), Rule("*", QUANT8)), exact_every=3)
    with deltackpt.open(tmp_path / "r", policy=pol) as repo:
        for s, x in enumerate(states):
            repo.save(s, {"model": {"w": x}, "optimizer": {"m": x + 1}})
        for s, x in enumerate(states):
            got = repo.load(s)
            if repo.manifest(s).delta_index % 3 == 0:
                assert_bitexact(got["optimizer"], {"m": x + 1})
            else:
                assert got["optimizer"]["m"] is None
                assert not repo.manifest(s).exact
        assert repo.verify().ok


def test_reopen_continues_closed_loop(tmp_path):
    states = _walk(10, seed=6)
    pol = Policy(rules=(Rule("*", QUANT8),), keyframe_every=100)
    path = tmp_path / "r"
    for lo, hi in ((0, 5), (5, 10)):
        with deltackpt.open(path, policy=pol) as repo:
            for s in range(lo, hi):
                repo.save(s, {"w": states[s]})
    with deltackpt.open(path, mode="r") as repo:
        assert repo.manifest(5).kind == "delta"  # the reference was rebuilt from disk
        prev = repo.load(4)["w"]
        y = repo.load(5)["w"]
        d = (states[5] - prev).reshape(-1, 64).double()
        bound = d.abs().amax(1, keepdim=True) / 127 / 2 * (1 + 1e-5) + 1e-6
        assert bool(((y - states[5]).reshape(-1, 64).double().abs() <= bound).all())
        assert repo.verify().ok


def test_nonfinite_chunks_fall_back_to_exact(tmp_path):
    x = torch.randn(256)
    y = x + 0.01
    y[7] = float("nan")
    with deltackpt.open(tmp_path / "r", rules=(Rule("*", QUANT8),), chunk_bytes=256) as repo:
        repo.save(0, {"w": x})
        repo.save(1, {"w": y})
        got = repo.load(1)["w"]
        # the chunk holding the NaN is stored exactly; the others are quantized
        assert torch.equal(got[:64].view(torch.int32), y[:64].view(torch.int32))
        assert bool(torch.isnan(got[7]))


# -- codecs on their own ------------------------------------------------------------------
def test_lowrank_selects_rank_by_energy():
    g = torch.Generator().manual_seed(7)
    et = torch_type(torch.float32)
    ref = torch.randn(96, 80, generator=g)
    for k in (1, 3, 6):
        d = torch.randn(96, k, generator=g) @ torch.randn(k, 80, generator=g)
        d += 1e-5 * torch.randn(96, 80, generator=g)
        codec = get_codec({"id": "lowrank", "cols": 80, "energy": 0.999})
        payload, _ = codec.encode(_b(ref + d), _b(ref), et)
        assert int(payload[:4].view("<u4")[0]) == k
        fixed = get_codec({"id": "lowrank", "cols": 80, "rank": 2})
        p2, _ = fixed.encode(_b(ref + d), _b(ref), et)
        assert int(p2[:4].view("<u4")[0]) == 2  # a fixed rank is used as given
    noise = torch.randn(96, 80, generator=g)
    with pytest.raises(NotApplicable):  # full-rank noise: factors would not pay
        get_codec({"id": "lowrank", "cols": 80, "energy": 0.99}).encode(
            _b(ref + noise), _b(ref), et)


def test_lowrank_residual_bounds_error():
    g = torch.Generator().manual_seed(8)
    et = torch_type(torch.float32)
    ref = torch.randn(64, 64, generator=g)
    x = ref + torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) \
        + 0.01 * torch.randn(64, 64, generator=g)
    codec = get_codec({"id": "lowrank", "cols": 64, "rank": 2, "residual_bits": 8,
                       "block": 64})
    payload, _ = codec.encode(_b(x), _b(ref), et)
    y = torch.from_numpy(codec.decode(payload, _b(ref), et, x.numel() * 4).copy()).view(
        torch.float32).reshape(64, 64)
    no_res = get_codec({"id": "lowrank", "cols": 64, "rank": 2})
    p0, _ = no_res.encode(_b(x), _b(ref), et)
    y0 = torch.from_numpy(no_res.decode(p0, _b(ref), et, x.numel() * 4).copy()).view(
        torch.float32).reshape(64, 64)
    assert float((y - x).abs().max()) < float((y0 - x).abs().max()) / 10


def test_lowrank_in_repository_aligns_chunks_to_rows(tmp_path):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(200, 30, generator=g)
    pol = Policy(rules=(Rule("*", {"id": "lowrank", "rank": 2, "residual_bits": 8}),),
                 chunk_bytes=1000, keyframe_every=100)
    with deltackpt.open(tmp_path / "r", policy=pol) as repo:
        repo.save(0, {"w": w})
        w2 = w + torch.randn(200, 2, generator=g) @ torch.randn(2, 30, generator=g) * 0.1
        repo.save(1, {"w": w2})
        t = repo.manifest(1).tensor("w")
        assert t.chunk_bytes % (30 * 4) == 0
        assert {t.codecs[c.codec].codec_id for c in t.chunks} == {"lowrank"}
        assert float((repo.load(1)["w"] - w2).abs().max()) < 1e-2
        assert repo.verify().ok


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.sampled_from([1, 7, 32]))
def test_sparse_codec_is_exact(seed, n_rows_changed, block):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((100, 32)).astype(np.float32)
    cur = ref.copy()
    rows = rng.choice(100, size=min(n_rows_changed, 100), replace=False)
    cur[rows] += rng.standard_normal((rows.size, 32)).astype(np.float32)
    et = torch_type(torch.float32)
    codec = get_codec({"id": "sparse", "block": block})
    payload, _ = codec.encode(cur.reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8),
                              et)
    out = codec.decode(payload, ref.reshape(-1).view(np.uint8), et, cur.nbytes)
    assert out.tobytes() == cur.tobytes()
    if block == 32:
        assert payload.size == 4 + rows.size * (4 + 32 * 4)


def test_sparse_rule_keeps_steps_exact(tmp_path):
    g = torch.Generator().manual_seed(10)
    emb = torch.randn(5000, 16, generator=g)
    pol = Policy(codec="diff", rules=(Rule("emb", {"id": "sparse", "block": 16}),))
    with deltackpt.open(tmp_path / "r", policy=pol) as repo:
        repo.save(0, {"emb": emb})
        for s in range(1, 5):
            rows = torch.randint(0, 5000, (20,), generator=g)
            emb[rows] += 0.1
            info = repo.save(s, {"emb": emb})
            assert info.exact
            assert info.stored_bytes < emb.numel() * 4 / 20
            assert torch.equal(repo.load(s)["emb"], emb)


def test_presets_and_json_policies():
    assert preset("lossless") == Policy()
    for name in ("balanced", "archive"):
        p = preset(name)
        assert p.lossy and not p.is_exact(False, 1) and p.is_exact(True, 0)
        assert Policy.from_dict(p.to_dict()) == p
    p = Policy.from_dict({"preset": "balanced", "exact_every": 3})
    assert p.exact_every == 3 and p.rules == preset("balanced").rules
    with pytest.raises(ValueError):
        preset("nope")
    with pytest.raises(deltackpt.PolicyError, match="delta codec"):
        Rule("*", {"id": "raw"})  # not a delta codec


def test_rule_with_fallback_list_tries_codecs_in_order(tmp_path):
    """lowrank where the delta is low-rank, quant where it is not (or not a matrix)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(128, 64, generator=g)
    b = torch.randn(64, generator=g)
    rule = Rule("*", [{"id": "lowrank", "energy": 0.99, "residual_bits": 8},
                      {"id": "quant", "bits": 8}])
    with deltackpt.open(tmp_path / "r", rules=(rule,), keyframe_every=100) as repo:
        repo.save(0, {"w": w, "b": b, "n": torch.randn(128, 64, generator=g)})
        w1 = w + torch.randn(128, 1, generator=g) @ torch.randn(1, 64, generator=g) * 0.01
        repo.save(1, {"w": w1, "b": b + 0.01, "n": torch.randn(128, 64, generator=g)})
        m = repo.manifest(1)

        def ids(path):
            t = m.tensor(path)
            return {t.codecs[c.codec].codec_id for c in t.chunks}

        assert ids("w") == {"lowrank"}      # a rank-1 delta: the low-rank codec takes it
        assert ids("b") == {"quant"}        # a vector: lowrank does not apply
        assert ids("n") == {"quant"}        # full-rank noise: lowrank declines, quant takes it
        assert repo.verify().ok and not repo.manifest(1).exact


@pytest.mark.parametrize("domain", ["linear", "log"])
def test_quant_payload_with_impossible_scales_is_corrupt(domain):
    """Scales the encoder can never write (non-finite; in the log domain, a delta wider than
    the dtype's bit patterns) are refused as corrupt instead of decoding to garbage."""
    from deltackpt.errors import CorruptChunkError
    from deltackpt.format.dtypes import element_type
    codec = get_codec({"id": "quant", "bits": 8, "block": 4, "domain": domain})
    et = element_type("torch", "float32")
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(torch.uint8).numpy().copy()
    ref = torch.tensor([1.5, 2.5, 3.5, 4.5]).view(torch.uint8).numpy().copy()
    payload, _ = codec.encode(x, ref, et)
    assert codec.decode(payload, ref, et, x.size).size == x.size  # the intact payload decodes
    for bad in (np.inf, np.nan) + ((3e38,) if domain == "log" else ()):
        hostile = payload.copy()
        hostile[:4] = np.array([bad], np.float32).view(np.uint8)
        hostile[4:8] = 127  # the largest 8-bit code
        with pytest.raises(CorruptChunkError):
            codec.decode(hostile, ref, et, x.size)
