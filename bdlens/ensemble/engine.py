"""The ensemble engine: ``bdlens ensemble`` and :class:`Forecaster`, its Python face.

:meth:`Forecaster.ensemble` composes a member source (posterior weight samples or deterministic
weights, wrapped in a perturbation scheme) for a K × J design, checks every input before any work,
and streams the members to a forecast store (:mod:`bdlens.ensemble.store`) in batches: one init
and a batch of members at a time, every lead written as it finishes, so peak memory depends on the
batch size only, not on the number of members or leads. Under ``torchrun`` the units (init × member
chunk) are dealt round-robin to the processes, each writing its own regions of the same store.
At the end the variance decomposition (docs/science.md, "Decomposition") is computed from the
members and stored in the ``decomposition`` group, with the cost and provenance in the attributes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from bdlens import __version__, streams
from bdlens.bayes import load_posterior
from bdlens.checkpoint import BUNDLED_DIR
from bdlens.data import Fields, open_dataset
from bdlens.data.export import BUNDLED_ANALYSIS
from bdlens.devices import Distributed, out_of_memory, resolve_device
from bdlens.ensemble.base import MemberSource
from bdlens.ensemble.design import PERTURBATION_DRAW, WEIGHT_SAMPLE, Design, anova, split_members
from bdlens.ensemble.members import ClimatologyMembers, DeterministicMembers, PersistenceMembers, PosteriorMembers, posterior_model
from bdlens.ensemble.rollout import _iso, history_offsets, initial_states, member_states
from bdlens.ensemble.schemes import SCHEMES, SchemeContext, build_scheme
from bdlens.ensemble.store import (
    STORE_LAYOUT,
    create_store,
    finalise,
    finished_units,
    open_forecast,
    record_unit,
    stored_attrs,
    unit_name,
    write_region,
)
from bdlens.ensemble.system import System, load_system
from bdlens.errors import BdlensError
from bdlens.models.lead_time import greedy_schedule, plan_rollout
from bdlens.models.pretrained import layout_of, load_trained
from bdlens.outputs import mark_output, prepare_output
from bdlens.progress import bar

log = logging.getLogger(__name__)

# Members of one store chunk (rounded up to whole weight groups): few files, small regions.
CHUNK_MEMBERS = 20
# Physical bounds a member must stay within (K); outside them it is recorded, not hidden.
TEMPERATURE_BOUNDS = (150.0, 350.0)
MEMORY_FRACTION = 0.25
# What makes the members: the hybrid (posterior or deterministic weights × a perturbation scheme), the
# diffusion baseline (a `bdlens train diffusion` checkpoint, K = 1) or the persistence reference.
MODELS = ("hybrid", "diffusion", "persistence", "climatology")


def parse_hours(text: str | int, what: str) -> int:
    """``"10d"``, ``"72h"`` or ``72`` → hours (positive whole hours)."""
    match = re.fullmatch(r"\s*(\d+)\s*([dh]?)\s*", str(text))
    if not match or int(match.group(1)) <= 0:
        raise BdlensError(f"{what} must be a positive duration like 10d, 72h or 72, got {text!r}")
    return int(match.group(1)) * (24 if match.group(2) == "d" else 1)


def parse_inits(inits: Sequence[str | np.datetime64] | str | None, available: np.ndarray) -> np.ndarray:
    """Init times from ISO strings or ``START/END/STEP`` ranges (e.g. ``2002-07-01T00/2002-07-11T00/5d``)."""
    if inits is None:
        return np.asarray(available[-1:], dtype="datetime64[ns]")
    values: list[np.datetime64] = []
    for item in [inits] if isinstance(inits, str | np.datetime64) else inits:
        text = str(item)
        try:
            if "/" in text:
                start, end, step = (text.split("/") + ["24h"])[:3]
                hours = parse_hours(step, "the step of an --init range")
                values += list(np.arange(np.datetime64(start, "h"), np.datetime64(end, "h") + 1, np.timedelta64(hours, "h")))
            else:
                values.append(np.datetime64(text, "ns"))
        except ValueError:
            raise BdlensError(f"--init {text!r} is not an ISO time (2002-07-01T00) or a range START/END/STEP") from None
    times = np.asarray(values, dtype="datetime64[ns]")
    if len(np.unique(times)) != len(times):
        raise BdlensError("--init lists the same time twice; give each init time once")
    return times


def available_memory(device: torch.device) -> int:
    """Bytes free for the batch: the GPU's free memory, or MemAvailable of the machine."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # no /proc (macOS, Windows): assume a small machine


