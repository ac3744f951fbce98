"""TEMPORARY during the redesign: removed when metrics/ lands."""
from neuromask_pl.data.checks import check_images, frozen  # noqa: F401
