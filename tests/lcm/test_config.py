"""The LCM config schema (``conceptlm.lcm.config``): errors that name the nested field (that importing it is light:
``tests/core/test_config_imports.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import LCMConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_tiny_config_loads():
    cfg = load_config(LCMConfig, REPO / "configs/lcm/tiny_cpu.yaml", [])
    assert cfg.lcm.diffusion.num_train_steps >= 2 and cfg.generate.diffusion.inference_steps >= 1


@pytest.mark.parametrize("override, field", [
    ("lcm.diffusion.cfg_dropout=1.5", "lcm.diffusion.cfg_dropout"),
    ("lcm.quant.codebook_size=1", "lcm.quant.codebook_size"),
    ("generate.diffusion.guidance_rescale=2", "generate.diffusion.guidance_rescale"),
    ("generate.quant.top_p=0", "generate.quant.top_p"),
    ("cost.llm.n_params=0", "cost.llm.n_params"),
    ("prepare.normalizer_method=bogus", "prepare.normalizer_method"),
])
def test_an_error_in_a_nested_section_names_its_field(override, field):
    """Validation raises ``ConfigError(field=...)`` directly: the field is the nested dotted name, not a word
    recovered from the message."""
    extra = ["cost.llm={name: x, n_params: 1, n_layers: 1, d_model: 1}"] if field.startswith("cost.llm") else []
    with pytest.raises(ConfigError) as err:
        load_config(LCMConfig, None, [*extra, override])
    assert err.value.field == field
    assert f"field '{field}'" in str(err.value)
