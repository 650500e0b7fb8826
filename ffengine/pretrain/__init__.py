"""Pre-training: SimCLR (:mod:`.simclr`) and CLIP (:mod:`.clip`) on a sample index, sharing
one epoch loop and resume logic (:mod:`.loop`)."""
