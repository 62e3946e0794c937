"""Sharded checkpoints (``dist.checkpoint: sharded``, FSDP2): every rank writes its own shards of the model and
optimizer state with ``torch.distributed.checkpoint`` (DCP), so no rank ever holds the whole model.

The layout and the protocol (one temporary folder, rank 0's manifest written last, atomic rename) are described in
:mod:`conceptlm.core.checkpoint`, which owns the full-state half and tells the two apart (:func:`~conceptlm.core.
checkpoint.is_sharded`). Here: writing the shards (:func:`save_sharded_checkpoint`), reading them back under FSDP2
(:func:`load_sharded`, DCP reshards to any world size) or whole on one process (:func:`read_sharded`), each rank's RNG
(:func:`load_rank_rng`), the checks a resume runs on the shard index (:func:`sharded_problem`; DCP's ``.metadata`` is
a pickle, read with a restricted unpickler) and :func:`consolidate_checkpoint` (sharded -> full, on one process).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from conceptlm.core.artifact import file_listing
from conceptlm.core.checkpoint import (
    FORMAT,
    MANIFEST,
    RNG_DIR,
    SHARDED_DIR,
    UNIT_FILE,
    _own_storage,
    _save_artifact,
    _write_failure,
    _write_manifest,
    find_latest_checkpoint,
    is_sharded,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    verify_checkpoint,
)
from conceptlm.core.errors import CheckpointError
from conceptlm.core.io import atomic_dir, atomic_write_text, replace_dir

__all__ = ["save_sharded_checkpoint", "load_sharded", "read_sharded", "sharded_tensors", "split_sharded",
           "load_rank_rng", "consolidate_checkpoint", "sharded_problem", "MODEL_PREFIX", "OPTIM_PREFIX"]

log = logging.getLogger(__name__)

MODEL_PREFIX, OPTIM_PREFIX = "model.", "optim."
"""Key prefixes of the model and the optimizer tensors inside the shards."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: unpickle it allowing only the classes DCP's index is made of (the
    checkpoint's dataclasses, ``torch.Size``, dtypes, layouts, paths), so a foreign file cannot run code."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
              ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _read_metadata(ckpt: Path):
    path = Path(ckpt) / SHARDED_DIR / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an incomplete sharded checkpoint)") from None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint index ({type(e).__name__}: {e})") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index")
    return md


def sharded_problem(ckpt: Path, files: dict) -> str | None:
    """What is wrong with an otherwise intact sharded checkpoint: its index unreadable, or a shard file the index
    names that the manifest does not list (a partial checkpoint)."""
    try:
        md = _read_metadata(ckpt)
    except CheckpointError as e:
        return str(e)
    for info in md.storage_data.values():
        rel = f"{SHARDED_DIR}/{info.relative_path}"
        if rel not in files:
            return f"{ckpt / rel}: named by the shard index but not listed in the manifest (incomplete)"
    return None


