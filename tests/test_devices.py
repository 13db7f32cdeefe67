"""Devices (docs/gpu.md): device selection, clear errors for a missing GPU and for running out of its
memory, resume across devices, bf16 autocast, activation checkpointing and DataLoader workers. The
tests marked ``gpu`` run only on a CUDA machine (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from interrupt import stop_after_saving
from test_training import tiny_setup  # noqa: F401  (tiny model, data and configs on a synthetic store)

from bdlens.checkpoint import load_weights
from bdlens.cli import main
from bdlens.devices import resolve_device
from bdlens.errors import BdlensError
from bdlens.models.config import ModelConfig
from bdlens.models.loss import WeightedL1Loss
from bdlens.models.transformer import EarthSpecificBlock, EarthSpecificTransformer
from bdlens.training.batches import BatchLoader
from bdlens.training.config import TrainConfig, load_train_config
from bdlens.training.deterministic import DeterministicObjective, prepare, train, training_batch
from bdlens.training.distributed import Distributed

CUDA = torch.device("cuda", 0)
OUT_OF_MEMORY = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139.81 GiB total capacity)")


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA (whatever it has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def config(root: Path, **update) -> TrainConfig:
    cfg, _ = load_train_config(root / "train.yaml")
    return cfg.model_copy(update=update)


def test_auto_is_cuda_when_present_else_cpu_and_cuda_is_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == (CUDA if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no tensor is made: only the name is resolved
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == resolve_device("cuda")
    with pytest.raises(BdlensError, match="must be auto, cpu or cuda"):
        resolve_device("tpu")


def test_cuda_without_cuda_exits_2_from_the_engine_and_the_trainer(no_cuda, tiny_setup, tmp_path, capsys) -> None:  # noqa: F811
    with pytest.raises(BdlensError, match="no CUDA device"):
        resolve_device("cuda")
    code = main(["ensemble", "--members", "2", "--lead", "24h", "--out", str(tmp_path / "fc.zarr"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "run"
    code = main(["train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(run), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists() and not (tmp_path / "fc.zarr").exists()
    cuda_in_config = tmp_path / "cuda.yaml"  # the config's device, without --device
    cuda_in_config.write_text((tiny_setup / "train.yaml").read_text() + "device: cuda\n")
    code = main(["train", "deterministic", "--config", str(cuda_in_config), "--out", str(run)])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


def raise_out_of_memory(*args, **kwargs):
    raise OUT_OF_MEMORY


def test_out_of_memory_is_one_line_that_says_what_to_lower(tiny_setup, tmp_path, capsys, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(EarthSpecificTransformer, "forward", raise_out_of_memory)
    code = main(["-q", "train", "deterministic", "--config", str(tiny_setup / "train.yaml"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB" in err
    assert "lower the batch size" in err and "checkpoint: true" in err and "precision: bf16" in err
    code = main(["-q", "ensemble", "--members", "2", "--lead", "24h", "--out", str(tmp_path / "fc.zarr"), "--device", "cpu", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "out of GPU memory" in err and "smaller --batch-size (this run used 2)" in err


def as_saved_elsewhere(state_file: Path, device: str | None) -> None:
    """Rewrite a CPU run's state.pt as a GPU run (``device``) would have written it (its config names
    the device and more loader workers, and it holds each rank's CUDA generator state), or, with
    None, as a bdlens from before GPUs wrote it (no execution settings in its config)."""
    state = torch.load(state_file, weights_only=True)
    saved = json.loads(state["config"])
    if device is None:
        for key in ("device", "precision", "loader_workers"):
            del saved[key]
    else:
        saved |= {"device": device, "loader_workers": 4}
        state["cuda_rng"] = [torch.randint(0, 255, (16,), dtype=torch.uint8)]  # never applied on the CPU
    state["config"] = json.dumps(saved)
    torch.save(state, state_file)


@pytest.mark.parametrize("saved_on", ["cuda", None])
def test_a_run_saved_on_a_gpu_or_before_gpus_resumes_on_the_cpu_bit_for_bit(tiny_setup, tmp_path, monkeypatch, saved_on) -> None:  # noqa: F811
    import bdlens.training.loop as loop

    cfg = config(tiny_setup, device="cpu")
    straight = load_weights(train(cfg, tmp_path / "straight"))
    partial_run = tmp_path / "partial"
    stop_after_saving(monkeypatch, loop, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, partial_run)
    monkeypatch.undo()
    as_saved_elsewhere(partial_run / "state.pt", saved_on)
    resumed = load_weights(train(cfg, partial_run, resume=True))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def first_step_loss(root: Path, precision: str) -> float:
    cfg = config(root, device="cpu", precision=precision)
    setup, dist_info = prepare(cfg), Distributed.from_env("cpu")
    objective = DeterministicObjective(cfg, setup, dist_info, None, None)
    objective.fresh_start(dist_info)
    return objective.train_step(0)["loss"]


def test_fp32_step_is_the_plain_computation_and_bf16_autocast_is_close_to_it(tiny_setup) -> None:  # noqa: F811
    cfg = config(tiny_setup)
    setup = prepare(cfg)
    torch.manual_seed(cfg.seed)  # the reference: the model, loss and batch of step 0 by hand, no device code
    model = EarthSpecificTransformer(setup.model_config).train()
    loss_fn = WeightedL1Loss(setup.layout.grid.latitudes(), setup.layout.upper_variables, setup.layout.surface_variables)
    torch.manual_seed(cfg.seed + 1)
    (upper, surface), target = training_batch(setup, cfg, 0, Distributed())
    reference = loss_fn(model(upper, surface), (target.upper, target.surface)).item()
    fp32, bf16 = first_step_loss(tiny_setup, "fp32"), first_step_loss(tiny_setup, "bf16")
    assert fp32 == reference
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)  # autocast ran, in bfloat16's precision


def test_vi_step_in_bf16_is_close_to_the_fp32_step(tmp_path) -> None:
    """The VI trainer's backbone pass and L1 loss under bf16 autocast (the KL term stays fp32): the
    first SVI loss, the same draw θ, moves by bfloat16's rounding only."""
    from test_bayes_posterior import deterministic
    from test_bayes_trainer import Repeated, RollingWorld, vi_config

    from bdlens.bayes.posterior import from_deterministic
    from bdlens.training.vi import train_vi

    losses = {}
    for precision in ("fp32", "bf16"):
        settings = vi_config(steps=1, validate_every=0, seed=4, device="cpu", precision=precision)
        model = deterministic()
        train_vi(from_deterministic(model, settings.posterior), Repeated(RollingWorld(model.config, 3)[1], 10), settings, tmp_path / precision)
        losses[precision] = json.loads((tmp_path / precision / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_activation_checkpointing_recomputes_the_blocks_and_keeps_the_gradients(monkeypatch) -> None:
    base = ModelConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "model_demo.yaml").model_dump()
    upper, surface = torch.randn(2, 2, 4, 8, 32, 64), torch.randn(2, 2, 4, 32, 64)
    calls = {"blocks": 0}
    block_forward = EarthSpecificBlock.forward

    def counted(self, *args):
        calls["blocks"] += 1
        return block_forward(self, *args)

    monkeypatch.setattr(EarthSpecificBlock, "forward", counted)
    grads, counts = [], []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = EarthSpecificTransformer(ModelConfig.model_validate(base | {"checkpoint": checkpoint})).train()
        calls["blocks"] = 0
        torch.manual_seed(1)  # the same DropPath masks (checkpointing replays the RNG when it recomputes)
        out = model(upper, surface)
        (out[0].square().mean() + out[1].square().mean()).backward()
        grads.append([p.grad for p in model.parameters()])
        counts.append(calls["blocks"])
    assert counts == [8, 16]  # every block again in the backward pass
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_loader_workers_give_the_same_batches_and_the_same_training(tiny_setup, tmp_path) -> None:  # noqa: F811
    cfg = config(tiny_setup, device="cpu")
    setup = prepare(cfg)
    make = partial(training_batch, setup, cfg, dist_info=Distributed())
    plain = BatchLoader(make, 8, 0, torch.device("cpu"))
    workers = BatchLoader(make, 8, 2, torch.device("cpu"))
    for step in (0, 1, 2, 5, 6, 3):  # 5 and then 3: a resume restarts the workers at that step
        for ours, theirs in zip(plain(step), workers(step), strict=True):
            assert torch.equal(ours.upper, theirs.upper) and torch.equal(ours.surface, theirs.surface)
    straight = load_weights(train(cfg, tmp_path / "plain"))
    with_workers = load_weights(train(cfg.model_copy(update={"loader_workers": 2}), tmp_path / "workers"))
    for name, value in straight.items():
        torch.testing.assert_close(with_workers[name], value, rtol=0, atol=0)


def test_posterior_members_follow_their_inputs_device_through_the_fused_linear(monkeypatch) -> None:
    """The batched posterior pass on a device other than the CPU (``meta``: shapes only, no
    autocast there): the fused member linear runs and every output is where the inputs are."""
    import bdlens.models.member_linear as member_linear
    from bdlens.bayes.posterior import from_deterministic
    from bdlens.bayes.sampling import forward_members, sample_weights

    fused = {"calls": 0}
    linear = member_linear.linear

    def counted(*args):
        fused["calls"] += 1
        return linear(*args)

    monkeypatch.setattr(member_linear, "linear", counted)
    base = ModelConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "model_demo.yaml")
    bayes = from_deterministic(EarthSpecificTransformer(base).eval()).to("meta")
    weights = sample_weights(bayes, 3, seed=0)
    with torch.no_grad():
        upper, surface = forward_members(bayes, weights, torch.empty(2, 2, 4, 8, 32, 64, device="meta"), torch.empty(2, 2, 4, 32, 64, device="meta"))
    assert weights.device.type == upper.device.type == surface.device.type == "meta"
    assert upper.shape == (3, 2, 4, 8, 32, 64) and surface.shape == (3, 2, 4, 32, 64)
    assert fused["calls"] > 0


