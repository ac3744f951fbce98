"""What every replacement of the fast copy must satisfy, one row per pass of ``neuromask_pl.fastcopy.passes.PASSES``
(and of the graph pass over inline calls). A new pass is tested by adding its row to ``EXAMPLES``.

For each example: the pass replaces the layer; the replacement's output and input gradient equal the original
layer's within the float32 bound below; no weight gradient is formed; float64 and autocast inputs run the original
layer itself (bit for bit); and, for passes that claim batch invariance, each image's output and input gradient are
the same bit for bit alone, in pairs and in a batch, at 1 and 2 threads.

The bound: a float32 sum of K products rounds each partial sum with a relative error of at most eps = 2**-24, so
two summation orders of the same products differ by at most about 2 K eps times the sum of the products' magnitudes
(Higham, "Accuracy and Stability of Numerical Algorithms", the gamma_K bound, once per order). The tests allow
4 K eps times the largest such magnitude sum (|W| |x| in float64), plus 4 eps |y| for an elementwise function's own
rounding; a wrong replacement (a flipped kernel, a missing bias, a shifted padding) is off by orders of magnitude more.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.fastcopy.passes import PASSES, apply_passes

pytestmark = pytest.mark.numerics

EPS = 2.0**-24
ALL_SWITCHES = frozenset({"pack_convolutions", "pack_linears", "batch_invariant"})


@dataclass(frozen=True)
class Example:
    """A layer the pass should replace, the input shape of one image, and the reduction length K of its output and
    input gradient (the larger of the two)."""

    label: str
    layer: Callable[[], nn.Module]
    image_shape: tuple[int, ...]
    reduction: int


class InlineSigmoid(nn.Module):
    """A gate written inline (``x.sigmoid()``, as fx leaves timm's squeeze-and-excitation gates), on 37 values an
    image."""

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * x).sigmoid()


class FunctionalHead(nn.Module):
    """A classifier head written as ``F.linear`` (no ``nn.Linear`` to swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(7, 12) * 0.3)
        self.bias = nn.Parameter(torch.randn(7) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


EXAMPLES: dict[str, list[Example]] = {
    "packed_convolution": [
        Example("3x3 stride 1", lambda: nn.Conv2d(6, 8, 3, padding=1), (6, 9, 9), 8 * 9),
        Example("3x3 stride 2 (transposed gradient)", lambda: nn.Conv2d(6, 8, 3, 2, 1), (6, 9, 9), 8 * 9),
        Example("stem stride 2 (col2im gradient)", lambda: nn.Conv2d(3, 8, 3, 2, 1), (3, 11, 11), 8 * 9),
        Example("depthwise", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 9, 9), 9),
    ],
    "per_image_pointwise": [Example("1x1, few weights", lambda: nn.Conv2d(6, 8, 1), (6, 9, 9), 8)],
    "frozen_linear": [
        Example("a head (blocked)", lambda: nn.Linear(12, 7), (12,), 12),
        Example("a large token layer (packed)", lambda: nn.Linear(256, 256), (6, 256), 256),
        Example("a small token layer (each image's rows one product)", lambda: nn.Linear(32, 128), (17, 32), 128),
    ],
    # 37 values an image: alone in the scalar loop, in a batch partly in the vectorised one (which rounds about
    # one value in 25 differently)
    "planewise_activation": [Example("a gate's sigmoid", nn.Sigmoid, (37, 1, 1), 1)],
    # the graph pass over inline calls (the module is traced with fx)
    "planewise": [Example("inline x.sigmoid()", InlineSigmoid, (37,), 1)],
    "blocked_linear": [Example("F.linear head", FunctionalHead, (12,), 12)],
}
GRAPH_REWRITES = {"planewise", "blocked_linear"}
CASES = [pytest.param(name, example, id=f"{name}: {example.label}") for name, examples in EXAMPLES.items()
         for example in examples]  # fmt: skip


def test_every_pass_has_an_example() -> None:
    assert set(EXAMPLES) == {p.name for p in PASSES} | GRAPH_REWRITES


def seeded(layer: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = layer()
    return module.eval()


def images(example: Example, count: int, seed: int = 1) -> Tensor:
    return 4 * torch.randn(count, *example.image_shape, generator=torch.Generator().manual_seed(seed))


def replaced(name: str, example: Example) -> tuple[nn.Module, nn.Module]:
    """(the original layer, the fast copy of it that the pass ``name`` made)."""
    original = seeded(example.layer).requires_grad_(False)
    holder = nn.Sequential(seeded(example.layer).requires_grad_(False))
    fast, record = apply_passes(holder, images(example, 2, seed=0), ALL_SWITCHES)
    touched = record.functional if name in GRAPH_REWRITES else record.layers
    assert touched.get(name), f"pass {name} did not apply ({record})"
    for other in set(record.layers) - {name}:  # the example's own layer only
        assert name in GRAPH_REWRITES, f"{other} replaced a layer of {name}'s example"
    return original, fast


def output_and_gradient(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = module(x)
        per_image = torch.linspace(-1, 1, y[0].numel(), dtype=y.dtype).reshape(y[0].shape)  # no cancellation
        seed = per_image.expand_as(y)  # the same for each image, in any batch
        (grad,) = torch.autograd.grad(y, x, grad_outputs=seed)
    return y.detach(), grad


def magnitude(module: nn.Module, x: Tensor) -> float:
    """The largest sum of product magnitudes of the layer's outputs: the layer with |weights|, in float64, on |x|
    (|f(x)| for one without weights)."""
    absolute = copy.deepcopy(module).double()
    with torch.no_grad():
        for parameter in absolute.parameters():
            parameter.abs_()
        return float(absolute(x.double().abs()).abs().max())


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("name", "example"), CASES)
def test_output_and_input_gradient_match_the_original(name: str, example: Example) -> None:
    original, fast = replaced(name, example)
    x = images(example, 5)
    want_y, want_grad = output_and_gradient(original, x)
    got_y, got_grad = output_and_gradient(fast, x)
    k = example.reduction
    y_bound = 4 * k * EPS * magnitude(original, x) + 4 * EPS * float(want_y.abs().max())
    grad_bound = 4 * k * EPS * float(want_grad.abs().max() + 1) * max(1.0, magnitude(original, x))
    assert (got_y - want_y).abs().max() <= y_bound
    assert (got_grad - want_grad).abs().max() <= grad_bound


@pytest.mark.parametrize(("name", "example"), CASES)
def test_no_weight_gradient_is_formed(name: str, example: Example) -> None:
    _, fast = replaced(name, example)
    fast.requires_grad_(True)  # even where the weights would take one
    output_and_gradient(fast, images(example, 3))
    assert all(p.grad is None for p in fast.parameters())


@pytest.mark.parametrize(("name", "example"), CASES)
def test_float64_and_autocast_run_the_original(name: str, example: Example) -> None:
    original, fast = replaced(name, example)
    x = images(example, 3)
    want, got = output_and_gradient(original.double(), x.double()), output_and_gradient(fast.double(), x.double())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    original.float(), fast.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(original(x), fast(x))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("name", "example"), CASES)
def test_each_image_is_the_same_in_any_batch(name: str, example: Example, threads: int) -> None:
    claims = {p.name: p.batch_invariant for p in PASSES} | dict.fromkeys(GRAPH_REWRITES, True)
    if not claims[name]:
        pytest.skip(f"{name} does not claim batch invariance")
    _, fast = replaced(name, example)
    x = images(example, 5)
    with torch_threads(threads):
        batch_y, batch_grad = output_and_gradient(fast, x)
        for rows in ([0], [3], [1, 2], [4, 0, 2]):
            y, grad = output_and_gradient(fast, x[rows])
            assert torch.equal(y, batch_y[rows]) and torch.equal(grad, batch_grad[rows]), rows
