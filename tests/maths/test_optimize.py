"""neuromask_pl.maths.optimize, the inner loop: the TF1 RMSProp and the single-kernel Adam, jitter, the two-scale and
upsampled masks, the deletion game's forward pass, per-sample early stopping, float16 loss scaling, the rows a
step runs, and masks that never depend on the batch; each checked against a hand computation or a run alone."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import BLUR_AREA, FAST_TOLERANCE, assert_masks_independent_of_the_batch, make_images
from torch import Tensor, nn

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers.benchmark import load_benchmark_classifier
from neuromask_pl.data import TensorDataModule
from neuromask_pl.data.localisation import make_localisation_set
from neuromask_pl.maths.losses import deletion_loss, temperature_at
from neuromask_pl.maths.optimize import (
    LeanAdam,
    MaskOptimisation,
    SampleLossScale,
    TFRMSprop,
    jitter_shift,
    learn_masks,
    running_rows,
    update_patience,
)
from neuromask_pl.metrics import deletion_auc
from neuromask_pl.settings import resolve_settings

pytestmark = pytest.mark.numerics


class RecordsBatchSizes(nn.Module):
    """Wraps a model and records the batch size of every forward pass run with gradients (the mask steps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.sizes.append(x.shape[0])
        return self.model(x)


# ----------------------------------------------------------------------------- TF1 RMSProp


def test_tf_rmsprop_two_steps_match_the_tf1_formula() -> None:
    start, grads = [1.0, -2.0, 0.5], [[0.5, -3.0, 0.0], [-0.25, 1.0, 2.0]]
    lr, decay, eps = 0.1, 0.9, 1e-10
    param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = TFRMSprop([param], lr=lr)
    expected, ms = list(start), [1.0, 1.0, 1.0]  # TF1 initialises the mean square to ones
    for grad in grads:
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        for i, g in enumerate(grad):
            ms[i] = decay * ms[i] + (1 - decay) * g * g
            expected[i] -= lr * g / math.sqrt(ms[i] + eps)
        assert param.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Sanity check on the numbers themselves: first step of element 0 is 0.1 * 0.5 / sqrt(0.925).
    assert expected[0] != start[0]


def test_tf_rmsprop_epsilon_sits_inside_the_square_root() -> None:
    # With decay 0 the mean square is g^2; for g = 1e-6, sqrt(g^2 + 1e-10) ~ 1.005e-5, so the step is
    # ~0.0995 * lr (epsilon outside the root would give a step of ~lr).
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = TFRMSprop([param], lr=1.0, decay=0.0)
    param.grad = torch.full((1,), 1e-6, dtype=torch.float64)
    optimizer.step()
    assert param.item() == pytest.approx(-1e-6 / math.sqrt(1e-12 + 1e-10), rel=1e-9)
    assert -0.1 < param.item() < -0.09


def test_tf_rmsprop_skips_parameters_without_gradient() -> None:
    used = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    optimizer = TFRMSprop([used, unused], lr=0.5)
    used.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(2))
    assert used.detach().tolist() == pytest.approx([1 - 0.5 / math.sqrt(1.0)] * 2)


# ----------------------------------------------------------------------------- single-kernel Adam (CUDA's)


