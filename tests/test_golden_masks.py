"""Masks of the `default` and `paper` presets on fixed inputs, against the masks saved in data/golden_masks.pt.

The inputs and the classifier are float64, so the masks depend on float64 rounding only. On the machine and torch
build that recorded them (same ``torch.__version__`` and CPU capability), they must be bit-identical. Elsewhere the
kernels may sum in another order: float64 rounding (about 1e-16 relative) amplified through the few steps run here
(each step is Lipschitz in its inputs with a constant well below 1e3 at these temperatures) stays far below 1e-6.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import make_images, make_tiny_cnn

from neuromask_pl import NeuroMask

pytestmark = pytest.mark.numerics

GOLDEN = Path(__file__).with_name("data") / "golden_masks.pt"
CASES = {"default": 40, "paper": 40}  # preset -> steps


def machine() -> str:
    return f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}"


def golden_masks() -> dict[str, torch.Tensor]:
    """Masks of each preset for four seeded float64 images (ids 3..6, seed 0, the predicted class)."""
    net = make_tiny_cnn(0).double()
    images = make_images(4, size=16, seed=11).double()
    return {
        preset: NeuroMask(net, preset=preset, steps=steps, seed=0).explain(images, ids=torch.arange(3, 7)).masks
        for preset, steps in CASES.items()
    }


def test_masks_equal_the_saved_masks() -> None:
    saved = torch.load(GOLDEN, weights_only=True)
    masks = golden_masks()
    for preset in CASES:
        if saved["machine"] == machine():
            assert torch.equal(masks[preset], saved[preset]), preset
        else:
            torch.testing.assert_close(masks[preset], saved[preset], rtol=0, atol=1e-6, msg=preset)


if __name__ == "__main__":  # python tests/test_golden_masks.py: record the masks (only before a deliberate change)
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    torch.save({"machine": machine(), **golden_masks()}, GOLDEN)
    print(f"saved {GOLDEN} on {machine()}")
