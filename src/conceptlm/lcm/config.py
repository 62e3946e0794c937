"""The LCM config: one file describes the whole Base-LCM workflow, documents -> concepts -> model -> text.

Sections:

* ``docs`` / ``segment`` / ``encoder`` / ``prepare``: what ``conceptlm lcm prepare`` segments, embeds and stores
  (:mod:`conceptlm.lcm.prepare`);
* ``lcm`` / ``lcm_data``: the Base-LCM and its training data (``lcm_data.source``: ``prepared`` = the folder of
  ``prepare.out_dir``, ``synthetic``, or any prepared folder), trained by ``conceptlm lcm train`` in the run folder;
* ``decoder`` / ``decoder_train``: the sentence decoder (retrieval bank or prefix LM) made by
  ``conceptlm lcm train-decoder`` in ``{run_dir}/decoder`` with its own length (``decoder_train.steps``);
* ``generate``: the prompt and stopping rules of ``conceptlm lcm generate``;
* ``evaluate``: what ``conceptlm lcm evaluate`` measures (the paper's Table 3 metrics);
* ``cost``: the inference-FLOPs comparison of ``conceptlm lcm cost`` (LCM generation vs a token-level LLM);
* ``run`` / ``optim`` / ``schedule`` / ``train`` / ``dist``: the shared loop's sections (the LCM run).

Each verb reads the sections it needs; :func:`prepare_config`, :func:`lcm_train_config` and
:func:`decoder_config` give the per-stage configs that the stage functions take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from conceptlm.core.config import RunConfig, check
from conceptlm.core.errors import ConfigError
from conceptlm.lcm.cost import CostSection
from conceptlm.lcm.decoder_train import DecoderTrainConfig, DecoderTrainSection
from conceptlm.lcm.decoders import DecoderSection
from conceptlm.lcm.documents import DocsSection
from conceptlm.lcm.encoders import EncoderSection
from conceptlm.lcm.generate import GenerationOptions
from conceptlm.lcm.model import LCMSection
from conceptlm.lcm.prepare import PrepareConfig, PrepareSection
from conceptlm.lcm.segment import SegmentSection
from conceptlm.lcm.train import LCMDataSection, LCMTrainConfig

__all__ = ["GenerateSection", "EvaluateSection", "LCMConfig", "prepare_config", "lcm_train_config",
           "decoder_config", "DECODER_RUN"]

DECODER_RUN = "decoder"
"""Sub-folder of the run folder that holds the decoder run (``train-decoder``)."""


@dataclass(kw_only=True)
class GenerateSection(GenerationOptions):
    """``generate:``: the prompt of ``conceptlm lcm generate`` and, inherited from
    :class:`~conceptlm.lcm.generate.GenerationOptions`, the stopping rules and sampling (the paper's defaults)."""

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
    generate: GenerateSection = field(default_factory=GenerateSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    cost: CostSection = field(default_factory=CostSection)

    @property
    def data_dir(self) -> Path | None:
        """The prepared folder the LCM trains on (None for synthetic vectors)."""
        src = self.lcm_data.source
        if src == "synthetic":
            return None
        return Path(self.prepare.out_dir if src == "prepared" else src)

    @property
    def decoder_dir(self) -> Path:
        """Where the decoder is read from: ``decoder.path``, else the run's ``decoder`` sub-run."""
        return Path(self.decoder.path) if self.decoder.path else self.run_dir / DECODER_RUN


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
