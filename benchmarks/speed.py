#!/usr/bin/env python
"""Cost of a mask step against the classifier's own forward + backward-to-input, side by side.

For one model, resolution, batch and precision, in one process and in interleaved rounds (so a noisy
machine slows every variant alike), it times per optimisation step of the whole batch:

- ``floor``: forward + backward-to-input of the unmodified classifier, eager (what any mask step pays);
- ``plain``: a NeuroMask step with the fast path off (the classifier as it is, the mask step by autograd);
- the fast path's variants pinned (``FastPath(auto=False)``; the explicit mask gradient where it applies), named as they
  run: ``folded`` (BatchNorm folded; channels_last on CUDA), ``folded+packed`` (convolutions and large Linear layers
  packed too, on the CPU), or ``packed`` for a model without BatchNorm; where Linear layers are packed, also
  ``... (linears unpacked)``, the same without them (``pack_linears=False``); a variant that changes nothing is
  the plain step and is left out;
- ``default``: a NeuroMask step as ``NeuroMask`` runs it by default (the switches as given; single-kernel Adam on
  CUDA), or
  with ``--auto`` the variant ``FastPath(auto=True)`` chose by timing them at set-up;
- ``default, autograd step``: where the default computes the mask gradient explicitly (the CPU), the same
  classifier with the mask gradient by autograd (``mask_gradient="autograd"``): what the explicit gradient buys;
- ``fast``: the fast path plus ``torch.compile`` (with CUDA graphs on CUDA); skipped with ``--no-compile``;
- ``reference``: the ``paper`` objective one image at a time, fp32, unmodified classifier (the reference's shape).

It prints, per variant, the median over rounds of ms per image and step, the median of the per-round
ratios to the floor, and (on a GPU) images per second at ``--at-steps`` steps; the activation memory a
mask step saves for backward, per image (counted with saved-tensor hooks, so also on the CPU; on CUDA
also the peak allocated memory); and writes everything to JSON. Weights are random (BatchNorm
statistics randomised so folding is not trivial): speed does not depend on them.

``--model`` is a torchvision name, ``timm:<name>``, ``module:factory`` (any callable returning the classifier;
``--model-kwargs`` is passed to it as JSON), or a built-in: ``cifar_resnet18``, ``efficientnet_lite0``,
``hf_tiny_vit`` (a 2-layer Hugging Face ViT whose ``.logits`` are read). ``--matrix`` runs the models of
:data:`MATRIX` (common models, docs/results/MODEL_MATRIX.md) one after the other with floor, plain, the
pinned variants and default, and prints one table: BatchNorms folded, convolutions packed, what the default chose,
the ratios to the floor, and each model's target.

Examples::

    python benchmarks/speed.py                                   # CPU target: ResNet-18/10 at 64 px, batch 16
    python benchmarks/speed.py --model timm:efficientnet_b0 --size 64 --batch 2 --no-compile
    python benchmarks/speed.py --model resnet50 --size 224 --batch 64 --precision bf16-mixed  # GPU
    python benchmarks/speed.py --model cifar_resnet18 --size 32 --batch 512 --precision bf16-mixed
    python benchmarks/speed.py --matrix --threads 1 --out docs/results/MODEL_MATRIX.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import reduce
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from neuromask_pl.data.checks import frozen
from neuromask_pl.fastcopy import FastCopies, FastPath, is_batchnorm
from neuromask_pl.maths.explicit import uses_explicit_gradient
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.settings import PRESETS

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
AUTOGRAD_STEP = "default, autograd step"  # the default's classifier with the mask step by autograd
TARGETS = {"cnn": 0.90, "transformer": 1.0, "tiny": 1.2}  # default step / floor, the targets per kind of model

# (label, --model, keyword arguments for an image size, kind). Fixed-size transformers are built for the size.
MATRIX: list[tuple[str, str, Callable[[int], dict[str, Any]], str]] = [
    ("torchvision resnet50", "resnet50", lambda size: {}, "cnn"),
    ("torchvision efficientnet_b0", "efficientnet_b0", lambda size: {}, "cnn"),
    ("torchvision mobilenet_v3_large", "mobilenet_v3_large", lambda size: {}, "cnn"),
    ("torchvision regnet_y_400mf", "regnet_y_400mf", lambda size: {}, "cnn"),
    ("timm efficientnet_b0", "timm:efficientnet_b0", lambda size: {}, "cnn"),
    ("timm mobilenetv3_large_100", "timm:mobilenetv3_large_100", lambda size: {}, "cnn"),
    ("timm regnety_004", "timm:regnety_004", lambda size: {}, "cnn"),
    ("torchvision densenet121", "densenet121", lambda size: {}, "cnn"),
    ("torchvision convnext_tiny", "convnext_tiny", lambda size: {}, "cnn"),
    ("timm mobilevit_xxs", "timm:mobilevit_xxs", lambda size: {}, "transformer"),
    ("timm levit_128s", "timm:levit_128s", lambda size: {"img_size": size}, "transformer"),
    (
        "torchvision maxvit_t",  # maxvit_t's layers; partition size 7 at 224 px, size / 32 at others
        "torchvision.models.maxvit:MaxVit",
        lambda size: dict(
            input_size=(size, size),
            stem_channels=64,
            partition_size=size // 32,
            block_channels=[64, 128, 256, 512],
            block_layers=[2, 2, 5, 2],
            head_dim=32,
            stochastic_depth_prob=0.2,
            num_classes=10,
        ),  # fmt: skip
        "transformer",
    ),
    ("torchvision vit_b_16", "vit_b_16", lambda size: {"image_size": size}, "transformer"),
    ("timm vit_tiny_patch16_224", "timm:vit_tiny_patch16_224", lambda size: {"img_size": size}, "transformer"),
    ("timm deit_tiny_patch16_224", "timm:deit_tiny_patch16_224", lambda size: {"img_size": size}, "transformer"),
    ("torchvision swin_t", "swin_t", lambda size: {}, "transformer"),
    ("timm rexnet_100", "timm:rexnet_100", lambda size: {}, "cnn"),  # inline sigmoid gates once traced
    ("ResNet-18 with an F.linear head", "functional_head_resnet18", lambda size: {}, "cnn"),
    (
        "timm swin_tiny_patch4_window7_224",  # window size size / 16 (4 at 64 px)
        "timm:swin_tiny_patch4_window7_224",
        lambda size: {"img_size": size, "window_size": size // 16},
        "transformer",
    ),
    ("torchvision mobilenet_v3_small", "mobilenet_v3_small", lambda size: {}, "tiny"),
    ("Hugging Face tiny ViT", "hf_tiny_vit", lambda size: {"image_size": size}, "tiny"),
]


def _cifar_resnet18(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from neuromask_pl.classifiers import EfficientNetLite0

    return EfficientNetLite0()


def _hf_tiny_vit(num_classes: int, image_size: int = 32) -> nn.Module:
    """A Hugging Face ViT (2 layers, width 32, 8 px patches), random weights, its ``.logits`` read by the wrapper."""
    import transformers

    from neuromask_pl.classifiers import ClassifierWrapper, Normalize

    config = transformers.ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=num_classes,
    )  # fmt: skip
    return ClassifierWrapper(transformers.ViTForImageClassification(config), Normalize(0.5, 0.5), output="logits")


class _FunctionalHead(nn.Module):
    """A backbone whose classifier head is written as ``F.linear`` (no ``nn.Linear`` module to replace)."""

    def __init__(self, backbone: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.weight = nn.Parameter(torch.randn(num_classes, features) / features**0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(self.backbone(x), self.weight, self.bias)


def _functional_head_resnet18(num_classes: int) -> nn.Module:
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    return _FunctionalHead(backbone, 512, num_classes)


BUILT_IN: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": _cifar_resnet18,
    "functional_head_resnet18": _functional_head_resnet18,
    "efficientnet_lite0": _efficientnet_lite0,
    "hf_tiny_vit": _hf_tiny_vit,
}


def build_model(spec: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised classifier with randomised BatchNorm statistics, from ``--model``'s spelling."""
    torch.manual_seed(0)
    kwargs = dict(kwargs or {})
    if spec in BUILT_IN:
        model = BUILT_IN[spec](num_classes, **kwargs)
    elif spec.startswith("timm:"):
        import timm

        model = timm.create_model(spec.removeprefix("timm:"), pretrained=False, num_classes=num_classes, **kwargs)
    elif ":" in spec:
        module_name, _, factory = spec.partition(":")
        model = reduce(getattr, factory.split("."), importlib.import_module(module_name))(**kwargs)
    elif hasattr(torchvision.models, spec):
        model = getattr(torchvision.models, spec)(num_classes=num_classes, **kwargs)
    else:
        raise ValueError(
            f"unknown --model {spec!r}: give a torchvision name, timm:<name>, module:factory, "
            f"or one of {sorted(BUILT_IN)}"
        )
    for module in model.modules():
        if is_batchnorm(module):
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


