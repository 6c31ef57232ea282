"""Lossy tiers: disk saved vs resume fidelity, per codec setting, one training run per workload.

Workload 1 ("transformer"): the 3.2M-parameter char-level transformer of deltackpt.cli.demo
(4 layers, d=256, context 128; the model of bench_foundation.py), AdamW + cosine schedule, fp32,
trained once; a checkpoint (model + optimizer + scheduler + data RNG + step) every 5 steps, 100
saves. Each checkpoint is written as a torch.save file (the baseline) and into one repository per
method: deltackpt lossless, the presets ``balanced`` and ``archive``, points of the error-budget
curve (``Policy(lossy_budget=...)``), and the fixed-width codecs for comparison (quant 4/2
bits, sparse top-k squant, lowrank for 2-D weights).

Workload 2 ("recsys"): a click model with a 200k x 32 item table and a 50k x 32 user table
(``nn.Embedding(sparse=True)`` + ``SparseAdam``, dense Adam for a small MLP) on synthetic
Zipf-popular clicks; each step touches a few thousand rows. Compared: torch.save, lossless,
lossless ``sparse`` codec on the tables and their moments, and the lossy presets.

Workload 3 ("cnn"): a small CNN (3 conv layers + 2 linear, ~357k parameters, BatchNorm) with
SGD + Nesterov momentum on synthetic 32x32 shape images generated in-process from fixed seeds
(benchmarks/suitekit/vision.py), a fixed train / held-out split; 100 saves every 5 steps as for
the transformer, and the held-out accuracy next to the loss.

Per method: disk total vs torch.save, bytes per save, the worst error the manifests record, and
RESUME FIDELITY: the state at a mid-run save is rebuilt from the repository (a lossy, i.e.
not bit-exact, step where the method has one), training continues for N steps in a fresh
trainer with the same data order, and the final loss (mean of the last 10 steps; and the
held-out accuracy where the workload has one) is compared with resuming from the original
in-memory state at that step. DRIFT (Inshrinkerator's repeated-resume test): from that same
state, ten cycles of "resume, train N/10 steps, save with the method, load it back", each
cycle's loss and accuracy compared with the uninterrupted run from the original state.

The methods are the table ``METHODS`` (one line each: name -> open kwargs, the workloads it
runs on); every preset of deltackpt is included even if the table does not name it.

    python benchmarks/bench_lossy.py            # full run (~22 min on 2 idle cores), writes results/
    python benchmarks/bench_lossy.py --quick    # CI-sized smoke run (< 1 min), writes nothing
    python benchmarks/bench_lossy.py --quick --workloads cnn --methods archive --out /tmp/x
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash
from suitekit.vision import CNNTrainer, ShapesConfig, ShapesData
from suitekit.workloads import train_checkpoints
from torch import nn

import deltackpt
from deltackpt.cli.demo import GPTConfig, Trainer
from deltackpt.engine.policy import PRESETS, Rule
from deltackpt.format.tree import flatten

#: published compression ratios quoted in the issue (literature, not measured here)
#: (name, ratio, what it was measured on): drawn as anchors on the frontier plot, never as points
PUBLISHED: tuple[tuple[str, float, str], ...] = (
    ("ExCP", 70.0, "~70x, Pythia-410M weights + Adam"),
    ("Inshrinkerator", 39.0, "39x"),
    ("LC-Checkpoint", 28.0, "~28x"),
    ("BitSnap", 16.0, '16x "without accuracy loss"'),
)
TARGET_RATIO = 25.0       # issue #17: >= 25x less disk than torch.save over the run ...
TARGET_LOSS_PCT = 0.5     # ... with the resumed run's final loss within 0.5%
ACC_PP = 0.5              # issue #17: the second workload's held-out accuracy within 0.5 points
LAST = 10                 # final loss = mean of the last LAST steps' losses

SQ = "*exp_avg_sq"


def q(bits: int, prune: float = 0.0, domain: str = "linear") -> dict[str, Any]:
    return {"id": "quant", "bits": bits, "block": 256, "prune": prune, "domain": domain}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    name: str
    open_kwargs: dict[str, Any] | None  # None: the torch.save baseline
    main: bool = False                  # drawn in the bytes-per-save plot
    aliases: list[str] = field(default_factory=list)  # sweep settings equal to this policy
    # filled in by the run
    repo_dir: str = ""
    repo: Any = None
    step_bytes: list[int] = field(default_factory=list)
    save_s: list[float] = field(default_factory=list)
    exact_steps: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return " = ".join([self.name, *self.aliases])

    @property
    def lossy(self) -> bool:
        return self.open_kwargs is not None and self.policy().lossy

    def policy(self) -> deltackpt.Policy:
        kw = dict(self.open_kwargs or {})
        return deltackpt.Policy.from_kwargs(kw.pop("policy", None), kw)

    def describe(self) -> dict[str, Any]:
        if self.open_kwargs is None:
            return {"baseline": "torch.save, one file per checkpoint"}
        p = self.policy()
        return {"preset": self.open_kwargs.get("policy"), "keyframe_every": p.keyframe_every,
                "exact_every": p.exact_every, "codec": p.codec, "reference": p.reference,
                "lossy_budget": p.lossy_budget,
                "rules": [{"pattern": r.pattern, "codec": r.codec,
                           **({"every": r.every} if r.every != 1 else {})}
                          for r in p.effective_rules]}

    def ke(self) -> str:
        if self.open_kwargs is None:
            return "-"
        p = self.policy()
        return f"{p.keyframe_every}/{p.exact_every}" if p.lossy else f"{p.keyframe_every}/-"


LONG = {"keyframe_every": 100, "exact_every": 0}   # one keyframe, no exact step after it
DENSE = ("transformer", "cnn")                      # the sweep runs on the dense workloads
ALL = ("transformer", "recsys", "cnn")


def quant(bits: int) -> tuple[Rule, ...]:
    """Rules: ``bits``-bit closed-loop deltas everywhere (``exp_avg_sq`` in the log domain)."""
    return Rule(SQ, q(bits, domain="log")), Rule("*", q(bits))


@dataclass(frozen=True)
class Spec:
    """A method: ``deltackpt.open`` keyword arguments (a preset by name, or rules and
    intervals), None for the torch.save baseline; ``main``: drawn in the bytes-per-save plot."""
    open_kwargs: dict[str, Any] | None
    main: bool = False
    workloads: tuple[str, ...] = ALL


_SPARSE = {"id": "sparse", "block": 32}
#: points of the error-budget curve run besides the presets' own
BUDGETS = (0.25, 0.5, 0.75, 1.25)
#: every method, one line each, in report order; a preset in deltackpt.engine.policy.PRESETS
#: that is not listed is appended by itself (see :func:`methods_for`)
METHODS: dict[str, Spec] = {
    "torch.save": Spec(None, main=True),
    "lossless": Spec({}, main=True),
    "sparse": Spec({"rules": (Rule("model/user.weight", _SPARSE), Rule("model/item.weight", _SPARSE),
                              Rule("sparse_opt/state/*", _SPARSE))}, True, ("recsys",)),
    "balanced": Spec({"policy": "balanced"}, main=True),
    "archive": Spec({"policy": "archive"}, main=True),
    # the error-budget curve (archive and balanced are points of it too)
    **{f"budget {b:g}": Spec({"lossy_budget": b, **LONG}, True, DENSE) for b in BUDGETS},
    # fixed-width closed-loop quantization, every block scaled by its largest change
    "q4": Spec({"rules": quant(4), **LONG}, True, DENSE),
    "q2": Spec({"rules": quant(2), **LONG}, True, DENSE),
    # sparse weights (squant: the largest 30 % of each block's changes, 4-bit log levels),
    # 2-bit moments, the second moment every 10th save: the ~25x point of the squant sweep
    "squant w.3 + q2 m + v/10": Spec({"rules": (
        Rule(SQ, q(4, domain="log"), every=10), Rule("*exp_avg", q(2)),
        Rule("*", {"id": "squant", "bits": 4, "keep": 0.3, "levels": "log"})), **LONG},
        True, DENSE),
    # lowrank where a weight is a matrix and the factors pay, else 4-bit quant
    "lowrank r8+2b": Spec({"rules": (
        Rule("model/*weight", [{"id": "lowrank", "rank": 8, "residual_bits": 2}, q(4)]),
        *quant(4)), **LONG}, True, DENSE),
}


def methods_for(workload: str) -> list[Method]:
    """The methods of ``workload`` (table order, then any preset the table does not name)."""
    table = dict(METHODS)
    for p in PRESETS:
        table.setdefault(p, Spec({"policy": p}, main=True))
    return [Method(name, None if s.open_kwargs is None else dict(s.open_kwargs), main=s.main)
            for name, s in table.items() if workload in s.workloads]


def policy_key(m: Method) -> str | None:
    """The method's policy with codec configs normalized (defaults filled in), as JSON."""
    if m.open_kwargs is None:
        return None

    def norm(c: Any) -> Any:
        if isinstance(c, list):
            return [norm(x) for x in c]
        if isinstance(c, dict):
            try:
                return deltackpt.get_codec(c).get_config()
            except Exception:  # noqa: BLE001 - e.g. lowrank without cols: compare as given
                return c
        return c

    d = m.policy().to_dict()
    d["rules"] = [{**r, "codec": norm(r["codec"])} for r in d["rules"]]  # `every` included
    return json.dumps(d, sort_keys=True)


