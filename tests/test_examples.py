"""The training example runs end to end with the current API (it broke silently once, when a helper moved)."""

from __future__ import annotations

from helpers import load_script
from PIL import Image


def test_train_with_explanations_trains_explains_and_writes_the_grid(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # its TensorBoard logs go to ./lightning_logs
    example = load_script("examples/train_with_explanations.py")
    example.main(["--epochs", "1", "--steps", "5", "--num-images", "3", "--output", str(tmp_path / "grid")])
    out = capsys.readouterr().out
    assert "explained 3 images at the end" in out and "'preservation_rate'" in out
    (grid,) = (tmp_path / "grid").glob("overlays_epoch0.png")
    assert Image.open(grid).size[1] >= 3 * 3 * 32  # 3 panels of 32 px digits, stacked, drawn 3x
    assert list((tmp_path / "lightning_logs").glob("version_0/events.out.tfevents.*"))
