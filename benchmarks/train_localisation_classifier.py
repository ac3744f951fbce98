"""Train the SmallCNN classifiers of the localisation benchmark (neuromask_pl.data.localisation) on a CPU.

Writes ``neuromask_pl/assets/localisation_<variant>.pt`` (a fp32 state_dict) and records the test
accuracy, the data and the command in ``neuromask_pl/assets/localisation_metrics.json``.

    python benchmarks/train_localisation_classifier.py                      # clean and spurious, a few minutes
    python benchmarks/train_localisation_classifier.py --variant clean --epochs 6
    python benchmarks/train_localisation_classifier.py --variant planted --epochs 8 --threads 1  # planted cues

Seeded and augmentation-free: the training images are a fixed generated set, shuffled by a seeded
generator. Metrics (all on the test split, whose digits are never seen in training):

- clean: ``test_accuracy`` on the clean test set; ``digit_box_only_accuracy`` with everything
  outside the ground-truth box set to black (the box alone carries the evidence).
- spurious: ``test_accuracy_cue_agrees`` on test images whose cue agrees with the digit;
  ``follows_cue_rate`` = share of predictions equal to ``cue_label`` on the decorrelated test set
  (cue independent of the digit), ``follows_cue_rate_conflicting`` the same over images with
  ``cue_label != label``, ``digit_accuracy_decorrelated`` the accuracy w.r.t. the digit there, and
  ``cue_only_follows_rate`` the share of decorrelated images classified as ``cue_label`` when
  everything but the cue is black.
- planted: ``test_accuracy`` on the planted test set (cues on their share of classes 3 and 7), and per
  cue (``cues.<name>``): ``class_accuracy_with_cue`` and ``class_accuracy_without_cue`` on the cue
  class's test images, ``cue_alone_rate`` = share of the test scenes without their digit, with the cue,
  classified as the cue's class (make_cue_alone_set), ``cue_on_black_rate`` the same with everything
  but the cue black, and ``no_cue_scene_rate`` the share of the scenes with neither digit nor cue
  classified as that class (the control).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.data.localisation import (
    PLANTED_CUES,
    PLANTED_SHARE,
    SmallCNN,
    checkpoint_path,
    make_cue_alone_set,
    make_localisation_set,
)

logger = logging.getLogger("train_localisation_classifier")

N_VAL = 500
N_TEST = 1000
SEED = 0


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    """Predicted class of each image (eval mode)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def train(
    variant: str, epochs: int, n_train: int, batch_size: int, lr: float, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a SmallCNN on ``n_train`` generated images of ``variant``; returns it and its training record."""
    spurious, planted = variant == "spurious", variant == "planted"
    t0 = time.time()
    data = make_localisation_set("train", n_train, seed=seed, spurious=spurious, planted=planted)
    val = make_localisation_set("val", N_VAL, seed=seed, spurious=spurious, planted=planted)
    logger.info("%s: generated %d train + %d val images in %.1f s", variant, n_train, N_VAL, time.time() - t0)

    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data["image"], data["label"]
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        total = 0.0
        for i in range(0, n_train, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        val_acc = float((predict(model, val["image"]) == val["label"]).float().mean())
        logger.info(
            "%s epoch %d/%d: train loss %.4f, val accuracy %.4f (%.0f s)",
            variant,
            epoch + 1,
            epochs,
            total / n_train,
            val_acc,
            time.time() - t0,
        )
    train_acc = float((predict(model, images) == labels).float().mean())
    record = {
        "epochs": epochs,
        "n_train": n_train,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_accuracy": round(train_acc, 4),
        "val_accuracy": round(val_acc, 4),
        "train_seconds": round(time.time() - t0, 1),
    }
    return model.eval(), record


def evaluate(model: nn.Module, variant: str, seed: int) -> dict[str, Any]:
    """The test metrics of ``variant`` (see the module docstring)."""
    if variant == "clean":
        test = make_localisation_set("test", N_TEST, seed=seed)
        pred = predict(model, test["image"])
        box_only = predict(model, test["image"] * test["gt_mask"])
        return {
            "n_test": N_TEST,
            "test_accuracy": round(float((pred == test["label"]).float().mean()), 4),
            "digit_box_only_accuracy": round(float((box_only == test["label"]).float().mean()), 4),
        }
    if variant == "planted":
        return evaluate_planted(model, seed)
    agree = make_localisation_set("test", N_TEST, seed=seed, spurious=True, cue="agree")
    decor = make_localisation_set("test", N_TEST, seed=seed, spurious=True, cue="independent")
    pred_agree = predict(model, agree["image"])
    pred = predict(model, decor["image"])
    cue_only = predict(model, decor["image"] * decor["cue_mask"])
    conflict = decor["cue_label"] != decor["label"]
    return {
        "n_test": N_TEST,
        "test_accuracy_cue_agrees": round(float((pred_agree == agree["label"]).float().mean()), 4),
        "follows_cue_rate": round(float((pred == decor["cue_label"]).float().mean()), 4),
        "follows_cue_rate_conflicting": round(float((pred == decor["cue_label"])[conflict].float().mean()), 4),
        "n_conflicting": int(conflict.sum()),
        "digit_accuracy_decorrelated": round(float((pred == decor["label"]).float().mean()), 4),
        "cue_only_follows_rate": round(float((cue_only == decor["cue_label"]).float().mean()), 4),
    }


def evaluate_planted(model: nn.Module, seed: int) -> dict[str, Any]:
    """The planted variant's test metrics (see the module docstring)."""

    def rate(hits: Tensor) -> float:
        return round(float(hits.float().mean()), 4)

    test = make_localisation_set("test", N_TEST, seed=seed, planted=True)
    pred = predict(model, test["image"])
    scenes = make_cue_alone_set("test", N_TEST, None, seed=seed)
    scene_pred = predict(model, scenes["image"])
    cues: dict[str, Any] = {}
    for index, (name, cls) in enumerate(PLANTED_CUES.items()):
        of_class = test["label"] == cls
        with_cue, without = of_class & (test["cue_index"] == index), of_class & (test["cue_index"] == -1)
        alone = make_cue_alone_set("test", N_TEST, name, seed=seed)
        cues[name] = {
            "class": cls,
            "n_with_cue": int(with_cue.sum()),
            "n_without_cue": int(without.sum()),
            "class_accuracy_with_cue": rate(pred[with_cue] == cls),
            "class_accuracy_without_cue": rate(pred[without] == cls),
            "cue_alone_rate": rate(predict(model, alone["image"]) == cls),
            "cue_on_black_rate": rate(predict(model, alone["image"] * alone["cue_mask"]) == cls),
            "no_cue_scene_rate": rate(scene_pred == cls),
        }
    return {
        "n_test": N_TEST,
        "planted_share": PLANTED_SHARE,
        "test_accuracy": rate(pred == test["label"]),
        "test_accuracy_without_cue": rate((pred == test["label"])[test["cue_index"] == -1]),
        "cues": cues,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variant",
        choices=["clean", "spurious", "planted", "both", "all"],
        default="both",
        help="both: clean and spurious; all: the three",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--out",
        default=None,
        help="checkpoint path (one variant only); default neuromask_pl/assets/localisation_<variant>.pt",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="metrics JSON to update; default localisation_metrics.json beside the checkpoints",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    variants = {"both": ["clean", "spurious"], "all": ["clean", "spurious", "planted"]}.get(
        args.variant, [args.variant]
    )
    if args.out is not None and len(variants) > 1:
        parser.error("--out needs a single --variant")
    metrics_path = args.metrics or os.path.join(os.path.dirname(checkpoint_path("clean")), "localisation_metrics.json")
    metrics: dict[str, Any] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
    metrics["dataset"] = {
        "source": "sklearn.datasets.load_digits (1797 real 8x8 handwritten digits, BSD-3-Clause)",
        "generator": "neuromask_pl.data.localisation.make_localisation_set(split, n, canvas=64, digit_size=24, seed"
        ", spurious, planted)",
        "model": "neuromask_pl.data.localisation.SmallCNN(num_classes=10), inputs 3 x 64 x 64 in [0, 1]",
    }
    for variant in variants:
        model, record = train(variant, args.epochs, args.n_train, args.batch_size, args.lr, args.seed)
        out = args.out or checkpoint_path(variant)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(model.state_dict(), out)
        with open(out, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        record.update(evaluate(model, variant, args.seed))
        record.update(
            file=os.path.basename(out),
            file_bytes=os.path.getsize(out),
            sha256=digest,
            num_parameters=sum(p.numel() for p in model.parameters()),
            command=shlex.join(
                ["python", "benchmarks/train_localisation_classifier.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            torch_version=torch.__version__,
        )
        metrics[variant] = record
        logger.info("%s: %s", variant, json.dumps(record))
        with open(metrics_path, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    logger.info("wrote %s", metrics_path)


if __name__ == "__main__":
    main()
