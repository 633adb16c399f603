"""The research workflow: comparing runs (:mod:`.compare`), sweeping configs (:mod:`.sweep`), and
analysing a checkpoint (:mod:`.analysis`, figures in :mod:`.plots`; used by ``notebooks/``)."""
