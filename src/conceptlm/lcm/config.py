"""The LCM config: every setting of the LCM workflow, documents -> concepts -> model -> text, in one file.

This module is the schema of ``configs/lcm/*.yaml``: every section dataclass with its ``validate()`` (each error a
``ConfigError`` naming the dotted field) and the per-stage configs the stage functions take. It imports only
:mod:`conceptlm.core.config` and :mod:`conceptlm.core.errors` (no torch), so reading a config loads no model code.
It is longer than ~500 lines because it is the one answer to "what can I set?": splitting it would scatter that.

Sections of :class:`LCMConfig`:

* ``docs`` / ``segment`` / ``encoder`` / ``prepare``: what ``conceptlm lcm prepare`` segments, embeds and stores
  (:mod:`conceptlm.lcm.data.prepare`);
* ``lcm`` (with ``lcm.diffusion`` and ``lcm.quant``) / ``lcm_data``: the LCM and its training data
  (``lcm_data.source``: ``prepared`` = the folder of ``prepare.out_dir``, ``synthetic``, or any prepared folder),
  trained by ``conceptlm lcm train`` in the run folder;
* ``decoder`` / ``decoder_train``: the sentence decoder (retrieval bank or prefix LM) made by
  ``conceptlm lcm train-decoder`` in ``{run_dir}/decoder`` with its own length (``decoder_train.steps``);
* ``generate`` (with ``generate.diffusion`` and ``generate.quant``): the prompt, stopping rules and sampling of
  ``conceptlm lcm generate``;
* ``evaluate``: what ``conceptlm lcm evaluate`` measures (the paper's Table 3 metrics);
* ``cost``: the inference-FLOPs comparison of ``conceptlm lcm cost`` (LCM generation vs a token-level LLM);
* ``export`` / ``harness``: the Hub-format folder of ``conceptlm lcm export`` and the lm-evaluation-harness tasks of
  ``conceptlm lcm eval-harness``;
* ``run`` / ``optim`` / ``schedule`` / ``train`` / ``dist``: the shared loop's sections (the LCM run).

Each verb reads the sections it needs; :func:`prepare_config`, :func:`lcm_train_config` and
:func:`decoder_config` give the per-stage configs that the stage functions take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conceptlm.core.config import RunConfig, check, with_own_length
from conceptlm.core.errors import ConfigError

__all__ = [
    "DocsSection", "SegmentSection", "EncoderSection", "NORMALIZER_METHODS", "PrepareSection",
    "DiffusionSection", "QuantSection", "LCM_VARIANTS", "LCMSection", "LCMDataSection",
    "DecoderSection", "DecoderTrainSection", "AutoencoderSection", "AUTOENCODER_RUN", "AutoencoderTrainConfig",
    "autoencoder_config",
    "SamplerOptions", "QuantSamplingOptions", "GenerationOptions", "GenerateSection", "EvaluateSection",
    "TransformerSize", "CostSection", "ExportSection", "LCMHarnessSection",
    "DECODER_RUN", "PrepareConfig", "LCMTrainConfig", "DecoderTrainConfig", "LCMConfig",
    "prepare_config", "lcm_train_config", "decoder_config", "decoder_run_config",
]


# --------------------------------------------------------------- documents -> sentence vectors (conceptlm lcm prepare)
@dataclass(kw_only=True)
class DocsSection:
    source: str = "generated"
    """``generated`` (built-in structured documents) or a path to a ``.txt`` / ``.jsonl`` file or a directory."""
    n_documents: int = 2000
    """How many documents ``generated`` produces."""
    seed: int = 0
    """Seed of the generator (document i depends only on (seed, i))."""
    limit: int | None = None
    """Read at most this many documents from files (None = all)."""
    text_field: str = "text"
    """JSONL: dotted path of the document text (integers index lists: ``messages.1.content``)."""
    id_field: str | None = None
    """JSONL: dotted path of a document id (default: ``<file>:<line>``)."""
    txt_split: Literal["file", "paragraphs", "lines"] = "paragraphs"
    """Plain text: one document per file, per blank-line separated block, or per non-empty line."""
    target_field: str | None = None
    """Instruction data (JSONL): dotted path of the answer, e.g. a summary. Each record becomes the document
    ``text``, the ``instruction_marker`` sentence, then the answer's sentences; training predicts only the answer
    (the reference's fine-tuning: source suffix "[MODEL]:")."""
    generated_task: Literal["document", "summary"] = "document"
    """``generated`` source: plain documents, or instruction pairs -- each document, the marker, then its summary
    (the document's first and last sentences: an extractive lead-and-outcome summary a model can learn)."""
    instruction_marker: str = "[MODEL]:"
    """The sentence between an instruction's source and its answer (kept as a sentence of its own)."""
    unescape: bool = False
    """Turn the escape sequences ``\\n``, ``\\t`` and ``\\"`` left in some exported datasets into the characters
    they stand for."""

    def validate(self) -> None:
        check(bool(self.source), "docs.source", "must be 'generated' or a path")
        check(self.n_documents > 0, "docs.n_documents", "must be > 0")
        check(self.limit is None or self.limit > 0, "docs.limit", "must be > 0 or null")
        check(bool(self.text_field) and all(self.text_field.split(".")), "docs.text_field",
              "must be a dotted path such as 'text' or 'messages.1.content'")
        check(self.target_field is None or (bool(self.target_field) and all(self.target_field.split("."))),
              "docs.target_field", "must be a dotted path or null")
        check(bool(self.instruction_marker.strip()), "docs.instruction_marker", "must not be empty")
        if self.source != "generated":
            path = Path(self.source)
            check(path.exists(), "docs.source", f"not found: {self.source}")
            check(path.is_dir() or path.suffix in (".txt", ".jsonl", ".parquet"), "docs.source",
                  f"{self.source}: expected a .txt or .jsonl file, a .parquet file or a directory")


@dataclass(kw_only=True)
class SegmentSection:
    backend: Literal["rule", "spacy", "sat"] = "rule"
    max_chars: int = 256
    """Length cap in characters (the paper: 200 for SpaCy Capped, 256 for SaT Capped); 0 disables it."""
    newlines: Literal["split", "paragraph", "ignore"] = "split"
    """``split``: every newline ends a sentence; ``paragraph``: only blank lines do (hard-wrapped text);
    ``ignore``: newlines are ordinary whitespace (the cap may still cut there)."""
    merge_fragments: bool = True
    """Join pieces without any letter or digit to the previous sentence (when that fits the cap)."""
    remove_emojis: bool = False
    """Delete emoji/pictograph characters first, as the reference pipeline does."""
    spacy_model: str = "en_core_web_sm"
    """spaCy pipeline for ``backend=spacy``; ``blank`` = blank English + the rule-based sentencizer."""
    sat_model: str = "sat-3l"
    sat_threshold: float = 0.2
    """Boundary probability threshold for ``backend=sat`` (reference Wikipedia example: sat-3l, 0.2)."""

    def validate(self) -> None:
        check(self.max_chars == 0 or self.max_chars >= 16, "segment.max_chars", "must be 0 (no cap) or >= 16")
        check(0.0 < self.sat_threshold < 1.0, "segment.sat_threshold", "must be in (0, 1)")


@dataclass(kw_only=True)
class EncoderSection:
    name: str = "minilm"
    """``minilm`` (offline default), a sentence-transformers / Hugging Face model directory, or ``sonar``."""
    batch_size: int = 64
    device: str = "auto"
    """``auto`` = CUDA when available, else CPU; or any torch device string."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the encoder (the vectors are returned as float32)."""
    max_seq_length: int | None = None
    """Truncate sentences to this many tokens (default: the model's own setting, 256 for MiniLM)."""
    normalize: bool | None = None
    """L2-normalise the vectors (default: as the model directory says; SONAR: false)."""
    sonar_encoder: str = "text_sonar_basic_encoder"
    sonar_lang: str = "eng_Latn"

    def validate(self) -> None:
        check(bool(self.name), "encoder.name", "must be 'minilm', 'sonar' or a model directory")
        check(self.batch_size > 0, "encoder.batch_size", "must be > 0")
        check(self.max_seq_length is None or self.max_seq_length > 1, "encoder.max_seq_length", "must be > 1")
        if self.name not in ("minilm", "sonar"):
            check(Path(self.name).is_dir(), "encoder.name",
                  f"{self.name}: not 'minilm', 'sonar' or an existing model directory")


NORMALIZER_METHODS = ("gaussian_robust", "robust", "standard", "reference_percent")
"""``prepare.normalizer_method`` values (:class:`~conceptlm.lcm.data.normalizer.RobustNormalizer`)."""


@dataclass(kw_only=True)
class PrepareSection:
    out_dir: str = "data/lcm/prepared"
    shard_size: int = 1000
    """Documents per shard (the unit of resumption)."""
    max_sentences: int | None = None
    """Cap on sentences per document, "End of text." included (None = no cap)."""
    long_documents: Literal["truncate", "wrap"] = "truncate"
    """Over the cap: keep the first ``max_sentences`` (no end-of-text, the document did not end), or cut into
    consecutive chunks ``<id>#0``, ``<id>#1``, ... (only the last ends with "End of text."; all chunks of a
    document share its split)."""
    end_of_text: bool = True
    """Append the end-of-document sentence to every document (the paper's ``eot = SONAR("End of text.")``)."""
    end_of_text_sentence: str = "End of text."
    skip_bad: bool = False
    """Skip (and count) bad records, undecodable files and empty documents instead of stopping."""
    val_fraction: float = 0.05
    """Fraction of documents (by a hash of the id) in the ``validation`` split."""
    split_seed: int = 0
    vector_dtype: Literal["float16", "float32"] = "float16"
    keep_text: bool = True
    """Store the original document text in the ``text`` column (null for the chunks of a wrapped document)."""
    normalizer_method: str = "gaussian_robust"
    normalizer_clip_proba: float | None = None
    normalizer_max_samples: int = 1_000_000
    """The normalizer is fitted on every ``ceil(n / normalizer_max_samples)``-th training vector (n: training
    vectors; all of them when n is at most this)."""
    normalizer_max_fit_vectors: int = 1_000_000
    """Most vectors held in memory to fit the normalizer. The fit is one streaming pass over the shards; when the
    vectors chosen by ``normalizer_max_samples`` fit under this, the fit is exact (on all of them); beyond it, on a
    seeded uniform sample of this many of them (:func:`~conceptlm.lcm.data.prepare.fit_normalizer_streaming`).
    With both at their default the fit is always exact."""
    normalizer_sample_seed: int = 0
    """Seed of that uniform sample (used only beyond ``normalizer_max_fit_vectors``)."""
    row_group_size: int = 16
    """Documents per Parquet row group, the unit that training reads (and caches) at a time: bounds the memory
    of reading to a few row groups whatever the number of documents."""
    workers: int = 1
    """Processes that embed and write shards (each loads the encoder once). Under torchrun every rank runs this
    many. Which documents form which shard does not depend on it, so the folder is byte-identical for any number
    of workers and ranks; not part of the folder's identity."""
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    on_change: Literal["refuse", "rebuild"] = "refuse"
    """A rerun on a folder that holds shards made from other documents or settings (a changed text, other ids,
    another encoder) or a damaged shard: ``refuse`` with one line naming the shard and what changed, or
    ``rebuild`` (re-encode exactly those shards; all of them after a settings change). Not part of the folder's
    identity."""

    def validate(self) -> None:
        check(bool(self.out_dir), "prepare.out_dir", "must be a folder path")
        check(self.on_change in ("refuse", "rebuild"), "prepare.on_change", "must be refuse or rebuild")
        check(self.shard_size > 0, "prepare.shard_size", "must be > 0")
        check(self.max_sentences is None or self.max_sentences >= 2, "prepare.max_sentences", "must be >= 2 or null")
        check(0.0 <= self.val_fraction < 1.0, "prepare.val_fraction", "must be in [0, 1)")
        check(bool(self.end_of_text_sentence.strip()), "prepare.end_of_text_sentence", "must not be empty")
        check(self.normalizer_method in NORMALIZER_METHODS, "prepare.normalizer_method",
              f"one of {', '.join(NORMALIZER_METHODS)}")
        check(self.normalizer_clip_proba is None or 0 < self.normalizer_clip_proba < 0.5,
              "prepare.normalizer_clip_proba", "must be in (0, 0.5) or null")
        check(self.normalizer_max_samples >= 2, "prepare.normalizer_max_samples", "must be >= 2")
        check(self.normalizer_max_fit_vectors >= 2, "prepare.normalizer_max_fit_vectors", "must be >= 2")
        check(self.row_group_size >= 1, "prepare.row_group_size", "must be >= 1")
        check(self.workers >= 1, "prepare.workers", "must be >= 1")


# ------------------------------------------------------------------------------------- the model (conceptlm lcm train)
@dataclass(kw_only=True)
class DiffusionSection:
    """The diffusion process of a One-/Two-Tower LCM (section ``lcm.diffusion``)."""

    schedule: Literal["cosine", "quadratic", "linear", "sigmoid"] = "cosine"
    """Noise schedule: ``cosine`` (Nichol & Dhariwal, s = 0.008), ``quadratic`` (reference ``scaled_linear``:
    betas on a line in sqrt space from ``beta_start`` to ``beta_end``), ``linear`` (betas on a line) or ``sigmoid``
    (the paper's, log-SNR centred on ``sigmoid_shift`` with scale ``sigmoid_scale``)."""
    num_train_steps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sigmoid_scale: float = 1.5
    """Sigmoid schedule's gamma (reference ``sigmoid_schedule_alpha``)."""
    sigmoid_shift: float = 0.0
    """Sigmoid schedule's delta (reference ``sigmoid_schedule_beta``): the centre of the log-SNR distribution."""
    zero_terminal_snr: bool = True
    """Rescale the schedule so the last step is pure noise (Lin et al. 2024, Alg. 1)."""
    prediction: Literal["x0", "epsilon", "v"] = "x0"
    """What the denoiser predicts (the reference and the paper: ``x0``, reference name ``sample``)."""
    weighting: Literal["none", "clamp_snr"] = "none"
    """Per-position loss weight: none, or ``clamp(SNR_t, min_snr, max_snr)`` renormalised to sum to the number of
    targets of the batch (reference ``clamp_snr``)."""
    min_snr: float = 0.0
    max_snr: float = 5.0
    step_sampling: Literal["uniform", "beta"] = "uniform"
    """Training timesteps: uniform over ``0..T-1``, or with probabilities from a Beta(0.8, 1) density."""
    cfg_dropout: float = 0.15
    """Probability that a target row is trained unconditionally (its context dropped), drawn independently per
    document and row (the reference drops exactly ``floor((T-1) * p)`` rows, the same for every document; spec
    §10.2 item 6). 0 = no classifier-free guidance training."""

    def validate(self) -> None:
        check(self.num_train_steps >= 2, "lcm.diffusion.num_train_steps", "must be >= 2")
        check(0 < self.beta_start < 1 and 0 < self.beta_end < 1, "lcm.diffusion.beta_start",
              "beta_start and beta_end must be in (0, 1)")
        check(self.sigmoid_scale > 0, "lcm.diffusion.sigmoid_scale", "must be > 0")
        check(0 <= self.min_snr <= self.max_snr, "lcm.diffusion.min_snr", "need 0 <= min_snr <= max_snr")
        check(0.0 <= self.cfg_dropout < 1.0, "lcm.diffusion.cfg_dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class QuantSection:
    """Residual vector quantization of the (normalized) concept space and Quant-LCM training (``lcm.quant``).

    The paper quantizes SONAR with 64 codebooks of 8192 units; a CPU-sized concept space needs far fewer.
    """

    n_codebooks: int = 8
    codebook_size: int = 256
    fit_samples: int = 50_000
    """At most this many training sentence vectors fit the codebooks."""
    fit_iters: int = 20
    """k-means iterations per codebook."""
    cfg_dropout: float = 0.15
    """Probability that a target is trained without its left context (for classifier-free guidance)."""

    def validate(self) -> None:
        check(self.n_codebooks >= 1, "lcm.quant.n_codebooks", "must be >= 1")
        check(self.codebook_size >= 2, "lcm.quant.codebook_size", "must be >= 2")
        check(self.fit_samples >= self.codebook_size, "lcm.quant.fit_samples", "must be >= codebook_size")
        check(self.fit_iters >= 1, "lcm.quant.fit_iters", "must be >= 1")
        check(0.0 <= self.cfg_dropout < 1.0, "lcm.quant.cfg_dropout", "must be in [0, 1)")


LCM_VARIANTS = ("base", "two_tower", "one_tower", "quant_d", "quant_c", "likelihood")
"""``lcm.model`` values: Base-LCM (MSE), the two diffusion LCMs, Quant-LCM with discrete / continuous targets."""


@dataclass(kw_only=True)
class LCMSection:
    """The Base-LCM architecture (section ``lcm`` of an LCM run config)."""

    model: Literal["base", "two_tower", "one_tower", "quant_d", "quant_c", "likelihood"] = "base"
    """LCM variant: ``base`` (MSE regression), ``two_tower`` / ``one_tower`` (diffusion, section ``diffusion``),
    ``quant_d`` / ``quant_c`` (Quantized LCM with discrete / continuous targets, section ``quant``),
    ``likelihood`` (the Base-LCM scored by the token cross-entropy of the next sentence through the frozen decoder
    ``likelihood_decoder``, SONAR-LLM)."""
    dim: int = 384
    """Sentence-embedding width ``D``; must equal the data's (checked against the data by the recipe)."""
    d_model: int = 256
    n_layers: int = 2
    """Decoder blocks (0 = PreNet -> PostNet, a linear next-vector baseline); the Two-Tower's contextualizer."""
    n_denoiser_layers: int = 2
    """Two-Tower only: blocks of the denoiser (AdaLN-zero, identity self-attention, cross-attention)."""
    n_heads: int = 4
    d_ff: int = 768
    """SwiGLU hidden width (the reference's ``swiglu_inner_dim(ffn)``: ffn 8192 -> 5632)."""
    dropout: float = 0.1
    """Residual dropout on each sub-layer output (reference: 0.1)."""
    attn_dropout: float = 0.0
    max_sentences: int = 128
    """Longest sequence of sentences the model sees: documents are cut into chunks of this many sentences for
    training (reference ``len_to_wrap_long_seq``), the learned-position table has this many rows, and a generated
    document (prompt + continuation) never grows beyond it."""
    positions: Literal["rope", "learned", "none"] = "rope"
    """RoPE (theta ``rope_theta``) on queries and keys (reference 1.6B arch), a learned table added after the
    PreNet (reference toy arch), or none."""
    rope_theta: float = 10000.0
    scale_embeddings: bool = False
    """Multiply the PreNet output by ``sqrt(d_model)`` (reference option, off by default)."""
    normalize: bool = True
    """Fit the robust normalizer (median / IQR) on the training embeddings; ``false`` = identity statistics."""
    normalizer_samples: int = 100_000
    """At most this many training sentence vectors are used to fit the normalizer."""
    min_context: int = 1
    """Positions ``< min_context`` of each chunk are never targets (reference ``min_context_size``)."""
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    """Noise process and objective of ``two_tower`` / ``one_tower`` (ignored by the other variants)."""
    quant: QuantSection = field(default_factory=QuantSection)
    """Quantizer of ``quant_d`` / ``quant_c`` (ignored by the other variants)."""
    likelihood_decoder: str | None = None
    """``likelihood`` only: the frozen sentence decoder that scores the predicted vectors (a ``prefix_lm`` decoder
    folder or a ``train-autoencoder`` folder; made for the data's encoder). Not part of the checkpoint."""

    def validate(self) -> None:
        check(self.dim > 0, "lcm.dim", "must be > 0")
        check(self.d_model > 0 and self.n_heads > 0, "lcm.d_model", "d_model and n_heads must be > 0")
        check(self.d_model % self.n_heads == 0, "lcm.n_heads", f"must divide d_model={self.d_model}")
        if self.positions == "rope":
            check((self.d_model // self.n_heads) % 2 == 0, "lcm.n_heads",
                  f"RoPE needs an even head width, d_model/n_heads = {self.d_model // self.n_heads}")
        check(self.n_layers >= 0, "lcm.n_layers", "must be >= 0")
        check(self.d_ff > 0, "lcm.d_ff", "must be > 0")
        check(0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0, "lcm.dropout", "must be in [0, 1)")
        check(self.max_sentences >= 2, "lcm.max_sentences", "must be >= 2 (one context and one target)")
        check(self.normalizer_samples > 0, "lcm.normalizer_samples", "must be > 0")
        check(0 <= self.min_context < self.max_sentences, "lcm.min_context",
              f"must be in [0, max_sentences={self.max_sentences})")
        check(self.model in LCM_VARIANTS, "lcm.model", f"must be one of {', '.join(LCM_VARIANTS)}")
        check(self.n_denoiser_layers >= 1, "lcm.n_denoiser_layers", "must be >= 1")
        check(self.model != "likelihood" or bool(self.likelihood_decoder), "lcm.likelihood_decoder",
              "lcm.model=likelihood needs the frozen decoder's folder (a prefix_lm decoder or an autoencoder)")
        self.diffusion.validate()
        self.quant.validate()

    @classmethod
    def from_dict(cls, data: dict) -> LCMSection:
        """The section of a saved ``config.yaml`` (its ``diffusion`` / ``quant`` sub-sections as dicts; files
        written before they existed have none). Raises ``TypeError`` for unknown fields."""
        data = dict(data)
        sub = {"diffusion": DiffusionSection, "quant": QuantSection}
        for name, kind in sub.items():
            if isinstance(data.get(name), dict):
                data[name] = kind(**data[name])
        return cls(**data)

    def decoder_config(self):
        """The shared-blocks config (:class:`~conceptlm.core.modules.DecoderConfig`) of the reference architecture:
        RMSNorm, SwiGLU and attention with biases. (Imported here, on use, so loading a config loads no torch.)"""
        from conceptlm.core.modules import DecoderConfig

        return DecoderConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
                             mlp="swiglu", norm="rms", norm_eps=1e-5, rope=self.positions == "rope",
                             rope_theta=self.rope_theta, attention_bias=True, mlp_bias=True, dropout=self.dropout,
                             attn_dropout=self.attn_dropout, causal=True)



@dataclass(kw_only=True)
class LCMDataSection:
    """Training data of an LCM run when no datasets are passed to :func:`train_lcm`."""

    source: str = "synthetic"
    """``synthetic`` (:class:`SyntheticVectorDocuments`) or a folder written by the ``prepare`` verb."""
    n_train: int = 512
    """Synthetic: training documents (the synthetic-only fields below are ignored for a prepared folder)."""
    n_eval: int = 64
    min_sentences: int = 4
    max_sentences: int = 24
    """Synthetic document lengths are uniform in ``[min_sentences, max_sentences]``."""
    rotation: float = 0.6
    """Synthetic: rotation angle (radians) per sentence in each of the ``dim/2`` planes of the dynamic."""
    noise: float = 0.05
    seed: int = 0
    min_length: int = 2
    """Chunks with fewer sentences are dropped (a target needs one sentence of context)."""
    cache_row_groups: int = 64
    """Prepared folder: decoded Parquet row groups kept in memory (least recently used dropped first); reading
    memory is about this many times ``prepare.row_group_size`` documents, whatever the number of documents."""

    def validate(self) -> None:
        check(bool(self.source), "lcm_data.source", "must be 'synthetic', 'prepared' or a prepared folder")
        check(self.cache_row_groups >= 1, "lcm_data.cache_row_groups", "must be >= 1")
        check(self.n_train > 0 and self.n_eval >= 0, "lcm_data.n_train", "n_train must be > 0, n_eval >= 0")
        check(2 <= self.min_sentences <= self.max_sentences, "lcm_data.min_sentences",
              "need 2 <= min_sentences <= max_sentences")
        check(self.noise >= 0, "lcm_data.noise", "must be >= 0")
        check(self.min_length >= 2, "lcm_data.min_length", "must be >= 2")


# ---------------------------------------------------------------------- sentence decoder (conceptlm lcm train-decoder)
@dataclass(kw_only=True)
class DecoderSection:
    """How concepts are turned back into text (the ``decoder`` section)."""

    kind: Literal["retrieval", "prefix_lm", "sonar", "autoencoder"] = "prefix_lm"
    """``retrieval``: nearest sentence of an embedded bank; ``prefix_lm``: a causal LM conditioned on the vector;
    ``sonar``: SONAR's pretrained text decoder (optional ``sonar-space`` package; reads ``encoder.name: sonar``
    vectors; nothing to train, no ``path``); ``autoencoder``: the decoder of a sentence autoencoder made by
    ``conceptlm lcm train-autoencoder`` (``decoder.path``, default the autoencoder folder of ``encoder.name``;
    decodes are cached)."""
    path: str | None = None
    """A saved decoder folder (``decoder.json``) to load; training writes one (the checkpoint's ``model/``)."""
    base: str | None = None
    """prefix_lm: ``null`` = a tiny Llama and a BPE tokenizer trained from scratch; else a pretrained causal LM
    (``smollm2-135m``, a ``.gguf`` file or a local HF folder)."""
    n_prefix: int = 4
    """Prefix embeddings the vector is mapped to."""
    projector: Literal["linear", "mlp"] = "mlp"
    projector_hidden: int = 1024
    """Inner width of the ``mlp`` projector."""
    lora: int = 0
    """LoRA rank on the pretrained LM (0 = train all its weights; the projector always trains fully)."""
    lora_alpha: int = 16
    noise_std: float = 0.3
    """Training noise: expected norm of the Gaussian noise added to the unit-norm embedding (per-dimension std
    ``noise_std / sqrt(dim)``) before renormalizing; 0 disables it. The paper-style ``sqrt(1-a) x + sqrt(a) sd eps``
    with ``a <= 0.2`` (LCM paper §2.5.2, Eq. 27) corresponds to noise norms up to ``sqrt(a / (1 - a)) = 0.5``."""
    noise_schedule: Literal["fixed", "uniform"] = "uniform"
    """``fixed``: every example gets ``noise_std``; ``uniform``: a per-example std drawn from U[0, noise_std]."""
    max_tokens: int = 64
    """Sentence tokens kept as training targets (longer sentences are cut and get no EOS target)."""
    max_new_tokens: int = 64
    num_beams: int = 1
    """1 = greedy decoding."""
    sonar_decoder: str = "text_sonar_basic_decoder"
    """sonar: the decoder's model card (``sonar-space``)."""
    sonar_lang: str = "eng_Latn"
    """sonar: the language decoded into."""
    batch_size: int = 64
    """Vectors decoded per ``generate`` call."""
    lowercase: bool = False
    """Train on lower-cased targets (the MiniLM embedding is uncased) and capitalize the first letter on decoding."""
    vocab_size: int = 4096
    """Tiny from-scratch LM: BPE vocabulary size."""
    hidden_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    max_position_embeddings: int = 256

    def validate(self) -> None:
        for name in ("n_prefix", "projector_hidden", "max_tokens", "max_new_tokens", "num_beams", "batch_size",
                     "vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            check(getattr(self, name) > 0, f"decoder.{name}", "must be > 0")
        check(self.lora >= 0, "decoder.lora", "must be >= 0 (0 = no LoRA)")
        check(self.lora == 0 or self.base is not None, "decoder.lora",
              "LoRA needs a pretrained decoder.base; a from-scratch LM trains all its weights (set decoder.lora=0)")
        check(self.noise_std >= 0, "decoder.noise_std", "must be >= 0")
        check(self.hidden_size % self.num_heads == 0, "decoder.hidden_size",
              f"{self.hidden_size} is not a multiple of decoder.num_heads={self.num_heads}")
        need = self.n_prefix + max(self.max_tokens, self.max_new_tokens) + 1
        check(self.base is not None or need <= self.max_position_embeddings, "decoder.max_position_embeddings",
              f"{self.max_position_embeddings} is shorter than n_prefix + max(max_tokens, max_new_tokens) + 1 = {need}")


@dataclass(kw_only=True)
class DecoderTrainSection:
    """``decoder_train:``: which sentences a decoder trains and is evaluated on (from ``docs`` + ``segment``, or
    given directly), and the decoder run's own length and step size."""

    max_sentences: int = 20000
    """Training sentences kept (after removing duplicates and the held-out ones)."""
    eval_sentences: int = 256
    """Held-out sentences (eval loss); drawn first from the shuffled unique sentences."""
    decode_eval: int = 64
    """Held-out sentences decoded at every evaluation for AutoBLEU and round-trip cosine (0 = none)."""
    min_chars: int = 2
    """Shorter sentences are dropped."""
    split: Literal["train", "all"] = "train"
    """Documents the decoder learns from: ``train`` (the prepared folder's train split, or the documents of
    ``docs`` that ``prepare``'s split rule puts there) or ``all`` (validation documents included: ``generate`` and
    ``evaluate`` then refuse it on validation documents)."""
    on_change: Literal["refuse", "rebuild"] = "refuse"
    """A retrieval bank already in the run folder that was made from other sentences, encoder or settings:
    ``refuse`` (one line naming what changed) or ``rebuild`` it. An identical bank is always reused. (A prefix
    decoder is a training run: a changed config is refused by the run's resume check.)"""
    steps: int | None = None
    """Optimizer steps of the decoder run (None = ``train.max_steps``)."""
    batch_size: int | None = None
    """Sentences per micro-batch (None = ``train.micro_batch_size``)."""
    lr: float | None = None
    """Peak learning rate (None = ``optim.lr``)."""

    def validate(self) -> None:
        check(self.max_sentences > 0, "decoder_train.max_sentences", "must be > 0")
        check(self.eval_sentences >= 0, "decoder_train.eval_sentences", "must be >= 0")
        check(0 <= self.decode_eval <= self.eval_sentences, "decoder_train.decode_eval",
              f"must be in [0, decoder_train.eval_sentences={self.eval_sentences}]")
        check(self.min_chars >= 1, "decoder_train.min_chars", "must be >= 1")
        check(self.steps is None or self.steps > 0, "decoder_train.steps", "must be > 0 or null")
        check(self.batch_size is None or self.batch_size > 0, "decoder_train.batch_size", "must be > 0 or null")
        check(self.lr is None or self.lr > 0, "decoder_train.lr", "must be > 0 or null")
        check(self.split in ("train", "all"), "decoder_train.split", "must be train or all")
        check(self.on_change in ("refuse", "rebuild"), "decoder_train.on_change", "must be refuse or rebuild")


@dataclass(kw_only=True)
class AutoencoderSection:
    """``autoencoder:``: a sentence encoder and decoder trained together here (``conceptlm lcm train-autoencoder``),
    on the sentences ``train-decoder`` would use (``decoder_train``: sources, split rule, held-out sentences and the
    run's length). The encoder is a small bidirectional transformer, mean-pooled and projected to ``dim`` (unit
    norm); the decoder a tiny Llama reading the vector through ``n_prefix`` prefix embeddings (as ``prefix_lm``).
    Both share one BPE tokenizer trained on the training sentences. The saved folder (the checkpoint's ``model/``)
    is usable as ``encoder.name`` and as ``decoder.path`` / ``decoder.kind: autoencoder``."""

    dim: int = 256
    """Bottleneck width: the concept vectors' dimension."""
    hidden_size: int = 256
    """Width of the encoder and of the decoder LM."""
    encoder_layers: int = 2
    decoder_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 4096
    """BPE vocabulary trained on the training sentences."""
    n_prefix: int = 4
    """Prefix embeddings the decoder reads the vector through."""
    max_tokens: int = 64
    """Tokens of a sentence the encoder reads and the decoder reproduces (longer ones are cut, with no EOS)."""
    noise_std: float = 0.3
    """Noise on the vector before decoding (as ``decoder.noise_std``: expected norm relative to the unit vector)."""
    noise_schedule: Literal["fixed", "uniform"] = "uniform"
    align_weight: float = 0.0
    """Weight of the alignment term ``1 - cos(W z, m)``: ``m`` the frozen ``align_encoder`` vector of the sentence,
    ``W`` a learned linear map (dropped on export); 0 = pure auto-encoding."""
    align_encoder: str = "minilm"
    """The encoder whose space the alignment term follows (any ``encoder.name``)."""

    def validate(self) -> None:
        for name in ("dim", "hidden_size", "encoder_layers", "decoder_layers", "num_heads", "vocab_size",
                     "n_prefix", "max_tokens"):
            check(getattr(self, name) > 0, f"autoencoder.{name}", "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "autoencoder.hidden_size",
              f"{self.hidden_size} is not a multiple of autoencoder.num_heads={self.num_heads}")
        check(self.noise_std >= 0, "autoencoder.noise_std", "must be >= 0")
        check(self.align_weight >= 0, "autoencoder.align_weight", "must be >= 0")


# ------------------------------------------------------------------------------------------- generation and evaluation
@dataclass(kw_only=True)
class SamplerOptions:
    """How a diffusion LCM samples one sentence embedding (``generate.diffusion``; LCM paper §2.3.2, §2.4.1).

    Defaults are the paper's evaluation settings: 40 inference steps, guidance 3 with rescale 0.7, initial noise
    scale 0.6, epsilon scaling 1.00045, deterministic DDIM.
    """

    inference_steps: int = 40
    spacing: Literal["trailing", "leading", "linspace", "reference"] = "trailing"
    """Timestep spacing: ``trailing`` = ``round(T - k T / S) - 1`` (the paper's formula, diffusers' ``trailing``),
    ``leading``, ``linspace``, or ``reference`` = the released code's integer-stride list (S = 40 of T = 100 runs
    50 steps)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance ``g`` (1 = the conditional prediction only; the unconditional pass is skipped)."""
    guidance_rescale: float = 0.7
    """CFG rescale ``phi`` (Lin et al. 2024, Alg. 2); 0 = plain CFG."""
    initial_noise_scale: float = 0.6
    epsilon_scaling: float | None = 1.00045
    """Divide the noise direction by this after x0 is computed (Ning et al. 2023); null = off."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic)."""
    clip_noise: float = 100.0
    """Clip latents to +-clip_noise (the reference's default, effectively off)."""
    thresholding: bool = False
    """Dynamic thresholding of x0 (ratio ``threshold_ratio``, bound ``sample_max_value``)."""
    threshold_ratio: float = 0.995
    sample_max_value: float = 6.0

    def validate(self) -> None:
        check(self.inference_steps >= 1, "generate.diffusion.inference_steps", "must be >= 1")
        check(self.guidance_scale >= 0, "generate.diffusion.guidance_scale", "must be >= 0")
        check(0.0 <= self.guidance_rescale <= 1.0, "generate.diffusion.guidance_rescale", "must be in [0, 1]")
        check(self.initial_noise_scale > 0, "generate.diffusion.initial_noise_scale", "must be > 0")
        check(self.epsilon_scaling is None or self.epsilon_scaling > 0, "generate.diffusion.epsilon_scaling",
              "must be > 0 or null")
        check(self.eta >= 0, "generate.diffusion.eta", "must be >= 0")
        check(self.clip_noise > 0, "generate.diffusion.clip_noise", "must be > 0")
        check(0 < self.threshold_ratio <= 1 and self.sample_max_value >= 1, "generate.diffusion.threshold_ratio",
              "need 0 < threshold_ratio <= 1 and sample_max_value >= 1")


@dataclass(kw_only=True)
class QuantSamplingOptions:
    """How a Quant-LCM picks each residual unit during generation (``generate.quant``; paper §2.3.5).

    Defaults are the paper's multi-sentence settings for Quant-LCM-D (temperature 1, top-k 3, guidance 1); for
    Quant-LCM-C the paper uses temperature 0.005, top-k 5, guidance 1.5.
    """

    temperature: float = 1.0
    """Quant-D: softmax temperature of the unit logits; Quant-C: the temperature of
    ``p(c | r) ~ exp(-||c - r||^2 / temperature)`` over the codebook (0 = the argmax / nearest centroid)."""
    top_k: int = 3
    """Sample among the k most likely units (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling over the remaining units (1 = off)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on the logits (Quant-D) or on the predicted vector (Quant-C); 1 = off."""

    def validate(self) -> None:
        check(self.temperature >= 0, "generate.quant.temperature", "must be >= 0")
        check(self.top_k >= 0, "generate.quant.top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "generate.quant.top_p", "must be in (0, 1]")
        check(self.guidance_scale >= 0, "generate.quant.guidance_scale", "must be >= 0")


@dataclass(kw_only=True)
class GenerationOptions:
    """Stopping rules and sampling of :func:`generate` (defaults: the paper's thresholds)."""

    max_new_sentences: int = 32
    min_new_sentences: int = 1
    """The end-of-text and repetition rules apply only from this many generated sentences on."""
    eos_threshold: float | None = 0.9
    """Stop when ``cos(x^_n, eot)`` reaches it (``None``: off; also off when no ``eot`` is given)."""
    repetition_threshold: float | None = 0.9
    """Stop when ``cos(x^_n, x_{n-1})`` reaches it (``None``: off)."""
    trim_stop_sentence: bool = True
    temperature: float = 0.0
    seed: int = 0
    use_cache: bool = True
    """Reuse the model's caches across steps (KV caches, cross-attention memories); off = recompute everything
    each step (same output, for checking and timing)."""
    diffusion: SamplerOptions = field(default_factory=SamplerOptions)
    """The diffusion sampler of One-/Two-Tower models (ignored by the others)."""
    quant: QuantSamplingOptions = field(default_factory=QuantSamplingOptions)
    """Unit sampling of Quant-LCMs (ignored by the others)."""

    def validate(self) -> None:
        """Raises ``ConfigError`` (a ``ValueError``) naming the field as ``generate.<name>``."""
        self.diffusion.validate()
        self.quant.validate()
        check(self.max_new_sentences >= 1, "generate.max_new_sentences", "must be >= 1")
        check(0 <= self.min_new_sentences <= self.max_new_sentences, "generate.min_new_sentences",
              f"must be in [0, max_new_sentences={self.max_new_sentences}]")
        check(self.temperature >= 0, "generate.temperature", "must be >= 0")


@dataclass(kw_only=True)
class GenerateSection(GenerationOptions):
    """``generate:``: the prompt of ``conceptlm lcm generate`` and, inherited from
    :class:`~conceptlm.lcm.config.GenerationOptions`, the stopping rules and sampling (the paper's defaults)."""

    prompt: str = ""
    """Prompt text (segmented and embedded with the run's segmenter and encoder); empty = the first
    ``prompt_sentences`` sentences of the first ``documents`` validation documents of the prepared data."""
    prompt_sentences: int = 4
    documents: int = 1
    """Validation documents continued when ``prompt`` is empty (the first ones with at least two sentences; the
    prompt keeps at least one sentence back as the reference)."""
    max_new_sentences: int = 8

    def options(self) -> GenerationOptions:
        """The :class:`GenerationOptions` part (a new object: callers may change it)."""
        return GenerationOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationOptions)})

    def validate(self) -> None:
        check(self.prompt_sentences >= 1, "generate.prompt_sentences", "must be >= 1")
        check(self.documents >= 1, "generate.documents", "must be >= 1")
        super().validate()  # ConfigError naming the field (generate.diffusion.inference_steps, ...)


@dataclass(kw_only=True)
class EvaluateSection:
    """``evaluate:``: the Table 3 pre-training metrics of ``conceptlm lcm evaluate`` on validation documents."""

    documents: int = 64
    """Validation documents evaluated (the first ones of the prepared data's validation split)."""
    batch_size: int = 16
    """Documents per teacher-forced batch; contrastive accuracy takes its negatives from the same batch."""
    round_trip: bool = True
    """Round-trip ℓ2 (decode each prediction, encode it again); needs the decoder."""
    mi_model: str | None = None
    """A causal LM scoring coherence (mutual information, the paper uses GPT-2): ``smollm2-135m``, a ``.gguf``
    file or a local folder; null = MI is not computed."""
    mi_context: int = 10
    """Ground-truth context sentences the MI scorer sees."""
    mi_sentences: int = 200
    """Predicted sentences scored for MI (two LM passes each)."""
    generate_documents: int = 16
    """Documents continued from their first half for the text metrics (ROUGE-L, OVL-3, REP-4; 0 = none)."""
    fragility_sentences: int = 0
    """Validation sentences whose fragility (Eq. 26: minus the expected sentence BLEU of the decoded, noised
    embedding, alpha ~ U[0, 1]) is estimated with the decoder (0 = off)."""
    fragility_samples: int = 2
    """Noise draws per sentence for the fragility estimate."""

    def validate(self) -> None:
        check(self.documents >= 1, "evaluate.documents", "must be >= 1")
        check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
        check(self.mi_context >= 0, "evaluate.mi_context", "must be >= 0")
        check(self.mi_sentences >= 1, "evaluate.mi_sentences", "must be >= 1")
        check(self.generate_documents >= 0, "evaluate.generate_documents", "must be >= 0")
        check(self.fragility_sentences >= 0, "evaluate.fragility_sentences", "must be >= 0")
        check(self.fragility_samples >= 1, "evaluate.fragility_samples", "must be >= 1")


# ------------------------------------------------------------------- Hub format and lm-eval (export, eval-harness)
@dataclass(kw_only=True)
class ExportSection:
    """``export:``: the Hub-format folder of ``conceptlm lcm export`` (:mod:`conceptlm.lcm.hub`)."""

    on_change: Literal["refuse", "rebuild"] = "refuse"
    """An existing export made from other weights, settings, encoder, prepared folder or decoder: refuse (one line
    naming what changed) or rebuild it; an export of the same inputs is always reused."""

    def validate(self) -> None:
        check(self.on_change in ("refuse", "rebuild"), "export.on_change", "must be refuse or rebuild")


@dataclass(kw_only=True)
class LCMHarnessSection:
    """``harness:``: lm-evaluation-harness generation tasks on the LCM (``conceptlm lcm eval-harness``,
    :mod:`conceptlm.lcm.harness`). Only ``generate_until`` tasks are meaningful: an LCM has no token likelihood."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (local tasks under ``include_path``, see :mod:`conceptlm.harness.tasks`)."""
    include_path: str = ""
    """Folder of task YAML files (``--include_path``)."""
    limit: int | None = None
    """Examples per task (None = all)."""
    num_fewshot: int | None = None
    max_sentences: int | None = None
    """Sentences generated per request (a task's ``max_gen_sentences`` overrides it; None =
    ``generate.max_new_sentences``). A task's ``max_gen_toks`` is ignored: the LCM generates sentences."""
    seed: int = 0
    """The harness's seeds; the LCM's own sampling seed is ``generate.seed``."""

    def validate(self) -> None:
        check(all(isinstance(t, str) and t for t in self.tasks), "harness.tasks", "must be a list of task names")
        check(len(set(self.tasks)) == len(self.tasks), "harness.tasks", "a task is listed twice")
        check(self.limit is None or self.limit > 0, "harness.limit", "must be > 0 (or null: every example)")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "harness.num_fewshot", "must be >= 0")
        check(self.max_sentences is None or self.max_sentences >= 1, "harness.max_sentences", "must be >= 1")
        check(not self.include_path or Path(self.include_path).exists(), "harness.include_path",
              f"{self.include_path!r} does not exist")


