"""Hub-format export of every LCM variant, and reading such folders back.

An export folder holds::

    config.json          model_type conceptlm_lcm, the variant and every hyperparameter (the whole ``lcm`` section
                         under "lcm"), an auto_map, and under "conceptlm": the encoder's and (when known) the
                         decoder's identity, the prepared folder's fingerprint and where the weights came from
    model.safetensors    the model's state dict (normalizer buffers and, for Quant-LCMs, the codebooks included)
    modeling_lcm.py      :mod:`conceptlm.lcm.hub_modeling`, copied: it imports only torch and transformers
    normalizer.json      the fitted normalizer (``RobustNormalizer.from_pretrained`` reads it)
    encoder.json         the identity of the sentence encoder the model was trained in (name, dim, weights
                         fingerprint, ...), when the run recorded one; prepared.json likewise
    README.md            a model card: what it is and how to load it
    artifact.json        kind ``lcm.hub``: settings, inputs by content (weights, encoder, prepared folder, decoder)
                         and every file's sha256

Outside conceptlm ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` gives the same outputs as the
conceptlm model (:mod:`conceptlm.lcm.hub_modeling`); inside it :func:`load_hub_lcm` rebuilds the conceptlm model, and
:func:`conceptlm.lcm.train.load_lcm` accepts such a folder wherever it takes a checkpoint (``conceptlm lcm generate``
/ ``evaluate`` / ``eval-harness --checkpoint FOLDER``), with the encoder and prepared folder checked as for a
checkpoint.

``conceptlm lcm export --config CFG`` writes the run's newest checkpoint (or ``--checkpoint``) to
``{run_dir}/hub`` (or ``--output``). A rerun with the same inputs reuses the folder; with other inputs it refuses,
naming what changed, or rebuilds with ``export.on_change=rebuild``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from conceptlm.core.artifact import Identity, damaged_file, decide, file_sha256, read_manifest, write_manifest
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.core.io import atomic_dir, atomic_write_text

__all__ = ["export_lcm", "load_hub_lcm", "is_hub_lcm", "hub_config", "export_identity", "export", "HUB_DIR",
           "MODELING_FILE", "KIND"]

log = logging.getLogger(__name__)

HUB_DIR = "hub"
"""Sub-folder of the run folder that receives the export by default."""
MODELING_FILE = "modeling_lcm.py"
KIND = "lcm.hub"
_FORMAT = 1


def hub_config(lcm: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` fields of an ``lcm`` section (a dict, as ``config.yaml`` holds it)."""
    q = lcm.get("quant") or {}
    keys = ("dim", "d_model", "n_layers", "n_denoiser_layers", "n_heads", "d_ff", "max_sentences", "positions",
            "rope_theta", "scale_embeddings")
    out = {k: lcm[k] for k in keys if k in lcm}
    variant = lcm.get("model", "base")
    if variant == "likelihood":  # a Base-LCM trained by another loss: the same network at inference
        variant = "base"
    return {"variant": variant, **out, "n_codebooks": q.get("n_codebooks", 8),
            "codebook_size": q.get("codebook_size", 256), "lcm": lcm}


def _section_dict(model) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(model.cfg)))


