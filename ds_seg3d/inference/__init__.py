"""Inference: sliding windows on one device or through a pipeline, and the ``predict`` command."""