@pytest.mark.parametrize("float16", [False, True])
def test_single_kernel_adam_of_cuda_gives_the_same_masks_with_early_stopping(
    float16, tiny_cnn, image_factory, monkeypatch
):  # noqa: E501
    """The single-kernel Adam (``fused=True``) that CUDA runs, exercised on the CPU (torch has it there too): same
    masks, same stops, also where early stopping and float16 overflow skips restore some samples' weights after the
    step."""
    images = image_factory(3, 16)
    options = dict(steps=40, settings={**BLUR_AREA, "stop_patience": 3, "stop_tolerance": 2e-2})

    def explain():
        with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
            return NeuroMask(tiny_cnn, preset="paper", **options).explain(images)

    reference = explain()
    monkeypatch.setattr("neuromask_pl.maths.optimize.single_kernel_adam", lambda device: True)
    made = []
    original = torch.optim.Adam.__init__

    def record(self, params, **kwargs):
        made.append(kwargs.get("fused"))
        original(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", record)
    fused = explain()
    assert made and all(made), "the single-kernel Adam was not used"
    assert min(reference.steps.tolist()) < 40, "no sample stopped early: the test would not cover restored weights"
    assert fused.steps.tolist() == reference.steps.tolist()
    torch.testing.assert_close(fused.masks, reference.masks, rtol=0, atol=FAST_TOLERANCE)


# ----------------------------------------------------------------------------- jitter


def test_jitter_shift_depends_on_seed_and_step_only() -> None:
    shifts = [jitter_shift(0, step, 2) for step in range(50)]
    assert shifts == [jitter_shift(0, step, 2) for step in range(50)]
    assert all(-2 <= dy <= 2 and -2 <= dx <= 2 for dy, dx in shifts) and len(set(shifts)) > 5
    assert jitter_shift(0, 3, 0) == (0, 0) and shifts != [jitter_shift(1, step, 2) for step in range(50)]


# ----------------------------------------------------------------------------- two-scale and upsampled masks


def test_two_scale_optimisation_learns_both_grids(tiny_cnn: torch.nn.Module) -> None:
    # 40 px: fine grid 8 x 8 (cells of 5 px), coarse grid 5 x 5 (cells of 8 px)
    settings = resolve_settings("default", 3, {"mask_size": 8, "mask_coarse": 5, "l_detail": 1.0})
    images = make_images(2, size=40, seed=1)
    problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0, 1]), torch.arange(2), settings, seed=0)
    assert problem.weights.shape == (2, 1, 1, 8 * 8 + 5 * 5)
    coarse_start = problem.weights.detach()[..., 64:].clone()
    assert torch.equal(coarse_start, torch.zeros_like(coarse_start))  # the coarse grid starts at zero
    problem.run()
    assert (problem.weights.detach()[..., 64:] != 0).any()  # and moves
    fit = problem.result()
    assert fit.masks.shape == (2, 1, 40, 40)


def test_upsampled_weights_give_a_binary_mask_with_smooth_contours(tiny_cnn: torch.nn.Module) -> None:
    """sigmoid(up(w) / T) at the image's resolution, by hand, versus up(sigmoid(w / T))."""
    images, ids = make_images(1, size=16, seed=2), torch.tensor([0])

    def first_mask(upsample_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        settings = resolve_settings(
            "paper",
            1,
            {"mask_scale": 4, "temperature": 0.001, "weight_limit": 1.0, "upsample_weights": upsample_weights},
        )
        problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0]), ids, settings, seed=0)
        return problem.evaluate()[0], problem.weights.detach()

    mask_on, weights = first_mask(True)
    up = F.interpolate(weights, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mask_on, torch.sigmoid(up / 0.001))
    assert ((mask_on > 0.01) & (mask_on < 0.99)).float().mean() < 0.1  # (nearly) binary at every pixel
    mask_off, same_weights = first_mask(False)
    assert torch.equal(same_weights, weights)
    torch.testing.assert_close(mask_off, F.interpolate(torch.sigmoid(weights / 0.001), size=(16, 16), mode="bilinear"))
    assert ((mask_off > 0.01) & (mask_off < 0.99)).float().mean() > 0.2  # bilinear ramps between 0/1 cells


def test_blur_baseline_on_images_too_small_to_blur_is_a_clear_error(tiny_cnn, image_factory) -> None:
    with pytest.raises(ValueError, match="too small for the blur baseline"):
        NeuroMask(tiny_cnn, preset="paper", steps=2, settings=BLUR_AREA).explain(image_factory(2, 8))


# ----------------------------------------------------------------------------- tie-free map


def test_tie_break_leaves_the_thresholded_mask_unchanged_and_stays_close(tiny_cnn: torch.nn.Module) -> None:
    images = make_images(2, size=16, seed=3)

    def explain(tie_break: float) -> Tensor:
        module = NeuroMask(tiny_cnn, preset="default", steps=12, seed=0, settings={"tie_break": tie_break})
        return module.explain(images, targets=1, ids=torch.tensor([0, 1])).masks

    plain, broken = explain(0.0), explain(0.001)
    assert (broken - plain).abs().max() <= 0.001 + 1e-6
    saturated = (plain == 0) | (plain == 1)
    assert torch.equal((broken > 0.5)[saturated], (plain > 0.5)[saturated])
    for k in range(2):  # fewer ties than the plain mask
        assert broken[k].unique().numel() >= plain[k].unique().numel()


