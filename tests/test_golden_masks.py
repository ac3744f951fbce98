"""Masks of the `default` and `paper` presets on fixed inputs, against the masks saved in data/golden_masks.pt.

The inputs and the classifier are float64, so the masks depend on float64 rounding only, which depends on the
kernels the CPU libraries pick: ATen by its CPU capability, oneDNN and MKL by the CPU model and the variables that
cap them (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``). On a machine with the recording's key
(:func:`machine_key`) the masks must be bit-identical. Elsewhere a few optimisation steps turn rounding-level
differences into different steps (the ``default`` preset anneals to a nearly binary mask and shows the classifier
random draws of it, so single pixels flip), and the test checks bounds measured across four kernel sets: this
recording, and AVX-512, AVX2 and SSE4.1 kernels of ATen, oneDNN and MKL together on another machine
(``python benchmarks/golden_across_cpus.py``, docs/results/golden_across_cpus.md), each about 3x the largest
difference measured there.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_images, make_tiny_cnn

from neuromask_pl import NeuroMask

pytestmark = pytest.mark.numerics

GOLDEN = Path(__file__).with_name("data") / "golden_masks.pt"
CASES = {"default": 40, "paper": 40}  # preset -> steps
#: Bounds off the recording's key, per preset: (mean |difference|, largest |difference|, largest |area difference|).
#: Measured largest: default 0.034, 1.0 (a flipped pixel), 0.043; paper 1.2e-4, 0.0105, 1e-4.
BOUNDS = {"default": (0.1, 1.0, 0.13), "paper": (5e-4, 0.03, 5e-4)}


def machine_key() -> dict[str, str]:
    """What the float kernels depend on: torch, the CPU (vendor, family, model, stepping, a hash of its flags), ATen's
    capability, the variables that cap oneDNN's and MKL's instruction sets, and the thread count."""
    cpu = {"processor": platform.processor() or platform.machine()}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:40] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = {k: fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "stepping")}
        cpu["flags"] = hashlib.sha1(fields.get("flags", "").encode()).hexdigest()[:12]
    except OSError:
        pass
    return {
        "torch": str(torch.__version__),
        "aten": str(torch.backends.cpu.get_cpu_capability()),
        "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        "threads": str(torch.get_num_threads()),
        **cpu,
    }


def golden_masks() -> dict[str, torch.Tensor]:
    """Masks of each preset for four seeded float64 images (ids 3..6, seed 0, the predicted class)."""
    net = make_tiny_cnn(0).double()
    images = make_images(4, size=16, seed=11).double()
    return {
        preset: NeuroMask(net, preset=preset, steps=steps, seed=0).explain(images, ids=torch.arange(3, 7)).masks
        for preset, steps in CASES.items()
    }


def differences(masks: torch.Tensor, saved: torch.Tensor) -> tuple[float, float, float]:
    """(mean |difference|, largest |difference|, largest |difference of an image's mask area|)."""
    gap = (masks - saved).abs()
    area = (masks.flatten(1).mean(1) - saved.flatten(1).mean(1)).abs().max()
    return float(gap.mean()), float(gap.max()), float(area)


def test_masks_equal_the_saved_masks() -> None:
    saved = torch.load(GOLDEN, weights_only=True)
    masks = golden_masks()
    same_machine = saved["machine"] == machine_key()
    for preset in CASES:
        assert torch.isfinite(masks[preset]).all() and 0 <= masks[preset].min() <= masks[preset].max() <= 1
        if same_machine:
            assert torch.equal(masks[preset], saved[preset]), preset
        else:
            measured = differences(masks[preset], saved[preset])
            assert all(m <= b for m, b in zip(measured, BOUNDS[preset])), (preset, measured, BOUNDS[preset])


if __name__ == "__main__":  # python tests/test_golden_masks.py: record the masks (only after a deliberate change)
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    torch.save({"machine": machine_key(), **golden_masks()}, GOLDEN)
    print(f"saved {GOLDEN} on {machine_key()}")
