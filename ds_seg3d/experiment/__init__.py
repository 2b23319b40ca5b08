"""Experiments: named comparisons (``comparisons``), what they hold (``spec``), how one runs (``run``)
and the markdown section it writes (``markdown``)."""