def dedupe(methods: list[Method]) -> list[Method]:
    """One repository per distinct policy: a sweep setting equal to a preset becomes an alias."""
    out: list[Method] = []
    for m in methods:
        key = policy_key(m)
        twin = next((o for o in out if key is not None and policy_key(o) == key), None)
        if twin is None:
            out.append(m)
        else:
            twin.aliases.append(m.name)
            twin.main |= m.main
    return out


# ---------------------------------------------------------------------------------- workloads
class Workload:
    """A trainer factory; trainers have ``train_step``, ``state``, ``load_state`` and ``step``."""
    name = ""

    def new(self) -> Any:
        raise NotImplementedError

    def describe(self, t: Any) -> str:
        raise NotImplementedError

    def accuracy(self, t: Any) -> float | None:
        """Held-out accuracy (%) of the trainer's model, None where the workload has none."""
        return None


class TransformerWorkload(Workload):
    name = "transformer"

    def __init__(self, quick: bool, total_steps: int) -> None:
        self.cfg = GPTConfig() if quick else GPTConfig(layers=4, dim=256, block=128)
        self.total_steps = total_steps

    def new(self) -> Trainer:
        return Trainer(self.cfg, total_steps=self.total_steps)

    def describe(self, t: Trainer) -> str:
        n = sum(p.numel() for p in t.model.parameters())
        c = self.cfg
        return (f"char transformer ({c.layers} layers, d={c.dim}, context {c.block}), "
                f"{n / 1e6:.2f}M parameters, AdamW + cosine schedule over "
                f"{self.total_steps} steps, batch {t.batch}, fp32")


class RecModel(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim, sparse=True)
        self.item = nn.Embedding(n_items, dim, sparse=True)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        eu, ei = self.user(u), self.item(i)
        return self.mlp(torch.cat([eu, ei, eu * ei], -1)).squeeze(-1)


