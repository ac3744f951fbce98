"""The fast copy of a frozen classifier, as named passes (see :mod:`.passes`).

- :mod:`.options`: :class:`FastPath`, the switches;
- :mod:`.surgery`: finding layers, recording their inputs, the rule for when a replacement computes;
- :mod:`.folding`: BatchNorm folded into the layer beside it;
- :mod:`.packed`: convolutions and Linear layers with weights packed for oneDNN and no weight gradient;
- :mod:`.invariant`: layers and a graph pass that make an image's result the same in any batch;
- :mod:`.passes`: the table of layer passes and the orchestrator that runs them;
- :mod:`.autotune`: timing copies against each other;
- :mod:`.copies`: :class:`FastCopies`, which builds, checks, caches and reports the copy that runs.
"""

from neuromask_pl.fastcopy.copies import FastCopies
from neuromask_pl.fastcopy.folding import fold_batchnorm, is_batchnorm
from neuromask_pl.fastcopy.options import FastPath
from neuromask_pl.fastcopy.passes import PASSES, LayerPass, PassRecord, apply_passes

__all__ = ["PASSES", "FastCopies", "FastPath", "LayerPass", "PassRecord", "apply_passes", "fold_batchnorm",
           "is_batchnorm"]  # fmt: skip
