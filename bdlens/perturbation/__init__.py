"""Aleatoric perturbations (SPEC §5): random patterns on the sphere, SPPT on the network tendency,
initial-condition perturbations."""
