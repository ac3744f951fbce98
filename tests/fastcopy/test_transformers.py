"""The fast path on transformers: Linear layers packed for oneDNN (:class:`FrozenLinear`), checked layer by layer
against float64 and on the real classes of timm, Hugging Face transformers and torchvision (random weights, tiny
configurations, never downloads); the user's model untouched.

Tolerances (float32, u = 2**-24):

- One layer: any order of summing ``K`` products and a bias (ATen's, oneDNN's blocked one, with or without fused
  multiply-adds) is within ``gamma(K + 1) * (|x| |W|^T + |b|)`` of the exact result, elementwise, where
  ``gamma(n) = n u / (1 - n u)`` (Higham, Accuracy and Stability of Numerical Algorithms, section 3.1). The tests
  compare the packed layer *and* ``nn.Linear`` with that bound against float64, so no figure of this CPU enters.
- A whole model: each packed layer changes its outputs by a few roundings of its K-term dot products, about
  ``sqrt(K) u`` of their scale for rounding errors of random sign. Along the at most 40 packed layers below, with
  K up to 3072 (sqrt about 55), that is about 40 * 55 * 6e-8, roughly 1.3e-4 of the scale, so ``MODEL_TOLERANCE
  = 1e-3`` of the largest logit (or input-gradient entry), as in test_fastpath_models.py. A wrong packing (a
  transposed or stale weight, a lost bias) changes them by far more.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_folding import assert_same_function, logits_and_input_gradient
from torch import Tensor, nn

from neuromask_pl.classifiers import ClassifierWrapper, Normalize
from neuromask_pl.fastcopy import FastCopies, FastPath
from neuromask_pl.fastcopy.packed import MIN_PACKED_LINEAR_WEIGHTS, FrozenLinear
from neuromask_pl.fastcopy.passes import apply_passes

MODEL_TOLERANCE = 1e-3
U = 2.0**-24

pytestmark = [
    pytest.mark.numerics,
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN"),
]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def frozen(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- one layer


@pytest.mark.parametrize(
    ("rows", "in_features", "out_features", "bias"),
    [((34,), 192, 768, True), ((2, 17), 768, 192, True), ((3, 5, 7), 96, 384, False), ((1,), 7, 3, True)],
)
def test_frozen_linear_forward_and_input_gradient_are_within_the_float32_bound(
    rows: tuple[int, ...], in_features: int, out_features: int, bias: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = frozen(nn.Linear(in_features, out_features, bias=bias))
    layer = FrozenLinear(copy.deepcopy(linear))
    x = torch.randn(*rows, in_features, generator=generator)
    upstream = torch.randn(*rows, out_features, generator=generator)
    weight, b = linear.weight.double(), linear.bias.double() if bias else torch.zeros(out_features).double()
    exact_out = x.double() @ weight.T + b
    out_bound = gamma(in_features + 1) * (x.double().abs() @ weight.abs().T + b.abs())
    exact_grad = upstream.double() @ weight
    grad_bound = gamma(out_features) * (upstream.double().abs() @ weight.abs())
    for module in (linear, layer):  # the bound holds for ATen's order and oneDNN's alike
        inputs = x.clone().requires_grad_(True)
        out = module(inputs)
        (grad,) = torch.autograd.grad(out, inputs, upstream)
        assert out.shape == exact_out.shape and grad.shape == x.shape
        assert ((out.double() - exact_out).abs() <= out_bound).all(), type(module).__name__
        assert ((grad.double() - exact_grad).abs() <= grad_bound).all(), type(module).__name__


def test_frozen_linear_runs_any_number_of_rows_after_packing_for_one() -> None:
    linear = frozen(nn.Linear(64, 32))
    layer = FrozenLinear(linear)
    for rows in (10, 3, 200):  # packed for 10 rows on the first call
        x = torch.randn(rows, 64)
        bound = gamma(65) * (x.abs() @ linear.weight.abs().T + linear.bias.abs())
        assert ((layer(x) - linear(x)).abs() <= 2 * bound).all()  # both within the bound of the exact value


def test_frozen_linear_runs_the_original_layer_under_autocast_and_for_other_dtypes() -> None:
    linear = frozen(nn.Linear(16, 8))
    layer = FrozenLinear(linear)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), linear(x))
    double = copy.deepcopy(linear).double()
    assert torch.equal(FrozenLinear(double)(x.double()), double(x.double()))


# ----------------------------------------------------------------------------- which layers are packed


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward changes the maths (as LoRA or a quantised layer would)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x)


class Mixed(nn.Module):
    """A large Linear that runs, a small one, a large subclass computing F.linear (as timm's ``Linear``), one that
    changes the maths, and a large one whose weights are only read."""

    def __init__(self) -> None:
        super().__init__()
        self.large = nn.Linear(256, 256)  # 65536 weights: packed
        self.small = nn.Linear(256, 16)  # too small to pay
        self.subclass = nn.modules.linear.NonDynamicallyQuantizableLinear(256, 256)  # F.linear itself
        self.changed = ScaledLinear(256, 256)  # its own maths
        self.read_only = nn.Linear(256, 256)  # weights read through F.linear, never called

    def forward(self, x: Tensor) -> Tensor:
        x = self.changed(self.subclass(self.large(x))) + F.linear(x, self.read_only.weight, self.read_only.bias)
        return self.small(x)


def packed_linears(module: nn.Module) -> int:
    return sum(isinstance(m, FrozenLinear) and m.packed for m in module.modules())


def test_linears_computing_f_linear_that_the_model_calls_are_packed_when_large_and_blocked_when_heads() -> None:
    assert MIN_PACKED_LINEAR_WEIGHTS == 256 * 256
    model = frozen(Mixed())
    copied = copy.deepcopy(model)
    copied, record = apply_passes(copied, torch.randn(3, 256), frozenset({"pack_linears", "batch_invariant"}))
    assert packed_linears(copied) == 2
    for layer in (copied.large, copied.subclass):
        assert isinstance(layer, FrozenLinear) and layer.packed and layer.blocked  # one row an image: blocked
    assert isinstance(copied.small, FrozenLinear) and copied.small.blocked and not copied.small.packed
    assert type(copied.changed) is ScaledLinear and not isinstance(copied.read_only, FrozenLinear)
    # the inline F.linear of read_only's weights is blocked by the graph pass (the model is traced for it); the one
    # inside ScaledLinear, whose maths is its own, is named as not covered
    assert len(record.functional["blocked_linear"]) == 1 and record.uncovered == {"linear (few rows)": 1}
    assert_same_function(copied, model, torch.randn(3, 256), MODEL_TOLERANCE)
    without_example = copy.deepcopy(model)
    without_example, _ = apply_passes(without_example, None, frozenset({"pack_linears", "batch_invariant"}))
    assert packed_linears(without_example) == 3  # without an example: every large one computing F.linear
    assert_same_function(without_example, model, torch.randn(3, 256), MODEL_TOLERANCE)  # weights kept readable


def test_multihead_attention_keeps_its_out_proj_and_its_feed_forward_is_packed() -> None:
    model = frozen(nn.TransformerEncoderLayer(256, 4, dim_feedforward=512, dropout=0.0, batch_first=True))
    tokens = torch.randn(2, 9, 256)
    fast = FastCopies(FastPath())
    copied = fast.get(model, tokens)
    assert fast.report()["packed_linears"] == 2 and fast.report()["linears"] == 3
    assert isinstance(copied.linear1, FrozenLinear) and isinstance(copied.linear2, FrozenLinear)
    assert not (copied.linear1.blocked or copied.linear2.blocked)  # 9 rows an image: one product for all rows
    assert not isinstance(copied.self_attn.out_proj, FrozenLinear)
    assert_same_function(copied, model, tokens, MODEL_TOLERANCE)


def test_pack_linears_false_or_pack_convolutions_false_leaves_the_linears() -> None:
    model = frozen(nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)))
    x = torch.randn(2, 512)
    for options, packed in (({}, 1), ({"pack_linears": False}, 0), ({"pack_convolutions": False}, 0)):
        fast = FastCopies(FastPath.of(options | {"fold_batchnorm": False, "batch_invariant": False}))
        copied = fast.get(model, x)
        assert fast.report()["packed_linears"] == packed, options
        assert (copied is model) == (packed == 0)
    fast = FastCopies(FastPath(pack_convolutions=False, pack_linears=True))
    assert fast.get(model, x) is not model and fast.report()["packed_linears"] == 1


# ----------------------------------------------------------------------------- real classes


def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2)


def hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=512, num_labels=10,
    )  # fmt: skip
    return ClassifierWrapper(transformers.ViTForImageClassification(config), Normalize(0.5, 0.5), output="logits")


def torchvision_model(name: str, **kwargs) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


# name: (model, image size, Linear layers, packed). timm's ViT (2 blocks of qkv 192 x 576, proj 192 x 192 (small),
# fc1, fc2; a small head): 6 of 9. The Hugging Face ViT (query, key, value, attention output, intermediate, output:
# 256 x 256 and up; a small classifier): 6 of 7. ConvNeXt-T (18 blocks of 2; stage 1's 96 x 384 ones and the head
# are small): 30 of 37. Swin-T (12 blocks of qkv, proj, 2 MLP layers, 3 patch mergings, a head; its attention reads
# qkv's and proj's weights through F.linear, never calling them; stage 1's MLP and the head are small): 23 of 52.
MODELS = {
    "timm vit_tiny": (timm_vit, 32, 9, 6),
    "Hugging Face ViT": (hf_vit, 32, 7, 6),
}
TORCHVISION_MODELS = {
    "torchvision convnext_tiny": (lambda: torchvision_model("convnext_tiny"), 64, 37, 30),
    "torchvision swin_t": (lambda: torchvision_model("swin_t"), 64, 52, 23),
}


def check_real_model(build, size: int, linears: int, packed: int) -> None:
    model = frozen(build())
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = torch.rand(2, 3, size, size)
    fast = FastCopies(FastPath())
    copied = fast.get(model, images)
    report = fast.report()
    assert (report["linears"], report["packed_linears"]) == (linears, packed)
    assert "packed" in report["variant"] and copied is not model
    assert_same_function(copied, model, images, MODEL_TOLERANCE)
    logits_and_input_gradient(copied, images)  # a mask step's work on the copy ...
    assert not any(isinstance(m, FrozenLinear) for m in model.modules())  # ... leaves the user's model as it was
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("name", list(MODELS))
def test_real_transformers_pack_their_linears_and_keep_logits_and_input_gradients(name: str) -> None:
    check_real_model(*MODELS[name])


@pytest.mark.parametrize("name", list(TORCHVISION_MODELS))
def test_torchvision_convnext_and_swin_pack_their_linears_and_keep_logits_and_input_gradients(name: str) -> None:
    check_real_model(*TORCHVISION_MODELS[name])
