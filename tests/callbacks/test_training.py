"""Tests for ExplainDuringTraining: it explains while a model trains and never changes the training."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import make_images, make_trainer
from PIL import Image
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuromask_pl import NeuroMask
from neuromask_pl.callbacks import ExplainDuringTraining
from neuromask_pl.data import unpack_batch
from neuromask_pl.viz import panel_grid, to_uint8

STEPS = 5  # mask steps per call: enough to change the masks, cheap on a CPU
REFERENCE_PATH = None  # the fast path the callback runs by default
BATCH = 8
TRAIN_IMAGES = make_images(48, size=16, seed=3)
TRAIN_LABELS = TRAIN_IMAGES.mean((2, 3)).argmax(1)  # the dominant colour
VAL_IMAGES = make_images(14, size=16, seed=4)
VAL_LABELS = VAL_IMAGES.mean((2, 3)).argmax(1)
STEPS_PER_EPOCH = len(TRAIN_IMAGES) // BATCH
SUMMARY_NAMES = [
    "loss_pred",
    "loss_sparse",
    "loss_smooth",
    "loss_detail",
    "loss_delete",
    "loss_total",
    "mask_area",
    "preservation_rate",
    "prob_original",
    "prob_masked",
    "steps",
]


class Classifier(pl.LightningModule):
    """A tiny CNN with BatchNorm and Dropout whose forward maps [0, 1] images to logits."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, *_ = unpack_batch(batch)
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def dict_collate(items: list) -> dict:
    return {"image": torch.stack([i[0] for i in items]), "label": torch.stack([i[1] for i in items])}


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(callbacks: list, logger: Any = False, epochs: int = 2, dict_batches: bool = False, **trainer_args: Any):
    """Train a freshly seeded Classifier; return (module, trainer).

    The training loader shuffles with the global torch RNG (no generator of its own) and the model
    has Dropout: any random number drawn by a callback changes the order and the masks of later batches.
    """
    seed_all(0)
    module = Classifier()
    train = DataLoader(TensorDataset(TRAIN_IMAGES, TRAIN_LABELS), batch_size=BATCH, shuffle=True)
    val = DataLoader(
        TensorDataset(VAL_IMAGES, VAL_LABELS), batch_size=4, collate_fn=dict_collate if dict_batches else None
    )
    trainer_args = {"inference_mode": True, **trainer_args}  # Lightning's default while training
    trainer = make_trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, log_every_n_steps=1, **trainer_args)
    trainer.fit(module, train, val)
    return module, trainer


