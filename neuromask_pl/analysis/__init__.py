"""Dataset-level analysis of a classifier's strategies (Spectral Relevance Analysis over the masks of a job): which
regions each class's explanations rest on, how many distinct strategies a class has, and which small, tight
clusters look like shortcuts ("Clever Hans" predictors).

Modules:

- :mod:`~neuromask_pl.analysis.features`: masks read from a store and averaged to one grid.
- :mod:`~neuromask_pl.analysis.spray`: the kNN graph, spectral embedding, eigengap, k-means, 2-D layout.
- :mod:`~neuromask_pl.analysis.exact`: exact kNN, k-means and t-SNE in numpy for a class's small arrays.
- :mod:`~neuromask_pl.analysis.strategies`: a cluster's statistics and its shortcut suspicion.
- :mod:`~neuromask_pl.analysis.analyze`: :func:`analyze` and :class:`StrategyAnalysis` (CSV, JSON files).
- :mod:`~neuromask_pl.analysis.report`: the self-contained ``report.html``.
- :mod:`~neuromask_pl.analysis.projector`: TensorBoard (projector, mean masks, statistics); needs torch.
- :mod:`~neuromask_pl.analysis.command`: ``neuromask-pl analyze`` (and ``python -m neuromask_pl.analysis``).
- :mod:`~neuromask_pl.analysis.synthetic`: stores of generated masks with planted cues, for tests and benchmarks.

No torch outside ``projector``: the analysis runs on numpy, scipy and scikit-learn.
"""

from neuromask_pl.analysis.analyze import ANALYSIS_DIR, SUSPICIOUS, StrategyAnalysis, analyze, find_store

__all__ = ["ANALYSIS_DIR", "SUSPICIOUS", "StrategyAnalysis", "analyze", "find_store"]