# --------------------------------------------------------------------------------- inference cost (conceptlm lcm cost)
@dataclass(kw_only=True)
class TransformerSize:
    """What the FLOPs model needs of a Transformer; also the explicit form of ``cost.llm`` / ``encoder`` /
    ``decoder`` in a config (write large counts as integers, e.g. ``6476271616``, or as ``6.5e+9``)."""

    name: str = "custom"
    n_params: int
    """Non-embedding parameters ``N`` (token / position tables excluded: a lookup costs no matmul FLOPs)."""
    n_layers: int
    d_model: int
    """Attention width ``d`` (the ``2 n_layer c d`` term)."""


def _log_spaced_totals() -> list[int]:
    return [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000]


@dataclass(kw_only=True)
class CostSection:
    """Inference-FLOPs comparison of the LCM with a token LLM (section ``cost`` of an LCM config; paper Fig. 13)."""

    lcm: str = "two_tower_1.6b"
    """LCM sizes: ``two_tower_1.6b`` | ``two_tower_7b`` | ``one_tower_1.6b`` (the paper's configs) or ``run`` (the
    run's own ``lcm`` section: d_model, n_layers, n_denoiser_layers, d_ff, dim, model)."""
    llm: str | TransformerSize = "llama2_7b"
    """The token LLM: ``llama2_7b`` or explicit ``{name, n_params, n_layers, d_model}`` (non-embedding params)."""
    encoder: str | TransformerSize = "sonar"
    """Sentence encoder: ``sonar`` (0.50B, 24 layers, d 1024), ``minilm_l6`` or explicit sizes."""
    decoder: str | TransformerSize = "sonar"
    """Sentence decoder: ``sonar`` (0.60B, 24 layers, d 1024) or explicit sizes."""
    inference_steps: int = 40
    """Diffusion steps per generated sentence (the paper's 40; the reference code's list for 40 has 50 steps)."""
    cfg: bool = True
    """Classifier-free guidance: conditional and unconditional denoiser rows at every step (2x denoiser cost)."""
    precompute_modulation: bool = False
    """Count the AdaLN modulations (and timestep MLP) as precomputed per timestep (as our generation does; not in
    the paper), not per step."""
    beam_size: int = 1
    """Sentence-decoder beam (multiplies the decode cost)."""
    sentence_tokens: list[float] = field(default_factory=lambda: [10.0, 20.0, 30.0, 40.0, 60.0])
    """Average sentence lengths in LLM tokens: one LCM curve / table column each."""
    total_tokens: list[int] = field(default_factory=_log_spaced_totals)
    """Document lengths (prompt + output, LLM tokens): the table rows / x axis."""
    prompt_fraction: float = 0.5
    """Fraction of each document given as the prompt (the rest is generated)."""

    def validate(self) -> None:
        from conceptlm.lcm.cost import DECODER_PRESETS, ENCODER_PRESETS, LCM_PRESETS, LLM_PRESETS  # the sizes

        choices = [*LCM_PRESETS, "run"]
        check(self.lcm in choices, "cost.lcm", f"{self.lcm!r} is not one of {', '.join(choices)}")
        for name, presets in (("llm", LLM_PRESETS), ("encoder", ENCODER_PRESETS), ("decoder", DECODER_PRESETS)):
            value = getattr(self, name)
            if isinstance(value, str):
                check(value in presets, f"cost.{name}",
                      f"{value!r} is not one of {', '.join(presets)} (or give n_params, n_layers, d_model)")
            else:
                check(value.n_params > 0, f"cost.{name}.n_params", "must be > 0")
                check(value.n_layers >= 1, f"cost.{name}.n_layers", "must be >= 1")
                check(value.d_model >= 1, f"cost.{name}.d_model", "must be >= 1")
        check(self.inference_steps >= 1, "cost.inference_steps", "must be >= 1")
        check(self.beam_size >= 1, "cost.beam_size", "must be >= 1")
        check(len(self.sentence_tokens) > 0, "cost.sentence_tokens", "needs at least one sentence length")
        check(all(v > 0 for v in self.sentence_tokens), "cost.sentence_tokens", "every length must be > 0")
        check(len(self.total_tokens) > 0, "cost.total_tokens", "needs at least one total length")
        check(all(v >= 1 for v in self.total_tokens), "cost.total_tokens", "every length must be >= 1")
        check(0.0 <= self.prompt_fraction < 1.0, "cost.prompt_fraction", "must be in [0, 1) (something is generated)")


