"""Pre-training: SimCLR on a sample index."""
