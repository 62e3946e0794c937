"""Resuming a checkpoint written before a setting existed: the new setting at its default is no change."""

from __future__ import annotations

import pytest
import yaml

from conceptlm.core.config import config_to_dict
from conceptlm.core.errors import ConfigError
from conceptlm.core.resume import check_config_changes
from tests.core.toy_recipe import ToyConfig


def _checkpoint_without(tmp_path, cfg: ToyConfig, key: str):
    """A checkpoint folder whose config.yaml lacks ``section.key`` (as an older version wrote it)."""
    data = config_to_dict(cfg)
    section, name = key.split(".")
    del data[section][name]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return tmp_path


def test_a_setting_added_later_at_its_default_is_no_change(tmp_path):
    cfg = ToyConfig()
    ckpt = _checkpoint_without(tmp_path, cfg, "optim.weight_decay")
    assert check_config_changes(cfg, ckpt) == {}


def test_a_setting_added_later_away_from_its_default_is_a_change(tmp_path):
    cfg = ToyConfig()
    ckpt = _checkpoint_without(tmp_path, cfg, "optim.weight_decay")
    cfg.optim.weight_decay = cfg.optim.weight_decay + 0.5
    with pytest.raises(ConfigError, match=r"optim.weight_decay: None -> "):
        check_config_changes(cfg, ckpt)
