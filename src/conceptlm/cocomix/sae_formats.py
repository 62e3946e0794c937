"""Load TopK SAEs saved by other libraries into :class:`~conceptlm.cocomix.sae.TopKSAE`.

Formats (:func:`load_any_sae` detects them):

- **ours**: a folder with ``sae.json`` + ``sae.safetensors`` (:func:`conceptlm.cocomix.sae.load_sae`).
- **EleutherAI sparsify** (``SparseCoder.save_to_disk``): a folder with ``cfg.json`` (``d_in``, ``k``,
  ``num_latents`` or ``expansion_factor``, ``activation``, ``transcode``, ``skip_connection``, ...) and
  ``sae.safetensors`` (``encoder.weight (C, d)``, ``encoder.bias (C,)``, ``W_dec (C, d)``, ``b_dec (d,)``). Its
  forward: ``top-k(ReLU((x - b_dec) @ W_enc.T + b_enc))``, ``x_hat = sum values * W_dec[indices] + b_dec``; no input
  normalization. Refused: ``activation: groupmax``, ``transcode``, ``skip_connection``, ``signed``.
- **SAELens** (``SAE.save_model``): a folder with ``cfg.json`` (``architecture: topk``, ``d_in``, ``d_sae``, ``k``
  (older files: ``activation_fn_kwargs.k``), ``apply_b_dec_to_input``, ``normalize_activations``) and
  ``sae_weights.safetensors`` (``W_enc (d, C)``, ``b_enc (C,)``, ``W_dec (C, d)``, ``b_dec (d,)``). Its forward:
  ``x' = norm_in(x) - apply_b_dec_to_input * b_dec``, ``ReLU(top-k(x' @ W_enc + b_enc))``,
  ``norm_out(acts @ W_dec + b_dec)``. ``apply_b_dec_to_input: false`` is folded into ``b_enc`` exactly
  (``b_enc + W_enc.T b_dec``). ``normalize_activations``: ``none`` or ``layer_norm`` (refused:
  ``constant_norm_rescale``, ``expected_average_only_in``, ``reshape_activations: hook_z``).
- **OpenAI** GPT-2 TopK SAEs (the SAE of the CoCoMix paper, App. A): a ``.pt`` state dict, read with
  ``torch.load(weights_only=True)``:
  ``pre_bias (d,)``, ``encoder.weight (C, d)``, ``latent_bias (C,)``, ``decoder.weight (d, C)``, the ``stats_*`` /
  ``latents_*`` buffers (ignored), ``activation`` (``"TopK"``) and ``activation_state_dict`` (``{"k", "postact_fn":
  "ReLU"}``). Layer-normed input exactly when the activation is TopK.

The OpenAI and SAELens ``layer_norm`` decoders de-normalize with ``sigma``; ours uses ``sigma + eps`` (the exact
inverse of the normalization), a relative difference of ``eps / sigma`` in the reconstruction. Latents are identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from conceptlm.cocomix.sae import SAE_CONFIG, SAE_WEIGHTS, TopKSAE, load_params, load_sae
from conceptlm.core.errors import CheckpointError

__all__ = ["load_any_sae", "load_sparsify_sae", "load_saelens_sae", "load_openai_sae", "detect_sae_format",
           "sae_weights_file"]


def detect_sae_format(path: str | Path) -> str:
    """``ours`` | ``sparsify`` | ``saelens`` | ``openai`` for ``path``; a one-line CheckpointError otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return "openai"
    if p.is_dir():
        if (p / SAE_CONFIG).is_file():
            return "ours"
        if (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file():
            return "sparsify"
        if (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file():
            return "saelens"
        subs = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "cfg.json").is_file())
        if subs:
            raise CheckpointError(f"{p}: holds one SAE per hook point ({', '.join(subs[:6])}); pass one of those "
                                  "folders")
    if not p.exists():
        raise CheckpointError(f"{p}: not found")
    raise CheckpointError(f"{p}: not a known SAE format (expected sae.json + sae.safetensors, cfg.json + "
                          "sae.safetensors (sparsify), cfg.json + sae_weights.safetensors (SAELens), or a .pt "
                          "file (OpenAI))")


def sae_weights_file(path: str | Path) -> Path:
    """The file that holds the weights of the SAE at ``path`` (any supported format), e.g. to key a cache by it."""
    p = Path(path)
    return {"ours": p / SAE_WEIGHTS, "sparsify": p / "sae.safetensors", "saelens": p / "sae_weights.safetensors",
            "openai": p}[detect_sae_format(p)]


def load_any_sae(path: str | Path) -> TopKSAE:
    """Load an SAE in any supported format (see the module docstring) as a CPU fp32 :class:`TopKSAE`."""
    fmt = detect_sae_format(path)
    loader = {"ours": load_sae, "sparsify": load_sparsify_sae, "saelens": load_saelens_sae,
              "openai": load_openai_sae}[fmt]
    sae = loader(path)
    sae.meta.setdefault("source_format", fmt)
    return sae