@dataclass(frozen=True)
class Request:
    """The resolved options of a run: stored in the forecast and compared on ``--resume``."""

    members: int
    weights: int
    lead_hours: int
    output_hours: int
    perturbation: str
    bayes: bool
    seed: int
    temperature: float
    amplitude: float
    inits: tuple[str, ...]
    data: str
    checkpoint: str
    model: str = "hybrid"
    lead_factors: tuple[tuple[int, float], ...] = ()
    scheme_config: str = ""  # the scheme's own config named by ensemble.json (e.g. which SPPT), "" for its default

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


class Forecaster:
    """A forecast system ready to make ensembles (see the module docstring)."""

    def __init__(self, system: System, device: str | torch.device = "auto") -> None:
        self.system = system
        self.device = resolve_device(device)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "auto") -> Forecaster:
        """The bundled demo system (default) or the checkpoints under ``path`` (a checkpoint, a bundle or a run directory)."""
        return cls(load_system(BUNDLED_DIR if path is None else path), device)

    # ------------------------------------------------------------------ building the member source

    def default_perturbation(self) -> str:
        """The system's calibrated default scheme (``none`` when it has none)."""
        return str(self.system.settings.get("default_perturbation", "none"))

    def default_weights(self, members: int, bayes: bool) -> int:
        """K for ``members``: 1 without Bayes, else the largest divisor of members up to the system's
        default (else members), preferring multiples of the posterior's modes so that each is drawn equally often."""
        if not bayes:
            return 1
        preferred = int(self.system.settings.get("default_weights", members))
        divisors = [k for k in range(1, min(preferred, members) + 1) if members % k == 0]
        balanced = [k for k in divisors if k % self.system.modes() == 0]
        return max(balanced or divisors)

    def source(self, design: Design, perturbation: str, bayes: bool, seed: int,
               temperature: float | None = None, amplitude: float | None = None, model: str = "hybrid",
               data: xr.Dataset | None = None, max_lead: int = 0, inits: Sequence[np.datetime64] = (),
               lead_factors: Mapping[int, float] | None = None,
               ) -> tuple[MemberSource, dict[str, Any]]:
        """The member source of a run and the (temperature, amplitude[, lead_factors]) it uses; ``model`` is one of
        :data:`MODELS` (``hybrid``: posterior or deterministic weights with ``perturbation``;
        ``climatology`` draws from ``data``'s training period, ``max_lead`` hours ahead of each of ``inits``)."""
        if model == "diffusion":
            if not self.system.checkpoints["diffusion"]:
                raise BdlensError(f"{self.system.root} holds no diffusion checkpoint; pass one with --checkpoint (bdlens train diffusion)")
            from bdlens.ensemble.diffusion import DiffusionMembers

            return DiffusionMembers(next(iter(self.system.checkpoints["diffusion"].values())), seed, device=self.device), {}
        if model == "persistence":
            inner, used = self.source(design, "none", False, seed)
            return PersistenceMembers(inner), {}
        if model == "climatology":
            inner, used = self.source(design, "none", False, seed)
            if data is None:
                raise BdlensError("--model climatology needs the data to draw past states from")
            return ClimatologyMembers(inner, data, self.system.train_period(), seed, max_lead, inits), {}
        settings = self.system.scheme(perturbation, bayes)
        temp = float(settings.get("temperature", 1.0) if temperature is None else temperature)
        amp = float(settings.get("amplitude", 1.0) if amplitude is None else amplitude)
        factors = settings.get("lead_factors", {}) if lead_factors is None else lead_factors
        factors = {int(h): float(f) for h, f in factors.items()}
        if any(not (h > 0 and f >= 0) for h, f in factors.items()):
            raise BdlensError(f"per-lead amplitude factors must map lead hours > 0 to factors >= 0, got {factors}")
        ck = self.system.checkpoints
        if bayes:
            if not ck["vi"]:
                raise BdlensError(f"{self.system.root} has no VI posterior; pass --no-bayes for the deterministic models")
            models = {}
            for step, path in ck["vi"].items():
                bayes_model, manifest = load_posterior(path, self.device)
                models[step] = posterior_model(bayes_model, layout_of(bayes_model.config, path), manifest, path)
            inner: MemberSource = PosteriorMembers(models, design, seed, temp)
            stats = {s: m.stats for s, m in models.items()}
            layout = next(iter(models.values())).layout
        else:
            if not ck["deterministic"]:
                raise BdlensError(f"{self.system.root} has no deterministic checkpoint; drop --no-bayes to use the posterior")
            trained = {step: load_trained(path, self.device) for step, path in ck["deterministic"].items()}
            inner = DeterministicMembers(trained)
            stats = {s: m.stats for s, m in trained.items()}
            layout = next(iter(trained.values())).layout
            temp = 1.0
        context = SchemeContext(seed, amp, layout, stats, self.system.names, settings, factors)
        source = build_scheme(perturbation, inner, context)
        if perturbation == "none":
            return source, {"temperature": temp, "amplitude": 0.0}
        used: dict[str, Any] = {"temperature": temp, "amplitude": amp}
        if factors:
            used["lead_factors"] = factors
        return source, used

    # ------------------------------------------------------------------ the run

    def ensemble(
        self,
        init: Sequence[str | np.datetime64] | str | None = None,
        members: int = 100,
        weights: int | None = None,
        lead: str | int = "10d",
        output_step: str | int = "24h",
        perturbation: str | None = None,
        bayes: bool = True,
        seed: int = 0,
        data: str | Path | xr.Dataset | None = None,
        out: str | Path | None = None,
        batch_size: int | str = "auto",
        resume: bool = False,
        overwrite: bool = False,
        temperature: float | None = None,
        amplitude: float | None = None,
        command: str | None = None,
        model: str = "hybrid",
        lead_factors: Mapping[int, float] | None = None,
    ) -> xr.Dataset:
        """Run an ensemble of ``members`` = K weight samples × J perturbation draws.

        ``init``: ISO times or ``START/END/STEP`` ranges (default: the latest analysis of the data);
        ``lead`` and ``output_step``: durations (``"10d"``, ``"72h"``); ``perturbation``: one of
        ``none`` and :data:`bdlens.ensemble.schemes.SCHEMES` (default: the system's calibrated
        choice); ``bayes=False`` uses the deterministic weights (K = 1); ``data``: a WB2/ERA5-layout
        zarr/netCDF path or Dataset with the analyses (default: the bundled demo analyses).
        ``temperature`` / ``amplitude`` / ``lead_factors`` (lead hours → factor on the amplitude; ``{}``
        for none) override the calibration; ``model``: one of :data:`MODELS`
        (the diffusion and persistence members have K = 1 and no perturbation scheme). Returns the forecast (dims
        number, time, prediction_timedelta, [level,] latitude, longitude; physical units), lazy on
        the store when ``out`` is given, in memory otherwise.
        """
        if out is None:
            tmp = Path(tempfile.mkdtemp(prefix="bdlens-ensemble-"))
            try:
                kwargs = dict(init=init, members=members, weights=weights, lead=lead, output_step=output_step,
                              perturbation=perturbation, bayes=bayes, seed=seed, data=data, batch_size=batch_size,
                              temperature=temperature, amplitude=amplitude, command=command, model=model,
                              lead_factors=lead_factors)
                return self.ensemble(out=tmp / "forecast.zarr", **kwargs).load()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out = Path(out)
        if perturbation not in (None, "none") and perturbation not in SCHEMES:
            raise BdlensError(f"unknown --perturbation {perturbation!r}; choose one of: none, {', '.join(sorted(SCHEMES))}")
        if model not in MODELS:
            raise BdlensError(f"unknown --model {model!r}; choose one of: {', '.join(MODELS)}")
        if model != "hybrid":
            if weights is not None or not bayes or perturbation not in (None, "none"):
                raise BdlensError(f"--model {model} takes no --weights, --no-bayes or --perturbation; leave them out")
            bayes, perturbation = False, "none"
        perturbation = self.default_perturbation() if perturbation is None else perturbation
        if weights is not None and not bayes:
            raise BdlensError("--weights sets the number of posterior weight samples; it cannot be combined with --no-bayes")
        k = self.default_weights(members, bayes) if weights is None else int(weights)
        design = Design.of(members, k)
        lead_hours, output_hours = parse_hours(lead, "--lead"), parse_hours(output_step, "--output-step")
        if lead_hours % output_hours:
            raise BdlensError(f"--lead {lead} is not a multiple of --output-step {output_step}")
        leads = list(range(output_hours, lead_hours + 1, output_hours))
        data_path = BUNDLED_ANALYSIS if data is None else data
        analysis = data_path if isinstance(data_path, xr.Dataset) else open_dataset(data_path, sparse_times=True)
        init_times = parse_inits(init, analysis.time.values)
        dist = Distributed.from_env(self.device)  # joins the process group under torchrun (nccl on GPUs)
        inputs = [self.system.root] + ([] if isinstance(data_path, xr.Dataset) else [data_path])
        resuming = prepare_output(out, "forecast", overwrite=overwrite and dist.main, resume=resume, resumable=True, inputs=inputs,
                                  layout=STORE_LAYOUT) if dist.main else resume

        source, used = self.source(design, perturbation, bayes, seed, temperature, amplitude, model, analysis, lead_hours, init_times,
                                   lead_factors)
        for lead_h in leads:
            try:
                greedy_schedule(lead_h, source.steps)
            except BdlensError:
                raise BdlensError(
                    f"lead {lead_h} h cannot be reached with {source.describe()}, whose step models take {list(source.steps)} h; "
                    f"choose --lead/--output-step multiples of {min(source.steps)} h"
                ) from None
        layout = _source_layout(source)
        offsets = history_offsets(source)
        history = initial_states(analysis, layout, init_times, offsets)
        request = Request(members, k, lead_hours, output_hours, perturbation, bayes, int(seed), used.get("temperature", 0.0),
                          used.get("amplitude", 0.0), tuple(_iso(t) for t in init_times),
                          "bundled demo analyses" if data is None else ("in-memory Dataset" if isinstance(data_path, xr.Dataset) else str(data_path)),
                          "bundled demo models" if self.system.root == BUNDLED_DIR else str(self.system.root), model,
                          tuple(sorted(used.get("lead_factors", {}).items())),
                          str(self.system.scheme(perturbation, bayes).get("config", "")) if perturbation != "none" else "")
        group = design.draws if bayes else 1
        # Chunks (rounded up to whole weight groups) small enough that every process gets work.
        chunk = min(members, group * math.ceil(min(CHUNK_MEMBERS, math.ceil(members / dist.world_size)) / group))
        batch = self.batch_size(batch_size, source, layout, group, chunk)
        calls = len(plan_rollout(source.steps, leads, source.n_input_times == 2))
        member_ids = np.arange(members)
        attrs = {
            "bdlens_version": __version__,
            "system": source.describe(),
            "command": command or "bdlens.Forecaster.ensemble",
            "config": request.key(),
            "seed": int(seed),
            "checkpoints": json.dumps(self.system.hashes(
                {"diffusion": ("diffusion",), "persistence": (), "climatology": ()}.get(model, ("vi",) if bayes else ("deterministic",))) | (
                self.system.hashes(("perturbation",)) if perturbation == "learned" else {})),
            "complete": False,
        }
        if dist.main and not resuming:
            coords = {
                "number": member_ids, "time": init_times,
                "prediction_timedelta": np.asarray(leads, dtype="timedelta64[h]").astype("timedelta64[ns]"),
                WEIGHT_SAMPLE: ("number", design.weight_sample(member_ids)),
                PERTURBATION_DRAW: ("number", design.perturbation_draw(member_ids)),
                "latitude": analysis.latitude.values, "longitude": analysis.longitude.values,
            }
            mark_output(out, "forecast")  # first: a store that fails while being created is still ours to replace
            create_store(out, layout, coords, chunk, attrs)
        elif dist.main and stored_attrs(out).get("config") != request.key():
            raise BdlensError(f"{out} was started with other options; resume with the same options or start anew with --overwrite")
        _barrier(dist)
        done = finished_units(out)
        units = [(i, c) for i in range(len(init_times)) for c in range(math.ceil(members / chunk))]
        mine = [u for n, u in enumerate(units) if n % dist.world_size == dist.rank and unit_name(*u) not in done]
        advice = f"pass a smaller --batch-size (this run used {batch}), then continue with --resume"
        progress = bar(total=len(mine), desc=f"ensemble ({source.describe()})", unit="unit", disable=not dist.main)
        with progress, out_of_memory(advice):
            for i, c in mine:
                self._run_unit(source, out, history, init_times, (i, c), range(c * chunk, min((c + 1) * chunk, members)), batch, calls, leads)
                progress.update(1)
        _barrier(dist)
        if dist.main:
            _finish(out, design, source, attrs)
        _barrier(dist)
        return open_forecast(out)

    def _run_unit(self, source: MemberSource, out: Path, history: dict[int, Fields], init_times: np.ndarray,
                  unit: tuple[int, int], members: range, batch: int, calls: int, leads: list[int]) -> None:
        i = unit[0]
        key = streams.init_key(init_times[i])
        lead_index = {lead: n for n, lead in enumerate(leads)}
        seconds, out_of_bounds = 0.0, []
        layout = _source_layout(source)
        for start in range(members.start, members.stop, batch):
            ids = tuple(range(start, min(start + batch, members.stop)))
            tick = time.perf_counter()
            one = {off: Fields(*(x[i : i + 1] for x in f)) for off, f in history.items()}
            for lead, state in member_states(source, one, key, ids, leads, self.device):
                cpu = Fields(state.upper.float().cpu(), state.surface.float().cpu())
                seconds += time.perf_counter() - tick
                out_of_bounds += _out_of_bounds(layout, cpu, ids, lead, _iso(init_times[i]))
                ds = layout.from_tensors(cpu, {"number": np.asarray(ids), "time": init_times[i : i + 1],
                                               "prediction_timedelta": np.asarray([lead], "timedelta64[h]").astype("timedelta64[ns]")})
                write_region(out, ds, {"number": slice(ids[0], ids[-1] + 1), "time": slice(i, i + 1),
                                       "prediction_timedelta": slice(lead_index[lead], lead_index[lead] + 1)})
                tick = time.perf_counter()
        record_unit(out, unit_name(*unit), {"seconds": seconds, "member_steps": len(members) * calls, "out_of_bounds": out_of_bounds})

    def batch_size(self, requested: int | str, source: MemberSource, layout: Any, group: int, chunk: int) -> int:
        """Members per batch: ``requested`` (rounded to whole weight groups), or with ``"auto"`` the
        largest that fits :data:`MEMORY_FRACTION` of the free memory by :func:`member_bytes`."""
        if requested == "auto":
            fits = int(MEMORY_FRACTION * available_memory(self.device) // member_bytes(source, layout, group))
            return max(group, min(chunk, fits // group * group))
        try:
            size = int(requested)
        except (TypeError, ValueError):
            raise BdlensError(f"--batch-size must be 'auto' or a positive integer, got {requested!r}") from None
        if size < 1:
            raise BdlensError(f"--batch-size must be 'auto' or a positive integer, got {requested!r}")
        if size % group:
            raise BdlensError(f"--batch-size {size} must be a multiple of the {group} perturbation draws per weight sample")
        return min(size, chunk)


def member_bytes(source: MemberSource, layout: Any, group: int) -> int:
    """A conservative estimate of the memory one member of a batch needs (bytes): its anchor and
    scratch states, the backbone's activations (tokens × channels × a factor for attention and MLP
    intermediates) and its share of the weight samples of its group."""
    state = 4 * (math.prod(layout.upper_shape) + math.prod(layout.surface_shape))
    configs = _backbone_configs(source)
    activations, parameters = 0, 0
    for cfg in configs:
        pz, ph, pw = cfg.patch
        tokens = (math.ceil(len(cfg.levels) / pz) + 1) * math.ceil(cfg.nlat / ph) * math.ceil(cfg.nlon / pw)
        activations = max(activations, 4 * tokens * cfg.embed_dim * 64)
    for model in getattr(_innermost(source), "models", {}).values():
        if hasattr(model, "bayes"):
            parameters += 4 * model.bayes.posterior.size
    return 16 * state + activations + parameters // group


def _innermost(source: MemberSource) -> MemberSource:
    while hasattr(source, "inner"):
        source = source.inner
    return source


def _backbone_configs(source: MemberSource) -> list:
    models = getattr(_innermost(source), "models", {})
    return [m.bayes.config if hasattr(m, "bayes") else m.model.config for m in models.values()]


def _source_layout(source: MemberSource) -> Any:
    model = next(iter(_innermost(source).models.values()))
    return model.layout


def _out_of_bounds(layout: Any, state: Fields, ids: tuple[int, ...], lead: int, init: str) -> list[dict[str, Any]]:
    bad = []
    names = list(layout.upper_variables) + list(layout.surface_variables)
    low, high = TEMPERATURE_BOUNDS
    for row, member in enumerate(ids):
        fields = [state.upper[row, v] for v in range(state.upper.shape[1])] + [state.surface[row, v] for v in range(state.surface.shape[1])]
        for name, values in zip(names, fields, strict=True):
            outside = ~torch.isfinite(values)
            if "temperature" in name:
                outside |= (values < low) | (values > high)
            if bool(outside.any()):
                bad.append({"init": init, "member": member, "lead_hours": lead, "variable": name})
    return bad


def _finish(out: Path, design: Design, source: MemberSource, attrs: dict[str, Any]) -> None:
    units = finished_units(out)
    seconds = sum(u["seconds"] for u in units.values())
    member_steps = sum(u["member_steps"] for u in units.values())
    out_of_bounds = [b for u in units.values() for b in u["out_of_bounds"]]
    if out_of_bounds:
        log.warning("%d member-leads left physical bounds (non-finite or temperature outside %s K); see the store's "
                    "out_of_bounds_members attribute", len(out_of_bounds), TEMPERATURE_BOUNDS)
    ds = xr.open_zarr(out, consolidated=True)
    decomposition = None
    if design.weights >= 2 and design.draws >= 2:
        parts = {}
        for name in ds.data_vars:
            d = anova(split_members(ds[name], design.draws))
            for comp in ("epistemic", "aleatoric", "total"):
                parts[f"{name}_{comp}_variance"] = d[comp].astype(np.float32)
        decomposition = xr.Dataset(parts).drop_attrs(deep=False)
    finalise(out, decomposition, {
        "network_evaluations_per_member_step": float(source.network_evaluations),
        "wall_seconds_per_member_step": seconds / max(member_steps, 1),
        "member_steps": member_steps,
        "out_of_bounds_members": json.dumps(out_of_bounds[:1000]),
        "out_of_bounds_count": len(out_of_bounds),
    })


def _barrier(dist: Distributed) -> None:
    """Wait for every process of a torchrun job (nothing to wait for in a plain run)."""
    if dist.parallel:
        torch.distributed.barrier()

