"""Mean-field posterior: σ = 0 limit, closed-form KL, parameter selections, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_models_transformer import inputs, tiny_config

from bdlens.bayes.posterior import (
    MeanFieldPosterior,
    PosteriorSettings,
    from_deterministic,
    inverse_softplus,
    load_posterior,
    save_posterior,
)
from bdlens.bayes.sampling import forward_members, forward_sample, sample_weights
from bdlens.checkpoint import save_checkpoint
from bdlens.errors import BdlensError
from bdlens.models import EarthSpecificTransformer


def deterministic(seed: int = 0, **overrides) -> EarthSpecificTransformer:
    torch.manual_seed(seed)
    return EarthSpecificTransformer(tiny_config(residual=True, **overrides)).eval()


def test_sigma_zero_reproduces_the_deterministic_model_exactly():
    model = deterministic()
    bayes = from_deterministic(model)
    with torch.no_grad():
        bayes.posterior.rho.fill_(-torch.inf)  # softplus(−inf) = 0: σ = 0
        upper, surface, _ = inputs(model.config, batch=2)
        reference = model(upper, surface)
        weights = sample_weights(bayes, 3, seed=7)
        single = forward_sample(bayes, weights[2], upper, surface)
        batched = forward_members(bayes, weights, upper, surface)
    assert torch.equal(weights, bayes.posterior.mu.expand(3, -1))
    for got, want in zip(single, reference, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(batched, reference, strict=True):
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-6, atol=1e-6)


def test_initialisation_mu_is_pretrained_and_sigma_is_a_fraction_of_each_tensors_rms():
    model = deterministic()
    bayes = from_deterministic(model, PosteriorSettings(init_sigma_scale=1e-3))
    post = bayes.posterior
    mu, sigma = post.unflatten(post.mu), post.unflatten(post.sigma.detach())
    for name, p in model.named_parameters():
        assert torch.equal(mu[name], p)
        rms = p.detach().square().mean().sqrt().item() or 1.0  # zero-initialised biases: scale 1
        torch.testing.assert_close(sigma[name], torch.full_like(p, 1e-3 * rms), rtol=1e-4, atol=0)
    # the prior is centred on the pretrained weights by default
    assert torch.equal(post.prior().mean, post.mu.detach())


@pytest.mark.parametrize("centre", ["pretrained", "zero"])
def test_closed_form_kl_matches_formula_and_torch_kl_divergence(centre):
    g = torch.Generator().manual_seed(3)
    n = 1000
    mu, rho, loc = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    prior_sigma = 0.3
    post = MeanFieldPosterior(["w"], [torch.Size([n])], mu, rho, loc if centre == "pretrained" else None, prior_sigma)
    sigma = torch.log1p(torch.exp(rho))
    m_p = loc if centre == "pretrained" else torch.zeros(n, dtype=torch.float64)
    # Textbook KL(N(μ,σ²) ‖ N(m,s²)) = log(s/σ) + (σ² + (μ − m)²) / (2 s²) − 1/2, summed over weights.
    formula = (torch.log(prior_sigma / sigma) + (sigma**2 + (mu - m_p) ** 2) / (2 * prior_sigma**2) - 0.5).sum()
    torch_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(m_p, torch.full_like(m_p, prior_sigma))
    ).sum()
    kl = post.kl()
    torch.testing.assert_close(kl, formula, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(kl, torch_kl, rtol=1e-12, atol=1e-9)
    # and a Monte-Carlo estimate E_q[log q − log p] agrees within its sampling error
    theta = post.distribution().sample((4000,))
    mc = post.distribution().log_prob(theta) - post.prior().log_prob(theta)
    assert abs(mc.mean() - kl) < 4 * mc.std() / 4000**0.5


def test_selections_pick_the_named_parameters():
    model = deterministic()
    names = dict(model.named_parameters())
    att = from_deterministic(model, PosteriorSettings(parameters="attention_mlp")).posterior.names
    assert att and all(".attn." in n or ".mlp." in n for n in att)
    assert set(att) == {n for n in names if ".attn." in n or ".mlp." in n}
    last = from_deterministic(model, PosteriorSettings(parameters="last_stages")).posterior.names
    assert set(last) == {n for n in names if n.startswith(("decoder1.", "recovery."))}
    assert from_deterministic(model).posterior.names == list(names)
    custom = from_deterministic(model, PosteriorSettings(parameters=["embed.*"])).posterior
    assert custom.size == sum(p.numel() for n, p in names.items() if n.startswith("embed."))
    with pytest.raises(BdlensError, match="no parameter name matches"):
        from_deterministic(model, PosteriorSettings(parameters=["nothing.*"]))
    with pytest.raises(ValueError, match="unknown selection"):
        PosteriorSettings(parameters="some")


def test_partial_posterior_leaves_the_other_weights_at_their_pretrained_values():
    model = deterministic()
    bayes = from_deterministic(model, PosteriorSettings(parameters="last_stages", init_sigma_scale=0.1))
    upper, surface, _ = inputs(model.config)
    theta = sample_weights(bayes, 1, seed=0)[0]
    reference = deterministic()
    with torch.no_grad():
        for name, value in bayes.posterior.unflatten(theta).items():
            reference.get_parameter(name).copy_(value)
        for got, want in zip(forward_sample(bayes, theta, upper, surface), reference(upper, surface), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("centre", ["pretrained", "zero"])
def test_save_load_round_trip(tmp_path, centre):
    model = deterministic()
    bayes = from_deterministic(model, PosteriorSettings(parameters="attention_mlp", prior_centre=centre, prior_sigma=0.05))
    with torch.no_grad():
        bayes.posterior.mu.add_(0.01)  # μ ≠ θ_pre, so the files must keep the prior mean apart
        bayes.posterior.rho.copy_(inverse_softplus(torch.rand(bayes.posterior.size) * 0.01))
    save_posterior(bayes, tmp_path, norm_stats={"key": "abc"})
    loaded, manifest = load_posterior(tmp_path)
    assert manifest["norm_stats"] == {"key": "abc"}
    assert json.loads((tmp_path / "manifest.json").read_text())["posterior"]["prior_centre"] == centre
    for a, b in ((loaded.posterior.mu, bayes.posterior.mu), (loaded.posterior.rho, bayes.posterior.rho)):
        assert torch.equal(a, b)
    torch.testing.assert_close(loaded.posterior.kl(), bayes.posterior.kl(), rtol=0, atol=0)
    assert torch.equal(sample_weights(loaded, 3, seed=1), sample_weights(bayes, 3, seed=1))
    # model.safetensors is a plain state dict of the posterior-mean model
    mean_model = EarthSpecificTransformer(model.config)
    mean_model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    mu = bayes.posterior.unflatten(bayes.posterior.mu)
    for name, p in mean_model.named_parameters():
        assert torch.equal(p, mu[name] if name in mu else model.get_parameter(name))


def test_load_rejects_directories_without_a_posterior(tmp_path):
    with pytest.raises(BdlensError, match="not a bdlens checkpoint"):
        load_posterior(tmp_path)
    save_checkpoint(tmp_path, deterministic().state_dict(), {"kind": "deterministic"})
    with pytest.raises(BdlensError, match="not a VI posterior"):
        load_posterior(tmp_path)
