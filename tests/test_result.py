"""Explanation objects: saving, loading and plain-dict export."""

from __future__ import annotations

import pytest
import torch

from neuromask_pl.explanation import Explanation
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
    assert set(data["loss"]) == {"pred", "sparse", "smooth", "total"}
    assert data["masks"].shape == (2, 1, 16, 16) and data["ids"].tolist() == [0, 1]


def test_load_rejects_other_files(tmp_path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold a saved Explanation"):
        Explanation.load(tmp_path / "other.pt")