def mask_steps(
    model: nn.Module, images: Tensor, targets: Tensor, preset: str, explicit: bool = False
) -> Callable[[], None]:
    """One mask step of ``preset`` per call; ``explicit``: the explicit mask gradient where the settings allow it
    (MaskOptimisation runs it only for settings it covers)."""
    settings = replace(PRESETS[preset], steps=10**9)  # stepped by hand: never "done"
    problem = MaskOptimisation(model, images, targets, torch.arange(len(images)), settings, seed=0, explicit=explicit)
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


def fast_copies(
    model: nn.Module, images: Tensor, autocast: Callable, auto: bool = False
) -> tuple[dict[str, tuple[nn.Module, dict[str, Any]]], FastCopies, nn.Module, float]:
    """The fast path's variants pinned, with their reports (by the name they run as; none that is the plain
    classifier): BatchNorm folded, then convolutions packed too; the default's
    FastCopies (``auto``) and module, timed among them as NeuroMask does on its first batch; the seconds that
    choice took."""
    pinned: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for suffix, switches in (
        ("", {"pack_convolutions": False, "pack_linears": False, "batch_invariant": False, "auto": False}),
        ("", {"auto": False}),
        (" (linears unpacked)", {"pack_linears": False, "auto": False}),
    ):
        if suffix and not any(r["packed_linears"] for _, r in pinned.values()):
            continue  # the packed variant without its packed Linear layers: only where it has some
        fast = FastCopies(FastPath(**switches))
        with autocast():
            module = fast.get(model, images)
        if module is not model:
            pinned.setdefault(fast.report()["variant"] + suffix, (module, fast.report()))
    default = FastCopies(FastPath(auto=auto))
    start = time.perf_counter()
    with autocast():
        module = default.get(model, images)
    return pinned, default, module, time.perf_counter() - start


