"""Trainers on one loop (:mod:`bdlens.training.loop`): deterministic 3DEST, variational post-training,
learned perturbation and the diffusion baseline, one module per objective."""
