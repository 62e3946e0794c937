"""Hugging Face glue: tiny models from config, loading/saving, PEFT LoRA, hidden states and a memory-light LM loss.

Everything here works on the model classes of ``ARCHS`` and on a ``peft.PeftModel`` wrapping one of them. No
function downloads anything: models and tokenizers load from local directories only.

The module is long (about 550 lines) because every method's model handling meets here: one home for what conceptlm
assumes about ``transformers`` and ``peft`` (versions change it), rather than several half-copies.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conceptlm.core.config import ARCHS
from conceptlm.core.errors import ConceptLMError
from conceptlm.core.io import atomic_dir

__all__ = [
    "ModelPathError",
    "build_tiny_model",
    "load_causal_lm",
    "check_safetensors_files",
    "load_tokenizer",
    "ensure_pad_token",
    "resize_token_embeddings",
    "lora_target_modules",
    "apply_lora",
    "save_model",
    "backbone",
    "output_head",
    "hidden_states",
    "logits_at",
    "causal_lm_loss_sum",
    "context_length",
]



def _tiny_config(arch: str, vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int | None, intermediate_size: int | None, max_position_embeddings: int,
                 tie_word_embeddings: bool, pad_token_id: int | None, bos_token_id: int | None,
                 eos_token_id: int | None) -> transformers.PretrainedConfig:
    """Build the HF config of one arch with all dropouts at 0."""
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv})")
    inter = 4 * hidden_size if intermediate_size is None else intermediate_size
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=kv,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                  attention_dropout=0.0, **ids)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "olmo2":
        return transformers.Olmo2Config(**common)
    if arch == "gemma2":
        head_dim = hidden_size // num_heads
        return transformers.Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                         sliding_window=max_position_embeddings)
    if arch == "gpt2":
        if kv != num_heads:
            raise ValueError("gpt2 has no grouped-query attention: num_kv_heads must equal num_heads")
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=max_position_embeddings,
                                       n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inter,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       summary_first_dropout=0.0, tie_word_embeddings=tie_word_embeddings,
                                       **ids)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma2": "Gemma2ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}


def _default_attn(model_type: str | None) -> str:
    return "eager" if model_type == "gemma2" else "sdpa"


def build_tiny_model(arch: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                     max_position_embeddings: int = 512, tie_word_embeddings: bool = True,
                     pad_token_id: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, attn_implementation: str | None = None,
                     seed: int | None = None) -> PreTrainedModel:
    """Build a randomly initialised Hugging Face causal LM from a config (no download).

    All dropouts are 0, so a forward pass is deterministic. Gemma2 gets a sliding window of at least
    ``max_position_embeddings`` (packing/padding never reaches the window) and "eager" attention by default.

    Args:
        arch: one of ``ARCHS``.
        vocab_size: number of token embeddings V.
        hidden_size: model width D.
        num_layers: decoder layers.
        num_heads: attention heads (D must be a multiple).
        num_kv_heads: key/value heads for grouped-query attention (default: ``num_heads``; gpt2: must be equal).
        intermediate_size: MLP width (default 4 * D).
        max_position_embeddings: context length.
        tie_word_embeddings: share input embeddings and LM head.
        pad_token_id, bos_token_id, eos_token_id: special token ids written into the config.
        attn_implementation: "sdpa" / "eager" (default "sdpa"; gemma2 "eager").
        seed: if given, ``torch.manual_seed(seed)`` right before initialisation (same seed -> same weights).

    Returns:
        The model (a ``transformers.PreTrainedModel`` in training mode, as HF creates it; with dropout 0 the mode
        does not change the forward pass).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cfg = _tiny_config(arch, vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    cls = getattr(transformers, _CLASSES[arch])
    if seed is not None:
        torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=attn_implementation or _default_attn(arch))


# ----------------------------------------------------------------------------------------------------- loading


