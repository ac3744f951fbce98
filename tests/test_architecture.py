"""The import rules of docs/architecture.md hold: the contracts in setup.cfg, checked by import-linter."""

from __future__ import annotations

import configparser
import logging

from helpers import REPO
from importlinter import cli


def test_the_import_contracts_are_kept() -> None:
    # lint_imports configures logging with logging.config.dictConfig, which disables every logger that exists
    # (the package's among them, so later tests would capture no log records): their states are put back.
    loggers = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    disabled = [logger.disabled for logger in loggers]
    try:
        assert cli.lint_imports(config_filename=str(REPO / "setup.cfg")) == cli.EXIT_STATUS_SUCCESS
    finally:
        for logger, was_disabled in zip(loggers, disabled):
            logger.disabled = was_disabled


def test_every_package_module_is_in_a_layer() -> None:
    """A new top-level module or package must be placed in the layers (else no rule covers it)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    layers = config["importlinter:contract:layers"]["layers"].replace("|", "\n").split()
    placed = {name.removeprefix("neuromask_pl.") for name in layers}
    package = REPO / "neuromask_pl"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    assert modules - placed == set()
