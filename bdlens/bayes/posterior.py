"""Mean-field Gaussian posterior over chosen 3DEST weights (docs/science.md §4), and its save/load format.

q(θ) = N(μ, diag σ²), σ = softplus(ρ), over the parameters that a selection picks (all of them,
attention + MLP only, the last stages only, or fnmatch patterns of parameter names); every other
parameter stays at its pretrained value. Post-training starts from the deterministic weights:
μ = θ_pre and σ = ``init_sigma_scale`` × RMS of each parameter tensor (1 for an all-zero tensor),
so that the initial noise is the same small fraction of every layer's own scale. The prior is
N(θ_pre, σ_p² I) (``prior_centre="pretrained"``, the default) or N(0, σ_p² I) (``"zero"``).

The chosen parameters live in one flat vector of P entries (in ``named_parameters`` order), so one
pyro sample site, one KL and one ``randn`` per weight sample cover the whole model.

**Modes.** A posterior may also hold C − 1 further *modes*: the weights of other independently
trained deterministic models of the same configuration. q is then the equal-weight mixture
(1/C) Σ_c N(m_c, diag σ²) with m_0 = μ and σ shared (tied) by every component; weight sample k
belongs to component k mod C. Independently trained networks sit in different basins of the loss,
and their differences are the part of the epistemic uncertainty that a Gaussian around one basin
cannot represent (a deep ensemble; a mixture of Gaussians around several solutions is the
"MultiSWAG" construction of Wilson & Izmailov 2020). σ is learned by VI at m_0 only and used at
every mode (docs/science.md §4, "Modes"), which keeps one σ per weight on disk. Modes are not
trained: :func:`with_modes` adds them to a post-trained posterior.

On disk a posterior is a directory: ``model.safetensors`` holds the deterministic model's state
dict with μ in place of the Bayesian weights (so it loads as the posterior-mean model),
``posterior.safetensors`` holds ``rho.<name>`` and, for a pretrained-centred prior, the prior mean
``prior_mean.<name>`` (unless it equals μ) and ``mode<c>.<name>`` for the modes c = 1 … C − 1
(their sources in ``posterior.modes``); ``manifest.json`` holds the model config, the
posterior settings and the normalisation statistics it was trained with. A bundled posterior whose
prior mean is the weights of a bundled deterministic model names that bundle instead
(``posterior.prior_mean_bundle``, see :func:`without_bundled_prior_mean`), so the package does not
ship the same 1.2 M weights twice.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdlens.checkpoint import bundled_checkpoint, load_state_into, load_weights, read_manifest, require_fields, save_checkpoint
from bdlens.errors import BdlensError, validation_error
from bdlens.models import EarthSpecificTransformer, ModelConfig

KIND = "vi"  # the manifest's "kind", beside bdlens.checkpoint's "deterministic"
FORMAT_VERSION = 1
POSTERIOR_WEIGHTS = "posterior.safetensors"
PRIOR_MEAN = "prior_mean."
PRIOR_MEAN_BUNDLE = "prior_mean_bundle"  # manifest["posterior"] key: the bundled checkpoint holding the prior mean
MODES = "modes"  # manifest["posterior"] key: where each further mode came from
MODE = "mode{}."  # posterior.safetensors prefix of mode c's weights (c ≥ 1)

# Named parameter selections of docs/science.md §4 as fnmatch patterns over `named_parameters` names.
SELECTIONS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "attention_mlp": ("*.attn.*", "*.mlp.*"),
    "last_stages": ("decoder1.*", "recovery.*"),
}


class PosteriorSettings(BaseModel):
    """Which parameters are Bayesian, how σ starts and what the prior is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parameters: str | tuple[str, ...] = "all"
    init_sigma_scale: float = Field(default=1e-4, gt=0)
    prior_centre: Literal["pretrained", "zero"] = "pretrained"
    prior_sigma: float = Field(default=1e-2, gt=0)

    @field_validator("parameters")
    @classmethod
    def _known(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, str) and value not in SELECTIONS:
            raise ValueError(f"unknown selection {value!r}; use one of {sorted(SELECTIONS)} or a list of name patterns")
        if not isinstance(value, str) and not value:
            raise ValueError("the list of parameter name patterns is empty")
        return value

    def patterns(self) -> tuple[str, ...]:
        """The fnmatch patterns of the selection."""
        return SELECTIONS[self.parameters] if isinstance(self.parameters, str) else tuple(self.parameters)


