"""Deterministic trainer: schedule, batching, exact resume, DDP agreement, checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from interrupt import stop_after_saving
from synthetic import synthetic_dataset

from bdlens.checkpoint import load_state_into, load_weights, read_manifest, save_checkpoint
from bdlens.cli import main
from bdlens.errors import BdlensError
from bdlens.training.config import load_train_config
from bdlens.training.deterministic import train
from bdlens.training.distributed import Distributed, batch_indices
from bdlens.training.schedule import lr_factor

UPPER = ["geopotential", "temperature"]
SURFACE = ["2m_temperature", "mean_sea_level_pressure"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 64×32 store, a tiny model config, a data config and a training config."""
    root = tmp_path_factory.mktemp("train")
    synthetic_dataset(times=48, upper_variables=UPPER, surface_variables=SURFACE).to_zarr(root / "data.zarr")
    (root / "model.yaml").write_text(yaml.safe_dump({
        "upper_variables": UPPER, "levels": [500, 850], "surface_variables": SURFACE, "grid": "64x32",
        "n_input_times": 2, "embed_dim": 8, "depths": [1, 1, 1, 1], "heads": [1, 2, 2, 1],
        "window": [2, 4, 8], "patch": [2, 4, 4], "drop_path": 0.1, "residual": True,
    }))
    (root / "data.yaml").write_text(yaml.safe_dump({
        "upper_variables": UPPER, "surface_variables": SURFACE, "levels": [500, 850], "step": "6h",
        "splits": {"train": {"start": "2000-01-01", "end": "2000-01-09"}, "val": {"start": "2000-01-10", "end": "2000-01-12"}},
    }))
    (root / "train.yaml").write_text(yaml.safe_dump({
        "model": str(root / "model.yaml"), "data": str(root / "data.yaml"), "world": str(root / "data.zarr"),
        "step_hours": 6, "batch_size": 4, "warmup_steps": 1, "steps": 4, "val_every": 2, "val_samples": 4,
        "checkpoint_every": 2, "seed": 3, "threads": 1,
    }))
    return root


def test_lr_schedule_is_linear_warmup_then_cosine() -> None:
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(20, 4, 20) == pytest.approx(0.0, abs=1e-12)


def test_batches_cover_each_epoch_once_and_ranks_split_them() -> None:
    single = Distributed(0, 1)
    epoch = [i for step in range(5) for i in batch_indices(step, 20, 4, seed=1, dist_info=single)]
    assert sorted(epoch) == list(range(20))
    assert batch_indices(5, 20, 4, 1, single) != batch_indices(0, 20, 4, 1, single)  # new permutation
    ranks = [batch_indices(7, 20, 4, 1, Distributed(r, 2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(batch_indices(7, 20, 4, 1, single))


def test_training_reduces_loss_and_writes_checkpoint(tiny_setup: Path, tmp_path: Path) -> None:
    cfg, path = load_train_config(tiny_setup / "train.yaml")
    checkpoint = train(cfg.model_copy(update={"steps": 12, "learning_rate": 3e-3}), tmp_path / "run", config_file=path, command="test")
    manifest = read_manifest(checkpoint)
    assert manifest["kind"] == "deterministic" and manifest["training"]["seed"] == 3
    assert manifest["model_config"]["embed_dim"] == 8 and "geopotential" in manifest["norm_stats"]["mean"]
    assert "geopotential_500" in manifest["validation"] and "persistence/geopotential_500" in manifest["validation"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val"] for r in records if "val" in r]  # validation every 2 steps: the same samples each time
    assert len(val) == 6 and val[-1]["geopotential_500"] < val[0]["geopotential_500"], val


def test_resume_is_exact(tiny_setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bdlens.training.loop as loop

    cfg, _ = load_train_config(tiny_setup / "train.yaml")
    straight = load_weights(train(cfg, tmp_path / "straight"))
    partial = tmp_path / "partial"
    stop_after_saving(monkeypatch, loop, 2)  # killed right after the step-2 state was saved
    with pytest.raises(KeyboardInterrupt):
        train(cfg, partial)
    monkeypatch.undo()
    assert torch.load(partial / "state.pt", weights_only=True)["step"] == 2
    resumed = load_weights(train(cfg, partial, resume=True))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    log = lambda run: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert [r["step"] for r in log(partial)] == [r["step"] for r in log(tmp_path / "straight")]  # redone lines are not doubled


def test_run_directory_is_not_overwritten_without_asking(tiny_setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code = main(["train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists; pass --resume to continue it, --overwrite to replace it" in err, err
    assert (run / "notes.txt").read_text() == "mine"
    code = main(["train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(tmp_path / "new"), "--resume"])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err


def test_bad_training_config_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: d\nsteps: 10\nbatch_sise: 3\nlearning_rate: -1\n")
    with pytest.raises(BdlensError) as info:
        load_train_config(bad)
    assert "batch_sise" in str(info.value) and "learning_rate" in str(info.value) and "\n" not in str(info.value)
    bad.write_text("model: m\ndata: d\nsteps: 10\nwarmup_steps: 20\n")
    with pytest.raises(BdlensError, match="warmup_steps .20. must be smaller than steps .10."):
        load_train_config(bad)


def test_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"kind": "test"})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(BdlensError, match="does not match the model configuration.*shape mismatch: weight"):
        load_state_into(other, load_weights(ckpt), ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(BdlensError, match="corrupted"):
        load_weights(ckpt)
    with pytest.raises(BdlensError, match="not a bdlens checkpoint"):
        read_manifest(tmp_path)


def test_ddp_two_cpu_processes_end_with_identical_weights(tiny_setup: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bdlens", "-q", "train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    agreement = [r for r in records if "max_weight_difference_between_ranks" in r]
    assert agreement and agreement[0]["ranks"] == 2 and agreement[0]["max_weight_difference_between_ranks"] == 0.0
    assert (tmp_path / "ddp" / "checkpoint" / "model.safetensors").is_file()


def test_analysis_inputs_replace_exactly_the_chosen_input_times(tiny_setup: Path) -> None:
    from bdlens.data import FieldLayout, WeatherDataset, compute_stats
    from bdlens.grid import GRIDS
    from bdlens.training.batches import collate

    truth = synthetic_dataset(times=12, upper_variables=UPPER, surface_variables=SURFACE)
    analysis = truth + 1.0  # a recognisable "analysis error"
    layout = FieldLayout(tuple(UPPER), (500, 850), tuple(SURFACE), GRIDS["64x32"])
    stats = compute_stats(truth)
    make = lambda ds: WeatherDataset(ds, layout, "6h", stats=stats, in_memory=True)  # noqa: E731
    t, a = make(truth), make(analysis)
    choice = torch.tensor([[True, False], [False, True]])
    (upper, surface), target = collate(t, [0, 3], (a, choice))
    (clean_upper, clean_surface), clean_target = collate(t, [0, 3])
    moved = (upper - clean_upper).abs().amax(dim=(2, 3, 4, 5)) > 0  # (B, T_in)
    assert torch.equal(moved, choice)
    assert torch.equal((surface - clean_surface).abs().amax(dim=(2, 3, 4)) > 0, choice)
    torch.testing.assert_close(target.upper, clean_target.upper, rtol=0, atol=0)  # targets stay the truth