class ModelPathError(ConceptLMError, ValueError):
    """A model/tokenizer/adapter directory is missing or is not what it should be. The message names the path."""


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The HF ``PreTrainedModel`` inside a ``peft.PeftModel`` (LoRA layers stay injected), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and not isinstance(model, PreTrainedModel):
        return get_base()
    return model


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ModelPathError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelPathError(f"{what} directory {str(p)!r} does not exist (only local paths are supported offline)")
    if not p.is_dir():
        raise ModelPathError(f"{what} path {str(p)!r} is a file, expected a directory saved by save_pretrained")
    return p


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory, a ``.gguf`` file or a named offline model (never downloads).

    ``path`` goes through ``conceptlm.core.gguf.resolve_model_path``: a ``.gguf`` file or a named model such as
    ``smollm2-135m`` is converted once into a cached safetensors folder, which is then loaded. A directory with
    ``config.json`` is loaded with ``AutoModelForCausalLM.from_pretrained``. A PEFT adapter
    directory (``adapter_config.json``) loads its base from ``base_model_name_or_path`` (absolute, relative to the
    working directory, or relative to the adapter directory) and applies the adapter with
    ``peft.PeftModel.from_pretrained`` (adapter frozen, ready for inference).

    Args:
        path: local model or adapter directory, ``.gguf`` file, or named offline model (``smollm2-135m``).
        dtype: parameter dtype (default: as saved).
        attn_implementation: attention backend (default: HF's choice, "eager" for gemma2).

    Returns:
        The model (a ``peft.PeftModel`` for an adapter directory).

    Raises:
        ModelPathError: the path is missing, not a directory, or holds neither config.json nor adapter_config.json;
            or a GGUF file / named model cannot be resolved (the message says what to install).
    """
    from conceptlm.core.gguf import resolve_model_path

    p = _check_dir(resolve_model_path(path), "model")
    if (p / "adapter_config.json").is_file():
        return _load_adapter(p, dtype=dtype, attn_implementation=attn_implementation)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{str(p)!r} is not a model directory: it has no config.json (nor adapter_config.json)")
    cfg = _read_json(p / "config.json")
    kwargs: dict = {"local_files_only": True}
    attn = attn_implementation or ("eager" if cfg.get("model_type") == "gemma2" else None)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if dtype is not None:
        kwargs["dtype"] = dtype
    check_safetensors_files(p)
    from safetensors import SafetensorError

    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except pickle.UnpicklingError:  # transformers reads .bin files with torch.load(weights_only=True)
        files = ", ".join(f.name for f in sorted(p.glob("*.bin"))) or "its weights"
        raise ModelPathError(f"{p}: {files} cannot be loaded safely (it holds Python objects that weights-only "
                             "unpickling refuses); conceptlm loads weights only through safetensors or weights-only "
                             "torch.load: convert the checkpoint to safetensors where you trust it") from None
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ModelPathError(f"cannot load a causal LM from {str(p)!r}: {_one_line(err)}") from err


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes, at most ``limit`` chars."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_safetensors_files(directory: str | Path) -> None:
    """Check every ``*.safetensors`` file in ``directory`` against its own header (8-byte length, JSON header, data
    offsets): a truncated or damaged file is a one-line :class:`ModelPathError` naming it. Reads the headers only."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                raw = fh.read(8)
                n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit in the file")
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ModelPathError(f"{f}: not a readable safetensors file ({_one_line(err, 120)}); the file is "
                                 "damaged or truncated: copy or save it again") from None
        if 8 + n + end != size:
            raise ModelPathError(f"{f}: truncated or damaged ({size} bytes, its header describes {8 + n + end}); "
                                 "copy or save it again")


def _load_adapter(p: Path, *, dtype: torch.dtype | None, attn_implementation: str | None):
    import peft

    cfg = _read_json(p / "adapter_config.json")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelPathError(f"{p / 'adapter_config.json'}: field 'base_model_name_or_path' is empty; save the base "
                             "model with save_model and load it with load_causal_lm before applying LoRA")
    candidates = [Path(base).expanduser(), p / base]
    base_dir = next((c for c in candidates if c.is_dir()), None)
    if base_dir is None:
        raise ModelPathError(f"{p / 'adapter_config.json'}: field 'base_model_name_or_path': base model directory "
                             f"{base!r} not found (looked in the working directory and in {str(p)!r})")
    model = load_causal_lm(base_dir, dtype=dtype, attn_implementation=attn_implementation)
    rows = _adapter_vocab_rows(p)
    if rows is not None and model.get_input_embeddings().weight.shape[0] < rows:
        # the run grew the vocabulary (e.g. a pad token): PEFT saved the resized embeddings with the adapter
        resize_token_embeddings(model, rows, init="mean")
    return peft.PeftModel.from_pretrained(model, str(p))


def _adapter_vocab_rows(p: Path) -> int | None:
    """Rows of the input embedding an adapter folder carries (saved when the run resized the vocabulary)."""
    from safetensors import safe_open

    f = p / "adapter_model.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            if key.endswith("embed_tokens.weight") or key.endswith("wte.weight"):
                return st.get_slice(key).get_shape()[0]
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer`` from a local directory (never downloads).

    ``path`` may also be a ``.gguf`` file or a named offline model (see ``load_causal_lm``); the tokenizer (with
    its chat template) then comes from the converted, cached folder.

    Raises:
        ModelPathError: the path is missing or holds no loadable tokenizer.
    """
    from conceptlm.core.gguf import resolve_model_path

    p = _check_dir(resolve_model_path(path), "tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelPathError(f"cannot load a tokenizer from {str(p)!r}: {err}") from err


# ----------------------------------------------------------------------------------------------- vocabulary

PAD_TOKEN = "<|pad|>"


def resize_token_embeddings(model: torch.nn.Module, new_vocab_size: int, *, init: str = "mean") -> None:
    """Resize the input embeddings (and an untied output head) to ``new_vocab_size`` rows, in place.

    Args:
        model: HF causal LM or a PeftModel wrapping one.
        new_vocab_size: new number of rows V'. Smaller than V drops the last rows.
        init: "mean": each new row is the mean of the old rows (of the same matrix; deterministic, the global RNG
            is left untouched); "normal": the model's own initialisation (draws from the global RNG).
    """
    if init not in ("mean", "normal"):
        raise ValueError(f"init must be 'mean' or 'normal', got {init!r}")
    if new_vocab_size <= 0:
        raise ValueError(f"new_vocab_size must be positive, got {new_vocab_size}")
    hf = _unwrap(model)
    emb_in = hf.get_input_embeddings().weight
    old = emb_in.shape[0]
    if new_vocab_size == old:
        return
    emb_out = hf.get_output_embeddings()
    tied = emb_out is not None and emb_out.weight is emb_in
    mean_in = emb_in.detach().float().mean(0)
    mean_out = None if emb_out is None or tied else emb_out.weight.detach().float().mean(0)
    bias = None if emb_out is None else getattr(emb_out, "bias", None)
    mean_bias = None if bias is None else bias.detach().float().mean()
    if init == "mean":
        devices = [emb_in.device] if emb_in.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            hf.resize_token_embeddings(new_vocab_size, mean_resizing=False)
    else:
        hf.resize_token_embeddings(new_vocab_size, mean_resizing=False)
    if init == "mean" and new_vocab_size > old:
        with torch.no_grad():
            w_in = hf.get_input_embeddings().weight
            w_in[old:] = mean_in.to(w_in.dtype)
            head = hf.get_output_embeddings()
            if mean_out is not None:
                head.weight[old:] = mean_out.to(head.weight.dtype)
            if mean_bias is not None and getattr(head, "bias", None) is not None:
                head.bias[old:] = mean_bias.to(head.bias.dtype)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> None:
    """Give ``tokenizer`` a pad token distinct from EOS, resizing ``model`` if the vocabulary grew.

    A tokenizer without a pad token, or whose pad token is its EOS token, gets the special token ``<|pad|>``
    (EOS is never reused: label masking of pad positions would otherwise hide EOS from training). When ``model``
    is given, its embeddings grow to ``len(tokenizer)`` rows if needed (mean-initialised, see
    ``resize_token_embeddings``) and ``config.pad_token_id`` (and the generation config's) is set.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or (eos_id is not None and pad_id == eos_id):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos_id:
            raise ValueError(f"could not add a pad token distinct from EOS ({tokenizer.eos_token!r})")
    if model is None:
        return
    hf = _unwrap(model)
    if hf.get_input_embeddings().weight.shape[0] < len(tokenizer):
        resize_token_embeddings(hf, len(tokenizer), init="mean")
    hf.config.pad_token_id = tokenizer.pad_token_id
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------------------- LoRA

_ATTN_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LORA_TARGETS = {"llama": _ATTN_PROJ, "qwen2": _ATTN_PROJ, "gemma2": _ATTN_PROJ, "olmo2": _ATTN_PROJ,
                 "gpt2": ["c_attn", "c_proj"]}
_CONV1D_TYPES = {"gpt2"}  # models whose linear layers are transformers Conv1D (weights stored transposed)


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "model_type", None)


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Default LoRA target module names for ``model``'s ``config.model_type``.

    llama/qwen2/gemma2/olmo2: the attention projections q/k/v/o; gpt2: ``c_attn`` and ``c_proj`` (attention and
    MLP Conv1D layers).

    Raises:
        ValueError: unknown model type (pass ``target_modules`` explicitly).
    """
    mt = _model_type(model)
    if mt not in _LORA_TARGETS:
        raise ValueError(f"no default LoRA target modules for model_type {mt!r} (known: "
                         f"{', '.join(sorted(_LORA_TARGETS))}); pass target_modules explicitly, e.g. the names of "
                         "the attention projection layers")
    return list(_LORA_TARGETS[mt])


def apply_lora(model: PreTrainedModel, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | None = None, modules_to_save: list[str] | None = None):
    """Wrap ``model`` with PEFT LoRA adapters (in place); only LoRA (and ``modules_to_save``) params train.

    Args:
        model: HF causal LM.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt (default ``lora_target_modules(model)``).
        modules_to_save: modules trained fully and saved with the adapter (e.g. ``["lm_head"]``).

    Returns:
        ``peft.PeftModel`` (a ``PeftModelForCausalLM``).
    """
    import peft

    targets = list(target_modules) if target_modules is not None else lora_target_modules(model)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          modules_to_save=modules_to_save, task_type=peft.TaskType.CAUSAL_LM, bias="none",
                          fan_in_fan_out=_model_type(model) in _CONV1D_TYPES)
    return peft.get_peft_model(model, cfg)


# ------------------------------------------------------------------------------------------------------ saving


def save_model(model: torch.nn.Module, directory: str | Path,
               tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Save ``model`` (full weights, or only the adapter of a PeftModel) and ``tokenizer`` atomically.

    Everything is written to a temporary sibling directory (``.tmp-*`` in the same parent) and renamed onto
    ``directory``; an existing ``directory`` is moved aside first and removed only after the rename, so a crash
    never leaves a half-written model under the target name. Weights are safetensors. Pass the unwrapped model
    (not a DDP/FSDP container).
    """
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise ModelPathError(f"cannot save a model to {str(target)!r}: it exists and is not a directory")
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))  # safetensors: always in transformers 5, PEFT's default
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


