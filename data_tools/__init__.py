"""Offline dataset building: phantoms, source layouts, NIfTI -> HDF5 shards, integrity checks, splits."""
