"""Timing copies of a classifier against each other (``FastPath.auto``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Timed forward + backward steps per variant when choosing (after one warm-up each): at least MEASURED_ROUNDS, more
# while all rounds so far took less than MEASURED_SECONDS (cheap models: more samples, hence a steadier choice).
MEASURED_ROUNDS, MAX_MEASURED_ROUNDS, MEASURED_SECONDS = 3, 10, 0.5


def fastest_variant(variants: Mapping[str, nn.Module], images: Tensor) -> tuple[str, dict[str, float]]:
    """The name of the variant whose forward + backward-to-input on ``images`` is fastest, and each one's seconds.

    Each variant runs one warm-up step (packing happens there), then timed steps in rounds, interleaved over the
    variants so that a busy machine slows them alike: :data:`MEASURED_ROUNDS` rounds, more (up to
    :data:`MAX_MEASURED_ROUNDS`) while they took less than :data:`MEASURED_SECONDS` in all. A variant's time is its
    fastest step, and a tie goes to the earlier variant (``original`` first). A variant that fails is left out; where
    all fail (e.g. the batch does not fit in memory with gradients), they are timed on half the images, down to one.
    """
    steps = _running(variants, images)
    while not steps and len(images) > 1:
        images = images[: len(images) // 2]
        steps = _running(variants, images)
    if not steps:
        return next(iter(variants)), {}
    seconds = {name: float("inf") for name in steps}
    spent = 0.0
    for round_ in range(MAX_MEASURED_ROUNDS):
        if round_ >= MEASURED_ROUNDS and spent >= MEASURED_SECONDS:
            break
        for name, step in steps.items():
            _synchronize(images.device)
            start = time.perf_counter()
            step()
            _synchronize(images.device)
            elapsed = time.perf_counter() - start
            seconds[name], spent = min(seconds[name], elapsed), spent + elapsed
    return min(seconds, key=seconds.__getitem__), seconds


def _running(variants: Mapping[str, nn.Module], images: Tensor) -> dict[str, Callable[[], None]]:
    """The forward + backward step of each variant that runs on ``images`` (after running it once)."""
    steps = {}
    for name, module in variants.items():
        step = _forward_backward(module, images)
        try:
            step()
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is not chosen
            log.debug("fast path variant %s fails on %d images (%s); left out", name, len(images), error)
            continue
        steps[name] = step
    return steps


def _forward_backward(module: nn.Module, images: Tensor) -> Callable[[], None]:
    def step() -> None:
        inputs = images.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(module(inputs).float().logsumexp(-1).sum(), inputs)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
