"""SONAR's pretrained text decoder as a :class:`~conceptlm.lcm.decoders.SentenceDecoder` (``decoder.kind: sonar``).

SONAR's encoder and decoder were trained together so that decoding inverts encoding (the LCM paper's concept space,
§2.1); this is the decoder that turns an LCM trained on ``encoder.name: sonar`` vectors into the paper's text output.
It comes from the optional ``sonar-space`` package (which needs a ``fairseq2`` build matching the installed torch;
see the README), is loaded from its model card (``decoder.sonar_decoder``, default ``text_sonar_basic_decoder``), and
decodes with beam search (``decoder.num_beams``; at most ``decoder.max_new_tokens`` tokens) into
``decoder.sonar_lang``.

It only reads vectors of SONAR's text encoder, un-normalised: any other encoder identity is refused in one line, as
for every decoder. Nothing is trained or saved here, so there is no decoder folder; its identity is the card name,
the language and a fingerprint of its weights. Decoding goes through the pipeline in batches of
``decoder.batch_size`` and keeps the last decodes in a bounded cache (evaluation decodes the same vectors again).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property

import torch

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DecoderSection
from conceptlm.lcm.decoders import SentenceDecoder

__all__ = ["SonarDecoder", "SONAR_PACKAGE_HINT"]

SONAR_PACKAGE_HINT = ("decoder.kind=sonar needs the sonar-space package (pip install sonar-space, with the fairseq2 "
                      "build matching your torch); offline, train a decoder with 'conceptlm lcm train-decoder'")
_CACHE_SIZE = 4096


def _check_encoder(identity: dict) -> None:
    if identity.get("backend") != "sonar":
        raise ConfigError(f"the SONAR decoder reads SONAR text-encoder vectors, but the encoder is "
                          f"{identity.get('name')!r}: set encoder.name=sonar (and prepare the documents with it)",
                          field="decoder.kind")
    if identity.get("normalize"):
        raise ConfigError("the SONAR decoder reads un-normalised SONAR vectors: set encoder.normalize=false",
                          field="encoder.normalize")


class SonarDecoder(SentenceDecoder):
    """SONAR's text decoder (``EmbeddingToTextModelPipeline``) for the vectors of ``encoder``.

    Args:
        section: the ``decoder`` section (``sonar_decoder``, ``sonar_lang``, ``num_beams``, ``max_new_tokens``,
            ``batch_size``).
        encoder_identity: the ``identity()`` of the encoder whose vectors will be decoded (must be SONAR's).
        device: where the decoder runs (default: CUDA when available).
    """

    kind = "sonar"

    def __init__(self, section: DecoderSection, encoder_identity: dict, *, device: str | torch.device | None = None):
        _check_encoder(encoder_identity)
        try:
            from sonar.inference_pipelines.text import EmbeddingToTextModelPipeline
        except ImportError:
            raise ConfigError(SONAR_PACKAGE_HINT, field="decoder.kind") from None
        self.section = section
        self._encoder_identity = dict(encoder_identity)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.pipeline = EmbeddingToTextModelPipeline(decoder=section.sonar_decoder,
                                                         tokenizer=section.sonar_decoder, device=self.device)
        except Exception as e:  # noqa: BLE001 - download/asset failures become one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"cannot load SONAR decoder {section.sonar_decoder!r}: {reason}",
                              field="decoder.sonar_decoder") from None
        self._cache: OrderedDict[bytes, str] = OrderedDict()

    @property
    def encoder_identity(self) -> dict:
        return self._encoder_identity

    @cached_property
    def _fingerprint(self) -> str:
        from conceptlm.lcm.data.encoders import weights_fingerprint

        return weights_fingerprint(self.pipeline.model)

    def identity(self) -> dict:
        return {"kind": self.kind, "card": self.section.sonar_decoder, "lang": self.section.sonar_lang,
                "num_beams": self.section.num_beams, "max_new_tokens": self.section.max_new_tokens,
                "fingerprint": self._fingerprint, "encoder": self._encoder_identity}

    def decode(self, vectors: torch.Tensor) -> list[str]:
        vectors = torch.as_tensor(vectors, dtype=torch.float32).detach().cpu()
        keys = [v.numpy().tobytes() for v in vectors]
        fresh: dict[bytes, str] = {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        if todo:
            fresh = dict(zip((keys[i] for i in todo), self._predict(vectors[todo])))
        out = []
        for k in keys:
            if k in fresh:
                out.append(fresh[k])
            else:
                self._cache.move_to_end(k)
                out.append(self._cache[k])
        for k, text in fresh.items():
            self._cache[k] = text
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return out

    def _predict(self, vectors: torch.Tensor) -> Sequence[str]:
        c = self.section
        return self.pipeline.predict(vectors.to(self.device), target_lang=c.sonar_lang, batch_size=c.batch_size,
                                     beam_size=c.num_beams, max_seq_len=c.max_new_tokens)