def _checkpoint_section(ckpt: Path) -> dict[str, Any]:
    """The resolved ``lcm`` section of a checkpoint's ``config.yaml`` (as :func:`_section_dict` gives it), without
    building the model (a reused export reads no weights)."""
    import dataclasses

    import yaml

    from conceptlm.lcm.config import LCMSection

    data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")) or {}
    try:
        section = LCMSection.from_dict(data["lcm"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/config.yaml: no usable 'lcm' section ({e})") from None
    return json.loads(json.dumps(dataclasses.asdict(section)))


def _normalizer_json(model, source: Path | None) -> str:
    """The checkpoint's ``normalizer.json`` when it has one (method, fit size), else one made from the buffers."""
    from conceptlm.lcm.data.normalizer import RobustNormalizer

    if source is not None and source.is_file():
        norm = RobustNormalizer.from_pretrained(source)
    else:
        norm = RobustNormalizer(model.cfg.dim)
    for name in ("center", "scale", "clip_min", "clip_max"):
        getattr(norm, name).copy_(getattr(model, name).detach().float().cpu())
    return json.dumps(norm.to_artifact()) + "\n"


def _model_card(config: dict[str, Any], meta: dict[str, Any]) -> str:
    enc = meta.get("encoder") or {}
    dec = meta.get("decoder") or {}
    lines = [
        f"# Large Concept Model ({config['variant']})", "",
        "A Large Concept Model (arXiv 2412.08821) trained with conceptlm: it models documents as sequences of "
        "sentence embeddings.", "",
        f"- variant: `{config['variant']}`; sentence-embedding width {config['dim']}, d_model {config['d_model']}, "
        f"{config['n_layers']} layer(s), {config['n_heads']} heads, at most {config['max_sentences']} sentences",
        f"- sentence encoder: `{enc.get('name', 'unknown')}` (weights fingerprint `{enc.get('fingerprint')}`; "
        "inputs must be its embeddings)",
        f"- sentence decoder used by the run: `{dec.get('kind', 'unknown')}` (fingerprint "
        f"`{dec.get('fingerprint')}`), not part of this folder", "",
        "## Load it (torch + transformers only)", "", "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)",
        "z = model.normalize(x)            # raw sentence embeddings (B, T, D) -> the model's space",
        "out = model(z, ...).prediction    # see modeling_lcm.py for each variant's arguments",
        "x_hat = model.denormalize(out)    # back to raw embeddings", "```", "",
        "In conceptlm: `conceptlm lcm generate --config CFG --checkpoint FOLDER` (or `evaluate`, `eval-harness`), or "
        "`conceptlm.lcm.hub.load_hub_lcm(FOLDER)`.", "",
        "Files: `config.json` (every hyperparameter under `lcm`), `model.safetensors`, `modeling_lcm.py`, "
        "`normalizer.json` (the fitted normalizer), `encoder.json` (the encoder identity), `artifact.json` "
        "(provenance and checksums).", ""]
    return "\n".join(lines)


def export_lcm(model, directory: str | Path, *, identity: Identity | None = None,
               meta: dict[str, Any] | None = None, normalizer: Path | None = None,
               extra_files: dict[str, dict] | None = None) -> Path:
    """Write the conceptlm LCM ``model`` (any variant) as a Hub-format folder at ``directory`` (replaced
    atomically); returns it.

    Args:
        identity: recorded as the folder's ``artifact.json`` (what the export was made from).
        meta: recorded in ``config.json`` under ``conceptlm`` (encoder / decoder identity, provenance).
        normalizer: a ``normalizer.json`` to take the method and fit size from (the statistics are the model's).
        extra_files: ``{name: JSON object}`` written next to the weights (``encoder.json``, ``prepared.json``).
    """
    from safetensors.torch import save_file

    from conceptlm.lcm import hub_modeling

    lcm = _section_dict(model)
    config = hub_modeling.LCMHubConfig(**hub_config(lcm))
    config.architectures = ["LCMHubModel"]
    stem = MODELING_FILE[:-3]
    config.auto_map = {"AutoConfig": f"{stem}.LCMHubConfig", "AutoModel": f"{stem}.LCMHubModel"}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": _FORMAT, **(meta or {})}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        data = config.to_dict()
        data["conceptlm"] = meta
        atomic_write_text(tmp / "config.json", json.dumps(data, indent=2, default=str) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(hub_modeling.__file__, tmp / MODELING_FILE)
        atomic_write_text(tmp / "normalizer.json", _normalizer_json(model, normalizer))
        for name, obj in (extra_files or {}).items():
            atomic_write_text(tmp / name, json.dumps(obj, indent=1) + "\n")
        atomic_write_text(tmp / "README.md", _model_card(data, meta))
        if identity is not None:
            write_manifest(tmp, identity)
    return directory


def is_hub_lcm(path: str | Path) -> bool:
    """``path`` is a folder written by :func:`export_lcm` (its ``config.json`` names the model type)."""
    from conceptlm.lcm.hub_modeling import MODEL_TYPE

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_hub_lcm(path: str | Path, *, device: str | torch.device = "cpu"):
    """The conceptlm model (:mod:`conceptlm.lcm.variants`) of an export folder, in eval mode (strict load; the
    files are checked against ``artifact.json`` when it has one)."""
    from safetensors.torch import load_file

    from conceptlm.lcm.config import LCMSection
    from conceptlm.lcm.variants import build_unit

    path = Path(path)
    if not is_hub_lcm(path):
        raise CheckpointError(f"{path} is not an LCM Hub-format folder (config.json with model_type conceptlm_lcm)")
    manifest = read_manifest(path)
    problem = damaged_file(path, manifest) if manifest is not None else None
    if problem is not None:
        raise CheckpointError(f"{problem}; export it again")
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        cfg = LCMSection.from_dict(data["lcm"])
        cfg.validate()
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / 'config.json'}: its 'lcm' section does not fit this version ({e})") from None
    model = build_unit(cfg).model
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ the verb
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    return data if isinstance(data, dict) else None


def _decoder_identity(cfg) -> dict[str, Any] | None:
    """The decoder the config names, by its ``artifact.json`` fingerprint (None when there is none yet)."""
    from conceptlm.lcm.decoders import decoder_manifest, read_decoder_header, resolve_decoder_dir

    try:
        where = resolve_decoder_dir(cfg.decoder_dir)
        manifest = decoder_manifest(where)
        header = read_decoder_header(where)
    except ConfigError:
        return None
    return {"kind": header.get("kind"), "fingerprint": manifest.get("fingerprint") if manifest else None,
            "path": str(where)}


def export_identity(checkpoint: Path, lcm: dict[str, Any], *, encoder: dict | None, prepared: str | None,
                    decoder: dict | None) -> Identity:
    """What an export of ``checkpoint`` is made of: the architecture and the modeling file (settings); the weights
    (sha256 of ``unit.safetensors``), the encoder identity, the prepared folder and the decoder (inputs)."""
    from conceptlm.core.checkpoint import MANIFEST, UNIT_FILE
    from conceptlm.lcm import hub_modeling
    from conceptlm.lcm.data.encoders import identity_fingerprint

    listed = (_read_json(checkpoint / MANIFEST) or {}).get("files") or {}
    weights = (listed.get(UNIT_FILE) or {}).get("sha256") or file_sha256(checkpoint / UNIT_FILE)
    return Identity(kind=KIND, format=_FORMAT,
                    settings={"lcm": lcm, "modeling": file_sha256(hub_modeling.__file__)},
                    inputs={"weights": weights, "encoder": identity_fingerprint(encoder) if encoder else None,
                            "prepared": prepared, "decoder": (decoder or {}).get("fingerprint")})


def export(cfg, *, checkpoint: str | None = None, output: str | None = None) -> dict[str, Any]:
    """``conceptlm lcm export``: the run's newest checkpoint (or ``--checkpoint``) as a Hub-format folder in
    ``{run_dir}/hub`` (or ``--output``), reused when it was made from the same inputs."""
    from conceptlm.core import checkpoint as ckpt_lib
    from conceptlm.lcm.recipe import _checkpoint
    from conceptlm.lcm.train import ENCODER_ARTIFACT, PREPARED_ARTIFACT, load_lcm

    ckpt = _checkpoint(cfg, checkpoint)
    if is_hub_lcm(ckpt):
        raise ConfigError(f"{ckpt} is already a Hub-format folder; pass a training checkpoint", field="checkpoint")
    problem = ckpt_lib.verify_checkpoint(ckpt) if ckpt.is_dir() else "no such directory"
    if problem is not None:
        raise CheckpointError(f"{ckpt}: not a usable checkpoint ({problem})")
    lcm = _checkpoint_section(ckpt)
    encoder = _read_json(ckpt / ENCODER_ARTIFACT)
    prepared = (_read_json(ckpt / PREPARED_ARTIFACT) or {}).get("fingerprint")
    decoder = _decoder_identity(cfg)
    identity = export_identity(ckpt, lcm, encoder=encoder, prepared=prepared, decoder=decoder)
    where = Path(output) if output else cfg.run_dir / HUB_DIR
    action = decide(where, identity, on_change=cfg.export.on_change, what=str(where), option="export.on_change")
    out = {"checkpoint": str(ckpt), "output": str(where), "variant": lcm["model"]}
    if action == "reuse":
        log.info("%s: reused (made from the same weights, encoder, prepared folder and decoder)", where)
        return {**out, "reused": True}
    model = load_lcm(ckpt)
    meta = {"checkpoint": str(ckpt), "weights_sha256": identity.inputs["weights"], "encoder": encoder,
            "prepared": prepared, "decoder": decoder}
    extra = {"encoder.json": encoder} if encoder else {}
    if prepared:
        extra["prepared.json"] = {"kind": "lcm.prepared", "fingerprint": prepared}
    export_lcm(model, where, identity=identity, meta=meta, normalizer=ckpt / "artifacts" / "normalizer" /
               "normalizer.json", extra_files=extra)
    return {**out, "reused": False}
