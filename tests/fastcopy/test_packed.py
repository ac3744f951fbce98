"""Which convolutions the fast copy packs: :func:`packing_pays` by hand, and ``pack_convolutions`` with an example
input packing only those (without one, every convolution it applies to)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuromask_pl.fastcopy.packed import FrozenConv2d, packing_pays
from neuromask_pl.fastcopy.passes import apply_passes


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)


@pytest.mark.parametrize(
    ("layer", "cells", "pays"),
    [
        (conv(32, 32, 3, 2, groups=32), (16, 16), False),  # depthwise, stride 2
        (conv(32, 32, 5, 1, groups=32), (16, 16), True),  # depthwise, stride 1
        (conv(16, 32, 3), (32, 32), True),  # k x k
        (conv(16, 32, 3, groups=4), (32, 32), True),  # grouped
        (conv(3, 8, 16, 16), (64, 64), True),  # a patch embedding
        (conv(256, 512, 1), (1, 1), False),  # squeeze-and-excitation: one cell
        (conv(256, 128, 1), (2, 2), True),  # 32768 weights at 4 cells
        (conv(128, 128, 1), (2, 2), False),  # 16384
        (conv(256, 128, 1), (4, 4), True),  # 32768 at 16 cells
        (conv(128, 128, 1), (4, 4), False),  # 16384
        (conv(64, 64, 1), (8, 8), False),  # 4096 weights at 64 cells
        (conv(128, 128, 1), (8, 8), True),  # 16384 at 64 cells: stays packed
        (conv(64, 64, 1, 2), (32, 32), False),  # 1x1 of stride 2, 4096 weights at 1024 cells
    ],
)
def test_packing_pays_by_hand(layer: nn.Conv2d, cells: tuple[int, int], pays: bool) -> None:
    assert packing_pays(layer, torch.Size([2, layer.in_channels, *cells])) is pays


def test_pack_convolutions_with_an_example_packs_where_it_pays_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(3, 16, 3),  # packed
        conv(16, 16, 3, 2, groups=16),  # depthwise stride 2: left
        conv(16, 64, 1),  # 1x1 at 16 x 16 cells: left
        nn.AdaptiveAvgPool2d(2),
        conv(64, 512, 1),  # 1x1 at 2 x 2 cells, 32768 weights: packed
    ).eval()
    images = torch.rand(2, 3, 32, 32)
    expected = model(images)
    model, record = apply_passes(model, images, frozenset({"pack_convolutions"}))
    assert record.count("packed_convolution") == 2
    assert [isinstance(layer, FrozenConv2d) for layer in model] == [True, False, False, False, True]
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)  # float32 rounding of other kernels
    every = nn.Sequential(conv(3, 16, 3), conv(16, 16, 3, 2, groups=16), conv(16, 64, 1))
    _, record = apply_passes(every, None, frozenset({"pack_convolutions"}))
    assert record.count("packed_convolution") == 3  # without an example: all of them
