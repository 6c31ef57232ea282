"""A small character-level transformer trained on CPU: the workload behind ``deltackpt demo``
and the benchmarks. Deterministic for a given seed; needs no downloads."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be on
his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my
purse, and nothing particular to interest me on shore, I thought I would sail about a little
and see the watery part of the world. It is a way I have of driving off the spleen and
regulating the circulation. Whenever I find myself growing grim about the mouth; whenever it is
a damp, drizzly November in my soul, then, I account it high time to get to sea as soon as I can.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of
Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.
"""


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 96
    block: int = 64
    layers: int = 2
    dim: int = 64
    heads: int = 4


class Block(nn.Module):
    mask: torch.Tensor  # a registered buffer
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(),
                                 nn.Linear(4 * cfg.dim, cfg.dim))
        self.register_buffer("mask", torch.triu(torch.ones(cfg.block, cfg.block,
                                                           dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.block, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def encode_text(text: str = TEXT, vocab: int = 96) -> torch.Tensor:
    return torch.tensor([min(max(ord(c) - 31, 0), vocab - 1) for c in text], dtype=torch.long)


class StepTrainer:
    """One optimizer step per ``train_step`` on a batch that ``sample`` draws with the seeded
    ``gen``, cross-entropy loss; ``state()`` is the checkpoint and ``load_state`` its inverse."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    step: int

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (inputs, targets)."""
        raise NotImplementedError

    def train_step(self) -> float:
        x, y = self.sample()
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "data_rng": self.gen.get_state(),
                "step": self.step}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (as ``state()`` returned it, or a load of it)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["data_rng"])
        self.step = int(state["step"])


class Trainer(StepTrainer):
    """Model, AdamW, cosine schedule and a seeded batch sampler; ``state()`` is the checkpoint."""

    def __init__(self, cfg: GPTConfig = GPTConfig(), *, seed: int = 0, lr: float = 3e-4,
                 total_steps: int = 100, batch: int = 16, freeze_backbone: bool = False) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = TinyGPT(cfg)
        if freeze_backbone:  # fine-tuning: everything but the output head is frozen
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        self.data = encode_text(vocab=cfg.vocab)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.batch = batch
        self.step = 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.data.numel() - self.cfg.block - 1
        ix = torch.randint(0, n, (self.batch,), generator=self.gen)
        x = torch.stack([self.data[i:i + self.cfg.block] for i in ix.tolist()])
        y = torch.stack([self.data[i + 1:i + 1 + self.cfg.block] for i in ix.tolist()])
        return x, y
