"""The fast path on the classes real classifiers are made of: timm (norm + activation modules, LeViT's BatchNorm1d
beside Linear layers, MobileViT, which fx cannot trace whole) and torchvision (DenseNet, MaxViT). Random weights,
never downloads; BatchNorm statistics randomised so that folding is not nearly the identity.

Tolerance (float32): each folded layer changes its outputs by a few roundings of its K-term dot products, about
sqrt(K) * u of their scale for rounding errors of random sign (u = 2**-24, about 6e-8). Along the up to 60
folded layers of these models, with K up to about 1200, that adds up to about 60 * 35 * 6e-8, roughly 1e-4, so
``MODEL_TOLERANCE = 1e-3`` of the largest logit (or gradient entry). A wrong fold changes them by far more (see
test_folding.py). The packed copy's convolutions are float32 too, and stay within the same bound.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_folding import assert_same_function, batchnorms, randomised
from torch import nn

from neuromask_pl.fastcopy import FastCopies, FastPath, fold_batchnorm

MODEL_TOLERANCE = 1e-3


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def maxvit_t_small() -> nn.Module:
    """torchvision's maxvit_t layers for 64 px inputs (partition size 2 instead of 7: the same modules)."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
        block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2, num_classes=10,
    )  # fmt: skip


def densenet121() -> nn.Module:
    import torchvision

    return torchvision.models.densenet121(num_classes=10)


# name: (model, BatchNorms, folded)
MODELS = {
    "timm efficientnet_b0": (timm_model("efficientnet_b0"), 49, 49),  # BatchNormAct2d
    "timm mobilenetv3_large_100": (timm_model("mobilenetv3_large_100"), 46, 46),
    "timm regnety_004": (timm_model("regnety_004"), 53, 53),
    "timm mobilevit_xxs": (timm_model("mobilevit_xxs"), 32, 32),  # fx traces its blocks' children only
    "timm levit_128s": (timm_model("levit_128s", img_size=64), 52, 52),  # LinearNorm, NormLinear
    # DenseNet: 62 BatchNorms sit between a concatenation and a ReLU, which no fold can absorb
    "torchvision densenet121": (densenet121, 121, 59),
    "torchvision maxvit_t": (maxvit_t_small, 34, 34),  # pre_norm before a 1x1 conv
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_classifiers_fold_and_pack_and_keep_their_logits_and_input_gradients(name: str) -> None:
    build, total, folds = MODELS[name]
    torch.manual_seed(0)
    model = randomised(build())
    images = torch.rand(2, 3, 64, 64)
    assert batchnorms(model) == total
    folded, count = fold_batchnorm(model, images)
    assert (count, batchnorms(folded)) == (folds, total - folds)
    assert_same_function(folded, model, images, MODEL_TOLERANCE)
    fast = FastCopies(FastPath(auto=False))  # the whole copy as NeuroMask runs it: folded and packed
    copy = fast.get(model, images)
    assert fast.report()["folded_batchnorm"] == folds and copy is not model
    if torch.backends.mkldnn.is_available():
        assert fast.report()["packed_convolutions"] > 0 and fast.report()["variant"] == "folded+packed"
    assert_same_function(copy, model, images, MODEL_TOLERANCE)
    assert batchnorms(model) == total  # the original is untouched
