"""Config loading: YAML instances of the dataclass schema, overrides, and errors naming file, line and field."""

from pathlib import Path

import pytest

from conceptlm.core.config import config_to_dict, load_config, parse_override, save_config
from conceptlm.core.errors import ConfigError
from conceptlm.lm.config import LMRunConfig
from conceptlm.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1.0e-4\n  betas: [0.8, 0.9]\ntrain:\n  max_steps: 7\n")
    cfg = load_config(SFTConfig, p)
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.train.max_steps == 7
    assert cfg.train.micro_batch_size == 16  # default kept


def test_overrides_take_precedence_and_parse_yaml_scalars(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1.0e-4\n")
    cfg = load_config(SFTConfig, p, ["optim.lr=2e-3", "model.lora.enabled=true", "model.lora.target_modules=[q_proj]",
                                     "data.limit_train=null"])
    assert cfg.optim.lr == 2e-3  # "2e-3" is a YAML string; a float field converts it
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ["q_proj"]
    assert cfg.data.limit_train is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize("text,line,field,needle", [
    ("optim:\n  lr: 1e-3\n  betaz: [0.9, 0.9]\n", 3, "optim.betaz", "did you mean 'betas'"),
    ("train:\n  max_steps: many\n", 2, "train.max_steps", "expected an integer"),
    ("model:\n  arch: bert\n", 2, "model.arch", "'llama'"),
    ("schedule:\n  kind: cosine\n  min_lr_ratio: 2.0\n", 3, "schedule.min_lr_ratio", "[0, 1]"),
    ("run:\n  name: x\ntrain:\n  micro_batch_size: 0\n", 4, "train.micro_batch_size", "> 0"),
    ("model:\n  hidden_size: 30\n  num_heads: 4\n", 3, "model.num_heads", "not divisible"),
    ("optim: 3\n", 1, "optim", "expected a mapping"),
])
def test_errors_name_file_line_field(tmp_path, text, line, field, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert e.value.line == line and e.value.field == field
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: field '{field}'") and needle in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:2"):
        load_config(SFTConfig, write(tmp_path, "a: 1\n b: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_override_error_names_the_override():
    with pytest.raises(ConfigError, match="command-line override: field 'train.max_steps'"):
        load_config(SFTConfig, None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(SFTConfig, None, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=0.01", "model.arch=gpt2"])
    save_config(cfg, tmp_path / "out.yaml", header="conceptlm sft train x")
    text = (tmp_path / "out.yaml").read_text()
    assert text.startswith("# conceptlm sft train x\n")
    again = load_config(SFTConfig, tmp_path / "out.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_every_config_file_loads():
    """Every YAML under configs/ is a valid instance of its method's schema and starts with its command."""
    from conceptlm.cli import METHODS

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for f in files:
        method = f.parent.name
        assert method in METHODS, f"{f}: no method named {method}"
        first = f.read_text().splitlines()[0]
        assert first.startswith("# conceptlm ") or first.startswith("# torchrun "), f"{f}: first line {first!r}"
        load_config(METHODS[method].config_cls(), f)


def test_base_config_is_valid():
    LMRunConfig().validate()


def test_with_own_length_replaces_only_what_is_set_and_caps_warmup():
    from conceptlm.core.config import with_own_length

    cfg = load_config(LMRunConfig, None, ["train.max_steps=100", "train.micro_batch_size=16", "optim.lr=0.003",
                                          "schedule.warmup_steps=30"])
    short = with_own_length(cfg, steps=20, batch_size=None, lr=1e-4)
    assert (short.train.max_steps, short.train.micro_batch_size, short.optim.lr) == (20, 16, 1e-4)
    assert short.schedule.warmup_steps == 20 and cfg.schedule.warmup_steps == 30  # capped; cfg untouched
    same = with_own_length(cfg, steps=None, batch_size=None, lr=None)
    assert config_to_dict(same) == config_to_dict(cfg)
