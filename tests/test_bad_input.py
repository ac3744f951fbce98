"""Bad input gives a clear error before any optimisation, or a per-sample failure; never a silent wrong result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuromask_pl import NeuroMask


class Returns(nn.Module):
    """A 'classifier' whose output is fixed by a function of the input (to test what NeuroMask accepts)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda z: z.softmax(-1), "probabilities"),
        (lambda z: z[:, :1], "column"),
        (lambda z: z * float("nan"), "NaN or inf logits"),
        (lambda z: torch.cat([z[:1], z[1:] + float("inf")]), r"NaN or inf logits for image\(s\) \[1\]"),
        (lambda z: {"logits": z}, "B x K"),
    ],
    ids=["probabilities", "one-column", "nan", "inf", "dict"],
)
def test_classifier_outputs_that_are_not_logits_are_refused_before_optimising(fn, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        NeuroMask(Returns(fn), steps=2).explain(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 2.5}, TypeError, "steps must be int"),
        ({"steps": True}, TypeError, "steps must be int"),
        ({"steps": "10"}, TypeError, "steps must be int"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"settings": {"lr": float("inf")}}, ValueError, "lr must be a finite number"),
        ({"settings": {"temperature": float("inf")}}, ValueError, "temperature must be a finite number"),
        ({"settings": {"lr": float("nan")}}, ValueError, "lr must be a finite number"),
    ],
)
def test_settings_are_checked_by_type_and_range_at_construction(tiny_cnn, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        NeuroMask(tiny_cnn, **kwargs)


def test_targets_and_ids_must_be_whole_numbers(tiny_cnn, image_factory) -> None:
    images = image_factory(2)
    explainer = NeuroMask(tiny_cnn, steps=2)
    with pytest.raises(ValueError, match="targets must be whole numbers"):
        explainer.explain(images, targets=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="ids must be whole numbers"):
        explainer.explain(images, ids=torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        explainer.explain(images, ids=[-1, 2])
    assert explainer.explain(images, targets=torch.tensor([1.0, 2.0]), ids=[3.0, 4.0]).targets.tolist() == [1, 2]


def test_images_must_have_the_classifiers_channels_and_float_type(tiny_cnn, image_factory) -> None:
    explainer = NeuroMask(tiny_cnn, steps=2)
    with pytest.raises(ValueError, match=r"1 channel\(s\) but the classifier takes 3 \(RGB\).*channels=3"):
        explainer.explain(image_factory(2, channels=1))
    with pytest.raises(ValueError, match=r"torch.float64 but the classifier's weights are torch.float32.*images.to"):
        explainer.explain(image_factory(2).double())


def test_cpu_out_of_memory_splits_the_batch_like_cuda(tiny_cnn, image_factory, monkeypatch) -> None:
    import neuromask_pl.module as module

    # float64: chunks of other sizes may sum in another order; float64 rounding stays far below the tolerance
    tiny_cnn, images = tiny_cnn.double(), image_factory(5).double()
    expected = NeuroMask(tiny_cnn, steps=4).explain(images)
    real = module.learn_masks
    sizes = []

    def tight_memory(classifier, images, *args, **kwargs):
        sizes.append(len(images))
        if len(images) > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(classifier, images, *args, **kwargs)

    monkeypatch.setattr(module, "learn_masks", tight_memory)
    explainer = NeuroMask(tiny_cnn, steps=4)
    got = explainer.explain(images)
    assert sizes[:2] == [5, 3] and explainer.max_chunk == 2
    torch.testing.assert_close(got.masks, expected.masks, rtol=0, atol=1e-9)

    def failing(message: str):
        def learn(*args, **kwargs):
            raise RuntimeError(message)

        return learn

    monkeypatch.setattr(module, "learn_masks", failing("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(MemoryError, match="one image alone"):
        NeuroMask(tiny_cnn, steps=4).explain(images[:1])
    monkeypatch.setattr(module, "learn_masks", failing("an internal bug"))
    with pytest.raises(RuntimeError, match="an internal bug"):  # other runtime errors are not taken for memory
        NeuroMask(tiny_cnn, steps=4).explain(images)
