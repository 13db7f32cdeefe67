"""Trainers: deterministic 3DEST (this package); the variational post-training lives in ``bdlens.bayes``."""
