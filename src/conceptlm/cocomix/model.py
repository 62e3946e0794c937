"""The CoCoMix student: a decoder-only LM on :mod:`conceptlm.core.modules` with a concept head, compression into a
continuous concept and mixing into the hidden states (CoCoMix paper §2.2, Eq. 2-4).

Shapes: ``B`` batch, ``T`` tokens, ``d`` width, ``V`` vocabulary, ``C`` concepts (SAE latents), ``K`` kept concept
logits (TopK), ``A`` concept labels per token (``K_attr``).

At the insert layer ``ins`` (the residual stream after ``ins`` blocks)::

    x = LN(h) - pre_bias             LN as in the TopK SAE: unbiased std, (h - mu) / (sigma + 1e-5)
    z = W_p x + b_p                  (.., C) concept logits, never stored for all tokens at once
    ĉ = (sum_k z_k W_c[:, i_k] + b_c + pre_bias) * sigma + mu      i = top-K(z), raw values (no ReLU)

and then, with ``mix``:

* ``interleave``: the remaining blocks see ``[h_1, ĉ_1, h_2, ĉ_2, ...]`` (2T slots, plain causal attention) and the
  logits for ``x_{t+1}`` are read from the slot of ``ĉ_t`` (the reference code's order and read-out);
* ``add``: ``h_t <- h_t + ĉ_t``;
* ``pause``: like ``interleave`` with ``ĉ_t`` replaced by one learned vector (the pause-token baseline);
  with ``slot_positions`` (gpt2 style, ``interleave`` or ``pause``) token t's position embedding is added to its
  second slot;
* ``none``: the hidden states are not changed (NTP, or the concept loss alone when the head is on).

Where this differs from the reference code (documented choices):

* the concept loss and the top-K run in token chunks inside one autograd function (:func:`concept_head`): the
  ``B x T x C`` logits are never materialised, and the loss gradients are formed in the same pass, so the head costs
  exactly the dense FLOPs (no recomputation);
* compression gathers the ``K`` active columns (``embedding_bag``) instead of a dense ``C x d`` matmul;
* RoPE (``style: llama``) in the mixed blocks: by default both slots of token ``t`` carry position ``t``
  (``interleave_positions: shared``; ``sequential`` numbers the 2T slots 0..2T-1). GPT-2 style has positions only at
  the input, like the reference;
* KV-cached decoding aligns the causal mask bottom-right (the reference code's SDPA path aligns it top-left: the two
  new queries of a cached step would see only the first two keys);
* labels come with a validity mask; masked rows (e.g. zero attribution at the last position) are excluded;
* dropout defaults to 0 (the reference silently trains with 0.1; set ``dropout`` to reproduce it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.cocomix.config import StudentSection
from conceptlm.core.modules import Decoder, DecoderConfig, KVCache

__all__ = [
    "StudentLM", "decoder_config", "StudentOutput", "ConceptOutput", "Steering", "ConceptHead",
    "concept_head", "sae_layer_norm", "compress_concepts", "SAE_LN_EPS",
]

SAE_LN_EPS = 1e-5
_CHUNK_ELEMENTS = 1 << 23  # concept logits held at once by default (32 MiB in fp32)


def decoder_config(s: StudentSection) -> DecoderConfig:
    """The :class:`DecoderConfig` of the blocks of the student ``s``."""
    common = dict(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, d_ff=s.ffn_dim,
                  dropout=s.dropout, attn_dropout=s.dropout, init_std=s.init_std)
    if s.style == "gpt2":
        return DecoderConfig(**common, norm="layer", norm_eps=1e-5, mlp="gelu_tanh", rope=False,
                             attention_bias=True, mlp_bias=True)
    return DecoderConfig(**common, norm="rms", norm_eps=1e-6, mlp="swiglu", rope=True)


@dataclass(frozen=True)
class Steering:
    """Amplify concept ``concept`` by ``factor`` in the concept logits before TopK (paper §3.2, Fig. 5).

    With ``force`` the concept is always kept, with value ``factor * max_c z_c`` (to steer a concept that is off).
    """

    concept: int
    factor: float
    force: bool = False


@dataclass
class ConceptOutput:
    """What the concept head returns for ``N = B*T`` tokens.

    Attributes:
        ce_sum: 0-d fp32, ``sum over valid rows of (1/A) sum_a CE(z, label_a)`` (0 without labels).
        rows: 0-d long, valid labelled rows. correct: 0-d long, valid rows whose arg-max concept is a label.
        indices / values: ``(B, T, K')`` kept concepts and their logits (``K' = K`` when compressing, else 1).
        continuous: ``(B, T, d)`` the continuous concept ``ĉ`` (``None`` unless compressing).
    """

    ce_sum: torch.Tensor
    rows: torch.Tensor
    correct: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    continuous: torch.Tensor | None = None


@dataclass
class StudentOutput:
    """``logits`` ``(B, T, V)`` at token positions (``logits[:, t]`` predicts token ``t+1``); ``concept`` when the
    head is on."""

    logits: torch.Tensor
    concept: ConceptOutput | None = None


# ------------------------------------------------------------------------------------------------ concept head
def sae_layer_norm(h: torch.Tensor, eps: float = SAE_LN_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TopK SAE's input normalisation: ``(x, mu, sigma)`` with ``x = (h - mu) / (sigma + eps)``, ``sigma`` the
    unbiased std over the last dim; ``mu``/``sigma`` are ``(..., 1)``."""
    mu = h.mean(-1, keepdim=True)
    centred = h - mu
    sigma = centred.std(-1, keepdim=True, unbiased=True)
    return centred / (sigma + eps), mu, sigma


