"""Every shipped config parses against the CLI (types and class paths checked, nothing run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuromask_pl.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "folder_torchvision.yaml", "checkpoint.yaml", "multi_gpu.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", ["predict", "test"])
def test_config_parses(config: Path, stage: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
