"""An image's mask is the same bit for bit alone or in any batch, on the CPU's default fast path, in float32.

Float32 rounding alone would not stay small here: the default's annealed optimisation grows a 1e-7 difference into
another mask (docs/results/STABILITY.md). So these tests ask for equality, not closeness, and name the kernels that
would otherwise change with the batch: autograd's cross-entropy backward (rows of 10 classes round differently with
the number of rows), matrix products under 4 rows (a classifier's head), ATen's choice of kernel for 1x1
convolutions (oneDNN from 16 images or 2 threads on), its transposed convolution (another kernel for one or two
images), and the scalar loop ATen runs a tensor's last few values by (a sigmoid of a few values an image, or of an
odd-sized mask).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script, make_images, make_tiny_cnn, needs_vector_kernels
from torch import nn

from neuromask_pl import NeuroMask
from neuromask_pl.fastcopy.copies import SCALAR_KERNELS, vector_kernels
from neuromask_pl.fastcopy.invariant import ROW_BLOCK, PerImageConv2d, PlanewiseActivation
from neuromask_pl.fastcopy.packed import FrozenConv2d, FrozenLinear
from neuromask_pl.fastcopy.passes import apply_passes
from neuromask_pl.maths.losses import prediction_loss

pytestmark = pytest.mark.numerics


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


BATCH = 17  # at least 16 images: ATen runs a 1x1 convolution by oneDNN from there, by another kernel below


class MobileBlockNet(nn.Module):
    """A small mobile-style CNN: a strided stem with BatchNorm, a depthwise and a pointwise (1x1) convolution, a
    squeeze-and-excitation gate (1x1 convolutions on one cell and a sigmoid of 16 values an image, whose last values
    ATen would run by its scalar loop alone and by its vectorised one in a batch), global pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid()
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pointwise(self.depthwise(self.stem(x))))
        return self.head((x * self.gate(x)).mean((2, 3)))


def mobile_net() -> nn.Module:
    torch.manual_seed(3)
    net = MobileBlockNet()
    with torch.no_grad():
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
        num_classes=10,
    ).eval()  # fmt: skip


@needs_vector_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("make_net", [mobile_net, tiny_vit], ids=["mobile_cnn", "vit"])
def test_each_mask_alone_equals_its_mask_in_a_batch_bit_for_bit(make_net, threads: int) -> None:
    net = make_net()
    images = make_images(BATCH, size=16, seed=7)
    ids = torch.arange(BATCH)
    with torch_threads(threads):
        explainer = NeuroMask(net, steps=30, seed=0)
        together = explainer.explain(images, ids=ids)
        assert explainer.fast_path_report["mask_gradient"] == "explicit"
        assert explainer.fast_path_report["batch_invariant"]
        for rows in ([0], [5, 6], [14, 15, 16], list(range(4, 9))):
            part = explainer.explain(images[rows], together.targets[rows], ids=ids[rows])
            assert torch.equal(part.masks, together.masks[rows]), rows


@pytest.mark.parametrize("size", [(45, 30), (28, 28)])
def test_odd_image_sizes_give_the_same_mask_alone_or_in_a_batch(size: tuple[int, int]) -> None:
    """Sizes whose pixel count is no multiple of 64: the explicit step's sigmoids run on planes padded to whole vector
    iterations (``planewise_sigmoid``), so no plane's last values take ATen's scalar kernel."""
    net = make_tiny_cnn(0)
    images = torch.rand(5, 3, *size, generator=torch.Generator().manual_seed(2))
    explainer = NeuroMask(net, steps=30, seed=0)
    together = explainer.explain(images)
    for rows in ([0], [1, 2], [4]):
        part = explainer.explain(images[rows], together.targets[rows], ids=torch.tensor(rows))
        assert torch.equal(part.masks, together.masks[rows]), rows


def test_cross_entropy_values_are_torchs_and_its_gradient_rows_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=generator) * 5
    targets = torch.randint(0, 10, (8,), generator=generator)
    weights = torch.rand(8, generator=generator)
    assert torch.equal(prediction_loss(logits, targets), F.cross_entropy(logits, targets, reduction="none"))

    def gradient(rows: slice) -> torch.Tensor:
        part = logits[rows].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(prediction_loss(part, targets[rows]), part, weights[rows])
        return grad

    full = gradient(slice(None))
    for size in (1, 2, 3, 5):
        assert torch.equal(torch.cat([gradient(slice(i, i + size)) for i in range(0, 8, size)]), full), size
    # the written-out gradient is autograd's up to float64 rounding (softmax of well-scaled logits: 1e-15)
    double = logits.double().requires_grad_(True)
    (ours,) = torch.autograd.grad(prediction_loss(double, targets), double, weights.double())
    (torchs,) = torch.autograd.grad(F.cross_entropy(double, targets, reduction="none"), double, weights.double())
    torch.testing.assert_close(ours, torchs, rtol=0, atol=1e-14)


