"""Fast implementations of the losses' hot paths: the fused per-anchor focal loss (:mod:`.focal`) and its
native CPU kernel (:mod:`.native`, C source in ``csrc/``)."""