class RecTrainer:
    """Synthetic clicks: users uniform, items Zipf-popular (hot items scattered over the table),
    click probability from hidden factors fixed by the seed (the "dataset", not checkpointed)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 32, batch: int = 1024,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.true_u = torch.randn(n_users, 8, generator=g) / 8 ** 0.25
        self.true_i = torch.randn(n_items, 8, generator=g) / 8 ** 0.25
        self.bias = torch.randn(n_items, generator=g) - 1.0
        w = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64) ** 1.05
        self.cdf = (torch.cumsum(w, 0) / w.sum()).float()
        self.perm = torch.randperm(n_items, generator=g)
        self.model = RecModel(n_users, n_items, dim)
        self.sparse_opt = torch.optim.SparseAdam(
            list(self.model.user.parameters()) + list(self.model.item.parameters()), lr=0.01)
        self.dense_opt = torch.optim.Adam(self.model.mlp.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.n_users, self.n_items, self.batch, self.step = n_users, n_items, batch, 0

    def train_step(self) -> float:
        u = torch.randint(0, self.n_users, (self.batch,), generator=self.gen)
        r = torch.rand(self.batch, generator=self.gen)
        i = self.perm[torch.searchsorted(self.cdf, r).clamp_(max=self.n_items - 1)]
        p = torch.sigmoid((self.true_u[u] * self.true_i[i]).sum(-1) * 2 + self.bias[i])
        y = (torch.rand(self.batch, generator=self.gen) < p).float()
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(u, i), y)
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "sparse_opt": self.sparse_opt.state_dict(),
                "dense_opt": self.dense_opt.state_dict(), "data_rng": self.gen.get_state(),
                "step": self.step}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.gen.set_state(state["data_rng"])
        self.step = int(state["step"])


class RecWorkload(Workload):
    name = "recsys"

    def __init__(self, quick: bool) -> None:
        self.n_users, self.n_items = (5_000, 20_000) if quick else (50_000, 200_000)

    def new(self) -> RecTrainer:
        return RecTrainer(self.n_users, self.n_items)

    def describe(self, t: RecTrainer) -> str:
        n = sum(p.numel() for p in t.model.parameters())
        return (f"click model: item table {self.n_items:,} x 32 and user table "
                f"{self.n_users:,} x 32 (nn.Embedding(sparse=True) + SparseAdam), MLP with "
                f"Adam; {n / 1e6:.2f}M parameters; batch {t.batch} (user uniform, item Zipf "
                f"1.05), synthetic clicks from hidden factors")


class CNNWorkload(Workload):
    name = "cnn"

    def __init__(self, quick: bool, total_steps: int) -> None:
        cfg = (ShapesConfig(size=16, width=8, train=2_000, heldout=500) if quick
               else ShapesConfig())
        self.data = ShapesData(cfg)  # generated once: every trainer shares the split
        self.total_steps = total_steps

    def new(self) -> CNNTrainer:
        return CNNTrainer(self.data, total_steps=self.total_steps)

    def accuracy(self, t: CNNTrainer) -> float:
        return t.accuracy()

    def describe(self, t: CNNTrainer) -> str:
        n = sum(p.numel() for p in t.model.parameters())
        c = self.data.cfg
        return (f"small CNN (3 conv-BN-ReLU-pool stages of width {c.width}/{2 * c.width}/"
                f"{4 * c.width}, linear 128, 10 classes), {n / 1e3:.0f}k parameters, SGD "
                f"(Nesterov momentum 0.9, weight decay 5e-4) + cosine schedule over "
                f"{self.total_steps} steps, batch {t.batch}, fp32, BatchNorm statistics in the "
                f"state; synthetic {c.size}x{c.size} shapes (10 classes, noise {c.noise:g}), "
                f"{c.train:,} training and {c.heldout:,} held-out images generated from fixed "
                f"seeds; momentum buffers are counted under exp_avg")


WORKLOADS = ("transformer", "recsys", "cnn")


# ------------------------------------------------------------------------------------ helpers
def group_of(path: str) -> str:
    if path.endswith("exp_avg_sq"):
        return "exp_avg_sq"
    if path.endswith(("exp_avg", "momentum_buffer")):
        return "exp_avg"
    if path.startswith("model/"):
        return "model"
    return "other"


def leaves_by_path(state: Any) -> dict[str, Any]:
    return {leaf.path: leaf.value for leaf in flatten(state)[1]}


def tensor_bytes(v: Any) -> bytes:
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous().cpu()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return np.ascontiguousarray(v).tobytes()


def state_digest(state: Any) -> str:
    h = xxhash.xxh3_128()
    for path, v in sorted(leaves_by_path(state).items()):
        h.update(path.encode())
        h.update(str(getattr(v, "dtype", "")).encode())
        h.update(tensor_bytes(v))
    return h.hexdigest()


def compare_states(orig: Any, got: Any) -> dict[str, Any]:
    """Bit-exactness, max |error| per group and the step/int leaves of two states."""
    a, b = leaves_by_path(orig), leaves_by_path(got)
    out: dict[str, Any] = {"bit_exact": set(a) == set(b), "max_abs": {}, "max_rel": {},
                           "missing": sorted(set(a) ^ set(b))}
    for path in sorted(set(a) & set(b)):
        x, y = a[path], b[path]
        if tensor_bytes(x) != tensor_bytes(y) or getattr(x, "dtype", None) != getattr(
                y, "dtype", None):
            out["bit_exact"] = False
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            err = (y.detach().double() - x.detach().double()).abs().max().item()
            peak = x.detach().double().abs().max().item()
            g = group_of(path)
            out["max_abs"][g] = max(out["max_abs"].get(g, 0.0), err)
            out["max_rel"][g] = max(out["max_rel"].get(g, 0.0), err / peak if peak else 0.0)
    return out


def recorded_errors(repo: Any, steps: list[int]) -> dict[str, Any]:
    """Worst error records of the manifests, over all steps, overall and per group."""
    rel: dict[str, float] = {}
    mabs: dict[str, float] = {}
    lossy_steps = 0
    for s in steps:
        m = repo.manifest(s)
        any_lossy = False
        for e in m.tensors:
            if not e.lossy:
                continue
            any_lossy = True
            g = group_of(e.path)
            rel[g] = max(rel.get(g, 0.0), float(e.lossy["max_rel"]))
            mabs[g] = max(mabs.get(g, 0.0), float(e.lossy["max_abs"]))
        lossy_steps += any_lossy
    return {"max_rel": max(rel.values(), default=0.0), "max_abs": max(mabs.values(), default=0.0),
            "by_group_rel": rel, "by_group_abs": mabs, "lossy_steps": lossy_steps}


def recorded_at(repo: Any, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in repo.manifest(step).tensors:
        if e.lossy:
            g = group_of(e.path)
            out[g] = max(out.get(g, 0.0), float(e.lossy["max_abs"]))
    return out


def bytes_by_group(repo: Any, steps: list[int], total: int) -> dict[str, int]:
    """Stored frame bytes attributed to the tensor group whose chunk first wrote them."""
    seen: set[bytes] = set()
    out = {"model": 0, "exp_avg": 0, "exp_avg_sq": 0, "other": 0}
    for s in steps:
        for e in repo.manifest(s).tensors:
            for c in e.chunks:
                if c.id in seen:
                    continue
                seen.add(c.id)
                out[group_of(e.path)] += repo.store.locate(c.id).length
    out["metadata"] = total - sum(out.values())
    return out


def pick_resume_step(repo: Any, target: int, saved: list[int], candidates: set[int],
                     lossy: bool) -> int:
    """``target`` unless the method is lossy and ``target`` is an exact step: then the nearest
    lossy step among ``candidates`` (steps whose original state was kept)."""
    if not lossy or not repo.manifest(target).exact:
        return target
    i = saved.index(target)
    for d in range(1, len(saved)):
        for j in (i - d, i + d):
            if 0 <= j < len(saved) and saved[j] in candidates \
                    and not repo.manifest(saved[j]).exact:
                return saved[j]
    return target


def perturb_ulp(state: Any) -> Any:
    """A copy of ``state`` with the last mantissa bit of every float32 array flipped."""
    s = copy.deepcopy(state)
    for leaf in flatten(s)[1]:
        v = leaf.value
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() >= 1:
            v.view(torch.int32).bitwise_xor_(1)
    return s


@dataclass
class Resumed:
    losses: list[float]
    accuracy: float | None = None                         # held-out, after the last step
    cycle_acc: list[float | None] = field(default_factory=list)  # drift reference only


def restored(workload: Workload, state: Any) -> Any:
    t = workload.new()
    t.load_state(copy.deepcopy(state))   # optimizers may alias the given tensors
    return t


def run_resume(workload: Workload, state: Any, n: int) -> Resumed:
    t = restored(workload, state)
    losses = [t.train_step() for _ in range(n)]
    return Resumed(losses, workload.accuracy(t))


def reference_run(workload: Workload, state: Any, cycles: int, n: int) -> Resumed:
    """The exact run for the drift test: ``cycles * n`` uninterrupted steps from the original
    state, with the held-out accuracy after each ``n``."""
    t = restored(workload, state)
    out = Resumed([])
    for _ in range(cycles):
        out.losses += [t.train_step() for _ in range(n)]
        out.cycle_acc.append(workload.accuracy(t))
    return out


def run_drift(workload: Workload, m: Method, start: Any, start_step: int, ref: Resumed,
              n: int, failures: list[str]) -> dict[str, Any]:
    """Inshrinkerator's repeated-resume test: from the (lossy) state ``start``, cycles of
    "resume, train ``n`` steps, save with the method, load it back"; per cycle the loss (mean of
    its last min(n, LAST) steps) and the held-out accuracy of the reloaded state vs ``ref``.

    The saves go to a fresh repository with the method's policy whose first save (a keyframe)
    is ``start`` itself, so each cycle's save is what the policy makes of a later step."""
    repo_dir = m.repo_dir + "-drift"
    kw = dict(m.open_kwargs or {})
    repo = deltackpt.open(repo_dir, policy=kw.pop("policy", None), **kw)
    t0 = time.perf_counter()
    cycles: list[dict[str, Any]] = []
    try:
        repo.save(start_step, start)
        state = start
        k = min(n, LAST)
        for c in range(len(ref.cycle_acc)):
            t = restored(workload, state)
            losses = [t.train_step() for _ in range(n)]
            info = repo.save(t.step, t.state())
            state = repo.load(t.step)
            cmp = compare_states(t.state(), state)
            rec = recorded_at(repo, t.step)
            bound = all(cmp["max_abs"].get(g, 0.0) <= rec.get(g, 0.0) * (1 + 1e-9) + 1e-30
                        for g in cmp["max_abs"])
            loss, loss_ref = statistics.fmean(losses[-k:]), statistics.fmean(
                ref.losses[c * n:(c + 1) * n][-k:])
            row: dict[str, Any] = {"cycle": c + 1, "step": t.step, "exact": info.exact,
                                   "loss": loss, "loss_ref": loss_ref,
                                   "diff_pct": 100 * (loss - loss_ref) / loss_ref,
                                   "recorded_bounds_measured": bound}
            acc = workload.accuracy(restored(workload, state))
            if acc is not None and ref.cycle_acc[c] is not None:
                row.update(accuracy=acc, accuracy_ref=ref.cycle_acc[c],
                           accuracy_diff_pp=acc - ref.cycle_acc[c])
            cycles.append(row)
            if not bound:
                failures.append(f"{workload.name}/{m.name}: drift cycle {c + 1}: measured error "
                                f"at step {t.step} exceeds the manifest's record")
            if not m.lossy and (row["diff_pct"] != 0 or row.get("accuracy_diff_pp", 0) != 0):
                failures.append(f"{workload.name}/{m.name}: lossless drift cycle {c + 1} "
                                f"differs from the exact run")
    finally:
        repo.close()
        shutil.rmtree(repo_dir, ignore_errors=True)
    last = cycles[-1] if cycles else {}
    log(f"{workload.name}/{m.label}: drift after {len(cycles)} cycles of {n} steps: loss "
        f"{last.get('diff_pct', 0):+.3f}% (worst cycle {worst_cycle(cycles):+.3f}%)"
        + (f", accuracy {last['accuracy_diff_pp']:+.2f} pp" if "accuracy_diff_pp" in last
           else "")
        + f", {time.perf_counter() - t0:.0f} s")
    return {"start_step": start_step, "steps_per_cycle": n, "cycles": cycles}


