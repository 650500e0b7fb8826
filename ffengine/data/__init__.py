"""Data: the sample index, shards, adapters, augmentations and the bundled demo data."""