# ---------------------------------------------------------------- on a GPU (benchmarks/gpu_check.sh)


@pytest.fixture()
def deterministic_cuda() -> Iterator[None]:
    """CUDA kernels that give the same bits on every run: torch's deterministic algorithms (benchmarks/gpu_check.sh
    sets the CUBLAS_WORKSPACE_CONFIG they need) and the math attention kernel (the memory-efficient one's
    backward pass with a learned bias accumulates atomically)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
def test_gpu_training_resumes_exactly_on_the_gpu_and_goes_on_on_the_cpu(tiny_setup, tmp_path, monkeypatch, deterministic_cuda) -> None:  # noqa: F811
    import bdlens.training.loop as loop

    cfg = config(tiny_setup, device="cuda", loader_workers=2)
    straight = load_weights(train(cfg, tmp_path / "straight"))
    for run, resume_on in (("gpu", "cuda"), ("cpu", "cpu")):
        stop_after_saving(monkeypatch, loop, 2)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / run)
        monkeypatch.undo()
        resumed = load_weights(train(cfg.model_copy(update={"device": resume_on}), tmp_path / run, resume=True))
        for name, value in straight.items():
            if resume_on == "cuda":
                torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
            else:  # CPU kernels round differently, and each AdamW step moves a weight by about the learning rate at most
                assert float((resumed[name] - value).abs().max()) <= 2 * 2 * cfg.learning_rate, name


@pytest.mark.gpu
def test_training_step_on_the_gpu_is_the_cpu_step_and_bf16_is_close(tiny_setup) -> None:  # noqa: F811
    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        cfg = config(tiny_setup, device=device, precision=precision)
        dist_info = Distributed.from_env(device)
        objective = DeterministicObjective(cfg, prepare(cfg), dist_info, None, None)
        objective.fresh_start(dist_info)
        losses[device, precision] = objective.train_step(0)["loss"]
    assert losses["cuda", "fp32"] == pytest.approx(losses["cpu", "fp32"], rel=1e-4)
    assert losses["cuda", "bf16"] == pytest.approx(losses["cpu", "fp32"], rel=2e-2)


@pytest.mark.gpu
def test_posterior_members_batched_on_the_gpu_equal_serial_passes() -> None:
    from bdlens.bayes.posterior import PosteriorSettings, from_deterministic
    from bdlens.bayes.sampling import forward_members, forward_sample, sample_weights

    base = ModelConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "model_demo.yaml")
    torch.manual_seed(0)
    bayes = from_deterministic(EarthSpecificTransformer(base).eval(), PosteriorSettings()).to(CUDA)
    upper, surface = torch.randn(2, 2, 4, 8, 32, 64, device=CUDA), torch.randn(2, 2, 4, 32, 64, device=CUDA)
    weights = sample_weights(bayes, 4, seed=7)
    assert weights.device == upper.device
    with torch.no_grad():
        batched = forward_members(bayes, weights, upper, surface)
        serial = [forward_sample(bayes, theta, upper, surface) for theta in weights]
    for k, (u, s) in enumerate(serial):
        torch.testing.assert_close(batched[0][k], u, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched[1][k], s, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_ensemble_on_the_gpu_matches_the_cpu(tmp_path) -> None:
    import numpy as np
    import xarray as xr

    for device in ("cpu", "cuda"):
        assert main(["-q", "ensemble", "--members", "4", "--weights", "2", "--lead", "24h", "--perturbation", "sppt",
                     "--out", str(tmp_path / f"{device}.zarr"), "--device", device]) == 0
    cpu, gpu = (xr.open_zarr(tmp_path / f"{d}.zarr") for d in ("cpu", "cuda"))
    for name in cpu.data_vars:
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-3, atol=1e-3 * float(np.abs(cpu[name].values).max()))