def select_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the trainable parameters of ``model`` matching any fnmatch pattern, in model order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not names:
        raise BdlensError(f"no parameter name matches {list(patterns)}; names look like {next(iter(dict(model.named_parameters())))!r}")
    return names


def inverse_softplus(sigma: Tensor) -> Tensor:
    """ρ with softplus(ρ) = σ (σ > 0); σ = 0 maps to −inf."""
    return torch.where(sigma > 20, sigma, torch.log(torch.expm1(sigma)))


class MeanFieldPosterior(nn.Module):
    """q(θ) = N(μ, diag softplus(ρ)²) over a flat vector of P chosen weights, with its prior.

    ``names``/``shapes`` say how the flat vector splits into the model's parameter tensors.
    ``prior_loc`` (P,) is the prior mean (None: zero), ``prior_sigma`` σ_p; ``modes`` (C − 1, P) are
    the further mixture components' locations (module docstring; None: C = 1). The KL and
    :meth:`distribution` are those of the component at μ, the one VI trains.
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        mu: Tensor,
        rho: Tensor,
        prior_loc: Tensor | None,
        prior_sigma: float,
        modes: Tensor | None = None,
        mode_sources: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        if mu.shape != (sum(self.numels),) or rho.shape != mu.shape:
            raise BdlensError(f"μ and ρ must have shape ({sum(self.numels)},) for these parameters, got {tuple(mu.shape)}, {tuple(rho.shape)}")
        self.mu = nn.Parameter(mu.detach().clone())
        self.rho = nn.Parameter(rho.detach().clone())
        self.prior_sigma = float(prior_sigma)
        self.register_buffer("prior_loc", torch.zeros((), dtype=mu.dtype) if prior_loc is None else prior_loc.detach().clone())
        self.prior_centred = prior_loc is not None
        if modes is not None and (modes.ndim != 2 or modes.shape[1] != mu.shape[0] or modes.shape[0] == 0):
            raise BdlensError(f"modes must have shape (C - 1, {mu.shape[0]}) with C ≥ 2, got {tuple(modes.shape)}")
        self.register_buffer("modes", torch.zeros((0, mu.shape[0]), dtype=mu.dtype) if modes is None else modes.detach().clone().to(mu.dtype))
        self.mode_sources = [str(x) for x in mode_sources]  # where modes 1 … C − 1 came from (the manifest's posterior.modes)

    @property
    def components(self) -> int:
        """C, the number of mixture components (1 for a single Gaussian)."""
        return 1 + self.modes.shape[0]

    def locations(self, samples: Sequence[int]) -> Tensor:
        """The location of weight sample k's component, m_{k mod C}, for each k: shape (K, P)."""
        locs = torch.cat([self.mu.detach()[None], self.modes])
        return locs[torch.as_tensor([k % self.components for k in samples], dtype=torch.long, device=locs.device)]

    @property
    def size(self) -> int:
        """P, the number of Bayesian weights."""
        return self.mu.numel()

    @property
    def sigma(self) -> Tensor:
        """σ = softplus(ρ), shape (P,)."""
        return F.softplus(self.rho)

    def distribution(self) -> dist.Distribution:
        """q(θ) as a pyro distribution with event shape (P,)."""
        return dist.Normal(self.mu, self.sigma).to_event(1)

    def prior(self) -> dist.Distribution:
        """p(θ) = N(prior_loc, σ_p² I) as a pyro distribution with event shape (P,)."""
        loc = self.prior_loc.expand(self.size)
        return dist.Normal(loc, torch.full_like(loc, self.prior_sigma)).to_event(1)

    def kl(self) -> Tensor:
        """Closed-form KL(q ‖ p) in nats (scalar), summed over the P weights."""
        return torch.distributions.kl_divergence(self.distribution(), self.prior())

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split flat weights (..., P) into ``{name: (..., *shape)}`` views for ``functional_call``."""
        lead = flat.shape[:-1]
        return {
            name: part.view(*lead, *shape)
            for name, part, shape in zip(self.names, torch.split(flat, self.numels, dim=-1), self.shapes, strict=True)
        }


class BayesianTransformer(nn.Module):
    """A deterministic 3DEST (``base``, frozen) with a mean-field posterior over some of its weights.

    ``base`` keeps θ_pre; a weight sample θ (P,) replaces the chosen parameters in a functional call
    (see :mod:`bdlens.bayes.sampling`). ``settings`` records how the posterior was set up.
    """

    def __init__(self, base: EarthSpecificTransformer, posterior: MeanFieldPosterior, settings: PosteriorSettings) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.posterior = posterior
        self.settings = settings

    @property
    def config(self) -> ModelConfig:
        """The backbone's configuration."""
        return self.base.config

    def mean_state_dict(self) -> dict[str, Tensor]:
        """The backbone's state dict with μ in place of the Bayesian weights (the posterior-mean model)."""
        state = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.posterior.unflatten(self.posterior.mu).items()})
        return state