# ------------------------------------------------------------------------------------------------------- stage configs
DECODER_RUN = "decoder"
"""Sub-folder of the run folder that holds the decoder run (``train-decoder``)."""
AUTOENCODER_RUN = "autoencoder"
"""Sub-folder of the run folder that holds the autoencoder run (``train-autoencoder``)."""


@dataclass(kw_only=True)
class PrepareConfig(RunConfig):
    """Config of the ``prepare`` verb: documents, segmenter, encoder and output settings."""

    docs: DocsSection = field(default_factory=DocsSection)
    segment: SegmentSection = field(default_factory=SegmentSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)


@dataclass(kw_only=True)
class LCMTrainConfig(RunConfig):
    """An LCM run: the shared run sections plus ``lcm`` (architecture) and ``lcm_data``."""

    lcm: LCMSection = field(default_factory=LCMSection)
    lcm_data: LCMDataSection = field(default_factory=LCMDataSection)


@dataclass(kw_only=True)
class DecoderTrainConfig(RunConfig):
    """``conceptlm lcm train-decoder``: a sentence decoder for the frozen encoder."""

    decoder: DecoderSection = field(default_factory=DecoderSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    docs: DocsSection = field(default_factory=DocsSection)
    segment: SegmentSection = field(default_factory=SegmentSection)
    decoder_train: DecoderTrainSection = field(default_factory=DecoderTrainSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    """Only its split rule is read (``val_fraction``, ``split_seed``): the decoder learns from the documents of
    ``docs`` that ``prepare`` puts in the train split."""


@dataclass(kw_only=True)
class AutoencoderTrainConfig(DecoderTrainConfig):
    """``conceptlm lcm train-autoencoder``: the decoder run's sentences and length, plus ``autoencoder``."""

    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)


@dataclass(kw_only=True)
class LCMConfig(RunConfig):
    docs: DocsSection = field(default_factory=DocsSection)
    segment: SegmentSection = field(default_factory=SegmentSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    lcm: LCMSection = field(default_factory=LCMSection)
    lcm_data: LCMDataSection = field(default_factory=lambda: LCMDataSection(source="prepared"))
    decoder: DecoderSection = field(default_factory=DecoderSection)
    decoder_train: DecoderTrainSection = field(default_factory=DecoderTrainSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    cost: CostSection = field(default_factory=CostSection)
    export: ExportSection = field(default_factory=ExportSection)
    harness: LCMHarnessSection = field(default_factory=LCMHarnessSection)

    @property
    def data_dir(self) -> Path | None:
        """The prepared folder the LCM trains on (None for synthetic vectors)."""
        src = self.lcm_data.source
        if src == "synthetic":
            return None
        return Path(self.prepare.out_dir if src == "prepared" else src)

    @property
    def decoder_dir(self) -> Path:
        """Where the decoder is read from: ``decoder.path``, else (``decoder.kind: autoencoder``) the autoencoder
        folder of ``encoder.name``, else the run's ``decoder`` sub-run."""
        if self.decoder.path:
            return Path(self.decoder.path)
        return Path(self.encoder.name) if self.decoder.kind == "autoencoder" else self.run_dir / DECODER_RUN


def _shared(cfg: RunConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}


def prepare_config(cfg: LCMConfig) -> PrepareConfig:
    """The ``prepare`` stage's config (docs, segment, encoder, prepare)."""
    return PrepareConfig(**_shared(cfg), docs=cfg.docs, segment=cfg.segment, encoder=cfg.encoder,
                         prepare=cfg.prepare)


def lcm_train_config(cfg: LCMConfig) -> LCMTrainConfig:
    """The Base-LCM run's config, ``lcm_data.source`` resolved to a folder (or ``synthetic``)."""
    folder = cfg.data_dir
    if folder is not None and not (folder / "manifest.json").is_file():
        raise ConfigError(f"{folder} holds no prepared documents (no manifest.json): run 'conceptlm lcm prepare' "
                          "with this config first, or set lcm_data.source=synthetic", field="lcm_data.source")
    data = dataclasses.replace(cfg.lcm_data, source=str(folder) if folder is not None else "synthetic")
    return LCMTrainConfig(**_shared(cfg), lcm=cfg.lcm, lcm_data=data)


def decoder_config(cfg: LCMConfig) -> DecoderTrainConfig:
    """The decoder run's config: ``{run_dir}/decoder``, trained on the sentences of the training documents
    (``recipe.train_decoder`` reads them from the prepared folder when there is one; otherwise from ``docs`` with
    ``prepare``'s split rule)."""
    shared = _shared(cfg)
    shared["run"] = dataclasses.replace(cfg.run, out_dir=str(cfg.run_dir), name=DECODER_RUN)
    return DecoderTrainConfig(**shared, decoder=cfg.decoder, encoder=cfg.encoder, docs=cfg.docs,
                              segment=cfg.segment, decoder_train=cfg.decoder_train, prepare=cfg.prepare)


def autoencoder_config(cfg: LCMConfig) -> AutoencoderTrainConfig:
    """The autoencoder run's config: ``{run_dir}/autoencoder``, trained on the sentences ``train-decoder`` would
    take (``decoder_train``, ``prepare``'s split rule)."""
    shared = _shared(cfg)
    shared["run"] = dataclasses.replace(cfg.run, out_dir=str(cfg.run_dir), name=AUTOENCODER_RUN)
    return AutoencoderTrainConfig(**shared, decoder=cfg.decoder, encoder=cfg.encoder, docs=cfg.docs,
                                  segment=cfg.segment, decoder_train=cfg.decoder_train, prepare=cfg.prepare,
                                  autoencoder=cfg.autoencoder)


def decoder_run_config(cfg):
    """``cfg`` with ``decoder_train.steps`` / ``batch_size`` / ``lr`` (when set) in place of the run's
    ``train.max_steps`` / ``train.micro_batch_size`` / ``optim.lr`` (the decoder is trained with its own length
    when it shares a config with the LCM)."""
    d = cfg.decoder_train
    return with_own_length(cfg, steps=d.steps, batch_size=d.batch_size, lr=d.lr)
