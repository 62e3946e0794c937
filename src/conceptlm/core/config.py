"""Typed configs: dataclasses are the schema, YAML files are instances, ``a.b=value`` overrides on the command line.

``load_config(SFTConfig, "configs/sft/tiny_cpu.yaml", ["optim.lr=1e-3"])`` reads the YAML with ``yaml.safe_load``
semantics, applies the overrides, checks every key and type against the dataclasses and runs each section's
``validate()``. Every error is a :class:`ConfigError` naming the file, the line and the dotted field, with a hint
("did you mean ...?", the allowed choices).

The sections every trainer needs live here (:class:`RunConfig`); the token-LM sections (model, tokenizer, chat data,
generation) live in :mod:`conceptlm.lm.config`. A method config subclasses one of them and adds its own section.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from conceptlm.core.errors import ConfigError

__all__ = [
    "RunSection", "OptimSection", "ScheduleSection", "TrainSection", "DistSection", "RunConfig",
    "load_config", "config_to_dict", "config_text", "save_config", "parse_override", "check", "with_own_length",
    "ARCHS",
]

ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2", "gemma2", "olmo2")
"""Hugging Face causal-LM architectures the toolkit builds and adapts (:mod:`conceptlm.core.hf`); here so that
configs validate an ``arch`` without importing transformers."""


def check(cond: bool, field_name: str, message: str) -> None:
    """Raise ``ConfigError(message, field=field_name)`` unless ``cond`` (for sections' ``validate``)."""
    if not cond:
        raise ConfigError(message, field=field_name)



@dataclass(kw_only=True)
class RunSection:
    name: str = "run"
    """Run name; outputs go to ``{out_dir}/{name}``."""
    out_dir: str = "runs"
    resume: str = "never"
    """``never`` (refuse to reuse a run folder that has checkpoints), ``auto`` (continue from the newest intact
    checkpoint if there is one) or a checkpoint directory path."""
    resume_changes: Literal["refuse", "apply"] = "refuse"
    """On resume, settings that differ from the checkpoint's config (other than run length, cadences, dist and
    generation): ``refuse`` stops with a list of them; ``apply`` uses the new values from the resumed step on."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers fed with every ``metrics.jsonl`` row besides TensorBoard: ``wandb`` and/or ``trackio``
    (off by default; see :mod:`conceptlm.core.trackers`)."""
    tracker_project: str = "conceptlm"
    """The tracker project the run is logged under."""

    def validate(self) -> None:
        check(bool(self.name) and not any(c in self.name for c in "/\\\0") and self.name not in (".", ".."),
              "run.name", f"{self.name!r} is not a folder name: must be non-empty, without '/' or '\\', and not "
              "'.' or '..' (the run folder must lie inside run.out_dir)")
        from conceptlm.core.trackers import TRACKERS

        for name in self.trackers:
            check(name in TRACKERS, "run.trackers", f"unknown tracker {name!r} (choose from {', '.join(TRACKERS)})")
        check(len(set(self.trackers)) == len(self.trackers), "run.trackers", "names a tracker twice")


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    """Applied to matrices only (no decay on biases, norms and 1-D params)."""
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", "must be > 0")
        check(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", "each beta must be in [0, 1)")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass(kw_only=True)
class ScheduleSection:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of ``optim.lr`` (cosine and linear decay)."""

    def validate(self) -> None:
        check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")


@dataclass(kw_only=True)
class TrainSection:
    max_steps: int = 100
    micro_batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto`` = bf16 autocast on CUDA, fp32 on CPU."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (and at the end); 0 = only at the end."""
    eval_batch_size: int = 32
    save_every: int = 0
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints",
                     "log_every"):
            check(getattr(self, name) > 0, f"train.{name}", "must be > 0")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        check(self.save_every >= 0, "train.save_every", "must be >= 0")


@dataclass(kw_only=True)
class DistSection:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """``auto`` = DDP when launched with torchrun and WORLD_SIZE > 1, else a single process. ``fsdp`` shards
    parameters, gradients and optimizer state (FSDP2, one unit per decoder layer) for large models."""
    find_unused_parameters: bool = False
    checkpoint: Literal["full", "sharded"] = "full"
    """``full``: rank 0 gathers the whole model and optimizer state and writes ``unit.safetensors``,
    ``trainer_state.pt`` and the method's export (``model/``). ``sharded`` (needs ``strategy: fsdp``): every rank
    writes its own shards with ``torch.distributed.checkpoint`` into ``dcp/``, so no rank ever holds the whole model
    (for models too large for one rank's memory); no ``model/`` export. A run resumes either layout, at any world size
    (see :mod:`conceptlm.core.checkpoint`)."""

    def validate(self) -> None:
        check(self.checkpoint == "full" or self.strategy == "fsdp", "dist.checkpoint",
              f"sharded checkpoints need dist.strategy=fsdp (got {self.strategy!r}); use dist.checkpoint=full")


@dataclass(kw_only=True)
class RunConfig:
    """The sections every trainer reads (run, optim, schedule, train, dist). Methods subclass it and add their own
    sections; token-LM methods build on :class:`conceptlm.lm.config.LMRunConfig` (model, tokenizer, chat data,
    generation)."""

    run: RunSection = field(default_factory=RunSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        check(self.schedule.warmup_steps <= self.train.max_steps, "schedule.warmup_steps",
              f"{self.schedule.warmup_steps} exceeds train.max_steps={self.train.max_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def with_own_length(cfg: RunConfig, *, steps: int | None, batch_size: int | None, lr: float | None):
    """``cfg`` with a stage's own ``steps`` / ``batch_size`` / ``lr`` (each when set) in place of the run's
    ``train.max_steps`` / ``train.micro_batch_size`` / ``optim.lr``, warmup capped at the new length (for stages such
    as an SAE or a decoder that share a config with the main run)."""
    train = dataclasses.replace(cfg.train, max_steps=steps or cfg.train.max_steps,
                                micro_batch_size=batch_size or cfg.train.micro_batch_size)
    optim = dataclasses.replace(cfg.optim, lr=lr or cfg.optim.lr)
    schedule = dataclasses.replace(cfg.schedule, warmup_steps=min(cfg.schedule.warmup_steps, train.max_steps))
    return dataclasses.replace(cfg, train=train, optim=optim, schedule=schedule)


# ----------------------------------------------------------------------------------------------------------------
# Loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_reason(e)})") from None
    return key.split("."), value


def _yaml_reason(e: yaml.YAMLError) -> str:
    """One line saying what is wrong (``str(YAMLError)`` spans several lines)."""
    reason = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
    return " ".join(str(reason).split())


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse YAML safely; return the data and a map dotted-key -> 1-based line of that key."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", path=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        if line is None and getattr(e, "position", None) is not None:  # ReaderError: a character offset
            line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"invalid YAML: {_yaml_reason(e)}", path=path, line=line) from None
    lines: dict[str, int] = {}

    def walk(n, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                line = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode) and k.value in seen:  # yaml.safe_load would keep the last one
                    raise ConfigError(f"duplicate key (first given at line {seen[k.value]}); keep one of them",
                                      path=path, line=line, field=f"{prefix}{k.value}")
                if isinstance(k, yaml.ScalarNode):
                    seen[k.value] = line
                key = f"{prefix}{k.value}"
                lines[key] = line
                walk(v, key + ".")

    if node is not None:
        walk(node, "")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping of sections", path=path, line=1)
    return data, lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type annotation; raise ConfigError(field=where) on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}", field=where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{value!r} is not one of {', '.join(map(repr, args))}", field=where)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", field=where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}", field=where)
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", field=where)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true/false, got {value!r}", field=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"expected an integer, got {value!r}", field=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", field=where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", field=where)
    raise ConfigError(f"unsupported config type {tp!r}", field=where)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for section {cls.__name__}, got {data!r}", field=prefix or None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key{hint}", field=where)
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{'.'.join(keys)}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load a config of dataclass type ``cls`` from YAML ``path`` (optional) plus ``key=value`` overrides.

    Raises:
        ConfigError: naming file, line and field for any unknown key, wrong type, invalid choice or failed check.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config file not found", path=path)
        data, lines = _yaml_with_lines(path)
    overridden: set[str] = set()
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
        overridden.add(".".join(keys))

    def locate(err: ConfigError) -> ConfigError:
        """Blame the innermost of the field and its sections that the file or an override sets; a key that only an
        override brings in (``nosuch.key=1``, ``model.bogus=2``) is the override's."""
        fld = err.field or ""
        key = fld
        while key:
            if key in overridden or (key not in lines and any(o.startswith(key + ".") for o in overridden)):
                return ConfigError(err.reason, path="command-line override", field=fld or None)
            if key in lines:
                break
            key = key.rsplit(".", 1)[0] if "." in key else ""
        return ConfigError(err.reason, path=path, line=lines.get(key), field=fld or None)

    try:
        cfg = _build(cls, data, "")
        cfg.validate()
    except ConfigError as e:
        raise locate(e) from None
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict (YAML-safe) view of a config dataclass."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def config_text(cfg: Any, header: str | None = None) -> str:
    """The resolved config as YAML, each line of ``header`` (e.g. the command) first as a comment."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def save_config(cfg: Any, path: str | Path, header: str | None = None) -> None:
    """Write the resolved config as YAML atomically (temp file, then rename)."""
    from conceptlm.core.io import atomic_write_text

    atomic_write_text(path, config_text(cfg, header))
