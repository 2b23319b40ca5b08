"""Evaluation: metrics on label maps, the ``evaluate`` command, its summary and Bland-Altman plot."""