def assert_equal_nested(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of (nested dicts/lists of) tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def independent_explanation(state: dict, images: torch.Tensor, **kwargs: Any):
    """NeuroMask run outside any Trainer on a fresh copy of the trained model."""
    copy = Classifier(**kwargs)
    copy.load_state_dict(state)
    return NeuroMask(copy, steps=STEPS, seed=0, fast_path=REFERENCE_PATH).explain(images)


@pytest.fixture(scope="module")
def baseline() -> tuple[dict, dict]:
    """Final weights and optimizer state of the run without the callback."""
    module, trainer = fit([])
    return module.state_dict(), trainer.optimizers[0].state_dict()


@pytest.mark.parametrize("inference_mode", [True, False])
def test_training_is_unchanged_and_tensorboard_gets_images_and_scalars(tmp_path, baseline, inference_mode):
    callback = ExplainDuringTraining(num_images=6, steps=STEPS)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    module, trainer = fit([callback], logger=logger, inference_mode=inference_mode)

    # Training is bit-for-bit that of the run without the callback (BatchNorm buffers included).
    state, optimizer_state = baseline
    assert_equal_nested(module.state_dict(), state, "state_dict")
    assert_equal_nested(trainer.optimizers[0].state_dict(), optimizer_state, "optimizer")
    assert "net.1.num_batches_tracked" in state and int(state["net.1.num_batches_tracked"]) == 2 * STEPS_PER_EPOCH

    # The fixed images are the first 6 validation images (batches of 4: taken across two batches).
    assert torch.equal(callback.images, VAL_IMAGES[:6]) and not callback.images.is_inference()

    # The last call came after the last training step: it equals NeuroMask on a copy of the final model.
    reference = independent_explanation(state, VAL_IMAGES[:6])
    last = callback.last_explanation
    assert torch.equal(last.masks, reference.masks)
    assert torch.equal(last.targets, reference.targets)
    assert last.summary() == reference.summary()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    expected_steps = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # global_step at the end of each validation
    images = events.Images("explain_train/overlays")
    assert [e.step for e in images] == expected_steps
    for name in [*SUMMARY_NAMES, "seconds"]:
        assert [e.step for e in events.Scalars(f"explain_train/{name}")] == expected_steps, name
    for name, value in reference.summary().items():
        assert events.Scalars(f"explain_train/{name}")[-1].value == pytest.approx(value, rel=1e-6, abs=1e-7), name
    logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")).astype(int)
    expected = to_uint8(panel_grid(VAL_IMAGES[:6], reference.masks)).astype(int)
    assert logged.shape == expected.shape == (6 * (16 + 2) + 2, 3 * 16 + 2 * 4 + 4, 3)
    assert np.abs(logged - expected).max() <= 1  # TensorBoard truncates to uint8, to_uint8 rounds


def test_the_comparison_sees_a_callback_that_draws_one_random_number(baseline):
    """Control: the bit-for-bit comparison above fails for a callback that touches the global RNG once."""

    class DrawsOnce(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking and trainer.current_epoch == 0:
                torch.rand(1)

    module, _ = fit([DrawsOnce()])
    with pytest.raises(AssertionError):
        assert_equal_nested(module.state_dict(), baseline[0])


class ImageOnlyLogger(Logger):
    """A logger with ``log_image`` (like WandbLogger) and no TensorBoard experiment."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.images: list[tuple[str, list, int]] = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: Any) -> None:
        self.images.append((key, images, step))


def test_every_n_epochs_and_a_logger_with_log_image(baseline):
    logger = ImageOnlyLogger()
    callback = ExplainDuringTraining(num_images=5, every_n_epochs=2, steps=STEPS, log_prefix="xt")
    module, _ = fit([callback], logger=logger, epochs=4, dict_batches=True)

    assert [(key, step) for key, _, step in logger.images] == [
        ("xt/overlays", 2 * STEPS_PER_EPOCH),
        ("xt/overlays", 4 * STEPS_PER_EPOCH),
    ]
    explain_steps = [step for step, metrics in logger.metrics if "xt/mask_area" in metrics]
    assert explain_steps == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]
    logged_names = {name for _, metrics in logger.metrics for name in metrics if name.startswith("xt/")}
    assert logged_names == {f"xt/{name}" for name in [*SUMMARY_NAMES, "seconds"]}

    assert torch.equal(callback.images, VAL_IMAGES[:5])  # from dict batches
    reference = independent_explanation(module.state_dict(), VAL_IMAGES[:5])
    (array,) = logger.images[-1][1]
    assert array.dtype == np.uint8 and np.array_equal(array, to_uint8(panel_grid(VAL_IMAGES[:5], reference.masks)))
    last_metrics = [metrics for _, metrics in logger.metrics if "xt/mask_area" in metrics][-1]
    assert {k: v for k, v in last_metrics.items() if k != "xt/seconds"} == {
        f"xt/{k}": v for k, v in reference.summary().items()
    }


def test_given_images_model_attribute_and_output_dir(tmp_path):
    images = make_images(3, size=16, seed=9)
    callback = ExplainDuringTraining(images=images, steps=STEPS, model_attribute="net", output_dir=tmp_path / "png")
    module, _ = fit([callback], epochs=2)
    # 'net' is explained, not the module (whose forward doubles the logits here).
    reference_module = Classifier(scale=2.0)
    reference_module.load_state_dict(module.state_dict())
    reference = NeuroMask(reference_module.net, steps=STEPS, seed=0, fast_path=REFERENCE_PATH).explain(images)
    assert torch.equal(callback.images, images)
    assert torch.equal(callback.last_explanation.masks, reference.masks)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["overlays_epoch0.png", "overlays_epoch1.png"]
    written = np.asarray(Image.open(tmp_path / "png" / "overlays_epoch1.png"))
    assert np.array_equal(written, to_uint8(panel_grid(images, reference.masks)))


class NoisyForward(nn.Module):
    """Draws from torch's, NumPy's and Python's RNGs in every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(3)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(()) + float(np.random.rand()) + random.random()
        return self.body(images) + 0.0 * noise


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_hooks_restore_rng_grads_flags_and_buffers(context):
    seed_all(1)
    model = NoisyForward()
    model(make_images(2, size=8))  # materialise the lazy layer
    module = pl.LightningModule()
    module.model = model
    model.train()
    model.body[2].eval()  # mixed flags must come back as they were
    model.body[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    requires_grad = [p.requires_grad for p in model.parameters()]
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    batch = (make_images(4, size=8, seed=5), torch.zeros(4, dtype=torch.long))

    callback = ExplainDuringTraining(num_images=3, steps=STEPS, model_attribute="model")
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0, global_step=0, loggers=[])
    with torch.inference_mode() if context == "inference_mode" else torch.no_grad():
        callback.on_validation_batch_end(trainer, module, None, batch, 0)
        callback.on_validation_epoch_end(trainer, module)

    assert torch.equal(callback.images, batch[0][:3]) and not callback.images.is_inference()
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[1]))
    assert random.getstate() == rng[2]
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), grads, grad_values))
    assert_equal_nested(model.state_dict(), state)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    reference = NeuroMask(model, steps=STEPS, seed=0, fast_path=REFERENCE_PATH).explain(
        batch[0][:3]
    )  # outside any no-grad context
    assert torch.equal(callback.last_explanation.masks, reference.masks)