# ----------------------------------------------------------------------------- deletion game


def test_one_forward_pass_holds_the_masked_and_the_deleted_images(tiny_cnn) -> None:
    model = RecordsBatchSizes(tiny_cnn.eval().requires_grad_(False))
    images = make_images(3, 16)
    settings = resolve_settings("default", 2, {"l_delete": 1.0})
    problem = MaskOptimisation(model, images, torch.tensor([0, 1, 2]), torch.arange(3), settings, seed=0)
    mask, logits, terms = problem.evaluate()
    assert model.sizes == [6] and logits.shape == (3, 3)
    hidden = images * (1 - mask) + mask * problem.baseline  # the mask's region replaced by the baseline
    torch.testing.assert_close(terms["delete"], deletion_loss(tiny_cnn(hidden), torch.tensor([0, 1, 2])))
    result = NeuroMask(tiny_cnn, steps=3, settings={"l_delete": 1.0}).explain(images)
    assert "delete" in result.loss and result.loss["delete"].shape == (3,)


def test_the_deletion_game_makes_hiding_the_mask_remove_the_class() -> None:
    """On the localisation benchmark's classifier: with l_delete the class probability falls faster as the
    mask's pixels are deleted (deletion AUC), and the hidden-region loss is lower."""
    classifier = load_benchmark_classifier("clean")
    data = make_localisation_set("test", 12, seed=0)
    images = data["image"]
    targets = classifier(images).argmax(1)
    results = {
        ld: NeuroMask(classifier, steps=150, settings={"l_delete": ld}).explain(images, targets) for ld in (0.0, 10.0)
    }
    aucs = {ld: deletion_auc(classifier, images, r.masks, targets).mean() for ld, r in results.items()}
    assert aucs[10.0] < aucs[0.0]
    assert bool(results[10.0].preserved.all())
    hidden = {ld: deletion_loss(classifier(images * (1 - r.masks)), targets).mean() for ld, r in results.items()}
    assert hidden[10.0] < hidden[0.0]


# ----------------------------------------------------------------------------- per-sample independence

TWO_SCALE_UPSAMPLED = dict(mask_scale=2, mask_coarse=3, l_detail=2.0, upsample_weights=True)


@pytest.mark.parametrize(
    ("size", "options"),
    [
        (16, dict(preset="default", steps=15)),
        (16, dict(preset="paper", steps=10, settings=dict(temperature_start=1.5, tie_break=0.2))),
        (32, dict(preset="default", steps=12, settings=dict(mask_size=8, mask_coarse=4))),
        (32, dict(preset="paper", steps=8, settings=TWO_SCALE_UPSAMPLED)),
        (32, dict(steps=25, settings=dict(l_delete=2.0))),
        (16, dict(steps=15, settings=dict(baseline="noise", temperature=0.05, lr_end=0.001))),
        (16, dict(preset="paper", steps=10, settings=dict(sample_temperature=0.5))),
    ],
    ids=[
        "default",
        "annealed_tie_break",
        "two_scale",
        "two_scale_upsampled_weights",
        "deletion_game",
        "noise",
        "sampled_one_grid",
    ],
)
def test_masks_do_not_depend_on_the_batch(tiny_cnn: torch.nn.Module, size: int, options: dict) -> None:
    images = make_images(3, size=size, seed=5).double()
    assert_masks_independent_of_the_batch(tiny_cnn.double(), images, **options)


