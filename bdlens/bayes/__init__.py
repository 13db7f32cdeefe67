"""Variational Bayesian 3DEST (SPEC §4): mean-field posterior, batched weight sampling, VI post-training."""
