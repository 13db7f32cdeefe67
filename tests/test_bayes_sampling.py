"""Batched posterior sampling: seeding, independence from K, batched = serial, per-member rollouts."""

from __future__ import annotations

import pytest
import torch
from test_bayes_posterior import deterministic
from test_models_transformer import inputs

from bdlens.bayes.posterior import PosteriorSettings, from_deterministic
from bdlens.bayes.sampling import PosteriorEnsemble, forward_members, forward_sample, sample_weights
from bdlens.models import EarthSpecificTransformer, rollout


@pytest.fixture(scope="module")
def bayes():
    return from_deterministic(deterministic(), PosteriorSettings(init_sigma_scale=0.05))


def test_member_weights_do_not_depend_on_how_many_are_drawn(bayes):
    four, many = sample_weights(bayes, 4, seed=11), sample_weights(bayes, 32, seed=11)
    assert torch.equal(four, many[:4])
    assert torch.equal(sample_weights(bayes, [2, 30], seed=11), many[[2, 30]])
    upper, surface, _ = inputs(bayes.config, batch=2)
    with torch.no_grad():
        out4, out32 = forward_members(bayes, four, upper, surface), forward_members(bayes, many, upper, surface)
    for a, b in zip(out4, out32, strict=True):
        torch.testing.assert_close(a, b[:4], rtol=1e-5, atol=1e-6)


def test_same_seed_identical_different_samples_differ(bayes):
    upper, surface, _ = inputs(bayes.config)
    with torch.no_grad():
        a = forward_members(bayes, sample_weights(bayes, 3, seed=5), upper, surface)
        b = forward_members(bayes, sample_weights(bayes, 3, seed=5), upper, surface)
        c = forward_members(bayes, sample_weights(bayes, 3, seed=6), upper, surface)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for out in (a, c):
        # member 0 vs 1 of a seed, and seed 5 vs seed 6, differ by far more than rounding
        assert (out[0][0] - out[0][1]).abs().max() > 1e-3
    assert (a[0][0] - c[0][0]).abs().max() > 1e-3
    # the draws really are θ = μ + σ ε with standard normal ε
    eps = (sample_weights(bayes, 8, seed=5) - bayes.posterior.mu) / bayes.posterior.sigma
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01


def test_batched_pass_equals_serial_functional_passes_and_loaded_models(bayes):
    upper, surface, _ = inputs(bayes.config, batch=2, seed=3)
    weights = sample_weights(bayes, 4, seed=0)
    with torch.no_grad():
        batched = forward_members(bayes, weights, upper, surface)
        for k, theta in enumerate(weights):
            serial = forward_sample(bayes, theta, upper, surface)
            # an ordinary module with member k's weights loaded is an independent reference
            member = EarthSpecificTransformer(bayes.config).eval()
            member.load_state_dict({**bayes.base.state_dict(), **bayes.posterior.unflatten(theta)})
            reference = member(upper, surface)
            for got, a, b in zip(batched, serial, reference, strict=True):
                torch.testing.assert_close(got[k], a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got[k], b, rtol=1e-5, atol=1e-6)


def test_ensemble_rollout_keeps_each_members_weights_for_the_whole_rollout(bayes):
    upper, surface, _ = inputs(bayes.config, batch=1, seed=4)
    history = {-6: (upper[:, 0], surface[:, 0]), 0: (upper[:, 1], surface[:, 1])}
    ensemble = PosteriorEnsemble(bayes, 3, seed=2)
    with torch.no_grad():
        states = dict(rollout({6: ensemble.step}, history, [6, 12, 18]))
        for k, theta in enumerate(ensemble.weights):
            member = EarthSpecificTransformer(bayes.config).eval()
            member.load_state_dict({**bayes.base.state_dict(), **bayes.posterior.unflatten(theta)})
            ref = dict(rollout({6: member.step}, history, [6, 12, 18]))
            for lead in (6, 12, 18):
                assert states[lead][0].shape == (3, *ref[lead][0].shape)
                torch.testing.assert_close(states[lead][0][k], ref[lead][0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(states[lead][1][k], ref[lead][1], rtol=1e-4, atol=1e-5)
