"""The likelihood-trained LCM (SONAR-LLM, arXiv 2508.05305): the Base-LCM's architecture and generation, scored by
the token cross-entropy of the next sentence through a **frozen** sentence decoder instead of MSE.

For every scored position ``t`` (:func:`~conceptlm.lcm.sequence.scored_positions`), the Base-LCM predicts
``x^_t = denormalize(y_{t-1})`` (raw embedding space, :class:`~conceptlm.lcm.variants.base.BaseLCM`); the loss part
``nll`` is the summed next-token cross-entropy of sentence ``t``'s target tokens (its tokens + EOS, as the decoder
was trained: ``decoder.target_ids``) given ``x^_t`` as the decoder's conditioning vector, and its count is the
number of those tokens, so the loop optimises the mean token cross-entropy over the global batch. The decoder is a
``prefix_lm`` decoder folder or the decoder half of a ``train-autoencoder`` folder (``lcm.likelihood_decoder``),
loaded on first use, kept frozen (no gradients, not a sub-module: it is neither optimised nor checkpointed);
gradients flow through it into the LCM only. The target texts are the prepared documents' sentences (the batch's
``sentences``); the recipe checks that the decoder was made for the data's encoder.

Generation and the teacher-forced metrics are the Base-LCM's (predict the vector, decode it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from conceptlm.core.errors import ConfigError
from conceptlm.core.unit import THROUGHPUT_KEY
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import LCMSection
from conceptlm.lcm.sequence import scored_positions
from conceptlm.lcm.variants.base import BaseLCM, BaseLCMUnit

__all__ = ["LikelihoodLCMUnit", "load_frozen_decoder"]


def load_frozen_decoder(path: str | Path, *, encoder: dict | None = None):
    """The decoder of ``path`` (a ``prefix_lm`` decoder folder, or an autoencoder folder / run), frozen, in eval
    mode; refused in one line when it is not a trainable-LM decoder or was made for another encoder than
    ``encoder`` (an encoder identity)."""
    from conceptlm.lcm.autoencoder import autoencoder_dir
    from conceptlm.lcm.decoders import load_decoder

    folder = autoencoder_dir(path)
    decoder = load_decoder(folder / "decoder" if folder is not None else path, encoder=encoder)
    if not hasattr(decoder, "token_loss"):
        raise ConfigError(f"{path}: a {decoder.identity().get('kind')!r} decoder has no token likelihood; "
                          "lcm.model=likelihood needs a prefix_lm decoder or an autoencoder",
                          field="lcm.likelihood_decoder")
    decoder.eval().requires_grad_(False)
    return decoder


class LikelihoodLCMUnit(BaseLCMUnit):
    """Base-LCM trained by the frozen decoder's token likelihood (module docstring): loss part ``nll``.

    Args:
        cfg: the architecture (``cfg.likelihood_decoder``: the decoder's folder).
        round_trip: as :class:`BaseLCMUnit` (for ``l2_r``).
        model: an existing :class:`BaseLCM` to wrap.
        decoder: the frozen decoder to use instead of loading ``cfg.likelihood_decoder`` (tests, benchmarks).
    """

    def __init__(self, cfg: LCMSection, *, round_trip: M.Vectors | None = None, model: BaseLCM | None = None,
                 decoder=None):
        super().__init__(cfg, round_trip=round_trip, model=model)
        self.loss_weights = {"nll": 1.0}
        object.__setattr__(self, "_decoder", decoder)  # not a sub-module: never optimised nor checkpointed

    @property
    def decoder(self):
        """The frozen decoder (loaded from ``cfg.likelihood_decoder`` on first use)."""
        if self._decoder is None:
            if not self.cfg.likelihood_decoder:
                raise ConfigError("lcm.model=likelihood needs lcm.likelihood_decoder", field="lcm.likelihood_decoder")
            object.__setattr__(self, "_decoder", load_frozen_decoder(self.cfg.likelihood_decoder))
        return self._decoder

    def _targets(self, batch: dict) -> dict:
        """Adds (once, in place) the target tokens of the scored sentences: ``nll_input_ids`` / ``nll_labels`` /
        ``nll_mask`` (N, L), N = scored positions in row-major order. Done when a loss is computed (``counts``),
        not in ``prepare``: metrics-only evaluation never loads the decoder."""
        if "nll_labels" in batch:
            return batch
        if "sentences" not in batch:
            raise ConfigError("lcm.model=likelihood trains on the documents' sentences: use a prepared folder "
                              "(lcm_data.source), not synthetic vectors", field="lcm_data.source")
        tm = scored_positions(batch, self.cfg.min_context)
        device = batch["vectors"].device
        dec = self.decoder
        if next(dec.parameters()).device != device:
            dec.to(device)
        texts = [batch["sentences"][b][t] for b, t in tm.nonzero().tolist()]
        targets = dec.target_ids(texts) if texts else []
        width = max((len(x) for x in targets), default=1)
        ids = torch.full((len(targets), width), dec.pad_id, dtype=torch.long)
        labels = torch.full((len(targets), width), -100, dtype=torch.long)
        mask = torch.zeros((len(targets), width), dtype=torch.long)
        for r, x in enumerate(targets):
            ids[r, :len(x)] = labels[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[r, :len(x)] = 1
        batch.update(nll_input_ids=ids.to(device), nll_labels=labels.to(device), nll_mask=mask.to(device))
        return batch

    def counts(self, batch: dict) -> dict:
        self._targets(batch)
        return {"nll": (batch["nll_labels"] != -100).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def forward(self, batch: dict) -> dict:
        self._targets(batch)
        _, y = self._predict(batch)
        tm = scored_positions(batch, self.cfg.min_context)
        pred = self.model.denormalize(y[tm].float())  # (N, D) raw-space predictions, row-major like the targets
        if pred.shape[0] == 0:
            return {"nll": y.sum() * 0.0}
        loss, _, _ = self.decoder.token_loss(pred, batch["nll_input_ids"], batch["nll_labels"], batch["nll_mask"])
        return {"nll": loss}
