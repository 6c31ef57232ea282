"""The six workloads (a-f), generated locally from fixed seeds: trainers and a synthetic large
state, each yielding (step, state) checkpoints."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltackpt.cli.demo import GPTConfig, Trainer

from .common import GiB, MiB
from .config import run_config


def gpt_cfg(quick: bool, scale: float) -> GPTConfig:
    if quick:
        dim = max(32, round(64 * math.sqrt(scale) / 16) * 16)
        return GPTConfig(layers=2, dim=dim, block=64)
    dim = max(64, round(256 * math.sqrt(scale) / 32) * 32)
    return GPTConfig(layers=4, dim=dim, block=128)


def train_checkpoints(trainer: Any, saves: int, every: int, losses: list[float] | None = None
                      ) -> Iterator[tuple[int, Any]]:
    """Train to step ``saves * every``, yielding ``(step, state)`` every ``every`` steps; each
    step's loss is appended to ``losses`` if given."""
    while trainer.step < saves * every:
        loss = trainer.train_step()
        if losses is not None:
            losses.append(loss)
        if trainer.step % every == 0:
            yield trainer.step, trainer.state()


class BF16Trainer(Trainer):
    """bf16 mixed precision as far as the checkpoint is concerned: the model's weights are bf16,
    rounded from fp32 master params that AdamW updates. Forward/backward run in fp32 on the
    bf16-rounded weights (the CPU build here has no fast bf16 matmul: a bf16 step was several times
    slower), so the bytes checkpointed are those of bf16 training: bf16 model + fp32 master +
    fp32 optimizer state."""

    def __init__(self, cfg: GPTConfig, *, total_steps: int, lr: float = 3e-4,
                 batch: int = 16) -> None:
        super().__init__(cfg, total_steps=total_steps, lr=lr, batch=batch)
        self.master = {n: nn.Parameter(p.detach().clone())
                       for n, p in self.model.named_parameters()}
        self.bf16 = {n: t.detach().to(torch.bfloat16) if t.is_floating_point() else t
                     for n, t in self.model.state_dict().items()}
        self.opt = torch.optim.AdamW(list(self.master.values()), lr=lr, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    def train_step(self) -> float:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.bf16[name])  # compute with the bf16-rounded weights
        x, y = self.sample()
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in self.model.named_parameters():
            self.master[name].grad = p.grad
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for name, m in self.master.items():
                self.bf16[name].copy_(m)  # round the updated master to bf16
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, object]:
        return {"model": self.bf16, "master": self.master,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "data_rng": self.gen.get_state(), "step": self.step}


class LoRA(nn.Module):
    """W + (alpha/r) * B @ A as a parametrization of a frozen weight."""

    def __init__(self, out_f: int, in_f: int, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A)


def lora_trainer(cfg: GPTConfig, total_steps: int) -> Trainer:
    tr = Trainer(cfg, total_steps=total_steps, lr=1e-3)
    for p in tr.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(123)
    targets: list[tuple[Any, str]] = [(tr.model.head, "weight")]
    b: Any  # a transformer block: attn and mlp are its submodules
    for b in tr.model.blocks:
        targets += [(b.attn, "in_proj_weight"), (b.attn.out_proj, "weight"),
                    (b.mlp[0], "weight"), (b.mlp[2], "weight")]
    for mod, name in targets:
        w = getattr(mod, name)
        parametrize.register_parametrization(mod, name, LoRA(w.shape[0], w.shape[1]))
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    tr.sched = torch.optim.lr_scheduler.LambdaLR(
        tr.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return tr


class RecSys(nn.Module):
    def __init__(self, n_items: int, n_users: int, dim: int = 32) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, dim, sparse=True)
        self.users = nn.Embedding(n_users, dim, sparse=True)
        nn.init.normal_(self.items.weight, std=0.05)
        nn.init.normal_(self.users.weight, std=0.05)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.users(u), self.items(i)], -1)).squeeze(-1)


class RecSysTrainer:
    """Clicks on Zipf-popular items from a hidden low-rank preference model; SparseAdam on the
    tables (only rows in the batch change), Adam on the MLP."""

    def __init__(self, n_items: int, n_users: int, batch: int = 512, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = RecSys(n_items, n_users)
        self.sparse_opt = torch.optim.SparseAdam(
            [self.model.items.weight, self.model.users.weight], lr=1e-2)
        self.dense_opt = torch.optim.Adam(self.model.mlp.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed + 7)
        self.hid_items = torch.randn(n_items, 8, generator=g)
        self.hid_users = torch.randn(n_users, 8, generator=g)
        ranks = torch.arange(1, n_items + 1, dtype=torch.float64)
        self.cdf = torch.cumsum(ranks ** -1.1, 0)
        self.cdf /= self.cdf[-1].clone()
        self.perm = torch.randperm(n_items, generator=g)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.n_users, self.batch, self.step = n_users, batch, 0

    def train_step(self) -> float:
        r = torch.rand(self.batch, generator=self.gen, dtype=torch.float64)
        items = self.perm[torch.searchsorted(self.cdf, r).clamp_(max=self.perm.numel() - 1)]
        users = torch.randint(0, self.n_users, (self.batch,), generator=self.gen)
        p = torch.sigmoid((self.hid_users[users] * self.hid_items[items]).sum(-1))
        y = torch.bernoulli(p, generator=self.gen)
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(users, items), y)
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "sparse_opt": self.sparse_opt.state_dict(),
                "dense_opt": self.dense_opt.state_dict(), "data_rng": self.gen.get_state(),
                "step": self.step}