# --------------------------------------------------------------------------------- one workload
def run_workload(workload: Workload, methods: list[Method], saves: int, every: int,
                 resume_save: int, resume_steps: int, root: str, drift_cycles: int = 0,
                 window: int = 3) -> dict[str, Any]:
    """Train once, saving with every method; then per method the load checks, the resume from
    the mid-run step and (``drift_cycles`` > 0) the repeated-resume drift test."""
    wroot = os.path.join(root, workload.name)
    os.makedirs(wroot)
    pt_path = os.path.join(wroot, "ckpt.pt")
    for m in methods:
        if m.open_kwargs is not None:
            m.repo_dir = os.path.join(wroot, m.name.replace(" ", "_").replace("/", "-"))
            kw = dict(m.open_kwargs)
            m.repo = deltackpt.open(m.repo_dir, policy=kw.pop("policy", None), **kw)
    trainer = workload.new()
    desc = workload.describe(trainer)
    target = resume_save * every
    kept: dict[int, Any] = {}
    digests: dict[int, str] = {}
    saved: list[int] = []
    run_losses: list[float] = []
    state_bytes = 0
    t_train = 0.0
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    for step, state in train_checkpoints(trainer, saves, every, run_losses):
        t_train += time.perf_counter() - t0
        saved.append(step)
        digests[step] = state_digest(state)
        if abs(step - target) <= window * every:
            kept[step] = copy.deepcopy(state)
        for m in methods:
            if m.error is not None:
                continue
            t0 = time.perf_counter()
            try:
                if m.repo is None:
                    torch.save(state, pt_path)
                    m.save_s.append(time.perf_counter() - t0)
                    m.step_bytes.append(os.path.getsize(pt_path))
                    os.remove(pt_path)
                    continue
                info = m.repo.save(step, state)
            except Exception as exc:  # noqa: BLE001 - a deltackpt bug: report it, go on
                m.error = f"save of step {step}: {type(exc).__name__}: {exc}"
                log(f"{workload.name}/{m.label}: {m.error}")
                continue
            m.save_s.append(time.perf_counter() - t0)
            m.step_bytes.append(info.stored_bytes)
            if info.exact:
                m.exact_steps.append(step)
            if len(saved) == 1:
                state_bytes = info.logical_bytes
        if len(saved) % 10 == 0 or len(saved) == saves:
            log(f"{workload.name}: {len(saved)}/{saves} saves, step {step}, "
                f"loss {run_losses[-1]:.4f}, {time.perf_counter() - t_start:.0f} s")
        t0 = time.perf_counter()
    log(f"{workload.name}: training {t_train:.0f} s, saves "
        f"{time.perf_counter() - t_start - t_train:.0f} s")

    baseline = next(m for m in methods if m.open_kwargs is None)
    pt_total = sum(baseline.step_bytes)
    rows: list[dict[str, Any]] = []
    resume_of: dict[int, Resumed] = {}
    drift_ref: dict[int, Resumed] = {}
    failures: list[str] = []

    def original_resume(step: int) -> Resumed:
        if step not in resume_of:
            t0 = time.perf_counter()
            resume_of[step] = run_resume(workload, kept[step], resume_steps)
            log(f"{workload.name}: resume from the original state at step {step}: "
                f"{time.perf_counter() - t0:.0f} s")
        return resume_of[step]

    base = original_resume(target).losses
    t0 = time.perf_counter()
    flr = run_resume(workload, perturb_ulp(kept[target]), resume_steps)
    fl = flr.losses
    f0 = statistics.fmean(base[-LAST:])
    floor = {"final_loss": statistics.fmean(fl[-LAST:]),
             "diff_pct": 100 * (statistics.fmean(fl[-LAST:]) - f0) / f0,
             "first_step_diff_pct": 100 * (fl[0] - base[0]) / base[0], "losses": fl,
             "accuracy": flr.accuracy}
    log(f"{workload.name}: noise floor (1-ulp flip) {floor['diff_pct']:+.4f}% in "
        f"{time.perf_counter() - t0:.0f} s")
    for m in methods:
        row: dict[str, Any] = {"method": m.label, "config": m.describe(), "ke": m.ke(),
                               "lossy": m.lossy, "main": m.main, "error": m.error,
                               "step_bytes": m.step_bytes, "steps": saved[:len(m.step_bytes)],
                               "save_s_median": statistics.median(m.save_s) if m.save_s
                               else None}
        rows.append(row)
        if m.error is not None:
            failures.append(f"{workload.name}/{m.label}: {m.error}")
            continue
        if m.repo is None:
            row.update(total=pt_total, ratio=1.0)
            continue
        total = m.repo.disk_usage()["total"]
        row.update(total=total, ratio=pt_total / total, exact_saves=len(m.exact_steps),
                   recorded=recorded_errors(m.repo, saved),
                   bytes_by_group=bytes_by_group(m.repo, saved, total))
        try:
            step = pick_resume_step(m.repo, target, saved, set(kept), m.lossy)
            t0 = time.perf_counter()
            got = m.repo.load(step)
            load_s = time.perf_counter() - t0
            cmp = compare_states(kept[step], got)
            rec = recorded_at(m.repo, step)
            # every recorded error must bound the measured one (same float64 arithmetic)
            consistent = all(cmp["max_abs"].get(g, 0.0) <= rec.get(g, 0.0) * (1 + 1e-9) + 1e-30
                             for g in cmp["max_abs"])
            step_exact = m.repo.manifest(step).exact
            row["load_check"] = {"step": step, "exact_step": step_exact,
                                 "bit_exact": cmp["bit_exact"], "max_abs": cmp["max_abs"],
                                 "max_rel": cmp["max_rel"], "recorded_max_abs": rec,
                                 "recorded_bounds_measured": consistent, "load_s": load_s}
            if step_exact and not cmp["bit_exact"]:
                failures.append(f"{workload.name}/{m.name}: step {step} is recorded exact "
                                f"but does not load bit-exactly")
            if not consistent:
                failures.append(f"{workload.name}/{m.name}: measured error at step {step} "
                                f"exceeds the manifest's record")
            # an exact step of a lossy method (deepest one before the resume step) must load
            # bit-exactly: compare against the digest of the original state
            ex = [s for s in m.exact_steps if s <= step]
            if ex:
                s_ex = max(ex, key=lambda s: (m.repo.manifest(s).kind != "keyframe", s))
                ok = state_digest(m.repo.load(s_ex)) == digests[s_ex]
                row["exact_step_check"] = {"step": s_ex, "kind": m.repo.manifest(s_ex).kind,
                                           "bit_exact": ok}
                if not ok:
                    failures.append(f"{workload.name}/{m.name}: exact step {s_ex} does not "
                                    f"load bit-exactly")
            orig = original_resume(step)
            base = orig.losses
            t0 = time.perf_counter()
            res = run_resume(workload, got, resume_steps)
            losses = res.losses
            f0, f1 = statistics.fmean(base[-LAST:]), statistics.fmean(losses[-LAST:])
            log(f"{workload.name}/{m.label}: {row['ratio']:.1f}x, resumed from step {step} "
                f"({'exact' if step_exact else 'lossy'}): final loss {f1:.5f} vs {f0:.5f} "
                f"({100 * (f1 - f0) / f0:+.3f}%), {time.perf_counter() - t0:.0f} s")
            row["resume"] = {"step": step, "exact_step": step_exact, "steps": resume_steps,
                             "final_loss_original": f0, "final_loss": f1,
                             "diff": f1 - f0, "diff_pct": 100 * (f1 - f0) / f0,
                             "first_step_diff_pct": 100 * (losses[0] - base[0]) / base[0],
                             "max_step_diff_pct": max(100 * abs(a - b) / b
                                                      for a, b in zip(losses, base)),
                             "losses": losses}
            if orig.accuracy is not None and res.accuracy is not None:
                row["resume"].update(accuracy_original=orig.accuracy, accuracy=res.accuracy,
                                     accuracy_diff_pp=res.accuracy - orig.accuracy)
            if drift_cycles:
                if step not in drift_ref:
                    drift_ref[step] = reference_run(workload, kept[step], drift_cycles,
                                                    resume_steps // drift_cycles)
                row["drift"] = run_drift(workload, m, got, step, drift_ref[step],
                                         resume_steps // drift_cycles, failures)
            if not m.lossy and not cmp["bit_exact"]:
                failures.append(f"{workload.name}/{m.name}: lossless load is not bit-exact")
        except Exception as exc:  # noqa: BLE001 - reported in the results, run goes on
            row["error"] = f"check/resume: {type(exc).__name__}: {exc}"
            failures.append(f"{workload.name}/{m.name}: {row['error']}")
            log(f"{workload.name}/{m.label}: {row['error']}")
        m.repo.close()
        shutil.rmtree(m.repo_dir, ignore_errors=True)
    # determinism of the harness: resuming the original state must replay the original run
    uninterrupted = run_losses[target:target + resume_steps]
    replay = resume_of[target].losses if target in resume_of else []
    deterministic = None if not uninterrupted or not replay else all(
        a == b for a, b in zip(uninterrupted, replay))
    return {"workload": workload.name, "description": desc, "saves": len(saved),
            "every": every, "steps": saved[-1] if saved else 0, "state_bytes": state_bytes,
            "torch_save_total": pt_total, "resume_target": target,
            "resume_steps": resume_steps, "original_resumes": {
                str(s): {"final_loss": statistics.fmean(v.losses[-LAST:]), "losses": v.losses,
                         "accuracy": v.accuracy} for s, v in resume_of.items()},
            "accuracy": workload.accuracy(trainer), "drift_cycles": drift_cycles,
            "drift_steps": resume_steps // drift_cycles if drift_cycles else 0,
            "drift_references": {str(s): {"losses": v.losses, "accuracy": v.cycle_acc}
                                 for s, v in drift_ref.items()},
            "replay_matches_uninterrupted_run": deterministic, "run_losses": run_losses,
            "noise_floor": floor,
            "methods": rows, "failures": failures}


# ------------------------------------------------------------------------------------- report
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def fmt_e(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.1e}")


def fmt_pct(x: float) -> str:
    return f"{x:+.3f}%" if abs(x) >= 0.001 else ("0" if x == 0 else f"{x:+.1e}%")


def method_table(r: dict[str, Any]) -> list[str]:
    acc = r.get("accuracy") is not None  # held-out accuracy columns where the workload has one
    lines = [("| method | K/E | total | vs torch.save | median save | worst rel err | "
              "worst abs err | worst rel err (model) | resume from | final loss | "
              "Δ loss | Δ loss % | first-step Δ % |" + (" held-out acc | Δ acc (pp) |" if acc
                                                         else "")),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if acc else "")]
    for row in r["methods"]:
        if row.get("error") and "total" not in row:
            lines.append(f"| {row['method']} | {row['ke']} | FAILED: {row['error']} |" +
                         " |" * (12 if acc else 10))
            continue
        rec = row.get("recorded")
        res = row.get("resume")
        if res:
            where = f"{res['step']} ({'exact' if res['exact_step'] else 'lossy'})"
            tail = (f"{where} | {res['final_loss']:.4f} | {res['diff']:+.2e} | "
                    f"**{fmt_pct(res['diff_pct'])}** | {fmt_pct(res['first_step_diff_pct'])}")
            if acc:
                tail += (f" | {res['accuracy']:.2f}% | **{res['accuracy_diff_pp']:+.2f}**"
                         if "accuracy" in res else " | |")
        elif row["method"] == "torch.save":
            orig = r["original_resumes"][str(r["resume_target"])]
            tail = f"{r['resume_target']} (original) | {orig['final_loss']:.4f} | (reference) | | "
            if acc:
                tail += f" | {orig['accuracy']:.2f}% | (reference)"
        else:
            tail = f"{row.get('error', '-')} | | | |" + (" | |" if acc else "")
        lines.append(
            f"| {row['method']} | {row['ke']} | {mib(row['total'])} | "
            f"**{row['ratio']:.1f}x** | {(row['save_s_median'] or 0) * 1e3:.0f} ms | "
            f"{fmt_e(rec and rec['max_rel'])} | {fmt_e(rec and rec['max_abs'])} | "
            f"{fmt_e(rec and rec['by_group_rel'].get('model', 0.0))} | {tail} |")
    return lines


def bytes_table(r: dict[str, Any]) -> list[str]:
    lines = [("| method | first save | later saves, median | model | exp_avg | exp_avg_sq | "
              "other | metadata |"), "|---|---|---|---|---|---|---|---|"]
    for row in r["methods"]:
        if "total" not in row:
            continue
        sb = row["step_bytes"]
        g = row.get("bytes_by_group")
        cells = " | ".join(mib(g[k]) for k in ("model", "exp_avg", "exp_avg_sq", "other",
                                                "metadata")) if g else "| | | |"
        lines.append(f"| {row['method']} | {mib(sb[0])} | "
                     f"{mib(statistics.median(sb[1:] or sb))} | {cells} |")
    return lines


def drift_tables(r: dict[str, Any]) -> list[str]:
    """Per method, the drift after each repeated-resume cycle (loss %, accuracy pp)."""
    rows = [x for x in r["methods"] if x.get("drift")]
    if not rows:
        return []
    n = max(len(x["drift"]["cycles"]) for x in rows)
    head = "| method | " + " | ".join(str(c + 1) for c in range(n)) + " |"
    rule = "|---|" + "---|" * n
    start = sorted({x["drift"]["start_step"] for x in rows})
    k = min(r["drift_steps"], LAST)
    lines = [(f"Repeated resume (Inshrinkerator's test): from the resume step above "
              f"({', '.join(map(str, start))}), {n} cycles of: load, train {r['drift_steps']} "
              f"steps, save with the method (into a repository whose first save is the "
              f"state resumed from), load it back. Δ loss % of each cycle (mean of its last "
              f"{k} losses) vs the uninterrupted run from the original state over the same "
              f"steps; a cycle whose save was an exact step is marked ᵉ:"), "", head, rule]
    for x in rows:
        cyc = x["drift"]["cycles"]
        lines.append(f"| {x['method']} | " + " | ".join(
            fmt_pct(c["diff_pct"]) + ("ᵉ" if c["exact"] and x["lossy"] else "") for c in cyc)
            + " |")
    if any("accuracy_diff_pp" in c for x in rows for c in x["drift"]["cycles"]):
        ref = r["drift_references"].get(str(start[0]), {}).get("accuracy", [])
        lines += ["", ("Δ held-out accuracy (percentage points) of the state loaded back after "
                       "each cycle vs the uninterrupted run at the same step" + (
                           f" (which scores {ref[0]:.2f}% after cycle 1 and {ref[-1]:.2f}% "
                           f"after cycle {len(ref)})" if ref and None not in ref else "") + ":"),
                  "", head, rule]
        for x in rows:
            lines.append(f"| {x['method']} | " + " | ".join(
                f"{c['accuracy_diff_pp']:+.2f}" if "accuracy_diff_pp" in c else "-"
                for c in x["drift"]["cycles"]) + " |")
    return lines


def codec_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return " then ".join(codec_text(x) for x in c)
    scaled = " (scaled prediction)" if c.get("predict") == "scaled" else ""
    tail = ", log scales" if c.get("scales") == "log" else ""
    if c.get("id") == "quant" and c.get("step"):
        unit = {"block": f"its block's RMS change{scaled}",
                "chunk": f"the chunk's RMS change{scaled}"}.get(c.get("unit", "value"), (
                    "a binade" if c.get("domain") == "log" else "the chunk's RMS value"))
        return (f"quant step {c['step']:g} x {unit}" + (" log" if c.get("domain") == "log"
                                                        else "")
                + (f" block {c['block']}" if c.get("block", 256) != 256 else "") + tail)
    if c.get("id") == "quant":
        return (f"quant {c.get('bits', 8)}-bit{scaled}"
                + (f" prune {c['prune']:g}" if c.get("prune") else "")
                + (" log" if c.get("domain") == "log" else "")
                + (f" block {c['block']}" if c.get("block", 256) != 256 else "") + tail)
    if c.get("id") == "squant":
        return (f"squant {c.get('bits', 4)}-bit keep {c.get('keep', 0.1):g}"
                + (" log levels" if c.get("levels") == "log" else "")
                + (" log" if c.get("domain") == "log" else ""))
    if c.get("id") == "lowrank":
        r = f"rank {c['rank']}" if c.get("rank") else f"energy {c.get('energy', 0.9):g}"
        return f"lowrank {r}" + (f" + {c['residual_bits']}-bit residual"
                                 if c.get("residual_bits") else "")
    return " ".join(f"{k}={v}" for k, v in c.items() if k != "id").join([c["id"] + " (", ")"])


def settings_lines(r: dict[str, Any]) -> list[str]:
    lines = [("| method | keyframe_every | exact_every | rules (first match wins; float "
              "tensors at inexact saves) |"), "|---|---|---|---|"]
    for row in r["methods"]:
        c = row["config"]
        if "rules" not in c:
            continue
        rules = "; ".join(f"`{x['pattern']}`: {codec_text(x['codec'])}"
                          + (f" every {x['every']}th save, held between" if x.get("every", 1) > 1
                             else "") for x in c["rules"])
        lines.append(f"| {row['method']} | {c['keyframe_every']} | "
                     f"{c['exact_every'] if c['rules'] else '-'} | "
                     f"{rules or 'none (lossless)'} |")
    return lines


def check_lines(r: dict[str, Any]) -> list[str]:
    out = []
    for row in r["methods"]:
        lc = row.get("load_check")
        if not lc:
            continue
        meas = max(lc["max_abs"].values(), default=0.0)
        s = f"- {row['method']}: step {lc['step']} loads "
        if lc["bit_exact"]:
            s += "**bit-exact**"
        else:
            bound = "yes" if lc["recorded_bounds_measured"] else "**NO**"
            s += (f"lossy (measured max abs error {meas:.1e}; the manifest's error record "
                  f"bounds it: {bound})")
        ex = row.get("exact_step_check")
        if ex and row["lossy"]:
            s += (f"; exact {ex['kind']} step {ex['step']} loads "
                  f"{'bit-exact' if ex['bit_exact'] else '**NOT bit-exact**'}")
        out.append(s + ".")
    return out


def worst_cycle(cycles: list[dict[str, Any]], key: str = "diff_pct") -> float:
    """The cycle's Δ furthest from 0: the last cycle alone can land near 0 on its way between
    excursions (a setting at +7 % in cycle 6 was -0.2 % in cycle 10)."""
    return max((c.get(key, 0.0) for c in cycles), key=abs, default=0.0)


def drift_text(x: dict[str, Any]) -> str:
    """``; drift +x% after N repeated resumes (worst cycle +y%)`` where the row has a drift
    test."""
    cycles = (x.get("drift") or {}).get("cycles") or []
    return (f"; drift {fmt_pct(cycles[-1]['diff_pct'])} after {len(cycles)} repeated resumes "
            f"(worst cycle {fmt_pct(worst_cycle(cycles))})") if cycles else ""


def verdict(t: dict[str, Any]) -> list[str]:
    rows = [x for x in t["methods"] if x.get("resume") and x["lossy"]]
    hit = [x for x in rows if x["ratio"] >= TARGET_RATIO
           and abs(x["resume"]["diff_pct"]) <= TARGET_LOSS_PCT]
    within = [x for x in rows if abs(x["resume"]["diff_pct"]) <= TARGET_LOSS_PCT]
    best_within = max(within, key=lambda x: x["ratio"], default=None)
    best = max(rows, key=lambda x: x["ratio"], default=None)
    pub = ", ".join(f"{n} {v}" for n, _, v in PUBLISHED)
    lines = []
    if hit:
        lines.append(
            f"**Target met** (≥ {TARGET_RATIO:g}x less total disk than torch.save over the "
            f"{t['saves']}-save run, resumed final loss within {TARGET_LOSS_PCT:g}%) by: " +
            ", ".join(f"`{x['method']}` ({x['ratio']:.1f}x, {fmt_pct(x['resume']['diff_pct'])}"
                      f"{drift_text(x)})" for x in sorted(hit, key=lambda x: -x["ratio"])) + "."
            " A single resume is the target's test; the drift over repeated resumes says "
            "whether a setting holds up when a run is resumed from its own lossy saves again "
            "and again.")
    else:
        lines.append(f"**Target not met**: no setting reaches ≥ {TARGET_RATIO:g}x less total "
                     f"disk than torch.save with the resumed final loss within "
                     f"{TARGET_LOSS_PCT:g}%.")
    if best_within is not None:
        lines.append(f"The smallest footprint within {TARGET_LOSS_PCT:g}% is "
                     f"`{best_within['method']}` at {best_within['ratio']:.1f}x.")
    if best is not None:
        lines.append(f"The highest ratio overall is `{best['method']}` at {best['ratio']:.1f}x "
                     f"(Δ loss {fmt_pct(best['resume']['diff_pct'])}).")
    over = [x for x in rows if abs(x["resume"]["diff_pct"]) > TARGET_LOSS_PCT]
    if over:
        lines.append("Outside the loss tolerance: " + ", ".join(
            f"`{x['method']}` ({fmt_pct(x['resume']['diff_pct'])})" for x in over) + ".")
    # where the bytes go for the best candidate
    cand = hit[0] if hit else best_within or best
    if cand and cand.get("bytes_by_group"):
        g = cand["bytes_by_group"]
        first = cand["step_bytes"][0]
        lines.append(
            f"Where the bytes go in `{cand['method']}` ({mib(cand['total'])} in all): the first "
            f"save, a full lossless keyframe, is {mib(first)} "
            f"({100 * first / cand['total']:.0f}% of the total), which alone caps any method "
            f"at {t['torch_save_total'] / first:.0f}x over {t['saves']} saves; by tensor "
            f"group: model {mib(g['model'])}, exp_avg {mib(g['exp_avg'])}, exp_avg_sq "
            f"{mib(g['exp_avg_sq'])}, manifests and indexes {mib(g['metadata'])}.")
    lines.append(f"The noise floor of this measurement (1-ulp flip of the original state) is "
                 f"{fmt_pct(t['noise_floor']['diff_pct'])}.")
    lines.append(f"For context, published ratios (other models, other baselines; not measured "
                 f"here): {pub}. The loss difference is measured on one seed after "
                 f"{t['resume_steps']} steps with the same batches, so it reflects only the "
                 f"perturbation of the restored state.")
    return lines


def cnn_verdict(c: dict[str, Any]) -> list[str]:
    """The second workload against the issue's accuracy bound (≤ ACC_PP points of held-out
    accuracy) and the loss tolerance, with the drift after the last cycle."""
    rows = [x for x in c["methods"] if x.get("resume") and x["lossy"]
            and "accuracy_diff_pp" in x["resume"]]
    ok = [x for x in rows if abs(x["resume"]["accuracy_diff_pp"]) <= ACC_PP
          and abs(x["resume"]["diff_pct"]) <= TARGET_LOSS_PCT]
    best = max(ok, key=lambda x: x["ratio"], default=None)
    lines = [f"On the cnn, {len(ok)} of {len(rows)} lossy settings keep the resumed run within "
             f"{ACC_PP:g} percentage points of held-out accuracy and {TARGET_LOSS_PCT:g}% of "
             f"final loss" + (f"; the smallest footprint among them is `{best['method']}` at "
                              f"{best['ratio']:.1f}x (Δ acc "
                              f"{best['resume']['accuracy_diff_pp']:+.2f} pp)" if best else "")
             + "."]
    drift = [x for x in rows if x.get("drift") and x["drift"]["cycles"]]
    if drift:
        worst = max(drift, key=lambda x: abs(x["drift"]["cycles"][-1].get("accuracy_diff_pp",
                                                                          0)))
        last = worst["drift"]["cycles"][-1]
        lines.append(f"After {last['cycle']} repeated resumes the "
                     f"largest accuracy drift is `{worst['method']}`'s "
                     f"{last.get('accuracy_diff_pp', 0):+.2f} pp (loss "
                     f"{fmt_pct(last['diff_pct'])}; its worst cycle "
                     f"{worst_cycle(worst['drift']['cycles'], 'accuracy_diff_pp'):+.2f} pp).")
    return lines


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Lossy tiers: disk vs resume fidelity", "",
             f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}, torch "
             f"{meta['torch']}, deltackpt {meta['deltackpt']}); `{meta['command']}`; "
             f"{meta['seconds']:.0f} s in all" + (
                 f" (1-min load average {meta['loadavg_1min'][0]:.1f} at the start, "
                 f"{meta['loadavg_1min'][1]:.1f} at the end: save times are noisy when other "
                 f"work shares the cores; sizes and losses are not affected)"
                 if None not in meta.get("loadavg_1min", [None]) else "") + ".", ""]
    for r in results:
        lines += [f"## {r['workload']}", "",
                  (f"{r['description']}; a checkpoint every {r['every']} steps, {r['saves']} "
                   f"saves ({r['steps']} steps), {mib(r['state_bytes'])} of tensors per "
                   f"checkpoint; torch.save total {mib(r['torch_save_total'])}. Resume: the "
                   f"state at step {r['resume_target']} (save #{r['resume_target'] // r['every']}"
                   f") as rebuilt by each method (the nearest lossy step for lossy methods), "
                   f"{r['resume_steps']} more steps with the same data order; final loss = mean "
                   f"of the last {LAST} losses; Δ vs resuming from the original in-memory "
                   f"state. K/E = keyframe_every / exact_every. Errors are the worst the "
                   f"manifests record over all steps (rel = max |error| / max |value| of the "
                   f"tensor)." + (f" Held-out accuracy at the end of the run (step {r['steps']})"
                                  f": {r['accuracy']:.2f}%; Δ acc = the resumed run's held-out "
                                  f"accuracy minus the original resume's, in percentage points."
                                  if r.get("accuracy") is not None else "")), ""]
        lines += method_table(r)
        nf = r["noise_floor"]
        lines += ["", (f"Noise floor: resuming from the original state with the last mantissa "
                       f"bit of every float tensor flipped (a relative change of about 1e-7) "
                       f"moves the final loss by {fmt_pct(nf['diff_pct'])} (first step "
                       f"{fmt_pct(nf['first_step_diff_pct'])}); differences of that order are "
                       f"the chaotic divergence of any perturbation, not a codec's error.")]
        dt = drift_tables(r)
        if dt:
            lines += [""] + dt
        lines += ["", ("Stored bytes (first save, later saves; by tensor group over the whole "
                       "run):"), ""]
        lines += bytes_table(r)
        lines += ["", "Settings:", ""] + settings_lines(r)
        lines += ["", "Checks:", ""] + check_lines(r)
        rep = r["replay_matches_uninterrupted_run"]
        lines.append(f"- Resuming from the original state replays the uninterrupted run "
                     f"bit-for-bit: {'n/a' if rep is None else 'yes' if rep else '**NO**'}.")
        for f in r["failures"]:
            lines.append(f"- FAILURE: {f}")
        lines.append("")
    t = next((r for r in results if r["workload"] == "transformer"), None)
    c = next((r for r in results if r["workload"] == "cnn"), None)
    if t is not None or c is not None:
        lines += ["## Verdict", ""]
    if t is not None:
        lines += [" ".join(verdict(t)), ""]
    if c is not None:
        lines += [" ".join(cnn_verdict(c)), ""]
    lines += ["![frontier](lossy_frontier.png)", "", "![bytes per save](lossy_bytes.png)", ""]
    return "\n".join(lines)


