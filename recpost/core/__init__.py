"""Contracts every layer shares, each defined once: the user-facing error (``errors``), the batch keys and
shapes (``batch``) and the run-folder layout (``runs``). Nothing here imports another part of recpost."""