# -------------------------------------------------------------------------------------- forward-pass pieces


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model`` / ``model.transformer``), also through a PeftModel.

    Calling it returns ``last_hidden_state`` (B, T, D) after the final norm, i.e. the input of the LM head.
    """
    hf = _unwrap(model)
    if not isinstance(hf, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel (or a PeftModel around one), got "
                        f"{type(model).__name__}")
    base = hf.base_model
    if base is hf:
        raise TypeError(f"{type(hf).__name__} has no separate decoder stack (base_model_prefix is empty)")
    return base


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head (``get_output_embeddings()``), mapping (..., D) -> (..., V); also through a PeftModel."""
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(_unwrap(model)).__name__} has no output embeddings (LM head)")
    return head


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final normed hidden states (the LM head's input).

    Args:
        model: HF causal LM or PeftModel.
        input_ids: (B, T) token ids.
        attention_mask: None; (B, T) padding mask (1 = token, 0 = pad); or a (B, 1, T, T) float additive mask with
            0 = attend and ``torch.finfo(dtype).min`` = blocked, passed through unchanged (for gemma2 it is given to
            every layer type, full and sliding).
        position_ids: (B, T) positions (needed with a packed 4-D mask: restart at 0 per segment).

    Returns:
        (B, T, D) hidden states.
    """
    mask = attention_mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        if not mask.is_floating_point():
            raise ValueError("a 4-D attention_mask must be a float additive mask (0 = attend, finfo.min = blocked); "
                             "boolean 4-D masks are silently wrong under eager attention")
        if _model_type(model) in _DICT_MASK_TYPES:
            mask = {kind: attention_mask for kind in _DICT_MASK_TYPES[_model_type(model)]}
    out = backbone(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


# Models whose decoder takes a {layer_type: 4-D mask} mapping for hybrid full/sliding attention (transformers 5).
_DICT_MASK_TYPES = {"gemma2": ("full_attention", "sliding_attention")}


def logits_at(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and gemma2-style ``final_logit_softcapping``: cap * tanh(logits / cap)).

    Args:
        hidden: (..., D) final hidden states.

    Returns:
        (..., V) logits in the head's dtype.
    """
    logits = output_head(model)(hidden)
    cap = getattr(_unwrap(model).config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def causal_lm_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy, computing logits only where there is a target.

    Targets are the shifted labels: ``labels[:, t + 1]`` is predicted from position t; -100 is ignored. Equals
    ``model(input_ids, attention_mask=..., labels=labels).loss * n`` without building the (B, T, V) logits.

    Args:
        model: HF causal LM or PeftModel.
        input_ids: (B, T) token ids.
        labels: (B, T) target ids, -100 where no loss.
        attention_mask: (B, T) padding mask or (B, 1, T, T) float additive mask (see ``hidden_states``).
        position_ids: (B, T) positions.

    Returns:
        (loss_sum, n): the scalar sum of token losses, fp32 (fp64 for a float64 model; 0 with a graph if
        n == 0), and the int64 scalar count n of targets.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    hid = hidden_states(model, input_ids, attention_mask, position_ids)
    targets = labels[:, 1:].to(hid.device)
    keep = targets != -100
    picked = hid[:, :-1][keep]  # (N, D)
    logits = logits_at(model, picked)
    if logits.dtype != torch.float64:
        logits = logits.float()  # fp32 cross-entropy under bf16/fp16 (fp64 models stay fp64)
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, keep.sum()


def context_length(model: torch.nn.Module) -> int:
    """Maximum sequence length of ``model`` (``max_position_embeddings`` / ``n_positions``)."""
    cfg = _unwrap(model).config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(cfg).__name__} has neither max_position_embeddings nor n_positions")
