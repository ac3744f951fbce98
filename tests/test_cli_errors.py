"""The `neuromask-pl` command on mistakes: exact option names, integer limits, short help, one-line errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from helpers import REPO, write_cli_config
from PIL import Image

from neuromask_pl.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    return write_cli_config(
        tmp_path / "tiny.yaml",
        images,
        steps=1,
        batch_size=2,
        trainer={"default_root_dir": str(tmp_path)},
        writer={"output_dir": str(tmp_path / "out")},
    )


def test_option_names_are_not_abbreviated(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(config), "--model.step", "1"])
    assert "--model.step" in capsys.readouterr().err


def test_integer_batch_limit_stays_an_integer(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # typing caches unions regardless of order: the Trainer's `int | float` can arrive float-first
    float_first = typing._UnionGenericAlias(typing.Union, (float, int, type(None)))  # type: ignore[attr-defined]
    monkeypatch.setitem(pl.Trainer.__init__.__annotations__, "limit_predict_batches", float_first)
    main(["predict", "--config", str(config), "--trainer.limit_predict_batches", "1"])
    rows = list(csv.DictReader(open(config.parent / "out" / "manifest.csv")))
    assert len(rows) == 2  # one batch of two of the three images


def test_help_is_short(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "torch.nn.Hardshrink" not in text and "neuromask_pl.FactoryClassifier" in text
    assert "--model.classifier.help CLASS" in " ".join(text.split()) and len(text.splitlines()) < 300
    assert "--trainer.accelerator" in text and "--trainer.max_epochs" not in text  # the common Trainer options
    with pytest.raises(SystemExit):
        main(["predict", "--help-all"])
    full = capsys.readouterr().out
    assert "--trainer.max_epochs" in full and len(full.splitlines()) > len(text.splitlines())


def test_options_left_out_of_the_help_are_accepted_and_recorded(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        demo = str(REPO / "configs" / "demo.yaml")
        main(["predict", "--config", demo, "--trainer.max_epochs", "3", "--print_config"])
    assert "max_epochs: 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--data.init_args.root", "/no/such/folder", "does not exist"),
        ("--data.init_args.image_size", "0", "image_size must be a positive"),
        ("--data.init_args.image_size", "4", "below this classifier's minimum of 32"),
        ("--trainer.accelerator", "gpu", "--trainer.accelerator gpu"),
    ],
)
def test_one_line_errors(config: Path, option: str, value: str, expected: str) -> None:
    if option == "--trainer.accelerator" and (pl.accelerators.CUDAAccelerator.is_available()):
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError) as error:
        main(["predict", "--config", str(config), option, value])
    message = str(error.value)
    assert expected in message and "\n" not in message and "Union" not in message


def test_entry_point_errors_are_one_line_and_project_classes_import(config: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "myclassifier.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)\n"
        "        self.fc = torch.nn.Linear(4, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = Path(sys.executable).with_name("neuromask-pl")
    run = subprocess.run(
        [
            str(script),
            "predict",
            "--config",
            str(config),
            "--model.classifier",
            "myclassifier.Tiny",
            "--trainer.limit_predict_batches",
            "1",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    bad = subprocess.run(
        [str(script), "predict", "--config", str(config), "--data.init_args.root", str(tmp_path / "nothing")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("neuromask-pl: error")]
    assert bad.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0]
    assert "Traceback" not in bad.stderr
