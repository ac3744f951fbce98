#!/usr/bin/env python
"""What ExplainDuringTraining's explanation costs against the same ``Explainer.explain`` outside training.

A LightningModule as users write them (a timm ResNet-18 and a torchmetrics metric among its attributes, attached to a
Trainer) is explained by the callback (its default fast path: a structural copy of the module's own layers) and, in
interleaved rounds, the same network by ``Explainer(net).explain`` outside training; also the callback explaining the
module as it is (``fast_path=FastPath.off()``). Prints the median seconds of each and their ratios (target: the
callback at most 1.2x ``explain()``).

Example::

    python benchmarks/callback_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pytorch_lightning as pl
import timm
import torch
import torchmetrics

from neuromask_pl import Explainer, FastPath
from neuromask_pl.callbacks import ExplainDuringTraining


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("resnet18", pretrained=False, num_classes=10)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    module = Classifier().eval()
    module.trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)  # attached
    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    runs = {
        "explain() outside training": lambda: Explainer(module.net, steps=args.steps).explain(images),
        "callback (default fast path)": lambda: ExplainDuringTraining(steps=args.steps, images=images).explain(module),
        "callback, module as it is": lambda: ExplainDuringTraining(
            steps=args.steps, images=images, fast_path=FastPath.off()
        ).explain(module),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["explain() outside training"])
    print(f"{args.images} images, {args.size} px, {args.steps} steps, {torch.get_num_threads()} threads")
    print("| run | median s | ratio to explain() |\n|---|---:|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")
    ratio = statistics.median(seconds["callback (default fast path)"]) / base
    print(f"\ncallback / explain(): {ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
