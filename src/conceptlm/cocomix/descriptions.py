"""What each SAE latent means, and how strongly the teacher's SAE reads a concept (paper §3.2, Fig. 5).

:func:`describe_concepts`: over the corpus's training windows, the teacher's residual stream after block
``teacher.layer`` is encoded by the SAE; for every latent the ``top_tokens`` tokens with the largest activation are
kept (:class:`StreamingTopN`, memory ``C x N`` plus one batch), each with a short context snippet, together with
how often the latent fires; the result is ``concepts.json`` next to the SAE, keyed by the SAE weights' sha256, the
corpus and the settings. :func:`concept_activation` and :func:`token_frequency` measure a steered continuation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.config import InterpretSection
from conceptlm.cocomix.sae import TopKSAE
from conceptlm.core.artifact import file_sha256
from conceptlm.core.io import atomic_write_text
from conceptlm.core.progress import progress_bar

__all__ = ["StreamingTopN", "ConceptDescriptions", "describe_concepts", "describe_tokens", "clean_text",
           "interpret_section", "sae_activations", "concept_activation", "token_frequency", "CONCEPTS_FILE",
           "SHOWN_TOKENS"]

CONCEPTS_FILE = "concepts.json"
"""Concept descriptions, next to the SAE's ``sae.safetensors``."""
SHOWN_TOKENS = 3
"""Description tokens shown per concept in the printed tables."""
_FORMAT = "conceptlm-sae-concepts"
_VERSION = 1


def interpret_section(cfg: Any) -> InterpretSection:
    """The ``interpret`` section of ``cfg`` (its defaults when the config has none), validated."""
    section = getattr(cfg, "interpret", None) or InterpretSection()
    section.validate()
    return section


# ------------------------------------------------------------------------------------------------ streaming top-N
class StreamingTopN:
    """The ``n`` largest positive activations of every latent over a stream of sparse SAE codes.

    Order: larger activation first; equal activations by smaller position. The result equals sorting all
    ``(activation, position)`` pairs of a latent at once, whatever the batch split. Memory: ``(C, n)`` tables plus
    one batch.
    """

    def __init__(self, n_latents: int, n: int, device: torch.device | str = "cpu"):
        self.n_latents, self.n = n_latents, n
        self.values = torch.full((n_latents, n), float("-inf"), device=device)
        self.positions = torch.full((n_latents, n), -1, dtype=torch.long, device=device)
        self.fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.tokens = 0

    def update(self, values: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor) -> None:
        """Fold in one batch: ``values`` / ``indices`` ``(M, k)`` (the SAE's kept codes of ``M`` tokens) and
        ``positions`` ``(M,)`` long (global token positions, each seen once)."""
        dev = self.values.device
        values, indices, positions = values.to(dev).float(), indices.to(dev), positions.to(dev)
        active = values > 0
        lat = indices[active]
        val = values[active]
        pos = positions[:, None].expand_as(indices)[active]
        self.fired += torch.bincount(lat, minlength=self.n_latents)
        self.tokens += int(positions.numel())
        kept = self.positions >= 0
        rows = torch.arange(self.n_latents, device=dev)[:, None].expand_as(self.positions)
        lat = torch.cat((rows[kept], lat))
        val = torch.cat((self.values[kept], val))
        pos = torch.cat((self.positions[kept], pos))
        order = torch.argsort(pos, stable=True)  # lexicographic (latent, -value, position) by stable sorts
        order = order[torch.argsort(-val[order], stable=True)]
        order = order[torch.argsort(lat[order], stable=True)]
        lat, val, pos = lat[order], val[order], pos[order]
        rank = torch.arange(lat.numel(), device=dev) - torch.searchsorted(lat, lat)
        keep = rank < self.n
        self.values.fill_(float("-inf"))
        self.positions.fill_(-1)
        self.values[lat[keep], rank[keep]] = val[keep]
        self.positions[lat[keep], rank[keep]] = pos[keep]

    def frequency(self) -> torch.Tensor:
        """``(C,)`` fraction of the tokens seen on which each latent fired (positive activation)."""
        return self.fired.double() / max(self.tokens, 1)