def test_sanity_check_is_not_collected_and_bad_images_stop_before_training():
    callback = ExplainDuringTraining(num_images=2, steps=STEPS)
    sanity = SimpleNamespace(sanity_checking=True, is_global_zero=True, current_epoch=0, global_step=0, loggers=[])
    callback.on_validation_batch_end(sanity, None, None, make_images(4, size=8), 0)
    callback.on_validation_epoch_end(sanity, None)
    assert callback.images is None and callback._collected == [] and callback.last_explanation is None

    bad = DataLoader(TensorDataset(VAL_IMAGES * 2 - 1, VAL_LABELS), batch_size=4)  # normalised to [-1, 1]
    seed_all(0)
    module = Classifier()
    trainer = make_trainer(
        max_epochs=1, inference_mode=True, callbacks=[ExplainDuringTraining(num_images=2, steps=STEPS)]
    )
    train = DataLoader(TensorDataset(TRAIN_IMAGES, TRAIN_LABELS), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"validation images.*\[0, 1\].*images=\.\.\."):
        trainer.fit(module, train, bad)
    assert trainer.global_step == 0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_images"):
        ExplainDuringTraining(num_images=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ExplainDuringTraining(every_n_epochs=0)
    with pytest.raises(ValueError, match="unknown preset"):
        ExplainDuringTraining(preset="nope")
    with pytest.raises(ValueError, match="unknown mask settings"):
        ExplainDuringTraining(settings={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ExplainDuringTraining(steps=0)
    with pytest.raises(ValueError, match="target_class"):
        ExplainDuringTraining(target_class=-1)
    with pytest.raises(ValueError, match=r"images=\.\.\..*\[0, 1\]"):
        ExplainDuringTraining(images=torch.full((2, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="B x C x H x W"):
        ExplainDuringTraining(images=torch.rand(3, 8, 8))

    module = Classifier()
    with pytest.raises(ValueError, match="no images yet"):
        ExplainDuringTraining().explain(module)
    with pytest.raises(ValueError, match="has no attribute 'head'"):
        ExplainDuringTraining(images=make_images(1), model_attribute="net.head").explain(module)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        ExplainDuringTraining(images=make_images(1), model_attribute="scale").explain(module)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_trainer_validate_explains_under_inference_mode(inference_mode):
    """trainer.validate() runs under torch.inference_mode by default (fit's validation under no_grad)."""
    seed_all(0)
    module = Classifier()
    logger = ImageOnlyLogger()
    callback = ExplainDuringTraining(num_images=4, steps=STEPS)
    trainer = make_trainer(logger=logger, callbacks=[callback], inference_mode=inference_mode)
    trainer.validate(module, DataLoader(TensorDataset(VAL_IMAGES, VAL_LABELS), batch_size=3), verbose=False)
    assert torch.equal(callback.images, VAL_IMAGES[:4]) and not callback.images.is_inference()
    reference = independent_explanation(module.state_dict(), VAL_IMAGES[:4])
    assert torch.equal(callback.last_explanation.masks, reference.masks)
    assert [(key, step) for key, _, step in logger.images] == [("explain_train/overlays", 0)]
