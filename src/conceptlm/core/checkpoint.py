"""Native checkpoints of a whole unit: its trainable state in safetensors, optimizer/scheduler/RNG/data state,
artefacts, an optional interoperable export, and a manifest that lets a resume verify them.

Layout of ``<run_dir>/checkpoints/step_00000042/``::

    unit.safetensors     the unit's checkpointed state: every trainable parameter and persistent buffer, minus
                         tied duplicates and the sub-modules the unit declares frozen (``TrainUnit.frozen_modules``)
    trainer_state.pt     optimizer + scheduler + step + RNG + data plan (``torch.load(weights_only=True)``)
    config.yaml          the resolved run config
    artifacts/<name>/    what the method needs to reload the run (a tokenizer, normalizer statistics, ...)
    model/               the unit's export, if it has one (e.g. ``save_pretrained`` + tokenizer for HF units:
                         loads with ``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained``)
    manifest.json        written last: size and sha256 of every file above

With ``dist.checkpoint: sharded`` (FSDP2) no rank ever holds the whole model: every rank writes its own shards of
the model and optimizer state with ``torch.distributed.checkpoint`` (DCP), and the folder holds instead of
``unit.safetensors`` and the optimizer part of ``trainer_state.pt``::

    dcp/.metadata        DCP's index of the shards (written by rank 0; read back with a restricted unpickler)
    dcp/__<r>_0.distcp   rank r's shards: ``model.<key>`` for the keys of :func:`checkpoint_keys` and
                         ``optim.<parameter>.<name>`` (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``), tensors only
    rng/rank_<r>.pt      rank r's RNG state
    trainer_state.pt     as above, with the optimizer's ``param_groups`` instead of its whole state dict

and no ``model/`` export (it would need the gathered weights). The same protocol holds: every rank writes into one
temporary folder, rank 0 writes the manifest once all ranks are done and renames the folder into place. A sharded
checkpoint resumes under FSDP2 at any world size (DCP reshards), and on one process (or DDP) by reading the shards
whole; :func:`conceptlm.core.sharded_checkpoint.consolidate_checkpoint` turns it into a full one, and
:func:`load_unit_state` reads either. The sharded half lives in :mod:`conceptlm.core.sharded_checkpoint`.

A checkpoint is written into a temporary sibling folder and renamed into place, so a run killed at any moment leaves
either the previous complete checkpoint or the new complete one; a save that fails (a full disk) is a
``CheckpointError`` naming the newest complete checkpoint. Resuming verifies the manifest and falls back to the newest
intact checkpoint (with a warning naming what was wrong); when every checkpoint is damaged it refuses, naming them.
Resuming loads ``unit.safetensors`` strictly: a missing, unexpected or wrong-shape tensor is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conceptlm.core.artifact import file_listing, listed_file_problem
from conceptlm.core.errors import CheckpointError
from conceptlm.core.io import atomic_dir, atomic_write_text

__all__ = ["save_checkpoint", "find_latest_checkpoint", "find_resumable_checkpoint", "verify_checkpoint",
           "load_trainer_state", "load_unit_state", "checkpoint_keys", "rng_state", "set_rng_state",
           "list_checkpoints", "checkpoint_step", "run_finished", "remove_stale_temporaries", "tied_parameter_names",
           "is_sharded", "UNIT_FILE", "MANIFEST", "FORMAT", "SHARDED_DIR", "RNG_DIR"]

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")
UNIT_FILE = "unit.safetensors"
MANIFEST = "manifest.json"
FORMAT = "conceptlm-checkpoint/2"
SHARDED_DIR = "dcp"
RNG_DIR = "rng"


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


# ------------------------------------------------------------------------------------------------ which tensors
def checkpoint_keys(unit: torch.nn.Module) -> list[str]:
    """State-dict keys a checkpoint of ``unit`` holds: trainable parameters and persistent buffers, without tied
    duplicates, frozen parameters (rebuilt from the unit's own construction, e.g. a LoRA base) and the sub-modules
    of ``unit.frozen_modules()``. Call on the unwrapped unit."""
    skip = tuple(n + "." for n in getattr(unit, "frozen_modules", lambda: [])())
    params = dict(unit.named_parameters(remove_duplicate=False))
    tied = tied_parameter_names(unit)
    keys = []
    for key in unit.state_dict(keep_vars=True):
        if key.startswith(skip) or key in tied:
            continue
        if key in params and not params[key].requires_grad:
            continue
        keys.append(key)
    return keys


# ------------------------------------------------------------------------------------------------ listing
def _step_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run that have their trainer state, oldest first (not verified: see
    :func:`find_resumable_checkpoint`)."""
    return [p for p in _step_dirs(run_dir) if (p / "trainer_state.pt").is_file()]


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(ckpt: str | Path) -> int:
    """The optimizer step of a checkpoint folder ``step_XXXXXXXX``."""
    m = _STEP_RE.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not a checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


def run_finished(run_dir: str | Path, max_steps: int) -> bool:
    """Whether the run folder holds an intact checkpoint at (or past) ``max_steps`` (a pipeline stage is done).

    Raises:
        CheckpointError: the run has checkpoints and every one is damaged (see :func:`find_resumable_checkpoint`).
    """
    ckpt = find_resumable_checkpoint(run_dir)
    return ckpt is not None and checkpoint_step(ckpt) >= max_steps


def verify_checkpoint(ckpt: str | Path) -> str | None:
    """``None`` if the checkpoint is intact, else what is wrong with it (one line)."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if not manifest.is_file():  # nothing to check the files against: at least the trainer state and the weights
        if not (ckpt / "trainer_state.pt").is_file():
            return "no trainer_state.pt and no manifest.json"
        try:
            load_trainer_state(ckpt)
        except Exception as e:  # noqa: BLE001 - any failure means unusable
            return f"trainer_state.pt is unreadable ({type(e).__name__})"
        if is_sharded(ckpt):  # sharded checkpoints always had a manifest: without one it is a partial folder
            return f"no manifest.json next to the shards in {SHARDED_DIR}/ (an incomplete sharded checkpoint)"
        if not (ckpt / UNIT_FILE).is_file():
            return f"no weights ({UNIT_FILE})"
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    problem = listed_file_problem(ckpt, files)
    if problem is None and is_sharded(ckpt):
        from conceptlm.core.sharded_checkpoint import sharded_problem

        problem = sharded_problem(ckpt, files)
    return problem


def find_resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (``None`` when the run has none); each newer damaged one is reported with a
    warning and skipped.

    Raises:
        CheckpointError: the run has checkpoints but every one of them is damaged (naming each and what is wrong),
            rather than letting a resume silently start the run over.
    """
    damaged: list[str] = []
    for ckpt in reversed(_step_dirs(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping damaged checkpoint %s: %s", ckpt, problem)
        damaged.append(f"{ckpt.name}: {problem}")
    if damaged:
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged ({'; '.join(damaged)}), nothing to resume "
                              f"from; move {Path(run_dir) / 'checkpoints'} away to start the run over, or choose "
                              "another run.name")
    return None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary folders a killed save left behind (call while holding the run lock)."""
    root = Path(run_dir) / "checkpoints"
    stale = [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale temporary checkpoint folder(s) in %s", len(stale), root)
    return stale


# ------------------------------------------------------------------------------------------------ saving
def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage with another (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def _save_artifact(obj: Any, directory: Path) -> None:
    if hasattr(obj, "save_pretrained"):
        obj.save_pretrained(directory)
    elif callable(obj):
        directory.mkdir(parents=True, exist_ok=True)
        obj(directory)
    else:
        raise TypeError(f"artifact {directory.name!r}: needs save_pretrained(dir) or to be a callable(dir)")


def _write_manifest(directory: Path, step: int) -> None:
    names = [str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file()]
    files = file_listing(directory, names)
    text = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")


def save_checkpoint(run_dir: str | Path, step: int, *, unit_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config_yaml: str, artifacts: dict[str, Any] | None = None,
                    export: Callable[[Path], bool] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (rank 0 only, with full CPU tensors).

    Args:
        unit_state: the tensors to checkpoint (``checkpoint_keys`` of the unit's full state dict).
        trainer_state: optimizer/scheduler/step/rng/data state (tensors and primitives).
        artifacts: ``{name: object with save_pretrained(dir) or callable(dir)}``, written to ``artifacts/<name>/``.
        export: ``(dir) -> wrote_anything`` for the interoperable copy in ``model/``.
        keep: number of most recent checkpoints to keep.
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:08d}"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of the training bar
    try:
        with atomic_dir(target) as tmp:
            save_file(_own_storage(unit_state), str(tmp / UNIT_FILE), metadata={"format": FORMAT})
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            for name, obj in (artifacts or {}).items():
                _save_artifact(obj, tmp / "artifacts" / name)
            if export is not None and not export(tmp / "model"):
                shutil.rmtree(tmp / "model", ignore_errors=True)
            _write_manifest(tmp, step)
        atomic_write_text(root / "latest", target.name + "\n")
    except Exception as e:  # noqa: BLE001 - only write failures are turned into a one-line error
        reason = _write_failure(e)
        if reason is None:
            raise
        newest = find_latest_checkpoint(run_dir)
        kept = f"the newest complete checkpoint is {newest}" if newest is not None else "no checkpoint was written"
        raise CheckpointError(f"cannot write checkpoint {target} ({reason}); {kept}") from e
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


_WRITE_FAILURE_TEXT = ("no space left", "os error 28", "storagefull", "disk quota", "file write failed",
                       "read-only file system")


def _write_failure(e: BaseException) -> str | None:
    """One line saying why writing failed when ``e`` is an I/O failure (a full disk, a quota, a read-only or
    vanished folder; also as torch's and safetensors' own errors), else ``None``."""
    if isinstance(e, OSError):
        what = os.strerror(e.errno) if e.errno else (str(e) or type(e).__name__)
        return f"{e.filename}: {what}" if e.filename else what
    text = " ".join(str(e).split())
    if any(t in text.lower() for t in _WRITE_FAILURE_TEXT):
        return text[:300]
    return None


# ------------------------------------------------------------------------------------------------ loading
def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


def _read_unit_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_unit_state(unit: torch.nn.Module, ckpt: str | Path) -> None:
    """Load a checkpoint's weights into an (unwrapped) unit, in place, strictly.

    A sharded checkpoint's model shards are read whole on this process (no process group needed).

    Raises:
        CheckpointError: naming the first missing, unexpected or wrong-shape tensor.
    """
    ckpt = Path(ckpt)
    path = ckpt / UNIT_FILE
    if is_sharded(ckpt):  # read on this process, whole: for eval, export and runs that do not shard the model
        from conceptlm.core.sharded_checkpoint import MODEL_PREFIX, read_sharded, split_sharded

        path = ckpt / SHARDED_DIR
        sd = split_sharded(read_sharded(ckpt, MODEL_PREFIX))[0]
    elif not path.is_file():
        raise CheckpointError(f"{ckpt}: no {UNIT_FILE} (not a conceptlm checkpoint)")
    else:
        sd = _read_unit_file(path)
    expected = checkpoint_keys(unit)
    own = unit.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected)]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; was it written by another model or config?")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} in the checkpoint"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + "; was it written by another model or config?")
    for k in expected:
        if tuple(sd[k].shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)}, the model expects "
                                  f"{tuple(own[k].shape)}")
    unit.load_state_dict(sd, strict=False)


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier parameter (e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


# ------------------------------------------------------------------------------------------------ sharded (DCP)
def is_sharded(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` is a sharded checkpoint (``dist.checkpoint: sharded``: DCP shards in ``dcp/``)."""
    return (Path(ckpt) / SHARDED_DIR).is_dir()
