"""Lightning callbacks: every side effect of a run (writing, logging, explaining during training) lives here."""

from neuromask_pl.callbacks.logger import ExplanationLogger
from neuromask_pl.callbacks.training import ExplainDuringTraining
from neuromask_pl.callbacks.writer import MaskWriter

__all__ = ["ExplainDuringTraining", "ExplanationLogger", "MaskWriter"]
