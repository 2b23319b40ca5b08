"""Memory: the planner (``plan``), its calibration and prediction, and the measured sweep (``bench memory``)."""
