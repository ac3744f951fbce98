"""The sanity checks of a run through the callbacks: the manifest's ``flags`` column, ``run.json``'s ``sanity`` with
a warning, and TensorBoard (``explain/flags/*``, ``explain/run/flags/*``, ``explain/run/one_class``, the text
``explain/sanity``), on a classifier that ignores its input (tests/sanity_models.py)."""

from __future__ import annotations

import csv
import json

import helpers
import pytest
from pytorch_lightning.loggers import TensorBoardLogger
from sanity_models import IgnoresInput, mid_grey
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from neuromask_pl.callbacks import ExplanationLogger, MaskWriter
from neuromask_pl.data import TensorDataModule
from neuromask_pl.explanation import FLAGS
from neuromask_pl.module import NeuroMask


def run(tmp_path, classifier, images, steps):
    logger = TensorBoardLogger(tmp_path / "logs", name="explain")
    trainer = helpers.make_trainer(
        logger=logger, callbacks=[MaskWriter(str(tmp_path / "out"), write_overlays=False), ExplanationLogger()]
    )
    datamodule = TensorDataModule(images, batch_size=6, pin_memory=False)
    trainer.predict(NeuroMask(classifier, steps=steps), datamodule=datamodule, return_predictions=False)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    return tmp_path / "out", events


def test_a_run_on_a_classifier_that_ignores_its_input_is_flagged_everywhere(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"(?s)MaskWriter: sanity checks.*12 of 12 mask\(s\) are empty"):
        out, events = run(tmp_path, IgnoresInput(), mid_grey(12), steps=40)

    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["flags"] for r in rows] == ["baseline_keeps_class;empty_mask"] * 12
    assert all(r["preserved"] == "True" and r["predicted"] == "0" for r in rows)
    assert all(float(r["prob_baseline"]) == pytest.approx(float(r["prob_original"])) for r in rows)

    sanity = json.loads((out / "run.json").read_text())["sanity"]
    assert sanity["samples"] == 12 and sanity["one_class"] and sanity["predicted_classes"] == 1
    assert sanity["flags"] == {"baseline_keeps_class": 12, "empty_mask": 12, "full_mask": 0, "prob_rise": 0}
    assert any("predicted as class 0 (cat)" in line for line in sanity["warnings"])

    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["explain/flags/empty_mask"] == scalars["explain/flags/baseline_keeps_class"] == [1.0, 1.0]
    assert scalars["explain/flags/full_mask"] == scalars["explain/flags/prob_rise"] == [0.0, 0.0]
    expected = {"baseline_keeps_class": 1.0, "empty_mask": 1.0, "full_mask": 0.0, "prob_rise": 0.0}
    assert {name: scalars[f"explain/run/flags/{name}"] for name in FLAGS} == {k: [v] for k, v in expected.items()}
    assert scalars["explain/run/one_class"] == [1.0]
    (text,) = events.Tensors("explain/sanity/text_summary")
    lines = text.tensor_proto.string_val[0].decode().splitlines()
    assert lines == [f"- {line}" for line in sanity["warnings"]]


def test_a_run_whose_classifier_tells_images_apart_says_so(tmp_path) -> None:
    images = helpers.make_images(12, seed=3)
    out, events = run(tmp_path, helpers.make_tiny_cnn(), images, steps=2)
    sanity = json.loads((out / "run.json").read_text())["sanity"]
    assert sanity["samples"] == 12 and not sanity["one_class"] and sanity["predicted_classes"] > 1
    assert not any("every one" in line for line in sanity["warnings"])
    assert events.Scalars("explain/run/one_class")[0].value == 0.0