def anchors(ax: Any) -> None:
    """The published ratios as labelled vertical markers (no loss value: not comparable)."""
    tr = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for k, (name, ratio, what) in enumerate(PUBLISHED):
        ax.axvline(ratio, color="tab:purple", ls=":", lw=1.2, alpha=0.7,
                   label="published ratio, other model (not measured here)" if k == 0 else None)
        ax.scatter([ratio], [0.97], marker="v", color="tab:purple", s=36, transform=tr,
                   clip_on=False, zorder=4)
        ax.annotate(f"{name} {what}\n(published, other model)", (ratio, 0.95), xycoords=tr,
                    xytext=(-3, -4), textcoords="offset points", rotation=90, ha="right",
                    va="top", fontsize=6.5, color="tab:purple")


def plot(results: list[dict[str, Any]], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(results), figsize=(9.5 * len(results), 5.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        pts = []
        for x in r["methods"]:  # identical results (e.g. a no-op setting) share one label
            if not x.get("resume"):
                continue
            p = (round(x["ratio"], 2), x["resume"]["diff_pct"])
            same = next((k for k, q in enumerate(pts) if (round(q[0], 2), q[1]) == p), None)
            if same is None:
                pts.append((x["ratio"], x["resume"]["diff_pct"], x["method"], x["lossy"]))
            else:
                q0 = pts[same]
                pts[same] = (q0[0], q0[1], f"{q0[2]} = {x['method']}", q0[3])
        ax.axhspan(-TARGET_LOSS_PCT, TARGET_LOSS_PCT, color="tab:green", alpha=0.08,
                   label=f"|Δ loss| ≤ {TARGET_LOSS_PCT:g}%")
        ax.axvline(TARGET_RATIO, color="tab:red", ls="--", lw=1, label=f"{TARGET_RATIO:g}x")
        ax.axhline(0, color="grey", lw=0.5)
        nf = abs(r["noise_floor"]["diff_pct"])
        if nf:
            for sign in (1, -1):
                ax.axhline(sign * nf, color="grey", ls=":", lw=1,
                           label="noise floor (1-ulp flip)" if sign > 0 else None)
        anchors(ax)
        cmap = plt.get_cmap("tab10")
        markers = "ovD^s<>phP*X"
        ax.scatter([1.0], [0.0], color="grey", marker="s", zorder=3, label="torch.save")
        for k, (x, y, name, lossy) in enumerate(sorted(pts)):
            ax.scatter([x], [y], color=cmap(k % 10) if lossy else "black", s=40, zorder=3,
                       marker=markers[k % len(markers)], label=f"{name} ({x:.1f}x)")
            ax.annotate(str(k + 1), (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ax.set_xscale("log")
        ys = [abs(p[1]) for p in pts if p[1]] + ([nf] if nf else [])
        ax.set_yscale("symlog", linthresh=max(1e-3, min(ys, default=1e-2)))
        ax.set_ylim(-2 * max(ys + [TARGET_LOSS_PCT]), 2 * max(ys + [TARGET_LOSS_PCT]))
        ax.set_xlim(0.8, 1.6 * max([TARGET_RATIO] + [p[0] for p in pts] +
                                   [a[1] for a in PUBLISHED]))
        ax.set_xlabel("total disk saved vs torch.save (x, log)")
        ax.set_ylabel(f"resume final-loss difference (%), after {r['resume_steps']} steps")
        ax.set_title(f"{r['workload']}: {r['saves']} saves")
        handles, labels = ax.get_legend_handles_labels()
        n_ref = len(labels) - len(pts)  # band, target line, noise floor, anchors, torch.save
        labels = [lab if k < n_ref else f"{k - n_ref + 1}: {lab}" for k, lab in enumerate(labels)]
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3, which="both")
    fig.text(0.01, 0.01, ("Purple dotted lines with ▼: published ratios of other systems on "
                          "other models and baselines (" + "; ".join(
                              f"{n} {v}" for n, _, v in PUBLISHED) + "). NOT measured here; "
                          "their loss axes are not comparable with this one, so they are drawn "
                          "at their ratio only, with no loss value."),
             fontsize=8, style="italic", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = os.path.join(out, "lossy_frontier.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for row in r["methods"]:
            if not row["main"] or not row["step_bytes"]:
                continue
            ax.plot(row["steps"], row["step_bytes"], label=row["method"],
                    lw=1.2, marker="." if len(row["steps"]) <= 40 else None)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("bytes added to disk by the save (log)")
        ax.set_title(f"{r['workload']}: bytes per save")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = os.path.join(out, "lossy_bytes.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


# --------------------------------------------------------------------------------------- main
def _script() -> str:
    """The benchmark script run: bench_lossy_sweep.py runs this module's ``main`` too."""
    name = os.path.basename(sys.argv[0] if sys.argv else "")
    return name if name.startswith("bench_") and name.endswith(".py") \
        else os.path.basename(__file__)


def readme_table(results: list[dict[str, Any]]) -> list[str]:
    """The README's summary: per setting, the transformer's and the CNN's ratio, Δ resume loss,
    Δ accuracy and drift (after the last repeated resume, and its worst cycle)."""
    res = {r["workload"]: {m["method"]: m for m in r["methods"]} for r in results}
    tr, cnn = res.get("transformer", {}), res.get("cnn", {})

    def drift(m: dict[str, Any], key: str, unit: str) -> str:
        cyc = (m.get("drift") or {}).get("cycles") or []
        if not cyc or key not in cyc[-1]:
            return "-"
        return f"{cyc[-1][key]:+.2f} {unit} ({worst_cycle(cyc, key):+.2f} {unit})"

    lines = ["| setting | transformer: vs torch.save | Δ resume loss | drift after 10 resumes "
             "(worst cycle) | cnn: vs torch.save | Δ resume loss | Δ held-out acc | drift, "
             "acc (worst cycle) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in tr.items():
        if m.get("error") or not m.get("resume") or m.get("baseline"):
            continue
        row = [f"`{name}`", f"{m['ratio']:.1f}x", f"{m['resume']['diff_pct']:+.2f} %",
               drift(m, "diff_pct", "%")]
        c = cnn.get(name)
        if c and not c.get("error") and c.get("resume"):
            row += [f"{c['ratio']:.1f}x", f"{c['resume']['diff_pct']:+.2f} %",
                    f"{c['resume'].get('accuracy_diff_pp', 0.0):+.2f} pp",
                    drift(c, "accuracy_diff_pp", "pp")]
        else:
            row += ["-"] * 4
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _only(methods: list[Method], names: str | None) -> list[Method]:
    """``methods`` restricted to ``names`` (comma-separated); the baselines always stay."""
    if not names:
        return methods
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {"torch.save", "lossless"}
    return [m for m in methods if wanted & {m.name, *m.aliases}]


def known_methods() -> set[str]:
    return set(METHODS) | set(PRESETS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few saves (CI smoke)")
    ap.add_argument("--saves", type=int, help="transformer checkpoints (default 100)")
    ap.add_argument("--every", type=int, default=5, help="transformer steps per checkpoint")
    ap.add_argument("--resume-save", type=int, help="resume from this save # (default saves/2)")
    ap.add_argument("--resume-steps", type=int, help="steps after resuming (default 100)")
    ap.add_argument("--rec-saves", type=int, help="recsys checkpoints (default 30)")
    ap.add_argument("--rec-every", type=int, default=5)
    ap.add_argument("--rec-resume-steps", type=int, help="recsys steps after resuming")
    ap.add_argument("--skip-recsys", action="store_true", help="same as --workloads "
                    "transformer,cnn")
    ap.add_argument("--cnn-saves", type=int, help="cnn checkpoints (default 100)")
    ap.add_argument("--cnn-every", type=int, default=5)
    ap.add_argument("--cnn-resume-steps", type=int, help="cnn steps after resuming (default 100)")
    ap.add_argument("--drift-cycles", type=int, help="repeated-resume cycles (default 10; "
                    "--quick 3), each of (resume steps // cycles) steps; 0: no drift test")
    ap.add_argument("--workloads", help=f"comma-separated, of {', '.join(WORKLOADS)} (default: "
                    "all)")
    ap.add_argument("--methods", help="comma-separated method names to run (default: all); "
                    "torch.save and lossless always run as the baselines")
    ap.add_argument("--out", help="results folder (default benchmarks/results; --quick: none)")
    ap.add_argument("--readme-table", metavar="JSON", help="print the README's table from a "
                    "run's lossy.json and exit (runs nothing)")
    args = ap.parse_args(argv)
    if args.readme_table:
        with open(args.readme_table) as f:
            print("\n".join(readme_table(json.load(f)["results"])))
        return 0
    quick = args.quick
    saves = args.saves or (10 if quick else 100)
    resume_save = args.resume_save or saves // 2
    resume_steps = args.resume_steps or (20 if quick else 100)
    rec_saves = args.rec_saves or (6 if quick else 30)
    rec_resume_steps = args.rec_resume_steps or (10 if quick else 50)
    cnn_saves = args.cnn_saves or (10 if quick else 100)
    cnn_resume_steps = args.cnn_resume_steps or (20 if quick else 100)
    out = args.out or (None if quick else os.path.join(os.path.dirname(__file__), "results"))
    if min(resume_steps, rec_resume_steps, cnn_resume_steps) < LAST:
        ap.error(f"resume steps must be >= {LAST}")
    wanted = [w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip()]
    if unknown := set(wanted) - set(WORKLOADS):
        ap.error(f"unknown workload(s) {', '.join(sorted(unknown))}; known: {', '.join(WORKLOADS)}")
    if args.skip_recsys:
        wanted = [w for w in wanted if w != "recsys"]
    if args.methods and (unknown := {n.strip() for n in args.methods.split(",") if n.strip()}
                         - known_methods()):
        ap.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: "
                 f"{', '.join(sorted(known_methods()))}")
    drift = max(0, (3 if quick else 10) if args.drift_cycles is None else args.drift_cycles)
    if drift and min(resume_steps, rec_resume_steps, cnn_resume_steps) < drift:
        ap.error("--drift-cycles must not exceed the resume steps (each cycle trains "
                 "resume steps // cycles steps)")
    t_all = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    root = tempfile.mkdtemp(prefix="deltackpt-lossy-", dir=os.environ.get("BENCH_TMP"))
    results = []
    try:
        for name in WORKLOADS:  # report order, whatever the order asked for
            if name not in wanted:
                continue
            methods = _only(dedupe(methods_for(name)), args.methods)
            if name == "transformer":
                results.append(run_workload(
                    TransformerWorkload(quick, total_steps=saves * args.every), methods, saves,
                    args.every, resume_save, resume_steps, root, drift))
            elif name == "recsys":
                results.append(run_workload(RecWorkload(quick), methods, rec_saves,
                                            args.rec_every, rec_saves // 2, rec_resume_steps,
                                            root, drift))
            else:
                results.append(run_workload(
                    CNNWorkload(quick, total_steps=cnn_saves * args.cnn_every), methods,
                    cnn_saves, args.cnn_every, cnn_saves // 2, cnn_resume_steps, root, drift))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "python": platform.python_version(), "deltackpt": deltackpt.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
                       f"{torch.get_num_threads()} torch threads",
            "command": "python benchmarks/" + _script() + (
                " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
            "seconds": time.perf_counter() - t_all,
            "loadavg_1min": [load_start, os.getloadavg()[0] if hasattr(os, "getloadavg")
                             else None]}
    md = to_markdown(results, meta)
    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "lossy.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out, "lossy.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        for p in plot(results, out):
            log(f"wrote {p}")
    failures = [f for r in results for f in r["failures"]]
    ok = not failures and all(r["replay_matches_uninterrupted_run"] is not False
                              for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
