"""Hub-format export of CoCoMix students, and reading such folders back.

A student folder holds ``config.json`` (``model_type: conceptlm_cocomix``, the student's architecture, an
``auto_map``), ``model.safetensors`` (the :class:`~conceptlm.cocomix.model.StudentLM` state dict),
``modeling_cocomix.py`` (:mod:`conceptlm.cocomix.hub_modeling`, copied: it imports only torch and transformers)
and, when the student has one, its tokenizer's files. Outside conceptlm::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # (else transformers asks y/N)

gives the student's logits bit for bit (concept path included), and ``lm_eval --model hf --model_args
pretrained=FOLDER,trust_remote_code=True`` scores it. Inside conceptlm, :func:`load_hub_student` rebuilds the
:class:`StudentLM` itself (KV-cached generation, steering, the harness model ``conceptlm-cocomix``).

``conceptlm cocomix export --config CFG`` writes one folder per student of ``pipeline.arms`` x ``pipeline.seeds``
to ``{run_dir}/students/{arm}-s{seed}/hub`` (``--checkpoint``: one student run or checkpoint folder instead;
``--output``: where its folder goes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from conceptlm.cocomix.config import StudentSection
from conceptlm.cocomix.model import StudentLM
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.core.io import atomic_dir, atomic_write_text

__all__ = ["export_student", "load_hub_student", "is_hub_student", "export", "student_checkpoints", "HUB_DIR",
           "MODELING_FILE"]

HUB_DIR = "hub"
"""Sub-folder of a student run that receives its Hub-format export by default."""
MODELING_FILE = "modeling_cocomix.py"
_ARCH_FIELDS = ("style", "vocab_size", "d_model", "n_layers", "n_heads", "max_len", "tie_embeddings", "mix",
                "concept_head", "insert_layer", "n_concepts", "concept_k", "interleave_positions", "concept_chunk",
                "slot_positions")


def _hub_config(section: StudentSection) -> dict[str, Any]:
    return {**{k: getattr(section, k) for k in _ARCH_FIELDS}, "d_ff": section.ffn_dim}


def export_student(model: StudentLM, directory: str | Path, *, tokenizer: Any = None,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a Hub-format folder at ``directory`` (replaced atomically); returns it.

    ``provenance`` (e.g. the run and checkpoint) is recorded in ``config.json`` under ``conceptlm``.
    """
    from safetensors.torch import save_file

    from conceptlm.cocomix import hub_modeling

    config = hub_modeling.CocomixStudentConfig(**_hub_config(model.config))
    config.architectures = ["CocomixForCausalLM"]
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.CocomixStudentConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.CocomixForCausalLM"}
    if tokenizer is not None:
        config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        config_dict = config.to_dict()
        config_dict["conceptlm"] = {"format": 1, **(provenance or {})}
        atomic_write_text(tmp / "config.json", json.dumps(config_dict, indent=2, default=str) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(hub_modeling.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def is_hub_student(path: str | Path) -> bool:
    """``path`` is a folder written by :func:`export_student` (its ``config.json`` names the model type)."""
    from conceptlm.cocomix.hub_modeling import MODEL_TYPE

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_hub_student(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[StudentLM, Any]:
    """``(StudentLM in eval mode, tokenizer or None)`` from a Hub-format folder (strict load)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_hub_student(path):
        raise CheckpointError(f"{path} is not a CoCoMix Hub-format folder (config.json with model_type "
                              "conceptlm_cocomix)")
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    section = StudentSection(**{k: data[k] for k in _ARCH_FIELDS if k in data}, d_ff=int(data["d_ff"]))
    model = StudentLM(section)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().to(device), _load_tokenizer(path)


def _load_tokenizer(path: Path) -> Any:
    """The folder's tokenizer by the class its ``tokenizer_config.json`` names: ``AutoTokenizer`` would read
    ``config.json`` and, finding an ``auto_map``, ask whether to run the folder's code."""
    import transformers

    from conceptlm.core.hf import load_tokenizer

    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    cls = getattr(transformers, str(json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")), None)
    if cls is None:
        return load_tokenizer(path)
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load the tokenizer of {path}: {err}") from err


# ------------------------------------------------------------------------------------------------ the verb
def student_checkpoints(cfg: Any, checkpoint: str | Path | None = None) -> tuple[list[tuple[str, Any, Path]], Any]:
    """``([(name, student sub-config, checkpoint folder)], tokenizer)``: every student of ``pipeline.arms`` x
    ``pipeline.seeds`` that has a checkpoint (its newest), or the one of ``checkpoint`` (a student run or checkpoint
    folder of this run)."""
    from conceptlm.cocomix.labels import resolve_teacher
    from conceptlm.cocomix.pipeline import _student_config
    from conceptlm.cocomix.report import student_runs
    from conceptlm.core import checkpoint as ckpt_lib
    from conceptlm.core.hf import load_tokenizer

    tokenizer = load_tokenizer(resolve_teacher(cfg))
    found: list[tuple[str, Any, Path]] = []
    if checkpoint is not None:
        p = Path(checkpoint)
        ckpt = p if (p / ckpt_lib.MANIFEST).is_file() else ckpt_lib.find_latest_checkpoint(p)
        run_dir = p.parent.parent if ckpt is p else p
        arm, _, seed = run_dir.name.rpartition("-s")
        if ckpt is None or not seed.isdigit():
            raise ConfigError(f"{p} is not a student run folder ({{arm}}-s{{seed}}) or one of its checkpoints",
                              field="checkpoint")
        found.append((run_dir.name, _student_config(cfg, arm, int(seed), len(tokenizer)), ckpt))
    else:
        for arm, dirs in student_runs(cfg).items():
            for seed, run_dir in zip(cfg.pipeline.seeds, dirs):
                latest = ckpt_lib.find_latest_checkpoint(run_dir) if run_dir.is_dir() else None
                if latest is not None:
                    found.append((run_dir.name, _student_config(cfg, arm, seed, len(tokenizer)), latest))
    for _, _, ckpt in found:
        problem = ckpt_lib.verify_checkpoint(ckpt)
        if problem is not None:
            raise CheckpointError(f"{ckpt}: damaged checkpoint ({problem})")
    return found, tokenizer


def export(cfg: Any, *, checkpoint: str | None = None, output: str | None = None) -> dict[str, Any]:
    """``conceptlm cocomix export``: every trained student (or the one of ``--checkpoint``) as a Hub-format folder."""
    from conceptlm.cocomix.student import load_student

    students, tokenizer = student_checkpoints(cfg, checkpoint)
    if not students:
        raise ConfigError(f"no student of {Path(cfg.run_dir) / 'students'} has a checkpoint; run the pipeline first",
                          field="pipeline.arms")
    if output is not None and len(students) > 1:
        raise ConfigError("--output names one folder: pass --checkpoint for one student too", field="output")
    out: dict[str, Any] = {}
    for name, sub, ckpt in students:
        where = Path(output) if output is not None else Path(sub.run_dir) / HUB_DIR
        model = load_student(sub, ckpt)
        export_student(model, where, tokenizer=tokenizer,
                       provenance={"run": str(sub.run_dir), "checkpoint": str(ckpt), "arm": name})
        out[name] = str(where)
    return {"exported": out}
