"""neuromask_pl.fastcopy.folding: each pattern that folds, against the unfolded module's logits and input gradients
(autograd through both), and each look-alike that must not fold.

Tolerance (float32): folding computes the same real function in another order. A folded layer's outputs change by a
few roundings of its K-term dot products, at most about K * u of the output's scale (u = 2**-24, about 6e-8, is
float32's unit roundoff). The nets here have K <= 300 and at most 3 folded layers in a row: at most about 5e-5,
so ``TOLERANCE = 1e-4`` of the largest output (or gradient) value. A wrong fold (a lost shift at the borders, a
dropped activation, the wrong channel) changes outputs by a tenth of their scale or more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.fastcopy.folding import fold_batchnorm, is_batchnorm

TOLERANCE = 1e-4


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in eval mode without gradients, every BatchNorm's statistics and affine map random (else folding
    a fresh BatchNorm is nearly the identity and would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if is_batchnorm(m):
                n = m.running_mean.shape[0]
                m.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return module.eval().requires_grad_(False)


def logits_and_input_gradient(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    inputs = inputs.clone().requires_grad_(True)
    out = model(inputs)
    (grad,) = torch.autograd.grad(out.logsumexp(-1).sum(), inputs)
    return out.detach(), grad


def assert_same_function(folded: nn.Module, original: nn.Module, inputs: Tensor, tolerance: float = TOLERANCE):
    """The folded copy's outputs and input gradients equal the original's within ``tolerance`` of their scale."""
    for got, expected, what in zip(
        logits_and_input_gradient(folded, inputs), logits_and_input_gradient(original, inputs), ("logits", "gradient")
    ):
        assert got.shape == expected.shape, what
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error <= tolerance, f"{what}: relative error {error:.2e}"


def batchnorms(module: nn.Module) -> int:
    return sum(is_batchnorm(m) for m in module.modules())


def check(net: nn.Module, inputs: Tensor, folds: int, *, example: bool = True) -> nn.Module:
    """Fold ``net`` (randomised), check the count and that the copy computes the same; returns the copy."""
    with torch.no_grad():
        net(inputs)  # materialise lazy layers
    net = randomised(net)
    folded, count = fold_batchnorm(net, inputs[:2] if example else None)
    assert count == folds
    assert batchnorms(folded) == batchnorms(net) - folds
    if folds:
        assert_same_function(folded, net, inputs)
    else:
        torch.testing.assert_close(folded(inputs), net(inputs), rtol=0, atol=0)
    return folded


# ----------------------------------------------------------------------------- norm + activation modules


class NormAct2d(nn.BatchNorm2d):
    """As timm's ``BatchNormAct2d``: a BatchNorm2d subclass that applies its ``drop`` and ``act`` after the norm."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Dropout(0.5), act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class Doubled(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward is not ``tail(batch_norm(x))``: folding it would change the maths."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x) + x.mean()


def conv_norm_head(norm: nn.Module, channels: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), norm, nn.Conv2d(channels, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(5)
    )


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(inplace=True), nn.Identity()], ids=["silu", "relu", "none"])
def test_a_norm_act_module_folds_into_the_conv_before_it_and_keeps_its_activation(act: nn.Module) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(3, 3, 10, 10)
    folded = check(conv_norm_head(NormAct2d(6, act)), inputs, folds=1)
    if not isinstance(act, nn.Identity):
        assert any(isinstance(m, type(act)) for m in folded.modules())


def test_timm_norm_act_and_frozen_batchnorms_fold() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(1)
    inputs = torch.randn(3, 3, 10, 10)
    for norm in (
        timm_layers.BatchNormAct2d(6, act_layer=nn.GELU),
        timm_layers.FrozenBatchNormAct2d(6, act_layer=nn.Hardswish),
        FrozenBatchNorm2d(6),
    ):
        folded = check(conv_norm_head(norm), inputs, folds=1)
        assert not any(is_batchnorm(m) for m in folded.modules()), type(norm).__name__


def test_a_norm_subclass_that_computes_something_else_is_not_folded() -> None:
    torch.manual_seed(2)
    inputs = torch.randn(3, 3, 10, 10)
    check(conv_norm_head(Doubled(6)), inputs, folds=0)


# ----------------------------------------------------------------------------- BatchNorm1d beside a Linear


class LinearNorm(nn.Module):
    """LeViT's: a Linear over tokens (B, N, C), its BatchNorm1d over the flattened tokens (B * N, C)."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(features, out, bias=False), nn.BatchNorm1d(out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """LeViT's head: BatchNorm1d, dropout, Linear."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(features), nn.Dropout(0.2), nn.Linear(features, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.drop(self.bn(x)))


