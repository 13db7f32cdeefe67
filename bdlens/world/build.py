"""``bdlens world build``: run the Held–Suarez world once, cache it, reuse it.

A world directory holds
- ``truth.zarr``: the truth trajectory, WB2 layout on the 64×32 grid, 6-hourly;
- ``analysis.zarr``: truth + balanced analysis error (``analysis_error.py``), same layout;
- ``restart.zarr``: the dynamical core's spectral truth state every ``restart_hours`` (what the physics
  ensemble restarts from; analysis states are rebuilt from it with the same seeded error draws);
- ``manifest.json``: the settings, their hash, timings and a physical summary.
It is written to a partial sibling and renamed at the end, so an interrupted build leaves nothing
(a killed one leaves a partial that the next build removes).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from bdlens import __version__
from bdlens.configs import config_path, default_cache_dir
from bdlens.errors import BdlensError
from bdlens.grid import lat_weights
from bdlens.progress import bar
from bdlens.world.analysis_error import ANALYSIS_STREAM, BalancedAnalysisError
from bdlens.world.config import WorldConfig, load_world_config
from bdlens.world.dycore import STATE_FIELDS, HeldSuarezCore
from bdlens.world.store import atomic_directory, fields_dataset

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WORLD_KIND = "world"
#: Every file of a world directory (worlds built before the output marker existed are recognised by it).
WORLD_LAYOUT = (MANIFEST, "truth.zarr/*", "analysis.zarr/*", "restart.zarr/*")
TIME_CHUNK = 40  # saved times per integration chunk and per zarr chunk (10 days at 6 h)


def resolve_config(config: WorldConfig | str | Path | None, small: bool) -> WorldConfig:
    """The world settings from an object, a YAML path or name, or the demo / small preset."""
    if isinstance(config, WorldConfig):
        return config
    if config is None:
        config = "world_small" if small else "world_demo"
    elif small:
        raise BdlensError("--small selects a preset config; do not combine it with --config")
    return load_world_config(config_path(config))


def build(
    config: WorldConfig | str | Path | None = None,
    *,
    small: bool = False,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) a demo world and return its directory.

    ``config``: a :class:`WorldConfig`, a YAML path, a config name in ``configs/``, or ``None`` for
    the default demo world (``small=True``: a few weeks, for tests). The cache entry is named by the
    hash of the settings, so a different setting never reuses a stale world; ``force`` rebuilds.
    """
    cfg = resolve_config(config, small)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise BdlensError(f"cache directory {root} is a file; pass --cache-dir a directory (or set BDLENS_CACHE_DIR)")
    target = root / f"world-{cfg.cache_key()}"
    if (target / MANIFEST).is_file() and not force:
        manifest = read_manifest(target)
        if manifest.get("config") != json.loads(cfg.model_dump_json()):
            raise BdlensError(f"cached world {target} does not match its settings hash; delete it or pass --force")
        log.info("reusing cached world %s (built %s)", target, manifest.get("built_at"))
        return target
    root.mkdir(parents=True, exist_ok=True)
    # A cache entry without a manifest is left from an older bdlens; it is replaced only if it holds
    # nothing but a world's files (never what a user put in a --cache-dir).
    with atomic_directory(target, WORLD_KIND, overwrite=True, flag="--cache-dir", layout=WORLD_LAYOUT, required=(MANIFEST,)) as tmp:
        _build_into(cfg, tmp)
    log.info("world written to %s", target)
    return target


