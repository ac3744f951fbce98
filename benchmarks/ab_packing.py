"""Which convolutions to pack on the CPU, side by side in one process: EfficientNet-Lite0's default mask step
with three packing rules, in interleaved rounds (the numbers in docs/results/PERFORMANCE.md).

- ``pointwise``: only convolutions whose padding is the layer's own and that are not grouped (its 32 pointwise
  convolutions);
- ``even``: also grouped ones and those that pad evenly in their forward (44);
- ``all``: also those that pad unevenly, as F.pad + an unpadded convolution (49).

The default fast path packs fewer: only where packing pays for the layer's shape (docs/results/MODEL_MATRIX.md,
"Convolutions packed only where it pays").

    python benchmarks/ab_packing.py --rounds 8 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuromask_pl.classifiers import EfficientNetLite0
from neuromask_pl.fastcopy import FastCopies, FastPath
from neuromask_pl.fastcopy.packed import FrozenConv2d
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.settings import resolve_settings

CURRENT = FrozenConv2d.padding_of


def pointwise_rule(conv: torch.nn.Module) -> list[int] | None:
    padding = CURRENT(conv)
    own = [conv.padding[1]] * 2 + [conv.padding[0]] * 2 if padding is not None else None
    return padding if padding == own and conv.groups == 1 else None


def even_rule(conv: torch.nn.Module) -> list[int] | None:
    padding = CURRENT(conv)
    return padding if padding is not None and padding[0] == padding[1] and padding[2] == padding[3] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per rule and round")
    args = parser.parse_args()

    torch.manual_seed(0)
    classifier = EfficientNetLite0().eval().requires_grad_(False)
    images = torch.rand(args.batch, 3, 224, 224)
    problems = {}
    for name, rule in (("pointwise", pointwise_rule), ("even", even_rule), ("all", CURRENT)):
        FrozenConv2d.padding_of = staticmethod(rule)
        try:
            fast = FastCopies(FastPath())
            model = fast.get(classifier, images)
        finally:
            FrozenConv2d.padding_of = staticmethod(CURRENT)
        print(f"{name}: {fast.report()['packed_convolutions']} convolutions packed")
        targets, ids = torch.zeros(args.batch, dtype=torch.long), torch.arange(args.batch)
        problems[name] = MaskOptimisation(model, images, targets, ids, resolve_settings("default", 10**6), 0)
    for problem in problems.values():  # warm-up: weight packing on the first call
        problem.step()
        problem.step()
    times: dict[str, list[float]] = {name: [] for name in problems}
    for _ in range(args.rounds):
        for name, problem in problems.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                problem.step()
            times[name].append((time.perf_counter() - start) / args.steps / args.batch * 1e3)
    print(f"\nEfficientNet-Lite0 224 px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps: ms per image and step, median [min, max]")  # fmt: skip
    for name, values in times.items():
        print(f"{name:>9}: {statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]")


if __name__ == "__main__":
    main()
