"""Base-LCM: a causal transformer that regresses the next sentence embedding (LCM paper §2.3.1, Fig. 4): the
model, its training unit and its next-sentence predictor.

Shapes: ``B`` documents, ``T`` sentences, ``D`` = ``dim`` (sentence-embedding width, e.g. 384 for MiniLM, 1024 for
SONAR), ``d`` = ``d_model``.

The normalizer lives **inside** the model, as frozen buffers ``center``/``scale`` (and optional clip bounds) that are
checkpointed with the weights, so a checkpoint alone can generate::

    z  = normalize(x)   = clamp((x - center) / scale, clip_min, clip_max)        (B, T, D)
    h0 = PreNet(z)      = z W_pre^T + b_pre  (x sqrt(d) if scale_embeddings) (+ learned positions)
    hL = Decoder(h0)    causal pre-norm blocks (RMSNorm, MHA with biases + RoPE, SwiGLU with biases), final RMSNorm
    y  = PostNet(hL)    = hL W_post^T + b_post                                   (normalized space)
    x^ = denormalize(y) = clamp(y, clip_min, clip_max) * scale + center          (raw space)

``y[:, t]`` predicts ``z[:, t + 1]``. Training compares ``y`` with ``z`` (normalized space, as the reference
criterion does); generation and the raw-space metrics use ``x^``. ``normalize=False`` (identity statistics) turns
the normalizer off. The statistics are set once from the training data with :meth:`BaseLCM.set_normalizer` (the
recipe also writes them as a checkpoint artefact for the decoders and evaluation).

Objective (LCM paper §2.3.1, Eqs. 1-6, with the reference recipes' ``compute_rmse: false``, ``reduction: sum``):
the part ``mse`` is ``sum over targets of ||y_{t-1} - z_t||^2`` in normalized space, a target being every real
position ``t >= max(1, min_context)``; its count is the number of targets, so the trainer optimises the mean squared
error per predicted sentence over the global batch (the reference's gradient normalisation).

Generation: :class:`BaseLCMPredictor` (``BaseLCM.predictor(options)``) plugs the model into
:func:`~conceptlm.lcm.generate.generate`.
"""

from __future__ import annotations

import torch
from torch import nn

from conceptlm.core.modules import KVCache
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import GenerationOptions, LCMSection
from conceptlm.lcm.generate import SequenceState, row_generator
from conceptlm.lcm.sequence import CausalSentenceModel, TeacherForcedEval, scored_positions

__all__ = ["BaseLCM", "BaseLCMPredictor", "BaseLCMUnit"]


class BaseLCM(CausalSentenceModel):
    """PreNet -> causal :class:`~conceptlm.core.modules.Decoder` -> PostNet, normalizer inside (module docstring).

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__(cfg)
        self._build_causal_tower("decoder")
        self.postnet = nn.Linear(cfg.d_model, cfg.dim)

    # ----------------------------------------------------------------------------------------- forward
    def forward_normalized(self, z: torch.Tensor, *, positions: torch.Tensor | None = None,
                           key_padding_mask: torch.Tensor | None = None,
                           cache: KVCache | None = None) -> torch.Tensor:
        """Normalized inputs ``z`` ``(B, T, D)`` -> normalized next-sentence predictions ``(B, T, D)``.

        Args:
            positions: long ``(B, T)`` sentence positions (default ``past + arange(T)``, ``past`` = cache length).
            key_padding_mask: bool ``(B, S)`` over all keys (cached + new), True = a real sentence. Not needed for
                right-padded batches (causal attention never lets a real sentence see a later pad).
            cache: :class:`KVCache` updated in place (incremental generation: one position per new sentence).
        """
        h = self._run_causal_tower(z, positions=positions, key_padding_mask=key_padding_mask, cache=cache)
        return self.postnet(h)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Raw inputs ``x`` ``(B, T, D)`` -> raw next-sentence predictions ``(B, T, D)`` (keywords as
        :meth:`forward_normalized`)."""
        return self.denormalize(self.forward_normalized(self.normalize(x), **kwargs))

    def predictor(self, options: GenerationOptions) -> BaseLCMPredictor:
        """The model side of :func:`~conceptlm.lcm.generate.generate` (:class:`BaseLCMPredictor`)."""
        return BaseLCMPredictor(self, options)