def from_deterministic(
    model: EarthSpecificTransformer, settings: PosteriorSettings | None = None
) -> BayesianTransformer:
    """A Bayesian 3DEST initialised from a trained deterministic one: μ = θ_pre, σ = scale × RMS(θ_pre).

    The deterministic ``model`` is copied, not modified.
    """
    settings = settings or PosteriorSettings()
    base = EarthSpecificTransformer(model.config)
    base.load_state_dict(model.state_dict())
    base.eval()
    names = select_parameters(base, settings.patterns())
    params = [base.get_parameter(n).detach() for n in names]
    mu = torch.cat([p.reshape(-1) for p in params])
    sigma = torch.cat([
        torch.full((p.numel(),), settings.init_sigma_scale * (float(p.square().mean().sqrt()) or 1.0), dtype=p.dtype)
        for p in params
    ])
    prior_loc = mu if settings.prior_centre == "pretrained" else None
    posterior = MeanFieldPosterior(names, [p.shape for p in params], mu, inverse_softplus(sigma), prior_loc, settings.prior_sigma)
    return BayesianTransformer(base, posterior.to(mu.device), settings)


def with_modes(bayes: BayesianTransformer, models: Sequence[EarthSpecificTransformer], sources: Sequence[str]) -> BayesianTransformer:
    """``bayes`` with the weights of ``models`` (other trained 3DESTs of the same configuration) as
    modes 1 … C − 1 of a mixture posterior (module docstring); ``sources`` says where each came from.

    μ, σ and the prior are kept; any modes ``bayes`` had are replaced. ``bayes`` is not modified."""
    post = bayes.posterior
    if not models or len(models) != len(sources):
        raise BdlensError(f"give one source per mode: {len(models)} models, {len(sources)} sources")
    for model, source in zip(models, sources, strict=True):
        if model.config != bayes.config:
            raise BdlensError(f"mode {source} has another model configuration than the posterior; its modes must be the same 3DEST trained again")
    modes = torch.stack([torch.cat([model.get_parameter(n).detach().reshape(-1) for n in post.names]) for model in models])
    prior_loc = post.prior_loc.expand(post.size) if post.prior_centred else None
    mixture = MeanFieldPosterior(post.names, post.shapes, post.mu, post.rho, prior_loc, post.prior_sigma, modes.to(post.mu.device), sources)
    return BayesianTransformer(bayes.base, mixture, bayes.settings)


