"""Model configuration: YAML loading, the named grids and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bdlens.errors import BdlensError
from bdlens.models import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _demo() -> dict:
    return yaml.safe_load((CONFIGS / "model_demo.yaml").read_text())


def test_named_grid_fills_sizes_and_a_model_section_is_accepted(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": _demo() | {"patch": [2, 2, 2]}}))
    config = ModelConfig.from_yaml(path)
    assert (config.nlat, config.nlon, config.n_levels) == (32, 64, 8)
    # 8 levels / 2 + the surface token; 32 / 2 latitudes; 64 / 2 longitudes; stage 2 halves lat/lon.
    assert config.token_shape(1) == (5, 16, 32) and config.token_shape(2) == (5, 8, 16)


def test_drop_path_rates_follow_pangu():
    config = ModelConfig.from_yaml(CONFIGS / "model_pangu.yaml")
    stage1, stage2, dec2, dec1 = config.drop_path_rates()
    assert stage1 == pytest.approx([0.0, 0.2 / 7]) and stage2[-1] == pytest.approx(0.2)
    assert dec2 == pytest.approx(stage2) and dec1 == pytest.approx(stage1)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"window": [2, 4, 12]}, "window longitude size 12 must divide"),
        ({"patch": [2, 2, 3]}, "patch longitude size 3 must divide"),
        ({"heads": [5, 6, 6, 3]}, "stage 1: 5 heads"),
        ({"upper_variables": ["vorticity"]}, "unknown upper-air variables"),
        ({"levels": [850, 500]}, "ascending"),
        ({"upper_variables": ["temperature", "geopotential"]}, "canonical order"),
        ({"grid": "10x10"}, "unknown grid"),
        ({"nlat": 33}, "contradicts grid 64x32"),
        ({"depths": [2, 2, 2]}, "depths"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_configs_raise_one_line_errors(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_demo() | change))
    with pytest.raises(BdlensError, match=message) as err:
        ModelConfig.from_yaml(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(BdlensError, match="cannot read model config"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BdlensError, match="must be a YAML mapping"):
        ModelConfig.from_yaml(tmp_path / "list.yaml")


def test_new_configs_use_pangus_convention_and_old_manifests_resolve_to_legacy():
    config = ModelConfig.from_yaml(CONFIGS / "model_demo.yaml")
    assert config.convention == "pangu" and config.ground_up
    stored = config.model_dump(mode="json")
    assert ModelConfig.from_manifest(stored, "manifest").convention == "pangu"
    del stored["convention"]  # a manifest written before the field existed
    assert ModelConfig.from_manifest(stored, "manifest").convention == "legacy"
    with pytest.raises(BdlensError, match="convention"):
        ModelConfig.from_manifest({**stored, "convention": "swin"}, "manifest")
