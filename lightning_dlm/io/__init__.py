"""Files: the checkpoint and export format (:mod:`.format`), reading that runs no code
(:mod:`.safe_read`, :mod:`.tokenizer_files`), one loader registry (:mod:`.loaders`) and the export
writer (:mod:`.export`). It knows file layouts, not models: ``DiffusionModel.from_pretrained``
assembles the model from what a loader read (:mod:`lightning_dlm.model.pretrained`)."""