class BigState:
    """A synthetic transformer-shaped fp32 state (params + Adam moments, 12 bytes/param) that
    moves by a random-walk Adam update between saves: every element changes a little."""

    def __init__(self, total_bytes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        n_params = total_bytes // 12
        d = 1024 if n_params >= 32 * 2**20 else 256
        per_layer = 12 * d * d + 4 * d
        layers = max(1, int(0.7 * n_params) // per_layer)
        vocab = max(1, (n_params - layers * per_layer) // d)
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
        for i in range(layers):
            shapes.update({f"layers.{i}.attn.qkv.weight": (3 * d, d),
                           f"layers.{i}.attn.out.weight": (d, d),
                           f"layers.{i}.mlp.fc1.weight": (4 * d, d),
                           f"layers.{i}.mlp.fc2.weight": (d, 4 * d),
                           f"layers.{i}.ln1.weight": (d,), f"layers.{i}.ln1.bias": (d,),
                           f"layers.{i}.ln2.weight": (d,), f"layers.{i}.ln2.bias": (d,)})
        self.params = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        self.m = {k: torch.zeros(s) for k, s in shapes.items()}
        self.v = {k: torch.zeros(s) for k, s in shapes.items()}
        self.step = 0
        self.update()

    def update(self, lr: float = 1e-4) -> None:
        self.step += 1
        for k, p in self.params.items():
            grad = torch.randn(p.shape, generator=self.gen).mul_(1e-3)
            self.m[k].mul_(0.9).add_(grad, alpha=0.1)
            self.v[k].mul_(0.999).addcmul_(grad, grad, value=0.001)
            p.addcdiv_(self.m[k], self.v[k].sqrt().add_(1e-8), value=-lr)

    def state(self) -> dict[str, object]:
        keys = list(self.params)
        return {"model": self.params, "optimizer": {
            "state": {i: {"step": torch.tensor(float(self.step)), "exp_avg": self.m[k],
                          "exp_avg_sq": self.v[k]} for i, k in enumerate(keys)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": 0.0, "params": list(range(len(keys)))}]},
            "step": self.step}


@dataclass
class Workload:
    key: str
    title: str
    checkpoints: Callable[[], Iterator[tuple[int, Any]]]
    describe: str = ""
    saves: int = 0


def make_workloads(quick: bool, scale: float, saves: int | None, every: int | None
                   ) -> list[Workload]:
    cfg = gpt_cfg(quick, scale)
    conf = run_config(quick, scale, saves, every)
    n, ev = conf["saves"], conf["every"]
    big_saves = 2 if quick else 3
    big_bytes = int((48 * MiB if quick else GiB) * scale)
    items = int((20_000 if quick else 200_000) * scale)
    users = int((5_000 if quick else 20_000) * scale)
    gpt = f"GPT layers={cfg.layers} dim={cfg.dim} block={cfg.block}"

    def big() -> Iterator[tuple[int, Any]]:
        s = BigState(big_bytes)
        for _ in range(big_saves):
            s.update()
            yield s.step, s.state()

    return [
        Workload("a", "dense fp32 pre-training",
                 lambda: train_checkpoints(Trainer(cfg, total_steps=n * ev), n, ev),
                 f"{gpt}, AdamW, fp32, all params trained; a save every {ev} steps", n),
        Workload("b", "bf16 mixed precision",
                 lambda: train_checkpoints(BF16Trainer(cfg, total_steps=n * ev), n, ev),
                 f"{gpt}, bf16 model weights + fp32 master params + AdamW state (forward/"
                 f"backward in fp32 on the bf16-rounded weights); a save every {ev} steps", n),
        Workload("c", "frozen-backbone fine-tuning",
                 lambda: train_checkpoints(Trainer(cfg, total_steps=n * ev, freeze_backbone=True),
                                      n, ev),
                 f"{gpt}, only the output head trained; a save every {ev} steps", n),
        Workload("d", "LoRA adapters",
                 lambda: train_checkpoints(lora_trainer(cfg, n * ev), n, ev),
                 f"{gpt}, rank-8 LoRA on all linear projections, base frozen, full "
                 f"state_dict saved; a save every {ev} steps", n),
        Workload("e", "recsys sparse embeddings",
                 lambda: train_checkpoints(RecSysTrainer(items, users), n, ev),
                 f"item table {items}x32 + user table {users}x32 (sparse, SparseAdam), MLP "
                 f"(Adam), batch 512 Zipf items; a save every {ev} steps", n),
        Workload("f", "large state (throughput)", big,
                 f"synthetic fp32 transformer-shaped params + 2 Adam moments, "
                 f"{big_bytes / MiB:.0f} MiB, random-walk update between saves; "
                 f"{big_saves} saves", big_saves),
    ]
