"""The template's network: Linear layers on flattened 1 x 28 x 28 digits, no convolution."""

from __future__ import annotations

import torch
from torch import nn


class SimpleDenseNet(nn.Module):
    def __init__(
        self, input_size: int = 784, lin1_size: int = 64, lin2_size: int = 128, lin3_size: int = 64,
        output_size: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1_size),
            nn.BatchNorm1d(lin1_size),
            nn.ReLU(),
            nn.Linear(lin1_size, lin2_size),
            nn.BatchNorm1d(lin2_size),
            nn.ReLU(),
            nn.Linear(lin2_size, lin3_size),
            nn.BatchNorm1d(lin3_size),
            nn.ReLU(),
            nn.Linear(lin3_size, output_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, channels, width, height = x.size()
        x = x.view(batch_size, -1)  # (batch, 1, width, height) -> (batch, 1*width*height)
        return self.model(x)