@needs_vector_kernels
@pytest.mark.parametrize("packed", [False, True])
def test_frozen_linear_rows_are_the_same_whatever_the_number_of_rows(packed: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(300, 250 if packed else 10).requires_grad_(False)  # 75,000 weights: packing pays
    layer = FrozenLinear(copy.deepcopy(linear), packed=packed, blocked=True)
    x = torch.randn(8, 300)
    grad_out = torch.randn(8, linear.out_features)

    def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        part = x[rows].clone().requires_grad_(True)
        out = layer(part)
        (grad,) = torch.autograd.grad(out, part, grad_out[rows])
        return out, grad

    assert ROW_BLOCK == 4
    for threads in (1, 2):  # with 2 threads ATen splits an unblocked product by its row count (5-7, 9-11 rows)
        with torch_threads(threads):
            full_out, full_grad = run(slice(None))
            for size in (1, 2, 3, 5, 6, 7):
                parts = [run(slice(i, i + size)) for i in range(0, 8, size)]
                assert torch.equal(torch.cat([p[0] for p in parts]), full_out), (threads, size)
                assert torch.equal(torch.cat([p[1] for p in parts]), full_grad), (threads, size)
    # the same function as the layer (float32 products of 300 terms: relative error well under 1e-5)
    torch.testing.assert_close(full_out, linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_grad, grad_out @ linear.weight, rtol=1e-5, atol=1e-5)
    assert layer(x[:1].unsqueeze(0)).shape == (1, 1, linear.out_features)  # leading dimensions kept


def test_pointwise_convolutions_run_one_kernel_at_any_batch_and_thread_count() -> None:
    net = mobile_net().requires_grad_(False)
    copied = copy.deepcopy(net)
    images = make_images(BATCH, size=16, seed=1)
    copied, record = apply_passes(
        copied, images[:2], frozenset({"pack_convolutions", "pack_linears", "batch_invariant"})
    )
    assert isinstance(copied.gate[1], PerImageConv2d) and isinstance(copied.gate[3], PerImageConv2d)  # one cell
    assert record.count("packed_convolution") >= 2  # the stem and the depthwise convolution (stride 1) are packed
    assert isinstance(copied.head, FrozenLinear) and copied.head.blocked and not copied.head.packed  # 1 row an image
    assert record.count("planewise_activation") == 1 and isinstance(copied.gate[4], PlanewiseActivation)
    torch.testing.assert_close(copied(images), net(images), rtol=1e-5, atol=1e-5)
    outputs = []
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            outputs.append(torch.cat([copied(images[i : i + 1]) for i in range(BATCH)]))
            outputs.append(copied(images))
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])


def test_a_blocked_packed_head_feeds_an_in_place_activation() -> None:
    """A head's output is a fresh tensor, not a view of its padded block: torchvision's MobileNetV3 runs an in-place
    Hardswish on it (autograd forbids changing a custom Function's view in place)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 250), nn.Hardswish(inplace=True), nn.Linear(250, 10)).eval()
    net.requires_grad_(False)
    copied = copy.deepcopy(net)
    copied, _ = apply_passes(copied, torch.randn(2, 300), frozenset({"pack_linears", "batch_invariant"}))
    assert [copied[0].packed, copied[0].blocked, copied[2].packed, copied[2].blocked] == [True, True, False, True]
    x = torch.randn(2, 300, requires_grad=True)
    (ours,) = torch.autograd.grad(copied(x).sum(), x)
    (reference,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)  # 250- and 300-term float32 sums


def test_the_report_claims_batch_invariance_only_for_vector_kernels() -> None:
    explainer = NeuroMask(mobile_net(), steps=1)
    explainer.explain(make_images(3, size=16, seed=7))
    report = explainer.fast_path_report
    vector = vector_kernels()
    assert report["batch_invariant"] == vector and (SCALAR_KERNELS in report["not_covered"]) == (not vector)


@needs_vector_kernels
def test_the_model_check_script_reports_every_model_it_ran(capsys) -> None:
    pytest.importorskip("timm")
    script = load_script("benchmarks/batch_invariance.py")
    assert script.main(["--only", "resnet18", "convnext_atto", "--size", "32", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| torchvision resnet18 | 0 |" in out and "| timm convnext_atto | 0 |" in out
    assert "0 model(s) whose masks depend on the batch" in out


def test_a_strided_packed_convolutions_input_gradient_is_the_same_in_any_batch() -> None:
    """A strided FrozenConv2d's input gradient (a transposed convolution: ATen's takes another kernel for one or two
    images, and oneDNN's splits its work by the batch with several threads) at 1 and 2 threads."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, 2, 1, bias=False).requires_grad_(False)  # ResNet-18's layer2.0.conv1
    layer = FrozenConv2d(conv)
    x = torch.randn(5, 64, 16, 16)
    grad_out = torch.randn(5, 128, 8, 8)

    def input_gradient(rows: slice) -> torch.Tensor:
        part = x[rows].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(layer(part), part, grad_out[rows])
        return grad

    for threads in (1, 2):
        with torch_threads(threads):
            full = input_gradient(slice(None))
            for size in (1, 2, 3):
                parts = torch.cat([input_gradient(slice(i, i + size)) for i in range(0, 5, size)])
                assert torch.equal(parts, full), (threads, size)
    reference = torch.nn.grad.conv2d_input(x.shape, conv.weight, grad_out, stride=2, padding=1)
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-5)  # float32 sums of 9 x 128 products