def test_jitter_and_total_variation_keep_batches_independent(tiny_cnn, image_factory) -> None:
    options = dict(preset="default", steps=20, settings=dict(jitter=2, smooth_penalty="tv", smooth_on="mask"))
    images = image_factory(4)
    batched = NeuroMask(tiny_cnn, **options).explain(images, ids=[5, 6, 7, 8])
    alone = NeuroMask(tiny_cnn, **options).explain(images[2:3], ids=[7])
    torch.testing.assert_close(batched.masks[2:3], alone.masks, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- early stopping


def test_update_patience_by_hand() -> None:
    best = torch.tensor([float("inf"), 1.0, 1.0, -2.0])
    stale = torch.tensor([0, 3, 3, 1])
    loss = torch.tensor([5.0, 0.9995, 0.99, -2.01])  # tolerance 1e-3: 1.0 -> needs < 0.999; -2 -> < -2.002
    new_best, new_stale = update_patience(loss, best, stale, 1e-3)
    assert new_best.tolist() == pytest.approx([5.0, 1.0, 0.99, -2.01])
    assert new_stale.tolist() == [0, 4, 0, 0]


def test_early_stopping_per_sample(tiny_cnn, image_factory) -> None:
    images = image_factory(4, 16)
    ids = torch.tensor([4, 9, 2, 6])
    # A fixed temperature (blur_area): with an annealed one the schedule spans `steps`, so a shorter run differs.
    settings = dict(preset="paper", steps=120, settings={**BLUR_AREA, "stop_patience": 5, "stop_tolerance": 1e-2})
    stopped = NeuroMask(tiny_cnn, **settings).explain(images, ids=ids)
    steps = stopped.steps.tolist()
    assert min(steps) < 120 and len(set(steps)) > 1  # images stop at different steps
    # A stopped mask is exactly the mask of a run that was given that many steps and no early stopping.
    for i, n in enumerate(steps):
        alone = NeuroMask(tiny_cnn, preset="paper", steps=n, settings=BLUR_AREA).explain(
            images[i : i + 1], ids=ids[i : i + 1]
        )
        torch.testing.assert_close(stopped.masks[i], alone.masks[0], rtol=0, atol=1e-4)
    # And batching does not change when (or where) an image stops.
    singles = [NeuroMask(tiny_cnn, **settings).explain(images[i : i + 1], ids=ids[i : i + 1]) for i in range(4)]
    assert [int(s.steps[0]) for s in singles] == steps
    assert stopped.summary()["steps"] == pytest.approx(sum(steps) / 4)


def test_no_early_stopping_runs_every_step(tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, steps=7).explain(image_factory(3, 16))
    assert result.steps.tolist() == [7, 7, 7]


def test_early_stopping_under_annealing_keeps_each_samples_last_temperature(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    ids = torch.tensor([1, 5, 9])
    options = dict(steps=60, settings=dict(tie_break=0.0, stop_patience=4, stop_tolerance=2e-2))
    result = NeuroMask(tiny_cnn, **options).explain(images, ids=ids)
    steps = result.steps.tolist()
    assert min(steps) < 60
    settings = resolve_settings("default", **options)
    no_stopping = replace(settings, stop_patience=0)
    for i, n in enumerate(steps):  # step one image by hand, as far as it went, without early stopping
        one = slice(i, i + 1)
        manual = MaskOptimisation(tiny_cnn, images[one], result.targets[one], ids[one], no_stopping, seed=0)
        for _ in range(n):
            manual.step()
        with torch.no_grad():  # the mask at the temperature of its last step, not the final one
            expected, _, _ = manual.evaluate(step=n - 1)
            final, _, _ = manual.evaluate()
        torch.testing.assert_close(result.masks[one], expected, rtol=0, atol=1e-4)
        if temperature_at(settings, n - 1) > 2 * settings.temperature:  # stopped while still annealing
            assert (final - expected).abs().max() > 1e-2


# ----------------------------------------------------------------------------- rows a step runs


def test_running_rows_tops_up_the_active_rows_to_a_power_of_two() -> None:
    active = torch.tensor([True, False, True, False, False, True, False, False])
    assert running_rows(active).tolist() == [0, 2, 5]
    assert running_rows(active, power_of_two=True).tolist() == [0, 1, 2, 5]  # 3 active -> 4 rows
    assert running_rows(torch.tensor([False, True, False]), power_of_two=True).tolist() == [1]
    assert running_rows(torch.tensor([True, True, True, False, True]), power_of_two=True).tolist() == [0, 1, 2, 4]
    five_of_six = torch.tensor([True, True, True, False, True, True])  # 5 -> 8, capped at the batch
    assert running_rows(five_of_six, power_of_two=True).tolist() == [0, 1, 2, 3, 4, 5]
    assert running_rows(torch.zeros(4, dtype=torch.bool), power_of_two=True).numel() == 0


def test_few_batch_sizes_give_the_same_masks_and_stops_as_early_stopping_alone(tiny_cnn, image_factory) -> None:
    """For a compiled classifier the rows of a step are topped up to a power of two: the classifier sees
    few batch sizes, and the topped-up (stopped) samples change nothing."""
    images, targets, ids = image_factory(7, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.arange(7)
    settings = resolve_settings(
        "paper", 60, {**BLUR_AREA, "stop_patience": 3, "stop_tolerance": 2e-2, "tie_break": 1e-3}
    )
    fits, sizes = {}, {}
    for few in (False, True):
        model = RecordsBatchSizes(tiny_cnn.eval().requires_grad_(False))
        fits[few] = learn_masks(model, images, targets, ids, settings, seed=0, few_batch_sizes=few)
        sizes[few] = set(model.sizes)
    assert len(sizes[False]) > 3, "too few samples stopped at different steps to test anything"
    assert sizes[True] <= {1, 2, 4, 7} and len(sizes[True]) < len(sizes[False])
    assert fits[True].steps.tolist() == fits[False].steps.tolist()
    torch.testing.assert_close(fits[True].masks, fits[False].masks, rtol=0, atol=1e-4)
    torch.testing.assert_close(fits[True].loss["total"], fits[False].loss["total"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- mixed precision


def test_loss_terms_shape_under_autocast_are_float32(tiny_cnn, image_factory) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fit = learn_masks(
            tiny_cnn.requires_grad_(False).eval(),
            image_factory(2, 16),
            torch.tensor([0, 1]),
            torch.arange(2),
            resolve_settings("default", 3),
            seed=0,
        )
    assert fit.masks.dtype == torch.float32 and fit.loss["total"].dtype == torch.float32
    assert F.softmax(fit.logits_masked, -1).shape == (2, 3)


def test_sample_loss_scale_skips_only_the_overflowing_sample() -> None:
    scaler = SampleLossScale(3, torch.device("cpu"), init=8.0, growth_interval=2)
    grad = torch.tensor([[8.0, 16.0], [float("inf"), 1.0], [4.0, 4.0]]).view(3, 1, 1, 2)
    unscaled, finite = scaler.unscale(grad)
    assert finite.tolist() == [True, False, True]
    assert unscaled.flatten(1).tolist() == [[1.0, 2.0], [0.0, 0.0], [0.5, 0.5]]
    assert scaler.scale.tolist() == [8.0, 4.0, 8.0]
    scaler.unscale(torch.ones(3, 1, 1, 2))  # second finite step in a row for samples 0 and 2: they grow
    assert scaler.scale.tolist() == [16.0, 4.0, 16.0]


class FP16Underflow(nn.Module):
    """Logits are 1e-8 times a linear map: in float16 the gradients flowing back through that factor
    (about 0.5e-8) are below float16's smallest subnormal (6e-8) and vanish without loss scaling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)) * 1e-8


def first_step_gradient(float16: bool) -> Tensor:
    model = FP16Underflow().eval().requires_grad_(False)
    settings = resolve_settings(
        "default", 1, {"l_sparse": 0.0, "l_smooth": 0.0, "l_detail": 0.0, "mask_scale": 1, "baseline": "black"}
    )
    problem = MaskOptimisation(model, make_images(2, 8), torch.tensor([0, 1]), torch.arange(2), settings, seed=0)
    with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
        problem.step()
    return problem.weights.grad.clone()


def test_float16_autocast_scales_the_loss_so_mask_gradients_survive(monkeypatch) -> None:
    full = first_step_gradient(float16=False)
    half = first_step_gradient(float16=True)
    assert full.abs().max() > 0
    torch.testing.assert_close(half, full, rtol=0, atol=0.02 * float(full.abs().max()))
    monkeypatch.setattr("neuromask_pl.maths.optimize.autocast_float16", lambda device: False)
    assert first_step_gradient(float16=True).abs().max() == 0  # what happens without the scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs 16-mixed as bf16-mixed on the CPU")
def test_16_mixed_through_a_trainer_on_cuda(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(2, 16)
    out = trainer_factory(precision="16-mixed", accelerator="cuda").predict(
        NeuroMask(tiny_cnn, steps=10), datamodule=TensorDataModule(images, batch_size=2)
    )
    full = NeuroMask(tiny_cnn, steps=10).explain(images.cuda())
    assert torch.isfinite(out[0].masks).all()
    assert (out[0].masks - full.masks.cpu()).abs().mean() < 0.02


# ----------------------------------------------------------------------------- the mask arithmetic's speed-ups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_adam_gives_torchs_adam_bit_for_bit(dtype: torch.dtype) -> None:
    """The same float operations in the same order as torch.optim.Adam's per-tensor step: equal weights and
    moments after every step, with the learning rate changed between steps (as lr_end anneals it)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(2, 1, 1, 40, generator=generator, dtype=dtype)
    grads = [torch.randn(start.shape, generator=generator, dtype=dtype) * 10**k for k in (-3, 0, 2, 0, -6, 1)]
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    lean, reference = LeanAdam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for step, grad in enumerate(grads):
        for optimizer, param in ((lean, ours), (reference, theirs)):
            optimizer.param_groups[0]["lr"] = 0.1 * 0.7**step
            param.grad = grad.clone()
            optimizer.step()
        assert torch.equal(ours, theirs)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(lean.state[ours][key], reference.state[theirs][key])


def test_the_noise_baseline_is_what_the_classifier_sees_where_the_mask_hides(tiny_cnn) -> None:
    """With baseline="noise" the masked image is ``x m + (1 - m) noise`` with the step's noise draw."""
    from neuromask_pl.maths.mask import noise_baseline

    images = make_images(2, size=16, seed=3)
    settings = resolve_settings("default", 3, {"baseline": "noise", "sample_temperature": 0.0})  # the mask itself
    seen = []
    hook = tiny_cnn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0, 1]), torch.arange(2), settings, seed=0)
        mask, _, _ = problem.evaluate(step=1)
    finally:
        hook.remove()
    expected = images * mask + (1 - mask) * noise_baseline(images, 0, 1)
    torch.testing.assert_close(seen[-1], expected)
    assert not torch.allclose(seen[-1], images * mask)  # not the black baseline


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_the_classifier_sees_a_draw_of_the_mask_and_the_result_is_the_mask(tiny_cnn, preset: str) -> None:
    """With sample_temperature t the classifier sees sigmoid((w / T + noise) / t) during the steps, with the
    step's logistic noise at the weights' grid, and the mask sigmoid(w / T) itself after them."""
    from neuromask_pl.maths.mask import grid_logits, logistic_noise
    from neuromask_pl.maths.optimize import image_mask

    images = make_images(2, size=16, seed=3)
    settings = resolve_settings(preset, 3, {"sample_temperature": 0.7, "mask_scale": 2, "mask_size": 0})
    seen = []
    hook = tiny_cnn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0, 1]), torch.arange(2), settings, seed=4)
        mask, _, _ = problem.evaluate(step=1)
        final, _, _ = problem.evaluate()
    finally:
        hook.remove()
    weights = problem.weights.detach()
    if problem.grids is not None:
        weights, _ = grid_logits(weights, *problem.grids)
    temperature = temperature_at(settings, 1)
    noise = logistic_noise(4, 1, tuple(weights.shape[-2:]))
    drawn = image_mask(weights + temperature * noise, temperature * 0.7, settings.upsample_weights, 16, 16)
    torch.testing.assert_close(seen[0], images * drawn)
    torch.testing.assert_close(mask, image_mask(weights, temperature, settings.upsample_weights, 16, 16))
    assert not torch.allclose(seen[0], images * mask)  # a draw, not the mask
    torch.testing.assert_close(seen[1], images * final)  # after the steps: the mask itself
