"""benchmarks/stability.py: IoU, top-k, pieces and the summary, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from helpers import load_script
from torch import nn


@pytest.fixture(scope="module")
def stability():
    return load_script("benchmarks/stability.py")


def as_mask(rows: list[str]) -> torch.Tensor:
    """A 1 x 1 x H x W bool mask from strings of '#' (kept) and '.' (hidden)."""
    return torch.tensor([[c == "#" for c in row] for row in rows]).view(1, 1, len(rows), len(rows[0]))


def test_iou_hand_computed(stability):
    first = as_mask(["##..", "##..", "....", "...."])  # 4 pixels
    second = as_mask([".##.", ".##.", "....", "...."])  # 4 pixels, 2 shared
    empty = as_mask(["....", "....", "....", "...."])
    got = stability.iou(torch.cat([first, first, empty]), torch.cat([second, first, empty]))
    # 2 shared of 6; identical; two empty masks agree. One float32 division: within 2**-24 relative.
    assert got.tolist() == pytest.approx([2 / 6, 1.0, 1.0], rel=2**-24, abs=0)
    assert stability.iou(first, empty).tolist() == [0.0]
    with pytest.raises(ValueError, match="one shape"):
        stability.iou(first, first[..., :2])


def test_top_k_keeps_the_highest_pixels_and_breaks_ties_by_raster_order(stability):
    maps = torch.tensor([[[[0.1, 0.9], [0.5, 0.9]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    got = stability.top_k_mask(maps, torch.tensor([0.25, 0.75]))  # 1 of 4 pixels; 3 of 4
    assert got[0, 0].tolist() == [[False, True], [False, False]]  # the tie 0.9 / 0.9: the earlier pixel
    assert got[1, 0].tolist() == [[False, True], [True, True]]
    assert stability.binarize(maps, True).flatten(1).sum(1).tolist() == [2, 4]  # masks: > 0.5
    with pytest.raises(ValueError, match="areas"):
        stability.binarize(maps, False)


def test_pieces_are_8_connected(stability):
    masks = torch.cat(
        [
            as_mask(["#...", ".#..", "..#.", "...#"]),  # a diagonal: one piece with 8-connectivity (4 with 4)
            as_mask(["##.#", "....", "#..#", "#.##"]),  # top-left pair, top-right, left pair, bottom-right L
            as_mask(["....", "....", "....", "...."]),
        ]
    )
    assert stability.count_pieces(masks).tolist() == [1, 4, 0]
    arrays = masks[:, 0].numpy()
    assert [stability._label_8_connected(a) for a in arrays] == [1, 4, 0]  # the scipy-free fallback agrees


def test_summarise_counts_flips_and_worst_image(stability):
    reference = torch.cat([as_mask(["##", ".."]), as_mask(["#.", ".."])])
    other = torch.cat([as_mask(["#.", ".."]), as_mask(["#.", ".."])])
    kept = {"reference": torch.tensor([True, True]), "alone": torch.tensor([False, True])}
    out = stability.summarise(reference, {"alone": other}, kept)
    assert out["alone"]["iou"] == [0.5, 1.0]
    assert (out["alone"]["iou_mean"], out["alone"]["iou_worst"], out["alone"]["class_flips"]) == (0.75, 0.5, 1)
    assert (out["pieces_mean"], out["pieces_max"], out["keeps_class_rate"]) == (1.0, 1, 1.0)
    assert out["area_mean"] == pytest.approx((2 / 4 + 1 / 4) / 2)


def test_keeps_class_blacks_out_the_rest(stability):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():  # class 0 scores the top-left pixel, class 1 the rest
        classifier[1].weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 1.0, 1.0]]))
    images = torch.ones(2, 1, 2, 2)
    masks = torch.cat([as_mask(["#.", ".."]), as_mask([".#", "##"])])
    assert stability.keeps_class(classifier, images, masks, torch.tensor([0, 0])).tolist() == [True, False]


def test_parse_variants(stability):
    assert stability.parse_variants("all") == list(stability.VARIANTS)
    assert stability.parse_variants("alone, avx2") == ["alone", "avx2"]
    assert stability.parse_variants(None) == [] and stability.parse_variants("") == []
    with pytest.raises(ValueError, match="unknown stability variants"):
        stability.parse_variants("alone,gpu")


def test_argv_without_drops_options_and_their_values(stability):
    argv = ["--n", "4", "--stability", "all", "--out=r.json", "--set", "lr=0.1", "--dump-maps", "m.pt"]
    got = stability.argv_without(argv, {"--stability", "--out", "--dump-maps"})
    assert got == ["--n", "4", "--set", "lr=0.1"]


def test_compare_methods_reports_stability_of_every_row(tmp_path):
    """Two benchmark images, 3 steps: every variant runs (avx2 in a subprocess), and the pieces and areas
    reported agree with the maps the command saved."""
    pytest.importorskip("captum")
    compare = load_script("benchmarks/compare_methods.py")
    stability = load_script("benchmarks/stability.py")
    dump = tmp_path / "maps.pt"
    argv = ["--n", "2", "--methods", "neuromask,saliency", "--presets", "default", "--steps-list", "3"]
    result = compare.main(argv + ["--stability", "all", "--dump-maps", str(dump), "--out", str(tmp_path / "r.json")])
    maps = torch.load(dump)
    rows = {row["name"]: row for row in result["rows"]}
    mask_row, saliency_row = rows["neuromask:default@3"], rows["saliency"]
    masks = maps["neuromask:default@3"] > stability.THRESHOLD
    assert mask_row["stability"]["pieces"] == stability.count_pieces(masks).tolist()
    for variant in stability.VARIANTS:  # every variant of a NeuroMask row is measured
        assert 0.0 <= mask_row["stability"][variant]["iou_worst"] <= mask_row["stability"][variant]["iou_mean"] <= 1
    # The saliency map keeps the top-k pixels, k the NeuroMask mask's share: the same area.
    assert saliency_row["stability"]["area_mean"] == pytest.approx(mask_row["stability"]["area_mean"], abs=1 / 4096)
    assert "plain" not in saliency_row["stability"] and "avx2" in saliency_row["stability"]
