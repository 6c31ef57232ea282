"""A small CNN on a synthetic image-classification set drawn in-process from fixed seeds (no
downloads): ten shape classes (disk, ring, square, frame, diamond, plus, X, bar, two dots,
triangle) at a random position, size, rotation and contrast over a smooth random
background and pixel noise, hard enough that the held-out accuracy stays well below 100 %."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltackpt.cli.demo import StepTrainer

CLASSES = ("disk", "ring", "square", "frame", "diamond", "plus", "x", "bar", "two dots",
           "triangle")


def _mask(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Class ``k``'s shape in normalized coordinates (the shape fills about the unit box)."""
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    if k == 0:
        return r < 0.9
    if k == 1:
        return (r - 0.75).abs() < 0.2
    if k == 2:
        return box < 0.75
    if k == 3:
        return (box > 0.5) & (box < 0.8)
    if k == 4:
        return u.abs() + v.abs() < 1.0
    if k == 5:
        return (torch.minimum(u.abs(), v.abs()) < 0.22) & (box < 0.95)
    if k == 6:
        return (torch.minimum((u - v).abs(), (u + v).abs()) < 0.3) & (box < 0.8)
    if k == 7:
        return (v.abs() < 0.25) & (u.abs() < 1.0)
    if k == 8:
        return ((u - 0.5) ** 2 + v * v < 0.12) | ((u + 0.5) ** 2 + v * v < 0.12)
    return (v > -0.7) & (v < 0.7) & (u.abs() < (0.7 - v) * 0.65)


def make_images(n: int, size: int, seed: int, noise: float = 0.3
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, size, size)`` and their labels, a pure function of the arguments."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(CLASSES), (n,), generator=g)

    def uni(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)

    cx, cy, rad = uni(-0.35, 0.35), uni(-0.35, 0.35), uni(0.3, 0.6)
    th = uni(-0.5, 0.5)
    contrast = uni(0.5, 1.0)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    dx, dy = xx - cx, yy - cy
    u = (dx * torch.cos(th) + dy * torch.sin(th)) / rad
    v = (-dx * torch.sin(th) + dy * torch.cos(th)) / rad
    shape = torch.zeros(n, size, size)
    for k in range(len(CLASSES)):
        sel = y == k
        shape[sel] = _mask(k, u[sel], v[sel]).float()
    # smooth clutter: a coarse random field upsampled, then white noise
    coarse = torch.randn(n, 1, 4, 4, generator=g)
    clutter = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                        align_corners=False)[:, 0]
    x = contrast * shape + 0.3 * clutter + noise * torch.randn(n, size, size, generator=g)
    return x.unsqueeze(1), y


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages, then a hidden linear layer and the classifier."""

    def __init__(self, size: int = 32, width: int = 32, classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 1
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.MaxPool2d(2)]
            ch = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * (size // 8) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ShapesConfig:
    size: int = 32
    width: int = 32
    train: int = 20_000
    heldout: int = 2_000
    noise: float = 0.3
    seed: int = 0


class ShapesData:
    """The fixed train / held-out split (generated once, shared by every trainer)."""

    def __init__(self, cfg: ShapesConfig) -> None:
        self.cfg = cfg
        self.x, self.y = make_images(cfg.train, cfg.size, cfg.seed, cfg.noise)
        self.hx, self.hy = make_images(cfg.heldout, cfg.size, cfg.seed + 1_000_003, cfg.noise)


class CNNTrainer(StepTrainer):
    """SmallCNN, SGD with Nesterov momentum and weight decay, cosine schedule; batches drawn
    from the training split by the seeded ``gen`` (its state is in the checkpoint)."""

    def __init__(self, data: ShapesData, *, total_steps: int, seed: int = 0, lr: float = 0.01,
                 batch: int = 64) -> None:
        torch.manual_seed(seed)
        self.data = data
        self.model = SmallCNN(data.cfg.size, data.cfg.width)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.batch, self.total_steps, self.step = batch, total_steps, 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, self.data.y.numel(), (self.batch,), generator=self.gen)
        return self.data.x[ix], self.data.y[ix]

    @torch.no_grad()
    def accuracy(self) -> float:
        """Held-out accuracy (%), BatchNorm in eval mode; training state is left untouched."""
        self.model.eval()
        try:
            hit = sum(int((self.model(x).argmax(-1) == y).sum())
                      for x, y in zip(self.data.hx.split(1000), self.data.hy.split(1000)))
        finally:
            self.model.train()
        return 100.0 * hit / self.data.hy.numel()