def save_posterior(
    bayes: BayesianTransformer, directory: str | Path, norm_stats: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` (μ: the posterior mean, or mode 0 of a mixture) and ``manifest.json``
    (model config, posterior settings, ``norm_stats`` as given, ``extra``) with
    :func:`bdlens.checkpoint.save_checkpoint`, and ``posterior.safetensors`` (ρ, prior mean, modes)."""
    directory = Path(directory)
    post = bayes.posterior
    manifest = {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "model_config": bayes.config.model_dump(mode="json"),
        "posterior": {**bayes.settings.model_dump(mode="json"), "names": post.names, **({MODES: post.mode_sources} if post.components > 1 else {})},
        "norm_stats": norm_stats,
        **(extra or {}),
    }
    save_checkpoint(directory, bayes.mean_state_dict(), manifest)
    tensors = {f"rho.{k}": v.detach().contiguous() for k, v in post.unflatten(post.rho).items()}
    # A prior centred on the pretrained weights equal to μ (as when μ is not trained) is μ itself,
    # already in model.safetensors: stored once, it halves the size of a bundled posterior.
    if post.prior_centred and not torch.equal(post.prior_loc, post.mu.detach()):
        tensors.update({PRIOR_MEAN + k: v.contiguous() for k, v in post.unflatten(post.prior_loc).items()})
    for c, mode in enumerate(post.modes, start=1):
        tensors.update({MODE.format(c) + k: v.contiguous() for k, v in post.unflatten(mode).items()})
    tmp = directory / f".{POSTERIOR_WEIGHTS}.tmp"
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp)
    tmp.replace(directory / POSTERIOR_WEIGHTS)
    return directory


def load_posterior(directory: str | Path, device: torch.device | str = "cpu") -> tuple[BayesianTransformer, dict[str, Any]]:
    """Read a directory written by :func:`save_posterior`; returns the model (on ``device``) and the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise BdlensError(f"{directory} holds a {manifest.get('kind')!r} checkpoint, not a VI posterior; train one with `bdlens train vi`")
    require_fields(manifest, directory, ("model_config", "posterior.names"))
    state = load_weights(directory)
    try:
        extra = load_file(directory / POSTERIOR_WEIGHTS)
    except (FileNotFoundError, SafetensorError) as err:
        raise BdlensError(f"{directory / POSTERIOR_WEIGHTS} is missing or corrupted ({err}); the posterior is incomplete") from None
    try:
        settings = PosteriorSettings.model_validate({k: v for k, v in manifest["posterior"].items() if k not in ("names", PRIOR_MEAN_BUNDLE, MODES)})
    except ValidationError as err:
        raise validation_error(f"{directory / 'manifest.json'} posterior", err) from None
    base = EarthSpecificTransformer(ModelConfig.from_manifest(manifest["model_config"], source=f"{directory}/manifest.json"))
    load_state_into(base, state, directory)
    names = manifest["posterior"]["names"]
    absent = [n for n in names if n not in state or f"rho.{n}" not in extra]
    if absent:
        raise BdlensError(f"{directory}: the manifest's posterior names {', '.join(absent[:3])} have no weights or ρ; the posterior is incomplete")
    shapes = [state[n].shape for n in names]
    # A bundle may store its tensors in float16 (bdlens.training.bundle); the model computes in its own dtype.
    dtype = next(base.parameters()).dtype
    mu = torch.cat([state[n].reshape(-1) for n in names]).to(dtype)
    rho = torch.cat([extra[f"rho.{n}"].reshape(-1) for n in names]).to(dtype)
    prior_loc = _prior_mean(extra, names, manifest["posterior"].get(PRIOR_MEAN_BUNDLE), mu) if settings.prior_centre == "pretrained" else None
    sources = manifest["posterior"].get(MODES) or []
    missing = [c for c in range(1, len(sources) + 1) if any(MODE.format(c) + n not in extra for n in names)]
    if missing:
        raise BdlensError(f"{directory / POSTERIOR_WEIGHTS} lacks the weights of mode {missing[0]} named in the manifest; the posterior is incomplete")
    modes = torch.stack([torch.cat([extra[MODE.format(c) + n].reshape(-1) for n in names]) for c in range(1, len(sources) + 1)]).to(dtype) if sources else None
    posterior = MeanFieldPosterior(names, shapes, mu, rho, None if prior_loc is None else prior_loc.to(dtype), settings.prior_sigma, modes, sources)
    # base's Bayesian entries now hold μ; they are never used, a weight sample always replaces them.
    return BayesianTransformer(base.to(device).eval(), posterior.to(device), settings), manifest


def _prior_mean(extra: dict[str, Tensor], names: Sequence[str], bundle: str | None, mu: Tensor) -> Tensor:
    """The pretrained-centred prior mean (P,): stored beside ρ, else in the named bundled checkpoint, else μ."""
    if all(PRIOR_MEAN + n in extra for n in names):
        return torch.cat([extra[PRIOR_MEAN + n].reshape(-1) for n in names])
    if bundle is not None:
        weights = load_weights(bundled_checkpoint(bundle))
        return torch.cat([weights[n].reshape(-1) for n in names])
    return mu.clone()


def without_bundled_prior_mean(directory: str | Path, bundles: dict[str, Path]) -> tuple[dict[str, Tensor], str] | None:
    """For bundling: if the posterior in ``directory`` stores a prior mean equal (exactly) to the weights
    of one of the deterministic ``bundles`` (name → directory), its ``posterior.safetensors`` tensors
    without the prior mean and that bundle's name; else None."""
    extra = load_file(Path(directory) / POSTERIOR_WEIGHTS)
    prior = {k.removeprefix(PRIOR_MEAN): v for k, v in extra.items() if k.startswith(PRIOR_MEAN)}
    if not prior:
        return None
    for name, path in sorted(bundles.items()):
        weights = load_weights(path)
        if all(k in weights and weights[k].shape == v.shape and torch.equal(weights[k], v) for k, v in prior.items()):
            return {k: v for k, v in extra.items() if not k.startswith(PRIOR_MEAN)}, name
    return None