def sae_activations(teacher: nn.Module, sae: TopKSAE, layer: int, input_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE code of the teacher's residual stream after block ``layer``: ``(B, T) -> (values (B, T, k) >= 0,
    indices (B, T, k))``."""
    from conceptlm.cocomix.teacher import hidden_at_layer

    with torch.no_grad():
        h = hidden_at_layer(teacher, input_ids, layer)
        x, _, _ = sae.normalize(h.to(sae.W_enc.dtype))
        return sae.encode(x)


def concept_activation(teacher: nn.Module, sae: TopKSAE, layer: int, input_ids: torch.Tensor, concept: int,
                       start: int = 0) -> dict[str, float]:
    """The teacher's SAE activation of ``concept`` on tokens ``start..`` of ``input_ids`` ``(1, L)`` (the whole
    sequence is the context): ``{"mean": mean activation, "fired": fraction of those tokens where it is > 0}``."""
    values, indices = sae_activations(teacher, sae, layer, input_ids)
    act = torch.where(indices == concept, values, torch.zeros_like(values)).sum(-1)[0, start:]
    if act.numel() == 0:
        return {"mean": 0.0, "fired": 0.0}
    return {"mean": float(act.mean()), "fired": float((act > 0).float().mean())}


def token_frequency(token_ids: list[int], vocabulary: set[int]) -> float:
    """Fraction of ``token_ids`` that lie in ``vocabulary`` (0 for an empty list)."""
    return sum(t in vocabulary for t in token_ids) / len(token_ids) if token_ids else 0.0


# ------------------------------------------------------------------------------------------------ descriptions
def clean_text(text: str) -> str:
    """``text`` on one line (newlines shown as ``\\n``)."""
    return text.replace("\n", "\\n")


def _snippets(tokenizer, windows: torch.Tensor, positions: list[int], ctx: int) -> list[tuple[str, str]]:
    """``(token text, context snippet)`` per global position; the token is marked ``«...»`` in its snippet."""
    t = windows.shape[1]
    flat = windows.reshape(-1).tolist()
    parts: list[list[int]] = []
    for p in positions:
        w, i = divmod(p, t)
        base = w * t
        parts += [flat[base + max(0, i - ctx): base + i], [flat[p]], flat[base + i + 1: base + min(t, i + 1 + ctx)]]
    texts = [clean_text(s) for s in tokenizer.batch_decode(parts)] if parts else []
    return [(texts[3 * j + 1], f"{texts[3 * j]}«{texts[3 * j + 1]}»{texts[3 * j + 2]}") for j in range(len(positions))]


def describe_tokens(tokens: list[str]) -> str:
    return ", ".join(repr(t) for t in tokens) if tokens else "(never fires)"


def _build_descriptions(top: StreamingTopN, windows: torch.Tensor, tokenizer, ctx: int) -> list[dict[str, Any]]:
    t = windows.shape[1]
    positions, values = top.positions.cpu().tolist(), top.values.cpu().tolist()
    flat_ids = windows.reshape(-1).tolist()
    snippets = iter(_snippets(tokenizer, windows, [p for row in positions for p in row if p >= 0], ctx))
    fired, freq = top.fired.cpu().tolist(), top.frequency().cpu().tolist()
    out = []
    for c in range(top.n_latents):
        entries, tokens, ids = [], [], []
        for pos, value in zip(positions[c], values[c], strict=True):
            if pos < 0:
                break
            text, snippet = next(snippets)
            entries.append({"token": text, "token_id": flat_ids[pos], "activation": value, "window": pos // t,
                            "position": pos % t, "context": snippet})
            if flat_ids[pos] not in ids:
                ids.append(flat_ids[pos])
                tokens.append(text)
        out.append({"concept": c, "frequency": freq[c], "fired": fired[c], "description": describe_tokens(tokens),
                    "tokens": tokens, "token_ids": ids, "top": entries})
    return out


@dataclass
class ConceptDescriptions:
    """The contents of ``concepts.json``: ``data["concepts"][c]`` describes latent ``c``; ``computed`` tells
    whether this call computed it (False: read back)."""

    path: Path
    data: dict[str, Any]
    computed: bool

    @property
    def n_concepts(self) -> int:
        return len(self.data["concepts"])

    def __getitem__(self, concept: int) -> dict[str, Any]:
        return self.data["concepts"][concept]

    def short(self, concept: int, n: int = SHOWN_TOKENS) -> str:
        """The first ``n`` distinct top-activating tokens of ``concept``, quoted."""
        return describe_tokens(self[concept]["tokens"][:n])


def _description_key(cfg: Any, section: InterpretSection, sae_dir: Path, n_windows: int) -> dict[str, Any]:
    from conceptlm.cocomix.corpus import corpus_identity
    from conceptlm.cocomix.sae_formats import sae_weights_file

    return {"sae_sha256": file_sha256(sae_weights_file(sae_dir)), "layer": cfg.teacher.layer,
            "corpus": corpus_identity(cfg.corpus), "split": "train", "windows": n_windows,
            "top_tokens": section.top_tokens, "context_tokens": section.context_tokens}


def _read_descriptions(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # a damaged file is recomputed
    ok = isinstance(data, dict) and data.get("format") == _FORMAT and data.get("version") == _VERSION
    return data if ok and data.get("key") == key else None


def describe_concepts(cfg: Any, *, teacher: nn.Module, tokenizer, sae: TopKSAE, sae_dir: str | Path,
                      windows: torch.Tensor, section: InterpretSection | None = None,
                      output: str | Path | None = None) -> ConceptDescriptions:
    """Concept descriptions of ``sae`` over ``windows`` ``(N, T)`` (the training windows), from ``output``
    (default ``{sae_dir}/concepts.json``) when that file has the same key, else computed and written atomically.

    The key: the sha256 of the SAE's weights file (``{sae_dir}/sae.safetensors`` for ours), ``teacher.layer``, the
    corpus identity, the number of windows scanned, ``top_tokens`` and ``context_tokens``. A foreign SAE given as a
    file (OpenAI ``.pt``) keeps its descriptions next to it (``{stem}.concepts.json``).
    """
    section = section or interpret_section(cfg)
    sae_dir = Path(sae_dir)
    default = sae_dir / CONCEPTS_FILE if sae_dir.is_dir() else sae_dir.with_name(f"{sae_dir.stem}.{CONCEPTS_FILE}")
    path = Path(output) if output is not None else default
    if section.describe_windows:
        windows = windows[: section.describe_windows]
    key = _description_key(cfg, section, sae_dir, windows.shape[0])
    data = _read_descriptions(path, key)
    if data is not None:
        return ConceptDescriptions(path, data, computed=False)
    device = sae.W_enc.device
    top = StreamingTopN(sae.n_latents, section.top_tokens, device=device)
    t = windows.shape[1]
    with progress_bar(total=windows.shape[0], unit="win", desc="concept descriptions", enabled=section.progress) as bar:
        for s in range(0, windows.shape[0], section.batch_size):
            batch = windows[s: s + section.batch_size].to(device)
            values, indices = sae_activations(teacher, sae, cfg.teacher.layer, batch)
            pos = torch.arange(s * t, s * t + batch.numel(), device=device)
            top.update(values.reshape(-1, sae.k), indices.reshape(-1, sae.k), pos)
            bar.update(batch.shape[0])
    data = {"format": _FORMAT, "version": _VERSION, "key": key, "tokens": top.tokens,
            "concepts": _build_descriptions(top, windows.cpu(), tokenizer, section.context_tokens)}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False) + "\n")
    return ConceptDescriptions(path, data, computed=True)
