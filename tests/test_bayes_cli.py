"""`bdlens train vi` end to end: deterministic checkpoint → VI run → posterior checkpoint → resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from test_training import tiny_setup  # noqa: F401  (the deterministic trainer's tiny model, data and config)

from bdlens.bayes.posterior import load_posterior
from bdlens.bayes.sampling import sample_weights
from bdlens.checkpoint import read_manifest
from bdlens.cli import main


def test_train_vi_from_a_deterministic_checkpoint(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    vi = {
        "posterior": {"parameters": "attention_mlp", "init_sigma_scale": 1e-2},
        "training": {"steps": 2, "batch_size": 2, "log_every": 1, "validate_every": 2, "checkpoint_every": 1},
        "validation": {"members": 2, "leads": [1, 3], "max_forecasts": 2},
    }
    (tmp_path / "vi.yaml").write_text(yaml.safe_dump(vi))
    assert main(["-q", "train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(tmp_path / "det")]) == 0
    args = ["-q", "train", "vi", "--from", str(tmp_path / "det" / "checkpoint"), "--config", str(tmp_path / "vi.yaml"), "--out", str(tmp_path / "vi")]
    assert main(args) == 0
    bayes, manifest = load_posterior(tmp_path / "vi" / "checkpoint")
    det = read_manifest(tmp_path / "det" / "checkpoint")
    assert manifest["norm_stats"] == det["norm_stats"] and manifest["step"] == 2
    assert all(".attn." in n or ".mlp." in n for n in bayes.posterior.names)
    records = [json.loads(line) for line in (tmp_path / "vi" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    assert [r["lead_steps"] for r in val] == [1, 3] and all(r["rmse"] > 0 and r["spread"] > 0 for r in val)
    # an existing run is neither overwritten nor resumed without being asked
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "vi.yaml").write_text(yaml.safe_dump(vi | {"training": vi["training"] | {"steps": 3}}))
    assert main([*args, "--resume"]) == 0
    resumed, manifest = load_posterior(tmp_path / "vi" / "checkpoint")
    assert manifest["step"] == 3
    assert not torch.equal(sample_weights(resumed, 1, 0), sample_weights(bayes, 1, 0))


def test_train_vi_with_analysis_inputs(tiny_setup: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    vi = {"training": {"steps": 2, "batch_size": 2, "validate_every": 0, "analysis_input_probability": 0.5}}
    (tmp_path / "vi.yaml").write_text(yaml.safe_dump(vi))
    assert main(["-q", "train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(tmp_path / "det")]) == 0
    args = ["-q", "train", "vi", "--from", str(tmp_path / "det" / "checkpoint"), "--config", str(tmp_path / "vi.yaml")]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "no_analysis")]) == 2  # the synthetic store has no analysis.zarr beside it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "analysis.zarr does not exist" in err and "analysis_input_probability" in err
    assert not (tmp_path / "no_analysis").exists()  # nothing half-written
    # any store with the training times serves as the analysis (here the truth itself)
    assert main([*args, "--out", str(tmp_path / "vi"), "--analysis", str(tiny_setup / "data.zarr")]) == 0
    _, manifest = load_posterior(tmp_path / "vi" / "checkpoint")
    assert manifest["training"]["analysis_path"] == str(tiny_setup / "data.zarr") and manifest["step"] == 2


def test_train_seed_replaces_the_config_seed(tiny_setup: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file

    base = ["-q", "train", "deterministic", "--config", str(tiny_setup / "train.yaml")]
    for name, extra in (("default", []), ("seed7", ["--seed", "7"]), ("seed7b", ["--seed", "7"])):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
    manifests = {n: read_manifest(tmp_path / n / "checkpoint") for n in ("default", "seed7")}
    assert manifests["seed7"]["training"]["config"]["seed"] == 7 and manifests["default"]["training"]["config"]["seed"] != 7
    weights = {n: load_file(tmp_path / n / "checkpoint" / "model.safetensors") for n in ("default", "seed7", "seed7b")}
    assert all(torch.equal(weights["seed7"][k], weights["seed7b"][k]) for k in weights["seed7"])  # reproducible from the seed
    assert not all(torch.equal(weights["seed7"][k], weights["default"][k]) for k in weights["seed7"])
