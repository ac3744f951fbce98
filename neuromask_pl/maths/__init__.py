"""The mathematics of mask learning, pure torch: the mask (:mod:`.mask`), the loss terms (:mod:`.losses`), the
mask step with its gradient written out (:mod:`.explicit`) and the inner loop (:mod:`.optimize`)."""
