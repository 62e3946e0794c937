"""Checkpoints: HF model (safetensors via ``save_pretrained``), optimizer, scheduler, RNG and data-order state.

Layout of ``<run_dir>/checkpoints/step_00000042/``::

    model/               save_pretrained output (full model, or the LoRA adapter) + tokenizer: loads with
                         ``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained``
    unit_extra.safetensors   unit parameters that are not part of the HF model (if any)
    trainer_state.pt     optimizer + scheduler + step + RNG + data plan (tensors/primitives only:
                         loaded with ``torch.load(weights_only=True)``)
    config.yaml          the resolved run config

A checkpoint is written into a temporary sibling folder and renamed into place, so a run killed at any moment
leaves either the previous complete checkpoint or the new complete one. ``latest`` names the newest one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from conceptlm.core.io import atomic_dir, atomic_write_text

__all__ = ["save_checkpoint", "find_latest_checkpoint", "load_trainer_state", "load_model_weights",
           "rng_state", "set_rng_state", "list_checkpoints"]

_STEP_RE = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, *, hf_model, tokenizer, model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config_yaml: str, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (call on rank 0 only, with full, CPU state dicts).

    Args:
        hf_model: the (unwrapped) HF model; its ``save_pretrained`` writes ``model/``.
        model_state: the unit's full state dict (keys ``model.*`` belong to the HF model).
        trainer_state: optimizer/scheduler/step/rng/data state (tensors and primitives).
        keep: number of most recent checkpoints to keep.
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:08d}"
    tied = _tied_keys(hf_model)  # gathered (FSDP) state dicts hold tied weights as separate copies: drop them
    hf_sd = {k[len("model."):]: v for k, v in model_state.items() if k.startswith("model.") and
             k[len("model."):] not in tied}
    extra = {k: v.contiguous() for k, v in model_state.items() if not k.startswith("model.")}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the training bar
    with atomic_dir(target) as tmp:
        hf_model.save_pretrained(tmp / "model", state_dict=hf_sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        if extra:
            save_file(extra, str(tmp / "unit_extra.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    atomic_write_text(root / "latest", target.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


def _read_safetensors_dir(directory: Path, stem: str) -> dict[str, torch.Tensor]:
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return load_file(str(single))
    shards = sorted(directory.glob(f"{stem}-*-of-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no {stem}.safetensors found")
    sd: dict[str, torch.Tensor] = {}
    for s in shards:
        sd.update(load_file(str(s)))
    return sd


def load_model_weights(unit: torch.nn.Module, ckpt: str | Path) -> None:
    """Load a checkpoint's weights into an (unwrapped) unit, in place: HF model (full or LoRA) + extra params."""
    ckpt = Path(ckpt)
    hf_model = unit.hf_model
    model_dir = ckpt / "model"
    if (model_dir / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(hf_model, _read_safetensors_dir(model_dir, "adapter_model"))
        bad = [k for k in result.unexpected_keys]
        if bad:
            raise RuntimeError(f"{model_dir}: unexpected adapter keys {bad[:5]}")
    else:
        sd = _read_safetensors_dir(model_dir, "model")
        missing, unexpected = hf_model.load_state_dict(sd, strict=False)
        tied = _tied_keys(hf_model)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"{model_dir}: weights do not match the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
    extra_path = ckpt / "unit_extra.safetensors"
    if extra_path.is_file():
        missing, unexpected = unit.load_state_dict(load_file(str(extra_path)), strict=False)
        if unexpected:
            raise RuntimeError(f"{extra_path}: unexpected keys {unexpected[:5]}")


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier parameter (e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
