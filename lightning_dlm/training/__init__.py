"""Training: the thin LightningModule (:mod:`.module`), its callbacks, checkpoint io, resume checks,
the optimiser, the distributed helpers and the Lightning CLI class (:mod:`.cli`)."""