class BaseLCMPredictor:
    """Base-LCM: the regression output is the next sentence (plus optional ``temperature`` noise, the reference's
    ``sample_latent_variable``); with the cache each new sentence costs one position per layer."""

    def __init__(self, model: BaseLCM, options: GenerationOptions) -> None:
        self.model, self.o = model, options
        self.cache = KVCache() if options.use_cache else None
        self.seq: SequenceState | None = None

    def _sample(self, y: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
        if self.o.temperature > 0:
            noise = torch.stack([torch.randn(y.shape[-1], generator=row_generator("lcm-generate", self.o.seed, r, step))
                                 for r in rows]).to(y)
            y = y + self.o.temperature * noise
        return y

    def start(self, z, keep, positions, rows):
        self.seq = SequenceState(z, keep, positions)
        y = self.model.forward_normalized(z, positions=positions, key_padding_mask=keep, cache=self.cache)
        return self._sample(y[:, -1], rows, 0)

    def step(self, z_new, rows, step):
        s = self.seq
        s.append(z_new)
        if self.cache is None:  # the whole sequence every step
            y = self.model.forward_normalized(s.z, positions=s.positions, key_padding_mask=s.keep)
        else:  # one position per document
            y = self.model.forward_normalized(z_new.unsqueeze(1), positions=s.positions[:, -1:],
                                              key_padding_mask=s.keep, cache=self.cache)
        return self._sample(y[:, -1], rows, step)

    def select(self, index):
        self.seq.select(index)
        if self.cache is not None:
            self.cache.reorder(index)


class BaseLCMUnit(TeacherForcedEval, TrainUnit):
    """Base-LCM (MSE next-sentence regression) as a :class:`~conceptlm.core.unit.TrainUnit`.

    Loss part ``mse`` (module docstring). Evaluation metrics (:class:`~conceptlm.lcm.sequence.TeacherForcedEval`:
    ``eval_metrics`` predicts the batch itself), teacher-forced, in raw embedding space: ``l2`` (ℓ2 of the
    prediction), ``l2_prev`` (ℓ2 of the "repeat the previous sentence" baseline), ``cos`` (cosine to the target),
    ``ca`` (contrastive accuracy against the other documents of the eval batch, as the reference code), ``par``
    (paraphrasing score) and, given a ``round_trip``, ``l2_r`` (round-trip ℓ2).

    Args:
        cfg: the architecture.
        round_trip: optional ``(N, D) -> (N, D)`` = ``encode(decode(v))`` (a frozen decoder and encoder, not part
            of the unit's weights), for ``l2_r``.
        model: an existing :class:`BaseLCM` to wrap (e.g. loaded from a checkpoint); default a fresh one.
    """

    def __init__(self, cfg: LCMSection, *, round_trip: M.Vectors | None = None, model: BaseLCM | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss_weights = {"mse": 1.0}
        self.model = model if model is not None else BaseLCM(cfg)
        self.round_trip = round_trip

    def counts(self, batch: dict) -> dict:
        return {"mse": scored_positions(batch, self.cfg.min_context).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def _predict(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized inputs ``z`` and predictions ``y`` aligned with their targets: ``y[:, t]`` predicts
        ``z[:, t]`` (``y[:, 0]`` is a zero placeholder)."""
        z = self.model.normalize(batch["vectors"])
        y = self.model.forward_normalized(z)  # right padding: no key-padding mask needed
        return z, torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)

    def forward(self, batch: dict) -> dict:
        z, y = self._predict(batch)
        tm = scored_positions(batch, self.cfg.min_context)
        se = ((y.float() - z.float()) ** 2).sum(-1)
        return {"mse": se[tm].sum()}

    @torch.no_grad()
    def teacher_forced(self, batch: dict) -> torch.Tensor:
        """Normalized predictions ``(B, T, D)``, ``[:, t]`` predicting sentence ``t`` from the true sentences before
        it (``[:, 0]`` is a placeholder; it is never scored)."""
        return self._predict(batch)[1]