def read_manifest(world: str | Path) -> dict[str, Any]:
    """The manifest of a built world; a clear error if ``world`` is not one."""
    path = Path(world) / MANIFEST
    if not path.is_file():
        raise BdlensError(f"{world} is not a built demo world (no {MANIFEST}); build one with `bdlens world build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BdlensError(f"{path} is corrupted ({err}); rebuild the world with `bdlens world build --force`") from err


def _restart_dataset(core: HeldSuarezCore, arrays: dict[str, np.ndarray], times: np.ndarray) -> xr.Dataset:
    dims = {
        "vorticity": ("time", "sigma", "m", "l"),
        "divergence": ("time", "sigma", "m", "l"),
        "temperature_variation": ("time", "sigma", "m", "l"),
        "log_surface_pressure": ("time", "surface", "m", "l"),
    }
    ds = xr.Dataset({k: (dims[k], arrays[k]) for k in STATE_FIELDS}, coords={"time": times})
    ds["sigma"] = ("sigma", np.asarray(core.coords.vertical.centers))
    ds.attrs["description"] = "dinosaur spectral state (non-dimensional units), truth trajectory"
    return ds


def _append(ds: xr.Dataset, store: Path, first: bool) -> None:
    if first:
        encoding = {name: {"chunks": (TIME_CHUNK, *ds[name].shape[1:])} for name in ds.data_vars}
        ds.to_zarr(store, mode="w", zarr_format=2, encoding=encoding, consolidated=True)
    else:
        ds.to_zarr(store, append_dim="time", zarr_format=2, consolidated=True)


def _build_into(cfg: WorldConfig, out: Path) -> None:
    started = time.perf_counter()
    core = HeldSuarezCore(cfg)
    error = BalancedAnalysisError(core, cfg.analysis_error, cfg.seed)
    state = core.rest_state(cfg.seed)
    # Every integration runs whole chunks of TIME_CHUNK outputs, so JAX compiles one function only;
    # the spin-up is rounded up to whole chunks and the last chunk's surplus frames are dropped.
    spinup_chunks = -(-int(round(cfg.spinup_days * 24 / cfg.output_hours)) // TIME_CHUNK)
    chunk_days = TIME_CHUNK * cfg.output_hours / 24
    with bar(total=spinup_chunks * chunk_days + cfg.days, desc="world", unit="day") as progress:
        for _ in range(spinup_chunks):
            state = core.advance(state, TIME_CHUNK)
            progress.update(chunk_days)
        spinup_seconds = time.perf_counter() - started
        times = cfg.times()
        restart_every = cfg.restart_hours // cfg.output_hours
        coords = {"latitude": core.latitudes, "longitude": core.longitudes, "level": core.levels}
        for start in range(0, cfg.n_times, TIME_CHUNK):
            n = min(TIME_CHUNK, cfg.n_times - start)
            state, frames = core.trajectory(state, TIME_CHUNK)
            arrays = {k: v[:n] for k, v in core.to_arrays(frames).items()}
            chunk_times = times[start : start + n]
            truth = core.diagnose(core.from_arrays(arrays))
            analysis_arrays = {
                name: np.stack([error.draw(ANALYSIS_STREAM, start + i)[name] for i in range(n)]) + arrays[name]
                for name in STATE_FIELDS
            }
            analysis = core.diagnose(core.from_arrays(analysis_arrays))
            first = start == 0
            _append(fields_dataset(truth, {**coords, "time": chunk_times}, ("time",)), out / "truth.zarr", first)
            _append(fields_dataset(analysis, {**coords, "time": chunk_times}, ("time",)), out / "analysis.zarr", first)
            keep = [i for i in range(n) if (start + i) % restart_every == 0]
            restart = _restart_dataset(core, {k: v[keep] for k, v in arrays.items()}, chunk_times[keep])
            _append(restart, out / "restart.zarr", first)
            progress.update(n * cfg.output_hours / 24)
    for name in ("truth.zarr", "analysis.zarr"):
        ds = xr.open_zarr(out / name)
        ds.attrs.update(_dataset_attrs(cfg, name))
        ds.attrs.pop("_NCZarr_", None)
        _rewrite_attrs(out / name, ds.attrs)
    manifest = {
        "bdlens_version": __version__,
        "format": "bdlens demo world",
        "cache_key": cfg.cache_key(),
        "config": json.loads(cfg.model_dump_json()),
        "built_at": np.datetime_as_string(np.datetime64("now"), unit="s"),
        "software": _software(),
        "build_seconds": round(time.perf_counter() - started, 1),
        "spinup_seconds": round(spinup_seconds, 1),
        "summary": summarize(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _software() -> dict[str, str]:
    """What the trajectory depends on besides the config: the chaotic core turns another jax or CPU's
    round-off into another realization of the same climate (README, "The demo world")."""
    versions = {name: importlib.metadata.version(name) for name in ("dinosaur", "jax", "jaxlib", "numpy")}
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the CPU model there; platform.processor() is often empty
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return versions | {"machine": platform.machine(), "cpu": models[0] if models else platform.processor() or "unknown"}


def _dataset_attrs(cfg: WorldConfig, name: str) -> dict[str, str]:
    role = "truth trajectory" if name == "truth.zarr" else "analysis = truth + balanced analysis error"
    return {
        "title": f"bdlens demo world: Held-Suarez atmosphere ({role})",
        "source": f"dinosaur dynamical core, T{cfg.truncation}, {cfg.layers} sigma layers, Held-Suarez forcing",
        "conventions_note": "WeatherBench2 layout; latitude ascending; surface fields from the lowest sigma layer",
        "analysis_error_model": json.dumps(cfg.analysis_error.model_dump()),
        "bdlens_world_key": cfg.cache_key(),
    }


def _rewrite_attrs(store: Path, attrs: dict[str, Any]) -> None:
    import zarr

    group = zarr.open_group(store, mode="r+", zarr_format=2)
    group.attrs.update(attrs)
    zarr.consolidate_metadata(store, zarr_format=2)


def summarize(world: str | Path) -> dict[str, Any]:
    """Physical sanity figures of a world: jets, T850, MSLP and the analysis-error size."""
    truth = xr.open_zarr(Path(world) / "truth.zarr")
    analysis = xr.open_zarr(Path(world) / "analysis.zarr")
    weights = xr.DataArray(lat_weights(truth.latitude.values), dims="latitude", coords={"latitude": truth.latitude})
    zonal_u = truth.u_component_of_wind.sel(level=250).mean(["time", "longitude"]).compute()
    t850 = truth.temperature.sel(level=850)
    error = analysis - truth

    def rms(da: xr.DataArray) -> float:
        return float(np.sqrt((da**2).weighted(weights).mean()).compute())

    north, south = zonal_u.where(zonal_u.latitude > 0, drop=True), zonal_u.where(zonal_u.latitude < 0, drop=True)
    return {
        "times": [str(truth.time.values[0])[:16], str(truth.time.values[-1])[:16]],
        "n_times": int(truth.sizes["time"]),
        "grid": f"{truth.sizes['longitude']}x{truth.sizes['latitude']}",
        "levels_hpa": [int(v) for v in truth.level.values],
        "jet_u250_max_ms": {
            "north": round(float(north.max()), 1),
            "north_lat": float(north.latitude.values[int(np.argmax(north.values))]),
            "south": round(float(south.max()), 1),
            "south_lat": float(south.latitude.values[int(np.argmax(south.values))]),
        },
        "t850_k": {
            "mean": round(float(t850.weighted(weights).mean().compute()), 1),
            "min": round(float(t850.min().compute()), 1),
            "max": round(float(t850.max().compute()), 1),
        },
        "mslp_hpa_mean": round(float(truth.mean_sea_level_pressure.weighted(weights).mean().compute()) / 100, 1),
        "analysis_error_rms": {
            "z500_m2s2": round(rms(error.geopotential.sel(level=500)), 1),
            "t850_k": round(rms(error.temperature.sel(level=850)), 2),
            "u850_ms": round(rms(error.u_component_of_wind.sel(level=850)), 2),
            "mslp_pa": round(rms(error.mean_sea_level_pressure), 1),
        },
    }