def _steer(logits: torch.Tensor, steer: Steering) -> None:
    if steer.force:
        logits[:, steer.concept] = steer.factor * logits.max(dim=1).values
    else:
        logits[:, steer.concept] *= steer.factor


def _force_kept(logits: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, concept: int) -> None:
    """Put ``concept`` into the kept set of every row that lacks it (replacing the smallest kept logit)."""
    missing = ~(idx == concept).any(1)
    idx[missing, -1] = concept
    val[missing, -1] = logits[missing, concept]


class _ConceptHeadFn(torch.autograd.Function):
    """Chunked concept logits -> (CE sum, top-K values, top-K indices, correct flags); see :func:`concept_head`."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, mask, k, chunk, ce_grad, steer):
        n, _ = x.shape
        c = weight.shape[0]
        ctx.set_materialize_grads(False)
        ce_total = torch.zeros((), dtype=torch.float32, device=x.device)
        top_val = torch.empty(n, k, dtype=torch.float32, device=x.device)
        top_idx = torch.empty(n, k, dtype=torch.long, device=x.device)
        correct = torch.zeros(n, dtype=torch.bool, device=x.device)
        dx = torch.empty_like(x, dtype=torch.float32) if ce_grad else None
        dw = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device) if ce_grad else None
        db = torch.zeros(c, dtype=torch.float32, device=x.device) if ce_grad else None
        n_labels = labels.shape[1] if labels is not None else 0
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            xc = x[s:e]
            logits = F.linear(xc, weight, bias).float()                       # (n_c, C)
            if steer is not None:
                _steer(logits, steer)
            val, idx = logits.topk(k, dim=1)
            if steer is not None and steer.force:
                _force_kept(logits, idx, val, steer.concept)
            top_val[s:e], top_idx[s:e] = val, idx
            if labels is None:
                continue
            lab, m = labels[s:e], mask[s:e]
            lse = torch.logsumexp(logits, dim=1)
            gold = logits.gather(1, lab).mean(1)
            ce_total += torch.where(m, lse - gold, 0.0).sum()
            correct[s:e] = (idx[:, :1] == lab).any(1) & m
            if ce_grad:  # d CE_sum / d logits = mask * (softmax - (1/A) sum_a onehot(label_a)), formed in place
                p = logits.sub_(lse[:, None]).exp_()
                p.scatter_add_(1, lab, torch.full(lab.shape, -1.0 / n_labels, device=p.device))
                p.mul_(m[:, None].to(p.dtype))
                dx[s:e] = p @ weight.float()
                dw.addmm_(p.t(), xc.float())
                db += p.sum(0)
        ctx.mark_non_differentiable(top_idx, correct, *([] if ce_grad else [ce_total]))
        ctx.save_for_backward(x, weight, top_idx, *([dx, dw, db] if ce_grad else []))
        ctx.ce_grad = ce_grad
        ctx.bias_dtype = bias.dtype
        return ce_total, top_val, top_idx, correct

    @staticmethod
    def backward(ctx, g_ce, g_val, _g_idx, _g_correct):
        x, weight, idx, *ce = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.ce_grad and g_ce is not None:
            dx, dw, db = ce
            gx, gw, gb = dx * g_ce, dw * g_ce, db * g_ce
        if g_val is not None:  # the kept logits feed the compression: sparse rows of the logit gradient
            gv = g_val.float()
            sx = F.embedding_bag(idx, weight.float(), per_sample_weights=gv, mode="sum")
            flat = idx.reshape(-1)
            sw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device).index_add_(
                0, flat, (gv.unsqueeze(-1) * x.float().unsqueeze(1)).reshape(-1, x.shape[1]))
            sb = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device).index_add_(0, flat, gv.reshape(-1))
            gx = sx if gx is None else gx + sx
            gw = sw if gw is None else gw + sw
            gb = sb if gb is None else gb + sb
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(ctx.bias_dtype) if gb is not None else None, None, None, None, None, None, None)


def concept_head(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    k: int,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk: int = 0,
    steer: Steering | None = None,
    ce_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concept logits ``z = x W^T + b`` in token chunks: the concept CE and the top-K, without ever holding all
    ``N x C`` logits (CoCoMix paper §2.2, Eq. 2).

    ``CE_sum = sum_{n: mask_n} (1/A) sum_a [logsumexp(z_n) - z_n[labels_{n,a}]]`` -- the full C-way softmax of the
    un-masked logits, i.e. a soft-target CE with mass 1/A on each label. Gradients reach ``x``, ``weight`` and
    ``bias`` through the CE (when ``ce_grad``) and through the returned top-K values.

    Args:
        x: ``(N, d)`` normalised hidden states. weight: ``(C, d)``. bias: ``(C,)``.
        k: logits kept per row (arg-max first).
        labels: ``(N, A)`` long concept indices in ``[0, C)``, or ``None`` (no CE).
        mask: ``(N,)`` bool, True = the row's labels count (default all).
        chunk: rows per chunk (0 = ``2^23 // C``).
        steer: amplify one concept before the top-K (inference only).
        ce_grad: form the CE gradient (False when the CE is only reported).

    Returns:
        ``(ce_sum 0-d fp32, values (N, k) fp32, indices (N, k) long, correct (N,) bool)``; ``correct`` marks valid
        rows whose arg-max is one of their labels.
    """
    n = x.shape[0]
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if steer is not None and need_grad:
        raise ValueError("concept steering is for inference: call under torch.no_grad()")
    if labels is not None:
        labels = labels.reshape(n, -1).long()
        mask = torch.ones(n, dtype=torch.bool, device=x.device) if mask is None else mask.reshape(n).bool()
    chunk = chunk or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    ce_grad = bool(ce_grad and need_grad and labels is not None)
    return _ConceptHeadFn.apply(x, weight, bias, labels, mask, k, chunk, ce_grad, steer)


