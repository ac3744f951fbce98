#!/usr/bin/env python
"""Whether each image's mask is the same bit for bit alone, in a pair and in a batch, for real model architectures.

For every model of the model matrix (``benchmarks/speed.py``'s ``MATRIX``: random weights, randomised BatchNorm
statistics) and a few more, it explains a batch of images with the ``default`` preset, then the first image alone,
the next two as a pair and the fourth alone, and prints the largest difference of their masks from the batch's
(0 = bit for bit; docs/results/STABILITY.md, "Bit for bit alone or in any batch"), and what the fast path's report
says: whether it claims batch invariance and which calls no pass covers. It fails (exit 1) where a model the report
calls batch invariant gave another mask alone. CPU, float32, the default fast path.

Example::

    PYTHONPATH=$PWD python benchmarks/batch_invariance.py --threads 1
    PYTHONPATH=$PWD python benchmarks/batch_invariance.py --only resnet18 hf_tiny_vit --steps 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

from neuromask_pl import NeuroMask  # noqa: E402

EXTRA = [("torchvision resnet18", "resnet18", {}), ("timm convnext_atto", "timm:convnext_atto", {})]


def models(size: int) -> list[tuple[str, str, dict]]:
    """(label, ``--model`` spelling, constructor keyword arguments) of the matrix's models and :data:`EXTRA`."""
    return [(label, spec, kwargs(size)) for label, spec, kwargs, _ in speed.MATRIX] + EXTRA


def largest_difference(net: torch.nn.Module, images: torch.Tensor, steps: int) -> tuple[float, dict]:
    """Largest |mask difference| of images 0, (1, 2) and 3 explained apart from their masks in the whole batch, and
    the fast path's report of the batch."""
    explainer = NeuroMask(net, steps=steps, seed=0)
    together = explainer.explain(images)
    report = explainer.fast_path_report
    differences = []
    for rows in ([0], [1, 2], [3]):
        part = explainer.explain(images[rows], together.targets[rows], ids=torch.tensor(rows))
        differences.append((part.masks - together.masks[rows]).abs().max().item())
    return max(differences), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="models whose label contains one of these")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=5, help="images in the batch (at least 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.rand(max(args.batch, 4), 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(
        f"| model | largest mask difference, alone or in a pair vs a batch of {len(images)} | fast path "
        "| batch invariant (report) | not covered |"
    )
    print("|---|---:|---|---|---|")
    differing = broken = 0
    for label, spec, kwargs in models(args.size):
        if args.only and not any(word in label for word in args.only):
            continue
        net = speed.build_model(spec, 10, kwargs)
        difference, report = largest_difference(net, images, args.steps)
        differing += difference > 0
        broken += difference > 0 and report["batch_invariant"]  # the report claimed what did not hold
        uncovered = ", ".join(f"{name} x{count}" for name, count in report["not_covered"].items()) or "-"
        claim = "yes" if report["batch_invariant"] else "no"
        print(f"| {label} | {difference:.3g} | {report['variant']} | {claim} | {uncovered} |", flush=True)
    threads = torch.get_num_threads()
    print(f"\n{differing} model(s) whose masks depend on the batch ({args.steps} steps, {threads} threads); "
          f"{broken} of them reported as batch invariant")  # fmt: skip
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
