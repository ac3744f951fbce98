"""TEMPORARY during the redesign: removed when metrics/ lands."""
from neuromask_pl.maths.mask import apply_mask, make_baseline  # noqa: F401
