#!/usr/bin/env python
"""Cost of a mask step against the classifier's own forward + backward-to-input, side by side.

For one model, resolution, batch and precision, in one process and in interleaved rounds (so a noisy
machine slows every variant alike), it times per optimisation step of the whole batch:

- ``floor``: forward + backward-to-input of the unmodified classifier, eager (what any mask step pays);
- ``plain``: a NeuroMask step with the fast path off (the classifier as it is);
- ``default``: a NeuroMask step as ``NeuroMask`` runs it by default (BatchNorm folded into a copy;
  channels_last on CUDA; fused Adam on CUDA);
- ``fast``: ``default`` plus ``torch.compile`` (with CUDA graphs on CUDA); skipped with ``--no-compile``;
- ``reference``: the ``paper`` objective one image at a time, fp32, unmodified classifier (the reference's shape).

It prints, per variant, the median over rounds of ms per image and step, the median of the per-round
ratios to the floor, and (on a GPU) images per second at ``--at-steps`` steps; the activation memory a
mask step saves for backward, per image (counted with saved-tensor hooks, so also on the CPU; on CUDA
also the peak allocated memory); and writes everything to JSON. Weights are random (BatchNorm
statistics randomised so folding is not trivial): speed does not depend on them.

Examples::

    python benchmarks/speed.py                                   # CPU target: ResNet-18/10 at 64 px, batch 16
    python benchmarks/speed.py --model resnet50 --size 224 --batch 64 --precision bf16-mixed  # GPU
    python benchmarks/speed.py --model cifar_resnet18 --size 32 --batch 512 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from neuromask_pl.data.checks import frozen
from neuromask_pl.maths.fastpath import FastClassifier, FastPath
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.settings import PRESETS

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier with randomised BatchNorm statistics."""
    torch.manual_seed(0)
    if name == "cifar_resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif name == "efficientnet_lite0":
        from neuromask_pl.classifiers import EfficientNetLite0

        model = EfficientNetLite0()
    else:
        model = getattr(torchvision.models, name)(num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_step(model: nn.Module, images: Tensor) -> Callable[[], None]:
    def run() -> None:
        inputs = images.detach().requires_grad_(True)
        torch.autograd.grad(model(inputs).float().logsumexp(1).sum(), inputs)

    return run


def mask_steps(model: nn.Module, images: Tensor, targets: Tensor, preset: str) -> Callable[[], None]:
    settings = replace(PRESETS[preset], steps=10**9)  # stepped by hand: never "done"
    problem = MaskOptimisation(model, images, targets, torch.arange(len(images)), settings, seed=0)
    return problem.step


def one_at_a_time(model: nn.Module, images: Tensor, targets: Tensor) -> Callable[[], None]:
    """The reference's shape: one paper-objective problem per image, each stepped in turn, fp32."""
    steps = [mask_steps(model, images[i : i + 1], targets[i : i + 1], "paper") for i in range(len(images))]

    def run() -> None:
        for step in steps:
            step()

    return run


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for backward during one call of ``step``."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision name, cifar_resnet18 or efficientnet_lite0")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32")
    parser.add_argument("--preset", default="default", help="the objective of the plain/default/fast steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--reference-images", type=int, default=2, help="images of the one-at-a-time variant")
    parser.add_argument("--at-steps", type=int, default=300, help="steps per image for the images/s column")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file")
    parser.add_argument(
        "--target-ms", type=float, default=None, help="say if the default or fast step meets this ms/image/step"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(args.model, args.num_classes).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    dtype = PRECISIONS[args.precision]
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    with torch.no_grad():
        targets = model(images).argmax(1)

    variants: dict[str, tuple[Callable[[], None], int, bool]] = {}  # name: (step, images per call, autocast)
    with frozen(model):
        setup = time.perf_counter()
        variants["floor"] = (floor_step(model, images), args.batch, True)
        variants["plain"] = (mask_steps(model, images, targets, args.preset), args.batch, True)
        fast_default = FastClassifier(FastPath())
        with autocast():
            default_model = fast_default.get(model, images)
        variants["default"] = (mask_steps(default_model, images, targets, args.preset), args.batch, True)
        compile_s = None
        if not args.no_compile:
            with autocast():
                compiled = FastClassifier(FastPath(compile=True)).get(model, images)
                fast = mask_steps(compiled, images, targets, args.preset)
                start = time.perf_counter()
                fast()
                fast()  # CUDA graphs record on the second call
                sync(device)
            compile_s = time.perf_counter() - start
            variants["fast"] = (fast, args.batch, True)
        n_ref = min(args.reference_images, args.batch)
        variants["reference"] = (one_at_a_time(model, images[:n_ref], targets[:n_ref]), n_ref, False)
        print(f"setup {time.perf_counter() - setup:.1f} s; folded BatchNorm layers: {fast_default.folded}"
              + (f"; compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)  # fmt: skip

        memory = {}
        for name in ("floor", "plain", "default"):
            with autocast():
                memory[name] = saved_bytes(variants[name][0]) / args.batch

        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (step, per_call, mixed) in variants.items():
                with autocast() if mixed else contextlib.nullcontext():
                    step()  # warm-up of this round
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    sync(device)
                times[name].append((time.perf_counter() - start) / args.steps / per_call)

        peak = {}
        if device.type == "cuda":
            for name in ("floor", "default"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with autocast():
                    variants[name][0]()
                sync(device)
                peak[name] = (torch.cuda.max_memory_allocated() - base) / args.batch

    rows = []
    for name, values in times.items():
        ratios = [value / floor for value, floor in zip(values, times["floor"])]
        per_image_step = statistics.median(values)
        rows.append(
            {
                "variant": name,
                "ms_per_image_step": 1e3 * per_image_step,
                "ratio_to_floor": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "images_per_s_at_steps": 1.0 / (per_image_step * args.at_steps),
                "precision": args.precision if name != "reference" else "32",
                "batch": args.batch if name != "reference" else 1,
            }
        )
    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "folded_batchnorm_layers": fast_default.folded,
        "compile_seconds": compile_s,
        "saved_activation_bytes_per_image": memory,
        "cuda_peak_bytes_per_image": peak,
        "rows": rows,
    }
    if args.target_ms is not None:
        best = min((row for row in rows if row["variant"] in ("default", "fast")), key=lambda r: r["ms_per_image_step"])
        result["target"] = {
            "ms_per_image_step": args.target_ms,
            "met": best["ms_per_image_step"] <= args.target_ms,
            "by": best["variant"],
        }
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, {args.precision}, preset {args.preset}, "
          f"{result['device']}, {args.rounds} rounds x {args.steps} steps\n")  # fmt: skip
    print("| variant | ms / image / step | ratio to floor (median [min, max]) | images/s at "
          f"{args.at_steps} steps |\n|---|---:|---:|---:|")  # fmt: skip
    for row in rows:
        print(f"| {row['variant']} | {row['ms_per_image_step']:.4f} | {row['ratio_to_floor']:.3f} "
              f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] | {row['images_per_s_at_steps']:.2f} |")  # fmt: skip
    print("\nactivation memory saved for backward, per image and step: "
          + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in memory.items()))  # fmt: skip
    if peak:
        print("CUDA peak per image: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in peak.items()))
    if "target" in result:
        target, best = result["target"], next(r for r in rows if r["variant"] == result["target"]["by"])
        print(f"target <= {args.target_ms} ms per image and step: {'MET' if target['met'] else 'MISSED'} "
              f"(best: {target['by']}, {best['ms_per_image_step']:.4f} ms)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