def compress_concepts(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_k values[n, k] * weight[indices[n, k]]``: ``(N, K)``, ``(N, K)`` long, ``(C, d)`` -> ``(N, d)``.

    The compress layer applied to the TopK-sparse logits (paper Eq. 3) touching only the K active columns.
    """
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


class ConceptHead(nn.Module):
    """Predictor ``d -> C``, shared ``pre_bias``, and (when compressing) the compress weight ``(C, d)`` + bias.

    Initialised like the reference: normal(0, ``init_std``) weights, zero biases and ``pre_bias``.
    """

    def __init__(self, d_model: int, n_concepts: int, k: int, *, compress: bool, chunk: int = 0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.k, self.chunk, self.compress_enabled = k, chunk, compress
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.predictor = nn.Linear(d_model, n_concepts)
        nn.init.normal_(self.predictor.weight, std=init_std)
        nn.init.zeros_(self.predictor.bias)
        if compress:
            self.compress = nn.Embedding(n_concepts, d_model)  # row c = column c of the paper's W (d x C)
            self.compress_bias = nn.Parameter(torch.zeros(d_model))
            nn.init.normal_(self.compress.weight, std=init_std)

    def forward(self, h: torch.Tensor, *, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                steer: Steering | None = None, ce_grad: bool = True) -> ConceptOutput:
        """``h`` ``(B, T, d)`` residual stream at the insert layer; ``labels`` ``(B, T, A)``, ``mask`` ``(B, T)``."""
        b, t, d = h.shape
        x, mu, sigma = sae_layer_norm(h)
        xin = (x - self.pre_bias).reshape(b * t, d)
        k = self.k if self.compress_enabled else 1
        if labels is not None and mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=h.device)
        ce, val, idx, correct = concept_head(
            xin, self.predictor.weight, self.predictor.bias, k=k, labels=labels, mask=mask, chunk=self.chunk,
            steer=steer, ce_grad=ce_grad)
        rows = mask.sum() if labels is not None else torch.zeros((), dtype=torch.long, device=h.device)
        cont = None
        if self.compress_enabled:
            comp = compress_concepts(val, idx, self.compress.weight).view(b, t, d)
            cont = (comp + self.compress_bias + self.pre_bias) * sigma + mu
        return ConceptOutput(ce_sum=ce, rows=rows, correct=correct.sum(), indices=idx.view(b, t, -1),
                             values=val.view(b, t, -1), continuous=cont)


# ------------------------------------------------------------------------------------------------ the model
class StudentLM(nn.Module):
    """Decoder-only LM with the CoCoMix concept path (see the module docstring).

    Submodules: ``embed`` (``V x d``), ``pos_embed`` (gpt2 style), ``decoder`` (:class:`Decoder`: ``layers`` and the
    final ``norm``), ``head`` (:class:`ConceptHead`, when ``concept_head``), ``pause`` (``mix: pause``) and
    ``lm_head`` (when embeddings are untied).
    """

    def __init__(self, cfg: StudentSection) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.pos_embed: nn.Embedding | None = None
        if cfg.style == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_len, d)
            nn.init.normal_(self.pos_embed.weight, std=cfg.init_std)
        self.decoder = Decoder(decoder_config(cfg))
        if cfg.style == "gpt2":  # GPT-2: residual output projections scaled by 1/sqrt(2 n_layers)
            for layer in self.decoder.layers:
                for proj in (layer.attn.o_proj, layer.mlp.fc2):
                    nn.init.normal_(proj.weight, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.head = (ConceptHead(d, cfg.n_concepts, cfg.concept_k, compress=cfg.compresses, chunk=cfg.concept_chunk,
                                 init_std=cfg.init_std) if cfg.concept_head else None)
        self.pause = nn.Parameter(torch.randn(d) * cfg.init_std) if cfg.mix == "pause" else None
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    # ------------------------------------------------------------------------------------------- helpers
    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding."""
        return KVCache()

    def past_tokens(self, cache: KVCache | None) -> int:
        """Tokens already in ``cache``."""
        if cache is None or not cache.keys:
            return 0
        n = cache.length(0)
        return n // 2 if self.config.doubled and self.config.insert_layer == 0 else n

    def _upper_positions(self, pos: torch.Tensor) -> torch.Tensor:
        if self.config.interleave_positions == "shared":
            return pos.repeat_interleave(2, dim=1)
        return (2 * pos.unsqueeze(-1) + torch.arange(2, device=pos.device)).flatten(1)

    def _embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(pos)
        return F.dropout(h, self.config.dropout, self.training) if self.config.dropout > 0 else h

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(..., d)`` -> logits ``(..., V)``."""
        return F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        concept_labels: torch.Tensor | None = None,
        concept_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        steer: Steering | None = None,
        concept_ce_grad: bool = True,
    ) -> StudentOutput:
        """``input_ids`` ``(B, T)`` -> :class:`StudentOutput` (logits ``(B, T, V)``).

        Args:
            concept_labels: ``(B, T, A)`` long concept indices for the concept CE (optional).
            concept_mask: ``(B, T)`` bool, True = that token's labels count (default all).
            cache: :class:`KVCache` extended in place (tokens continue after the cached ones).
            steer: concept steering (:class:`Steering`; inference only).
            concept_ce_grad: form the concept CE gradient (False when the CE is only reported).
        """
        cfg = self.config
        b, t = input_ids.shape
        past = self.past_tokens(cache)
        if past + t > cfg.max_len:
            raise ValueError(f"sequence of {past + t} tokens exceeds student.max_len={cfg.max_len}")
        pos = torch.arange(past, past + t, device=input_ids.device).unsqueeze(0).expand(b, t)
        h = self._embed(input_ids, pos)
        split = cfg.insert_layer if (self.head is not None or cfg.doubled) else cfg.n_layers
        h = self.decoder(h, positions=pos, cache=cache, layers=slice(0, split), final_norm=False)
        concept = None
        if self.head is not None:
            if steer is not None and not cfg.compresses:
                raise ValueError(f"steering needs a mixed concept (student.mix is {cfg.mix!r})")
            concept = self.head(h, labels=concept_labels, mask=concept_mask, steer=steer, ce_grad=concept_ce_grad)
        if cfg.mix == "add":
            h = h + concept.continuous
        if cfg.doubled:
            extra = concept.continuous if cfg.mix == "interleave" else self.pause.to(h.dtype).expand(b, t, -1)
            if cfg.slot_positions:
                extra = extra + self.pos_embed(pos).to(h.dtype)
            h = torch.stack((h, extra), dim=2).view(b, 2 * t, -1)
            h = self.decoder(h, positions=self._upper_positions(pos), cache=cache, layers=slice(split, None),
                             final_norm=False)
            h = h.view(b, t, 2, -1)[:, :, 1]  # the slot after token t predicts token t+1
        else:
            h = self.decoder(h, positions=pos, cache=cache, layers=slice(split, None), final_norm=False)
        return StudentOutput(logits=self.unembed(self.decoder.norm(h)), concept=concept)