class _SafeReader:
    """Builds DCP's FileSystemReader with the restricted metadata unpickler (a function, so that importing this
    module does not import torch.distributed.checkpoint)."""

    @staticmethod
    def make(path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        class Reader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                from torch.distributed.checkpoint.metadata import StorageMeta

                md = _read_metadata(Path(self.path).parent)
                if getattr(md, "storage_meta", None) is None:
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
                return md

        return Reader(str(path))


def sharded_tensors(model: dict[str, torch.Tensor], optim_state: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The flat dict a sharded checkpoint holds: ``model.<key>`` and ``optim.<parameter>.<name>`` (tensors or
    DTensors only: anything else would be pickled by DCP and could not be loaded safely)."""
    out: dict[str, torch.Tensor] = {MODEL_PREFIX + k: v for k, v in model.items()}
    for fqn, st in (optim_state or {}).items():
        for name, v in st.items():
            out[f"{OPTIM_PREFIX}{fqn}.{name}"] = v
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"sharded checkpoints hold tensors only; {bad[0]!r} is a {type(out[bad[0]]).__name__}")
    return out


def split_sharded(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Inverse of :func:`sharded_tensors`: ``(model state, optimizer "state" keyed by parameter name)``."""
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(MODEL_PREFIX):
            model[k[len(MODEL_PREFIX):]] = v
        elif k.startswith(OPTIM_PREFIX):
            fqn, name = k[len(OPTIM_PREFIX):].rsplit(".", 1)
            optim.setdefault(fqn, {})[name] = v
    return model, optim


def _check_index(ckpt: Path, md, expected: dict[str, torch.Tensor]) -> None:
    """One-line error for the first tensor the index lacks, holds in excess, or holds with another shape."""
    where = Path(ckpt) / SHARDED_DIR
    have = md.state_dict_metadata
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    for names, what in ((missing, "is missing from the checkpoint"), (unexpected, "in the checkpoint is unexpected")):
        if names:
            raise CheckpointError(f"{where}: tensor {names[0]!r} {what}"
                                  + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                                  + "; was it written by another model or config?")
    for k, t in expected.items():
        size = tuple(getattr(have[k], "size", ()))
        if size != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {size}, the model expects {tuple(t.shape)}")


def load_sharded(ckpt: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Load a sharded checkpoint into ``tensors`` (``sharded_tensors`` of this run's model and optimizer, DTensors
    under FSDP2), in place, on every rank together: each rank reads only the pieces of its own shards, whatever
    the world size that wrote them (DCP reshards). Strict: a missing, unexpected or wrong-shape tensor is a
    ``CheckpointError`` naming it."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    _check_index(ckpt, _read_metadata(ckpt), tensors)
    dcp.load(tensors, storage_reader=_SafeReader.make(ckpt / SHARDED_DIR))


def read_sharded(ckpt: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole tensors of a sharded checkpoint whose keys start with ``prefix`` (``"model."``, ``"optim."`` or
    all), read on this process alone (no process group needed; none is used if one exists)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = Path(ckpt)
    md = _read_metadata(ckpt)
    out = {}
    for k, meta in md.state_dict_metadata.items():
        if not k.startswith(prefix):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt / SHARDED_DIR}: {k!r} is not a tensor (not a conceptlm checkpoint)")
        out[k] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in a single process: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=_SafeReader.make(ckpt / SHARDED_DIR), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps a bad shard file in several exception types
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{ckpt / SHARDED_DIR}: cannot read the shards ({type(e).__name__}: {msg})") from None
    return out


def load_rank_rng(ckpt: str | Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s RNG state saved with a sharded checkpoint, or None when it has none."""
    path = Path(ckpt) / RNG_DIR / f"rank_{rank:05d}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, tensors: dict[str, torch.Tensor],
                            trainer_state: dict[str, Any], config_yaml: str, artifacts: dict[str, Any] | None = None,
                            keep: int = 2) -> Path:
    """Write sharded checkpoint ``step``; called by every rank together (a collective).

    Every rank writes its own shards of ``tensors`` (:func:`sharded_tensors`; DTensors are written shard by shard,
    nothing is gathered) and its RNG state into ``checkpoints/.tmp-step_XXXXXXXX/``, hashes its own files; after
    all ranks are done, rank 0 writes ``trainer_state.pt``, ``config.yaml``, the artefacts and the manifest and
    renames the folder into place. A failure on any rank is a ``CheckpointError`` on every rank, naming the newest
    complete checkpoint, and leaves no step folder behind.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from conceptlm.core.distributed import barrier, get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:08d}"
    tmp = root / f".tmp-{target.name}.sharded"

    def agree(failed: BaseException | None, what: str) -> None:
        """Every rank learns whether any rank failed; all raise together (one line naming the failure)."""
        flags = [None] * world if world > 1 else None
        reason = None if failed is None else (_write_failure(failed) or f"{type(failed).__name__}: {failed}")
        if world > 1:
            dist.all_gather_object(flags, reason)
        else:
            flags = [reason]
        bad = [(r, m) for r, m in enumerate(flags) if m is not None]
        if bad:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = find_latest_checkpoint(run_dir)
            kept = f"the newest complete checkpoint is {newest}" if newest is not None else "no checkpoint was written"
            r, m = bad[0]
            raise CheckpointError(f"cannot write checkpoint {target} ({what} on rank {r}: {m}); {kept}") from failed

    failed: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            failed = e
    agree(failed, "creating the folder")
    own: dict[str, dict[str, Any]] = {}
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED_DIR)))
        rng_file = f"{RNG_DIR}/rank_{rank:05d}.pt"
        torch.save(rng_state(), tmp / rng_file)
        names = sorted(f"{SHARDED_DIR}/{p.name}" for p in (tmp / SHARDED_DIR).glob(f"__{rank}_*.distcp"))
        own = file_listing(tmp, [*names, rng_file])  # each rank hashes the files it wrote, in parallel
    except Exception as e:  # noqa: BLE001 - told to every rank below
        failed = e
    agree(failed, "writing the shards")
    listings = [None] * world
    if world > 1:
        dist.all_gather_object(listings, own)
    else:
        listings = [own]
    if rank == 0:
        try:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            for name, obj in (artifacts or {}).items():
                _save_artifact(obj, tmp / "artifacts" / name)
            files = {k: v for listing in listings for k, v in listing.items()}
            rest = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
            files.update(file_listing(tmp, [n for n in rest if n not in files]))
            text = json.dumps({"format": FORMAT, "step": step, "layout": "sharded", "world_size": world,
                               "files": dict(sorted(files.items()))}, indent=1)
            (tmp / MANIFEST).write_text(text + "\n", encoding="utf-8")
            replace_dir(tmp, target)
            atomic_write_text(root / "latest", target.name + "\n")
        except Exception as e:  # noqa: BLE001 - told to every rank below
            failed = e
    agree(failed, "writing the manifest")
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def consolidate_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write sharded checkpoint ``ckpt`` as a full one at ``out`` (atomically), on one process: the same tensors in
    ``unit.safetensors``, the optimizer state in ``trainer_state.pt`` as a full checkpoint holds it, the config and
    the artefacts copied, a new manifest. Without the ``model/`` export, which only the method's unit can write (to
    get it, resume the run on one process with ``dist.strategy=none dist.checkpoint=full``: a run resumed at its
    last step from a checkpoint of the other layout writes it again in its own).

    Raises:
        CheckpointError: ``ckpt`` is damaged or not a sharded checkpoint.
    """
    ckpt, out = Path(ckpt), Path(out)
    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt}: not a sharded checkpoint (no {SHARDED_DIR}/); it is already full")
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({problem})")
    state = load_trainer_state(ckpt)
    model, optim = split_sharded(read_sharded(ckpt))
    full_state = {k: v for k, v in state.items() if k != "optimizer_param_groups"}
    full_state["optimizer"] = {"state": optim, "param_groups": state["optimizer_param_groups"]}
    with atomic_dir(out) as tmp:
        save_file(_own_storage(model), str(tmp / UNIT_FILE), metadata={"format": FORMAT})
        torch.save(full_state, tmp / "trainer_state.pt")
        shutil.copy2(ckpt / "config.yaml", tmp / "config.yaml")
        if (ckpt / "artifacts").is_dir():
            shutil.copytree(ckpt / "artifacts", tmp / "artifacts")
        _write_manifest(tmp, int(state["step"]))
    return out
