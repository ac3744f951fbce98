"""Progress inside a batch: the mask steps reported as they run (Explainer.explain(progress=...), the CLI's bar)."""

from __future__ import annotations

import helpers
import pytest
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from neuromask_pl import NeuroMask
from neuromask_pl.callbacks import ExplanationLogger
from neuromask_pl.callbacks.logger import _RichSteps
from neuromask_pl.data import TensorDataModule
from neuromask_pl.explainer import Explainer, StepBar

STEPS = 4


def test_explain_reports_every_step_and_the_masks_stay_the_same(capsys):
    images = helpers.make_images(3, size=12)
    explainer = Explainer(helpers.make_tiny_cnn(), steps=STEPS)
    quiet = explainer.explain(images)
    calls: list[tuple[int, int]] = []
    reported = explainer.explain(images, progress=lambda step, steps: calls.append((step, steps)))
    assert calls == [(s, STEPS) for s in range(1, STEPS + 1)]
    assert torch.equal(reported.masks, quiet.masks)  # bit-identical: progress sees counts, never tensors

    shown = explainer.explain(images, progress=True)  # a tqdm bar on stderr, with the rate and the time left
    err = capsys.readouterr().err
    assert "explaining 3 image(s)" in err and f"/{STEPS} [" in err
    assert torch.equal(shown.masks, quiet.masks)
    explainer.explain(images, progress=StepBar("steps", mininterval=0, leave=True))  # every step drawn
    err = capsys.readouterr().err
    assert f"{STEPS}/{STEPS} [" in err and "<00:00" in err  # elapsed < remaining (the ETA)

    explainer.progress = True  # the default of explain() (NeuroMask.explain goes through it)
    NeuroMask(explainer.classifier, steps=STEPS).explainer.progress = True
    explainer.explain(images)
    assert "explaining 3 image(s)" in capsys.readouterr().err


def test_a_step_bar_closes_at_the_last_step_and_opens_again_for_the_next_batch():
    bar = StepBar("x", disable=True)
    bar(1, 2)
    assert bar._bar is not None
    bar(2, 2)
    assert bar._bar is None
    bar(1, 3)
    assert bar._bar is not None and bar._bar.total == 3
    bar.close()


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_the_trainer_shows_the_mask_steps_beside_its_progress_bar(capsys, monkeypatch, bar):
    data = TensorDataModule(helpers.make_images(4, size=12), batch_size=2, pin_memory=False)
    module = NeuroMask(helpers.make_tiny_cnn(), steps=STEPS)
    seen: list[tuple[int, int]] = []
    kind = _RichSteps if bar == "rich" else StepBar
    call = kind.__call__

    def spy(self, step: int, steps: int) -> None:
        call(self, step, steps)
        shown = self._bar is not None or step == steps if bar == "tqdm" else self.task is not None
        seen.append((step, steps) if shown else (step, -1))  # a bar (or a task of Lightning's display) is open

    monkeypatch.setattr(kind, "__call__", spy)
    callbacks = [ExplanationLogger()] + ([TQDMProgressBar(refresh_rate=1)] if bar == "tqdm" else [])
    trainer = helpers.make_trainer(callbacks=callbacks, enable_progress_bar=True)
    trainer.predict(module, datamodule=data, return_predictions=False)
    assert seen == [(s, STEPS) for s in range(1, STEPS + 1)] * 2  # two batches, every step
    if bar == "tqdm":
        assert "mask steps" in capsys.readouterr().out
    assert module.explainer.progress is False  # put back when the stage ends

    quiet = helpers.make_trainer(callbacks=[ExplanationLogger(step_progress=False)], enable_progress_bar=True)
    quiet.predict(module, datamodule=data, return_predictions=False)
    assert "mask steps" not in capsys.readouterr().out
