"""NeuroMask used as a submodule of another LightningModule (explaining inside its predict_step)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from neuromask_pl.explanation import Explanation
from neuromask_pl.module import NeuroMask


class ClassifyAndExplain(pl.LightningModule):
    """A user's module: classifies, and explains its own predictions in predict_step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.explainer = NeuroMask(self.net, preset="paper", steps=4, seed=3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def predict_step(self, batch, batch_idx: int) -> dict:
        (images,) = batch
        ids = torch.arange(len(images)) + batch_idx * 3
        return {"logits": self(images), "explanation": self.explainer.explain(images, ids=ids).cpu()}


def test_explaining_inside_another_modules_predict_step(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=3)
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    outputs = trainer_factory().predict(ClassifyAndExplain(tiny_cnn), loader)

    explanations = [o["explanation"] for o in outputs]
    assert all(isinstance(e, Explanation) for e in explanations)
    alone = NeuroMask(tiny_cnn, preset="paper", steps=4, seed=3).explain(images)
    torch.testing.assert_close(torch.cat([e.masks for e in explanations]), alone.masks, atol=1e-4, rtol=0)
    assert torch.cat([e.targets for e in explanations]).tolist() == alone.targets.tolist()
    assert all(torch.equal(v, before[k]) for k, v in tiny_cnn.state_dict().items())


def test_submodule_needs_inference_mode_off(tiny_cnn, image_factory, trainer_factory) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(image_factory(2)), batch_size=2)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer_factory(inference_mode=True).predict(ClassifyAndExplain(tiny_cnn), loader)
