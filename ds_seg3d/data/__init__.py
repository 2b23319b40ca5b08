"""Shards (schema, reader), patch sampling, augmentation and pipeline-aware loaders."""