def time_rounds(variants: dict[str, tuple[Callable[[], None], int, bool]], rounds: int, steps: int,
                autocast: Callable, device: torch.device) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per image and step of each variant in each round (a warm-up step first in every round)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (step, per_call, mixed) in variants.items():
            with autocast() if mixed else contextlib.nullcontext():
                step()
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(device)
            times[name].append((time.perf_counter() - start) / steps / per_call)
    return times


def ratio_rows(times: dict[str, list[float]], at_steps: int) -> list[dict[str, Any]]:
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
                "images_per_s_at_steps": 1.0 / (per_image_step * at_steps),
            }
        )
    return rows


def measure(args: argparse.Namespace, spec: str, kwargs: dict[str, Any], size: int, full: bool) -> dict[str, Any]:
    """Time one model; ``full`` adds the compiled and one-at-a-time variants and the memory counts."""
    device = torch.device(args.device)
    model = build_model(spec, args.num_classes, kwargs).to(device)
    images = torch.rand(args.batch, 3, size, size, device=device)
    dtype = PRECISIONS[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    with torch.no_grad():
        targets = model(images).argmax(1)

    variants: dict[str, tuple[Callable[[], None], int, bool]] = {}  # name: (step, images per call, autocast)
    with frozen(model):
        setup = time.perf_counter()
        variants["floor"] = (floor_step(model, images), args.batch, True)
        variants["plain"] = (mask_steps(model, images, targets, args.preset), args.batch, True)
        pinned, default, default_model, choice_s = fast_copies(model, images, autocast, args.auto)
        explicit = uses_explicit_gradient("auto", PRESETS[args.preset], device)  # as NeuroMask runs it
        for name, (module, _) in pinned.items():
            variants[name] = (mask_steps(module, images, targets, args.preset, explicit), args.batch, True)
        variants["default"] = (mask_steps(default_model, images, targets, args.preset, explicit), args.batch, True)
        if explicit:  # what the explicit gradient buys: the same classifier, the mask gradient by autograd
            variants[AUTOGRAD_STEP] = (mask_steps(default_model, images, targets, args.preset), args.batch, True)
        compile_s = None
        if full and not args.no_compile:
            with autocast():
                compiled = FastCopies(FastPath(compile=True)).get(model, images)
                fast = mask_steps(compiled, images, targets, args.preset)
                start = time.perf_counter()
                fast()
                fast()  # CUDA graphs record on the second call
                sync(device)
            compile_s = time.perf_counter() - start
            variants["fast"] = (fast, args.batch, True)
        n_ref = min(args.reference_images, args.batch) if full else 0
        if n_ref:
            variants["reference"] = (one_at_a_time(model, images[:n_ref], targets[:n_ref]), n_ref, False)
        report = default.report()
        folded = max([r["folded_batchnorm"] for _, r in pinned.values()], default=0)  # reached, chosen or not
        print(f"{spec}: setup {time.perf_counter() - setup:.1f} s; BatchNorm folded {folded} of "
              f"{report['batchnorm_layers']}; default runs {report['variant']} (chosen in {choice_s:.1f} s)"
              + (f"; compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)  # fmt: skip

        memory = {}
        if full:
            for name in ("floor", "plain", "default"):
                with autocast():
                    memory[name] = saved_bytes(variants[name][0]) / args.batch
        times = time_rounds(variants, args.rounds, args.steps, autocast, device)
        peak = {}
        if device.type == "cuda" and full:
            for name in ("floor", "default"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with autocast():
                    variants[name][0]()
                sync(device)
                peak[name] = (torch.cuda.max_memory_allocated() - base) / args.batch

    rows = ratio_rows(times, args.at_steps)
    for row in rows:
        row["precision"] = args.precision if row["variant"] != "reference" else "32"
        row["batch"] = args.batch if row["variant"] != "reference" else 1
    versus_plain = [d / p for d, p in zip(times["default"], times["plain"])]
    return {
        "model": spec,
        "model_kwargs": kwargs,
        "size": size,
        "fast_path": report,
        "pinned": {name: pinned_report for name, (_, pinned_report) in pinned.items()},
        "folded_batchnorm_layers": folded,
        "choice_seconds": choice_s,
        "compile_seconds": compile_s,
        "default_to_plain": {
            "median": statistics.median(versus_plain),
            "min": min(versus_plain),
            "max": max(versus_plain),
        },  # fmt: skip
        "saved_activation_bytes_per_image": memory,
        "cuda_peak_bytes_per_image": peak,
        "rows": rows,
    }


def machine(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    result = {"config": vars(args) | {"out": str(args.out) if args.out else None}, **machine(args)}
    result |= measure(args, args.model, kwargs, args.size, full=True)
    rows = result["rows"]
    if args.target_ms is not None:
        best = min((row for row in rows if row["variant"] in ("default", "fast")), key=lambda r: r["ms_per_image_step"])
        result["target"] = {
            "ms_per_image_step": args.target_ms,
            "met": best["ms_per_image_step"] <= args.target_ms,
            "by": best["variant"],
        }
    print(f"\n{args.model} {args.size}x{args.size}, batch {args.batch}, {args.precision}, preset {args.preset}, "
          f"{result['device']}, {args.rounds} rounds x {args.steps} steps; default runs "
          f"{result['fast_path']['variant']}\n")  # fmt: skip
    print("| variant | ms / image / step | ratio to floor (median [min, max]) | images/s at "
          f"{args.at_steps} steps |\n|---|---:|---:|---:|")  # fmt: skip
    for row in rows:
        print(f"| {row['variant']} | {row['ms_per_image_step']:.4f} | {row['ratio_to_floor']:.3f} "
              f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] | {row['images_per_s_at_steps']:.2f} |")  # fmt: skip
    memory, peak = result["saved_activation_bytes_per_image"], result["cuda_peak_bytes_per_image"]
    print("\nactivation memory saved for backward, per image and step: "
          + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in memory.items()))  # fmt: skip
    if peak:
        print("CUDA peak per image: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in peak.items()))
    if "target" in result:
        target, best = result["target"], next(r for r in rows if r["variant"] == result["target"]["by"])
        print(f"target <= {args.target_ms} ms per image and step: {'MET' if target['met'] else 'MISSED'} "
              f"(best: {target['by']}, {best['ms_per_image_step']:.4f} ms)")  # fmt: skip
    return result


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    """Every model of MATRIX (or those whose label contains ``--only``), one table."""
    entries = [entry for entry in MATRIX if not args.only or any(word in entry[0] for word in args.only)]
    models = []
    for label, spec, kwargs_for, kind in entries:
        try:
            result = measure(args, spec, kwargs_for(args.size), args.size, full=False)
        except ImportError as error:  # e.g. timm or transformers not installed
            print(f"{label}: skipped ({error})", flush=True)
            continue
        ratios = {row["variant"]: row["ratio_to_floor"] for row in result["rows"]}
        report = result["fast_path"]
        result |= {
            "label": label,
            "kind": kind,
            "target": TARGETS[kind],
            "met": ratios["default"] <= TARGETS[kind],
            "floor_ms_per_image_step": next(r["ms_per_image_step"] for r in result["rows"] if r["variant"] == "floor"),
        }
        models.append(result)
        print(f"  {label}: default {ratios['default']:.2f}x floor ({report['variant']}), "
              f"{result['default_to_plain']['median']:.2f}x plain", flush=True)  # fmt: skip
    print(f"\n{args.size} px, batch {args.batch}, {args.precision}, preset {args.preset}, {machine(args)['device']}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.steps} steps; ratio = median over "
          "rounds of (ms per image and step) / floor's in the same round\n")  # fmt: skip
    print("| model | floor ms | BN folded | convs packed | default runs | plain | folded | (folded+)packed "
          "| autograd step | **default** | default / plain | target | met |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")  # fmt: skip
    for result in models:
        ratios = {row["variant"]: row["ratio_to_floor"] for row in result["rows"]}
        report, pinned = result["fast_path"], list(result["pinned"].values())
        folded = max([r["folded_batchnorm"] for r in pinned], default=0)  # what the switches reach, chosen or not
        packed = max([r["packed_convolutions"] for r in pinned], default=0)
        packed_name = next((name for name in result["pinned"] if "packed" in name), None)
        folded_name = next((name for name in result["pinned"] if "packed" not in name), None)
        cells = {name: f"{ratio:.2f}" for name, ratio in ratios.items()}
        versus = result["default_to_plain"]
        print(f"| {result['label']} | {result['floor_ms_per_image_step']:.1f} | "
              f"{folded}/{report['batchnorm_layers']} | {packed}/{report['convolutions']} | {report['variant']} | "
              f"{cells['plain']} | {cells.get(folded_name, '-')} | {cells.get(packed_name, '-')} | "
              f"{cells.get(AUTOGRAD_STEP, '-')} | **{cells['default']}** | "
              f"{versus['median']:.2f} "
              f"[{versus['min']:.2f}, {versus['max']:.2f}] | {result['target']:.2f} | "
              f"{'yes' if result['met'] else 'NO'} |")  # fmt: skip
    return {"config": vars(args) | {"out": str(args.out) if args.out else None}, **machine(args), "models": models}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18",
                        help="torchvision name, timm:<name>, module:factory, or " + ", ".join(BUILT_IN))  # fmt: skip
    parser.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the model's constructor")
    parser.add_argument("--matrix", action="store_true", help="run the models of MATRIX instead of --model")
    parser.add_argument("--auto", action="store_true", help="the default row runs FastPath(auto=True)'s timed choice")
    parser.add_argument("--only", nargs="*", default=None, help="with --matrix: models whose label contains these")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="default 16, with --matrix 2")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32")
    parser.add_argument("--preset", default="default", help="the objective of the mask steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--reference-images", type=int, default=2, help="images of the one-at-a-time variant")
    parser.add_argument("--at-steps", type=int, default=300, help="steps per image for the images/s column")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file")
    parser.add_argument(
        "--target-ms", type=float, default=None, help="say if the default or fast step meets this ms/image/step"
    )
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.matrix else 16
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = run_matrix(args) if args.matrix else run_one(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
