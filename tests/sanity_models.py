"""Tiny seeded classifiers that provoke each sanity flag of neuromask_pl.explanation (``from sanity_models import``).

- :class:`IgnoresInput`: constant logits whatever the image. The baseline alone keeps the class, the sparsity penalty
  empties the mask while the class stays "preserved", and every image is predicted as one class.
- :class:`MeanCurve`: the logit margin of class 0 over class 1 is a function of the image's mean. ``"full"``:
  brighter is surer (on mid-grey images every hidden pixel costs, so the mask stays full); ``"rise"``: surest at a
  mean of 0.25 and unsure at 0.5 (hiding half of a mid-grey image raises the probability far above the original's,
  while black is class 1, so the baseline does not keep the class).
- :func:`random_weights_cnn`: a conv net with seeded random weights that calls every image one class.
"""

from __future__ import annotations

import torch
from torch import nn


class IgnoresInput(nn.Module):
    """Logits (2, 0, -1) for every image."""

    class_names = ["cat", "dog", "owl"]

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.sum((1, 2, 3))[:, None]


class MeanCurve(nn.Module):
    """Two classes: logit 0 is ``f(mean of the image)``, logit 1 is 0."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        if self.kind == "rise":
            f = 10.2 - 40 * torch.relu(m - 0.25) - 60 * torch.relu(0.25 - m)
        else:
            f = 20 * (m - 0.45)
        return torch.stack([f, torch.zeros_like(f)], 1)


def random_weights_cnn(seed: int = 1) -> nn.Module:
    """conv -> ReLU -> pool -> linear with seeded random weights (10 classes), untrained."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
        ).eval()


def mid_grey(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` images of mean about 0.5: mid-grey plus a little seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + 0.1 * (torch.rand(n, 3, size, size, generator=generator) - 0.5)
