"""neuromask_pl.data.batch, the batch format: how samples are collated and how NeuroMask reads a batch."""

from __future__ import annotations

import pytest
import torch

from neuromask_pl.data import collate_samples, unpack_batch


def test_collate_samples_stacks_the_readable_and_lists_the_rest() -> None:
    first, last = torch.zeros(3, 4, 5), torch.ones(3, 4, 5)
    samples = [
        {"index": 7, "image": first, "label": 2, "path": "a.png"},
        {"index": 8, "label": 0, "path": "b.png", "error": "OSError: truncated"},
        {"index": 9, "image": last, "label": 1, "path": "c.png"},
    ]
    batch = collate_samples(samples)
    assert torch.equal(batch["image"], torch.stack([first, last]))
    assert batch["index"].tolist() == [7, 9] and batch["index"].dtype == torch.long
    assert batch["label"].tolist() == [2, 1] and batch["path"] == ["a.png", "c.png"]
    assert batch["skipped"] == [{"index": 8, "path": "b.png", "error": "OSError: truncated"}]


def test_collate_samples_of_an_all_unreadable_batch() -> None:
    # Without a crop size the empty image tensor is (0, 3, 0, 0); labels stay present and empty.
    marker = {"index": 5, "path": "p.png", "label": 1, "error": "OSError: broken"}
    batch = collate_samples([marker])
    assert batch["image"].shape == (0, 3, 0, 0) and batch["label"].shape == (0,)
    assert batch["skipped"] == [{"index": 5, "path": "p.png", "error": "OSError: broken"}]


def test_collate_samples_refuses_images_of_different_shapes() -> None:
    samples = [{"index": 0, "image": torch.zeros(3, 4, 4)}, {"index": 1, "image": torch.zeros(3, 4, 5)}]
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 4, 4\), \(3, 4, 5\)\].*batch_size=1"):
        collate_samples(samples)


def test_unpack_batch_reads_dicts_pairs_and_tensors() -> None:
    images, labels = torch.rand(2, 3, 4, 4), torch.tensor([1, 0])
    batch = {"image": images, "label": labels, "index": torch.tensor([5, 6]), "path": ["a", "b"], "skipped": []}
    got = unpack_batch(batch)
    assert got[0] is images and got[1] is labels and got[2].tolist() == [5, 6] and got[3:] == (["a", "b"], [])
    assert unpack_batch({"image": images})[1:] == (None, None, None, [])
    for pair in ((images, labels), [images, labels]):
        got = unpack_batch(pair)
        assert got[0] is images and got[1] is labels and got[2:] == (None, None, [])
    assert unpack_batch([images])[1:] == (None, None, None, [])  # a TensorDataset of images alone
    assert unpack_batch(images)[0] is images and unpack_batch(images)[1:] == (None, None, None, [])


def test_unpack_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"needs an 'image' entry, got keys \['img'\]"):
        unpack_batch({"img": torch.rand(1, 3, 4, 4)})
    with pytest.raises(TypeError, match="got list"):
        unpack_batch([[0.5, 0.5]])
