"""The research workflow: comparing runs (:mod:`.compare`) and sweeping configs (:mod:`.sweep`)."""