class Tokens(nn.Module):
    """(B, N, C) tokens through LinearNorm, GELU, LinearNorm, then mean over tokens and a NormLinear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = LinearNorm(8, 12), LinearNorm(12, 8), NormLinear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.second(F.gelu(self.first(x))).mean(1))


def test_levit_linear_norm_and_norm_linear_fold() -> None:
    torch.manual_seed(3)
    check(Tokens(), torch.randn(4, 7, 8), folds=3)


def test_batchnorm1d_after_a_linear_folds_only_when_it_normalises_the_linears_outputs() -> None:
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    check(mlp, torch.randn(5, 6), folds=1)
    check(mlp, torch.randn(5, 6), folds=0, example=False)  # without an example the BatchNorm's input is unknown
    # On (B, N, C) tokens with N == C a BatchNorm1d normalises dim 1, the tokens, not the Linear's outputs.
    tokens = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.Flatten(), nn.Linear(81, 3))
    check(tokens, torch.randn(5, 9, 6), folds=0)


class WideLinearNorm(nn.Module):
    """A Linear with 2C outputs whose BatchNorm1d(C) sees them as twice the rows: not folded (nor an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(4), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return self.head(self.bn(y.reshape(-1, 4)).reshape_as(y))


def test_a_batchnorm1d_over_reshaped_rows_of_a_wider_linear_is_left_alone() -> None:
    torch.manual_seed(10)
    check(WideLinearNorm(), torch.randn(5, 6), folds=0)


# ----------------------------------------------------------------------------- BatchNorm before a layer


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(6, 8, 1), (3, 6, 9, 9)),  # MaxViT's pre_norm before a 1x1 convolution
        (nn.Conv2d(6, 8, 3, stride=2, bias=False), (3, 6, 9, 8)),
        (nn.Conv2d(6, 9, 3, groups=3), (3, 6, 9, 9)),  # grouped: each output reads its group's channels
        (nn.Conv2d(6, 6, 3, groups=6, dilation=2), (3, 6, 11, 11)),
        (nn.Conv1d(6, 4, 3), (3, 6, 12)),
    ],
    ids=["pointwise", "strided", "grouped", "depthwise-dilated", "conv1d"],
)
def test_a_batchnorm_folds_into_an_unpadded_conv_after_it(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(5)
    norm = nn.BatchNorm1d(6) if layer.weight.ndim == 3 else nn.BatchNorm2d(6)
    check(nn.Sequential(norm, layer, nn.Flatten(1), nn.LazyLinear(4)), torch.randn(*shape), folds=1)


def test_a_batchnorm_before_a_padded_conv_stays() -> None:
    """Zero padding: the border outputs would read the shift where the unfolded conv reads zeros."""
    torch.manual_seed(6)
    for padding in (1, "same"):
        net = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=padding), nn.Flatten(), nn.LazyLinear(3))
        check(net, torch.randn(2, 4, 8, 8), folds=0)


class MBConv(nn.Module):
    """MaxViT's MBConv start: BatchNorm, 1x1 conv, BatchNorm, GELU, depthwise 3x3 conv (padded), BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.GELU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
        )  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x.repeat(1, 2, 1, 1) + self.layers(x)).mean((2, 3)))


def test_batchnorms_on_both_sides_of_a_conv_fold_into_it() -> None:
    torch.manual_seed(7)
    check(MBConv(), torch.randn(3, 4, 9, 9), folds=3)


class Shared(nn.Module):
    """A BatchNorm whose output also feeds a skip connection: folding it into the conv would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv, self.head = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        return self.head((self.conv(y) + y).mean((2, 3)))


def test_a_batchnorm_between_a_concatenation_and_a_relu_or_feeding_two_layers_stays() -> None:
    torch.manual_seed(8)
    dense = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(3))
    check(dense, torch.randn(2, 4, 6, 6), folds=0)  # DenseNet's pre-activation: the ReLU sits between
    check(Shared(), torch.randn(2, 4, 6, 6), folds=0)


class DataDependent(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x if x.mean() > 0 else -x


def test_an_untraceable_sequential_folds_adjacent_pairs_both_ways() -> None:
    torch.manual_seed(9)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), NormAct2d(4, nn.ReLU()), DataDependent(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
        nn.Flatten(), nn.LazyLinear(3),
    )  # fmt: skip
    check(net, torch.randn(2, 3, 6, 6), folds=2)