# ----------------------------------------------------------------------------------------------- helpers
def _json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def _int(cfg: dict, key: str, path: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(f"{path}: field '{key}' must be a positive integer, got {v!r}")
    return v


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def _refuse(cond: bool, path: Path, field: str, why: str) -> None:
    if cond:
        raise CheckpointError(f"{path}: field '{field}': {why} is not supported (only plain TopK SAEs)")


def _build(d_in: int, n_latents: int, k: int, normalize: bool, tensors: dict[str, torch.Tensor], source: Path,
           meta: dict[str, Any]) -> TopKSAE:
    if not 1 <= k <= n_latents:
        raise CheckpointError(f"{source}: k={k} must be in [1, {n_latents}]")
    sae = TopKSAE(d_in, n_latents, k, normalize_input=normalize, seed=0)
    load_params(sae, tensors, source=source)
    sae.meta = meta
    return sae


# ----------------------------------------------------------------------------------------------- sparsify
def load_sparsify_sae(path: str | Path) -> TopKSAE:
    """An SAE saved by ``sparsify.SparseCoder.save_to_disk`` (folder with ``cfg.json`` + ``sae.safetensors``)."""
    p = Path(path)
    cfg_path = p / "cfg.json"
    cfg = _json(cfg_path)
    _refuse(cfg.get("activation", "topk") != "topk", cfg_path, "activation", f"activation {cfg.get('activation')!r}")
    for flag in ("transcode", "skip_connection", "signed"):
        _refuse(bool(cfg.get(flag, False)), cfg_path, flag, f"{flag}=true")
    d_in, k = _int(cfg, "d_in", cfg_path), _int(cfg, "k", cfg_path)
    n = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 0) or 0)
    if not n:
        raise CheckpointError(f"{cfg_path}: neither 'num_latents' nor 'expansion_factor' gives the latent count")
    raw = _safetensors(p / "sae.safetensors")
    extra = sorted(set(raw) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise CheckpointError(f"{p / 'sae.safetensors'}: unexpected tensors {extra} for a plain TopK SAE")
    tensors = {"W_enc": raw.get("encoder.weight"), "b_enc": raw.get("encoder.bias"), "W_dec": raw.get("W_dec"),
               "b_dec": raw.get("b_dec")}
    tensors = {k_: v for k_, v in tensors.items() if v is not None}
    return _build(d_in, int(n), k, False, tensors, p / "sae.safetensors", {"source": str(p), "config": cfg})


# ----------------------------------------------------------------------------------------------- SAELens
def load_saelens_sae(path: str | Path) -> TopKSAE:
    """An SAE saved by SAELens ``SAE.save_model`` with ``architecture: topk``."""
    p = Path(path)
    cfg_path = p / "cfg.json"
    cfg = _json(cfg_path)
    arch = cfg.get("architecture", "standard")
    _refuse(arch != "topk", cfg_path, "architecture", f"architecture {arch!r}")
    norm = cfg.get("normalize_activations", "none") or "none"
    _refuse(norm not in ("none", "layer_norm"), cfg_path, "normalize_activations", f"normalization {norm!r}")
    _refuse(cfg.get("reshape_activations", "none") not in (None, "none"), cfg_path, "reshape_activations",
            f"reshaping {cfg.get('reshape_activations')!r}")
    d_in, n = _int(cfg, "d_in", cfg_path), _int(cfg, "d_sae", cfg_path)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if not isinstance(k, int) or isinstance(k, bool):
        raise CheckpointError(f"{cfg_path}: field 'k' (or 'activation_fn_kwargs.k') must be an integer, got {k!r}")
    wpath = p / "sae_weights.safetensors"
    raw = _safetensors(wpath)
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(raw))
    if missing:
        raise CheckpointError(f"{wpath}: missing tensors {missing}")
    if tuple(raw["W_enc"].shape) != (d_in, n):
        raise CheckpointError(f"{wpath}: tensor 'W_enc' has shape {tuple(raw['W_enc'].shape)}, expected "
                              f"{(d_in, n)}")
    w_enc = raw["W_enc"].T.contiguous()
    b_enc = raw["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + w_enc @ raw["b_dec"]  # our encoder always subtracts b_dec: add it back in the bias
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    return _build(d_in, n, k, norm == "layer_norm", tensors, wpath, {"source": str(p), "config": cfg})


# ----------------------------------------------------------------------------------------------- OpenAI
def load_openai_sae(path: str | Path) -> TopKSAE:
    """An OpenAI ``sparse_autoencoder`` TopK state dict (``.pt``, the CoCoMix paper's SAE), loaded with
    ``weights_only=True``."""
    p = Path(path)
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and IO errors of a foreign file
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: expected a state dict, got {type(sd).__name__}")
    activation = sd.get("activation")
    _refuse(activation != "TopK", p, "activation", f"activation {activation!r}")
    state = sd.get("activation_state_dict") or {}
    k = state.get("k") if isinstance(state, dict) else None
    if isinstance(k, torch.Tensor):
        k = int(k)
    if not isinstance(k, int):
        raise CheckpointError(f"{p}: field 'activation_state_dict.k' must be an integer, got {k!r}")
    post = state.get("postact_fn", "ReLU")
    _refuse(post != "ReLU", p, "activation_state_dict.postact_fn", f"post-activation {post!r}")
    needed = ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight")
    missing = [key for key in needed if not isinstance(sd.get(key), torch.Tensor)]
    if missing:
        raise CheckpointError(f"{p}: missing tensors {missing}")
    n, d = sd["encoder.weight"].shape
    tensors = {"W_enc": sd["encoder.weight"].float(), "b_enc": sd["latent_bias"].float(),
               "W_dec": sd["decoder.weight"].float().T.contiguous(), "b_dec": sd["pre_bias"].float()}
    return _build(int(d), int(n), k, True, tensors, p, {"source": str(p)})
