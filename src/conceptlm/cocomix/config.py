"""The CoCoMix config schema: every section of the one file that describes the whole pipeline, teacher -> SAE ->
labels -> students -> report, and the run configs of the stages that train (the tiny teacher, the SAE, a student).

Sections of :class:`CocomixConfig`:

* ``corpus`` (:class:`CorpusSection`): documents and token windows;
* ``teacher`` (:class:`TeacherSection`): the frozen teacher (a path, or a tiny one trained here) and the block whose
  output the SAE reads;
* ``sae`` (:class:`SAESection`): the TopK SAE, with its own training length;
* ``labels`` (:class:`LabelSection`): how concept labels are chosen and cached;
* ``student`` (:class:`StudentSection`) and ``cocomix`` (:class:`CocomixSection`): the student architecture and
  its objective;
* ``pipeline`` (:class:`PipelineSection`): which arms and seeds the ``pipeline`` verb trains, and what a stage
  does with an output made from other settings (``on_change: refuse | rebuild``);
* ``interpret`` (:class:`InterpretSection`): the ``concepts`` / ``explain`` / ``steer`` verbs;
* ``harness`` (:class:`HarnessSection`): lm-evaluation-harness tasks for the ``eval-harness`` verb and, when
  given, the report's downstream columns (off by default);
* ``run`` / ``optim`` / ``schedule`` / ``train`` / ``dist``: the shared loop's sections, used by the students
  (the teacher and the SAE carry their own length and step size).

This module imports nothing but :mod:`conceptlm.core.config` and :mod:`conceptlm.core.errors` (no torch, no
transformers), so reading or checking a config is fast; ``tests/cocomix/test_config_imports.py`` holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from conceptlm.core.config import ARCHS, RunConfig, check

__all__ = ["CorpusSection", "TeacherSection", "SAESection", "LabelSection", "StudentSection", "CocomixSection",
           "PipelineSection", "InterpretSection", "HarnessSection", "TinyTeacherConfig", "SAETrainConfig",
           "StudentTrainConfig", "CocomixConfig", "ARMS", "DEFAULT_DEAD_AFTER_TOKENS"]

ARMS = ("cocomix", "ntp", "ntp_flops", "kd", "pause", "kd_pause", "mix_only", "concept_only", "add", "cocomix_pos",
        "pause_pos")
"""Arms of the comparison (the paper's baselines and ablations, §3, §3.3 and App. A, and ours): names accepted by
:func:`conceptlm.cocomix.arms.make_arm`."""
DEFAULT_DEAD_AFTER_TOKENS = 10_000_000  # Gao et al. 2024


# ------------------------------------------------------------------------------------------------ sections
@dataclass(kw_only=True)
class CorpusSection:
    source: str = "generated"
    """``generated``, or a ``.txt`` / ``.jsonl`` file, or a directory of them, or a token-shard folder (``conceptlm
    data tokenize``; its ``train`` / ``validation`` splits and tokenizer are used, read through memory maps, and
    ``n_documents``, ``text_field``, ``txt_split``, ``val_fraction`` and ``seed`` do not apply)."""
    text_field: str = "text"
    """JSONL: dotted path of the document text (``text``, ``messages.1.content``)."""
    txt_split: Literal["paragraph", "line"] = "paragraph"
    """TXT: one document per blank-line-separated paragraph, or per non-empty line."""
    n_documents: int = 2000
    """``generated``: how many documents; files: use the first N documents (0 = all; a warning says how many were
    left out)."""
    seed: int = 0
    """Seeds the generator and the train/val split."""
    window: int = 64
    """Tokens per window."""
    val_fraction: float = 0.05
    n_topics: int = 16
    """``generated``: number of latent topics."""
    topics_per_document: int = 2
    """``generated``: topics mixed in one document."""
    sentences_per_document: tuple[int, int] = (6, 14)
    """``generated``: inclusive range of sentences per document."""
    topic_stickiness: float = 0.7
    """``generated``: probability that a sentence keeps the previous sentence's topic."""

    def validate(self) -> None:
        check(bool(self.source), "corpus.source", "must be 'generated' or a .txt/.jsonl file or a directory")
        if self.source != "generated":
            p = Path(self.source)
            check(p.is_dir() or (p.is_file() and p.suffix in (".txt", ".jsonl")), "corpus.source",
                  f"{self.source!r} is neither 'generated', an existing .txt/.jsonl file, nor a directory")
        check(bool(self.text_field), "corpus.text_field", "must be a non-empty dotted path")
        check(self.n_documents >= 0, "corpus.n_documents", "must be >= 0")
        check(self.source != "generated" or self.n_documents >= 2, "corpus.n_documents",
              "the generator needs at least 2 documents (one for validation)")
        check(self.window >= 2, "corpus.window", "must be >= 2")
        check(0.0 <= self.val_fraction < 1.0, "corpus.val_fraction", "must be in [0, 1)")
        check(self.n_topics >= 1, "corpus.n_topics", "must be >= 1")
        check(1 <= self.topics_per_document <= self.n_topics, "corpus.topics_per_document",
              f"must be in [1, n_topics={self.n_topics}]")
        lo, hi = self.sentences_per_document
        check(1 <= lo <= hi, "corpus.sentences_per_document", "must be (min, max) with 1 <= min <= max")
        check(0.0 <= self.topic_stickiness <= 1.0, "corpus.topic_stickiness", "must be in [0, 1]")


@dataclass(kw_only=True)
class TeacherSection:
    path: str | None = None
    """HF folder, ``.gguf``, named model, conceptlm run/checkpoint folder; ``null`` = train a tiny teacher."""
    layer: int = 1
    """Index of the block whose output (residual stream) is the SAE input (the paper: block 5 of GPT-2 small's 12,
    App. A)."""
    # tiny teacher (path: null)
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 512
    """Size of the BPE vocabulary trained on the corpus."""
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    save_every: int = 0
    """Tiny-teacher checkpoint cadence (0: only at the end)."""
    seed: int = 0

    def validate(self) -> None:
        check(self.layer >= 0, "teacher.layer", "must be >= 0")
        check(self.arch in ARCHS, "teacher.arch", f"must be one of {', '.join(ARCHS)}")
        for name in ("hidden_size", "num_layers", "num_heads", "steps", "batch_size"):
            check(getattr(self, name) > 0, f"teacher.{name}", "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "teacher.hidden_size", "must be a multiple of num_heads")
        check(self.vocab_size >= 300, "teacher.vocab_size", "must be >= 300 (256 bytes + special tokens + merges)")
        check(self.lr > 0, "teacher.lr", "must be > 0")
        check(0 <= self.warmup_steps <= self.steps, "teacher.warmup_steps", "must be in [0, steps]")
        check(self.save_every >= 0, "teacher.save_every", "must be >= 0")
        if self.path is None:
            check(self.layer < self.num_layers, "teacher.layer",
                  f"{self.layer} is not a block of the tiny teacher (num_layers={self.num_layers})")


@dataclass(kw_only=True)
class SAESection:
    n_latents: int = 512
    """Number of latents (concepts); the input width ``d_in`` is the teacher's."""
    k: int = 16
    """Active latents per token."""
    aux_k: int | None = None
    """Dead latents used by AuxK (default ``d_in // 2``); 0 disables AuxK."""
    aux_coef: float = 1 / 32
    dead_after_tokens: int = DEFAULT_DEAD_AFTER_TOKENS
    """A latent that has not fired for this many tokens is dead (Gao et al.: 10M)."""
    normalize_input: bool = True
    eps: float = 1e-5
    init_windows: int = 64
    """Training windows whose mean activation initialises ``b_dec`` (and is the FVU reference)."""
    seed: int = 0
    # the SAE's own training length and step size, so one config can train the SAE and the students differently
    steps: int | None = None
    """Optimizer steps of the SAE run (``null`` = ``train.max_steps``)."""
    batch_size: int | None = None
    """Windows per micro-batch of the SAE run (``null`` = ``train.micro_batch_size``)."""
    lr: float | None = None
    """Peak learning rate of the SAE run (``null`` = ``optim.lr``)."""

    def validate(self) -> None:
        check(self.steps is None or self.steps >= 1, "sae.steps", "must be >= 1 or null")
        check(self.batch_size is None or self.batch_size >= 1, "sae.batch_size", "must be >= 1 or null")
        check(self.lr is None or self.lr > 0, "sae.lr", "must be > 0 or null")
        check(self.n_latents >= 1, "sae.n_latents", "must be >= 1")
        check(1 <= self.k <= self.n_latents, "sae.k", f"must be in [1, n_latents={self.n_latents}]")
        check(self.aux_k is None or self.aux_k >= 0, "sae.aux_k", "must be >= 0 or null")
        check(self.aux_coef >= 0, "sae.aux_coef", "must be >= 0")
        check(self.dead_after_tokens >= 1, "sae.dead_after_tokens", "must be >= 1")
        check(self.eps > 0, "sae.eps", "must be > 0")
        check(self.init_windows >= 1, "sae.init_windows", "must be >= 1")


@dataclass(kw_only=True)
class LabelSection:
    """How concept labels are chosen and cached (the ``labels`` section of a CoCoMix config)."""

    k_attr: int = 4
    """Labels per token (the reference's ``topK_attri``)."""
    mode: Literal["post", "pre"] = "post"
    """Activation in the attribution: ``post`` = post-TopK values, active latents only (reference code);
    ``pre`` = pre-activations of all latents (paper Eq. 1)."""
    score: Literal["signed", "abs"] = "signed"
    """Rank by the signed score (reference and paper) or by its magnitude (ablation)."""
    selection: Literal["attribution", "activation"] = "attribution"
    """``attribution`` (CoCoMix) or ``activation``: the ``k_attr`` most active SAE latents (paper Fig. 6a)."""
    include_sigma: bool = False
    """Multiply scores by the token's normalization scale (exact decoder chain rule); labels are unchanged."""
    sae_path: str = ""
    """SAE file or SAE run folder; empty = the SAE training run's output."""
    cache_dir: str = ""
    """Where the label cache is written (empty = ``{run_dir}/labels``)."""
    batch_size: int = 8
    """Windows per teacher pass."""
    chunk_windows: int = 64
    """Windows per cache chunk (one progress record each); a multiple of ``batch_size``."""
    chunk_tokens: int = 0
    """Tokens per scoring chunk (bounds the gathered / dense temporaries); 0 = automatic."""
    shard_windows: int = 0
    """Windows per label-cache shard; 0 = one ``labels.npy`` / ``mask.npy`` per split, written by one process (the
    default). N > 0 (a multiple of ``batch_size``): the cache is a folder of shards of N windows, aligned with the
    windows (shard s = windows ``[s*N, (s+1)*N)``), written in parallel by every process of a torchrun launch
    (shard s by rank ``s mod world``), each atomically; a killed run computes only the missing shards, and the
    labels are the same bytes for any number of processes. Needed (> 0) to label with more than one process."""
    progress: bool = True

    def validate(self) -> None:
        check(self.k_attr > 0, "labels.k_attr", "must be > 0")
        check(self.mode in ("post", "pre"), "labels.mode", f"{self.mode!r} is not one of: post, pre")
        check(self.score in ("signed", "abs"), "labels.score", f"{self.score!r} is not one of: signed, abs")
        check(self.selection in ("attribution", "activation"), "labels.selection",
              f"{self.selection!r} is not one of: attribution, activation")
        check(self.batch_size > 0, "labels.batch_size", "must be > 0")
        check(self.chunk_windows > 0, "labels.chunk_windows", "must be > 0")
        check(self.chunk_windows % self.batch_size == 0, "labels.chunk_windows",
              f"{self.chunk_windows} is not a multiple of labels.batch_size={self.batch_size}")
        check(self.chunk_tokens >= 0, "labels.chunk_tokens", "must be >= 0 (0 = automatic)")
        check(self.shard_windows >= 0 and self.shard_windows % self.batch_size == 0, "labels.shard_windows",
              f"{self.shard_windows} is not 0 or a positive multiple of labels.batch_size={self.batch_size}")

    def describe(self) -> dict[str, Any]:
        """The settings that determine the labels (recorded in a label cache's header)."""
        return {"k_attr": self.k_attr, "mode": self.mode, "score": self.score, "selection": self.selection,
                "include_sigma": self.include_sigma}


@dataclass(kw_only=True)
class StudentSection:
    """The student's architecture (``student:`` in a config); the objective lives in ``CocomixSection``."""

    style: Literal["llama", "gpt2"] = "gpt2"
    """``gpt2``: LayerNorm, tanh-GELU MLP, learned absolute positions, biases (the paper's student); ``llama``:
    RMSNorm, SwiGLU, RoPE, no biases."""
    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0
    """MLP width; 0 = ``4*d_model`` (gpt2) or ``8*d_model/3`` rounded up to a multiple of 8 (llama)."""
    max_len: int = 256
    """Longest sequence in tokens (size of the position table for gpt2; a hard limit for both styles)."""
    tie_embeddings: bool = True
    dropout: float = 0.0
    """Embedding, residual and attention dropout (the reference trains with 0.1)."""
    init_std: float = 0.02
    mix: Literal["interleave", "add", "pause", "none"] = "interleave"
    concept_head: bool = True
    """Predict concepts at ``insert_layer`` (needed by ``interleave`` / ``add`` and by the concept loss)."""
    insert_layer: int = 1
    """Blocks below the insertion: the concept is predicted from the residual stream after this many blocks."""
    n_concepts: int = 1024
    """``C``: concept vocabulary (the SAE's latent count)."""
    concept_k: int = 16
    """``K``: concept logits kept (TopK) before compression."""
    interleave_positions: Literal["shared", "sequential"] = "shared"
    """RoPE positions of the mixed blocks (llama style): ``shared`` = both slots of token t at t; ``sequential`` =
    slots numbered 0..2T-1."""
    concept_chunk: int = 0
    """Tokens per chunk of the concept head (0 = as many as fit in 2^23 logits)."""
    slot_positions: bool = False
    """gpt2 style, ``mix: interleave | pause``: add token t's position embedding to the slot after ``h_t`` (``ĉ_t``
    or the pause vector), as a token fed at the input would get, so that slot's query can find the latest token.
    Off (the paper and the reference): the upper blocks have no positions, so one shared pause vector cannot tell
    its slots apart, and ``ĉ_t`` carries position only through the concept bottleneck."""

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len", "n_concepts", "concept_k"):
            check(getattr(self, name) > 0, f"student.{name}", "must be > 0")
        check(self.d_model % self.n_heads == 0, "student.d_model",
              f"{self.d_model} is not divisible by student.n_heads={self.n_heads}")
        check(self.style != "llama" or (self.d_model // self.n_heads) % 2 == 0, "student.d_model",
              "llama style (RoPE) needs an even head width d_model/n_heads")
        check(self.d_ff >= 0 and self.concept_chunk >= 0, "student", "d_ff and concept_chunk must be >= 0")
        check(0.0 <= self.dropout < 1.0, "student.dropout", "must be in [0, 1)")
        check(not (self.concept_head or self.doubled) or 0 <= self.insert_layer < self.n_layers,
              "student.insert_layer", f"must be in [0, n_layers={self.n_layers})")
        check(self.concept_k <= self.n_concepts, "student.concept_k",
              f"{self.concept_k} exceeds student.n_concepts={self.n_concepts}")
        check(not self.slot_positions or (self.doubled and self.style == "gpt2"), "student.slot_positions",
              "applies to mix=interleave|pause in the gpt2 style only (llama-style blocks see positions through RoPE)")
        check(self.mix not in ("interleave", "add") or self.concept_head, "student.concept_head",
              f"mix={self.mix} mixes the predicted concept: set concept_head=true")

    @property
    def ffn_dim(self) -> int:
        """Resolved MLP width."""
        if self.d_ff:
            return self.d_ff
        return 4 * self.d_model if self.style == "gpt2" else 8 * -(-8 * self.d_model // 24)

    @property
    def doubled(self) -> bool:
        """Blocks from ``insert_layer`` on see two slots per token."""
        return self.mix in ("interleave", "pause")

    @property
    def compresses(self) -> bool:
        """The predicted concept is compressed and mixed in (``interleave`` / ``add``)."""
        return self.mix in ("interleave", "add")


@dataclass(kw_only=True)
class CocomixSection:
    """The objective (``cocomix:`` in a config); the architecture is ``student:``."""

    lam: float = 0.1
    """``λ``, weight of the concept loss (0 = not trained; its CE is then reported as the metric ``concept_ce``)."""
    k_attr: int = 4
    """``K_attr``: concept labels per token (checked against the batches)."""
    kd_weight: float = 0.0
    """``λ_KD`` of knowledge distillation from a teacher's next-token distribution (0 = off)."""
    kd_temperature: float = 1.0
    """Softmax temperature ``τ`` of both distributions in the KD term (the term is scaled by ``τ²``)."""

    def validate(self) -> None:
        check(self.lam >= 0, "cocomix.lam", "must be >= 0")
        check(self.k_attr > 0, "cocomix.k_attr", "must be > 0")
        check(self.kd_weight >= 0, "cocomix.kd_weight", "must be >= 0")
        check(self.kd_temperature > 0, "cocomix.kd_temperature", "must be > 0")


@dataclass(kw_only=True)
class PipelineSection:
    arms: list[str] = field(default_factory=lambda: ["ntp", "cocomix"])
    """Students to train, by name: ``cocomix``, ``ntp`` (matched active parameters), ``ntp_flops`` (matched
    training FLOPs), ``kd``, ``pause``, ``kd_pause``, ``mix_only`` (lam = 0), ``concept_only`` (no mixing),
    ``add`` (added instead of interleaved), ``cocomix_pos`` / ``pause_pos`` (the interleaved slot also gets the
    token's position embedding)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One student per arm and seed (``train.seed`` of that run)."""
    labels: str = "cached"
    """``cached``: students read the label cache (the teacher is not run while they train); ``online``: the
    teacher and SAE label every batch during training (same labels, for cost comparisons)."""
    on_change: str = "refuse"
    """What a stage does when its output folder holds one made from other settings or inputs (its
    ``artifact.json`` fingerprint differs from what it would make now): ``refuse`` stops with one line naming the
    change, before anything is written; ``rebuild`` removes and rebuilds it, and with it every stage downstream
    whose inputs change (each logged). Outputs of the same fingerprint are always reused."""

    def validate(self) -> None:
        check(bool(self.arms), "pipeline.arms", "name at least one arm")
        unknown = [a for a in self.arms if a not in ARMS]
        check(not unknown, "pipeline.arms", f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        check(len(set(self.arms)) == len(self.arms), "pipeline.arms", "an arm is listed twice")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "pipeline.seeds",
              "give at least one seed, each once")
        check(self.labels in ("cached", "online"), "pipeline.labels", "must be 'cached' or 'online'")
        check(self.on_change in ("refuse", "rebuild"), "pipeline.on_change", "must be 'refuse' or 'rebuild'")


@dataclass(kw_only=True)
class InterpretSection:
    """``interpret:`` in a CoCoMix config: the prompt, the student, and the explain / steer / description settings."""

    prompt: str = ""
    """Text to explain or continue; empty = the first ``prompt_tokens`` tokens of the first validation window."""
    prompt_tokens: int = 32
    """Length of the default prompt (0 = the whole window)."""
    arm: str = "cocomix"
    """Student arm (``students/{arm}-s{seed}``); it needs a concept head (and a mixed concept for steering)."""
    seed: int = 0
    top_concepts: int = 5
    """Concepts shown per prompt token by ``explain``."""
    steer_concept: int = -1
    """Concept to steer; -1 = the concept the student predicts (arg-max) most often over the prompt."""
    steer_factor: float = 10.0
    """Multiplier of the concept's logit before the TopK (the paper uses [-10, 10])."""
    steer_force: bool = False
    """Always keep the concept, with value ``steer_factor * max(z)`` (steers a concept that is off; ours: the
    paper's steering, §3.2, only scales the logit)."""
    max_new_tokens: int = 40
    temperature: float = 0.8
    """Sampling temperature of both continuations (0 = greedy)."""
    top_k: int = 0
    top_p: float = 1.0
    sample_seed: int = 0
    """Seed of the sampler; the plain and the steered continuation use the same one."""
    top_tokens: int = 10
    """N of the concept descriptions: top-activating tokens kept per concept."""
    context_tokens: int = 6
    """Tokens either side of a top-activating token in its context snippet."""
    describe_windows: int = 0
    """Training windows scanned for the descriptions (0 = all)."""
    batch_size: int = 16
    """Windows per teacher pass while describing concepts."""
    progress: bool = True

    def validate(self) -> None:
        check(self.arm in ARMS, "interpret.arm", f"unknown arm {self.arm!r}; choose from {', '.join(ARMS)}")
        for name in ("top_concepts", "max_new_tokens", "top_tokens", "batch_size"):
            check(getattr(self, name) > 0, f"interpret.{name}", "must be > 0")
        for name in ("prompt_tokens", "context_tokens", "describe_windows", "top_k"):
            check(getattr(self, name) >= 0, f"interpret.{name}", "must be >= 0")
        check(self.steer_concept >= -1, "interpret.steer_concept", "must be a concept index, or -1 (automatic)")
        check(self.temperature >= 0, "interpret.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "interpret.top_p", "must be in (0, 1]")


@dataclass(kw_only=True)
class HarnessSection:
    """``harness:`` in a CoCoMix config: lm-evaluation-harness tasks on the students (``eval-harness`` verb,
    :mod:`conceptlm.cocomix.harness`). With ``tasks`` given, the pipeline also evaluates every student and the
    report gains one column per task (its ``metric``); empty (the default) changes nothing."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (local tasks under ``include_path``, or the harness's own when online)."""
    include_path: str = ""
    """Folder of task YAML files (``--include_path``); see :mod:`conceptlm.harness.tasks` for local tasks."""
    metric: str = "acc"
    """The metric shown in the report's columns (a task without it shows its first metric)."""
    limit: int | None = None
    """Examples per task (None = all)."""
    num_fewshot: int | None = None
    batch_size: int = 8
    """Sequences per forward pass when scoring."""
    seed: int = 0
    """The harness's seeds (few-shot sampling, and the sampler of tasks that sample)."""

    def validate(self) -> None:
        check(all(isinstance(t, str) and t for t in self.tasks), "harness.tasks", "must be a list of task names")
        check(len(set(self.tasks)) == len(self.tasks), "harness.tasks", "a task is listed twice")
        check(self.limit is None or self.limit > 0, "harness.limit", "must be > 0 (or null: every example)")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "harness.num_fewshot", "must be >= 0")
        check(self.batch_size > 0, "harness.batch_size", "must be > 0")
        check(not self.include_path or Path(self.include_path).exists(), "harness.include_path",
              f"{self.include_path!r} does not exist")


# ------------------------------------------------------------------------------------------------ run configs
@dataclass(kw_only=True)
class TinyTeacherConfig(RunConfig):
    """The run config of a tiny teacher (built by :func:`conceptlm.cocomix.teacher.train_tiny_teacher` from the
    corpus and teacher sections; its run is ``{run_dir}/teacher``)."""

    corpus: CorpusSection = field(default_factory=CorpusSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)


@dataclass(kw_only=True)
class SAETrainConfig(RunConfig):
    """The run config of the SAE stage (``{run_dir}/sae``: :func:`conceptlm.cocomix.sae_train.sae_run_config`)."""

    corpus: CorpusSection = field(default_factory=CorpusSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sae: SAESection = field(default_factory=SAESection)


@dataclass(kw_only=True)
class StudentTrainConfig(RunConfig):
    student: StudentSection = field(default_factory=StudentSection)
    cocomix: CocomixSection = field(default_factory=CocomixSection)

    def validate(self) -> None:
        super().validate()
        check(self.cocomix.lam == 0 or self.student.concept_head, "cocomix.lam",
              f"{self.cocomix.lam} trains a concept head: set student.concept_head=true or cocomix.lam=0")


@dataclass(kw_only=True)
class CocomixConfig(RunConfig):
    corpus: CorpusSection = field(default_factory=CorpusSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sae: SAESection = field(default_factory=SAESection)
    labels: LabelSection = field(default_factory=LabelSection)
    student: StudentSection = field(default_factory=StudentSection)
    cocomix: CocomixSection = field(default_factory=CocomixSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    interpret: InterpretSection = field(default_factory=InterpretSection)
    harness: HarnessSection = field(default_factory=HarnessSection)

    def validate(self) -> None:
        super().validate()
        check(self.student.n_concepts == self.sae.n_latents, "student.n_concepts",
              f"{self.student.n_concepts} must equal sae.n_latents={self.sae.n_latents} (labels are SAE latents)")
        check(self.cocomix.k_attr == self.labels.k_attr, "cocomix.k_attr",
              f"{self.cocomix.k_attr} must equal labels.k_attr={self.labels.k_attr}")
        check(self.student.max_len >= self.corpus.window, "student.max_len",
              f"{self.student.max_len} is shorter than corpus.window={self.corpus.window}")
        check(self.cocomix.lam == 0 or self.student.concept_head, "cocomix.lam",
              f"{self.cocomix.lam} trains a concept head: set student.concept_head=true or cocomix.lam=0")
