"""neuromask_pl.explanation: an Explanation's saving, loading, plain-dict export and the empty Explanation."""

from __future__ import annotations

import pytest
import torch

from neuromask_pl.explanation import LOSS_TERMS, Explanation
from neuromask_pl.module import NeuroMask


def test_save_and_load_round_trip(tmp_path, tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, preset="paper", steps=3).explain(image_factory(3), ids=[7, 8, 9])
    result.paths = ["a.png", "b.png", "c.png"]
    result.save(tmp_path / "exp.pt")
    back = Explanation.load(tmp_path / "exp.pt")
    assert back.paths == result.paths and back.skipped == []
    for name in ("ids", "masks", "targets", "prob_original", "prob_masked", "mask_area", "preserved", "images"):
        assert torch.equal(getattr(back, name), getattr(result, name)), name
    for term, value in result.loss.items():
        assert torch.equal(back.loss[term], value)
    assert back.records() == result.records()


def test_as_dict_is_plain(tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, preset="paper", steps=2).explain(image_factory(2))
    data = result.as_dict()
    assert list(data["loss"]) == ["pred", "sparse", "smooth", "detail", "delete", "total"]
    assert data["masks"].shape == (2, 1, 16, 16) and data["ids"].tolist() == [0, 1]


def test_load_rejects_other_files(tmp_path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold a saved Explanation"):
        Explanation.load(tmp_path / "other.pt")


def test_empty_explanation_has_every_field_with_zero_samples() -> None:
    images = torch.empty(0, 3, 10, 12)
    empty = Explanation.empty(images)
    assert len(empty) == 0 and empty.masks.shape == (0, 1, 10, 12) and empty.images is images
    assert set(empty.loss) == set(LOSS_TERMS) and all(v.shape == (0,) for v in empty.loss.values())
    assert empty.ids.dtype == empty.targets.dtype == empty.steps.dtype == torch.long
    assert empty.preserved.dtype == torch.bool and empty.prob_masked.shape == (0,)
    assert empty.records() == [] and empty.summary() == {}
