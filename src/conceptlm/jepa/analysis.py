"""Embedding-space analysis of LLM-JEPA (paper §5, Fig. 3 and Table 14).

For a split, Enc(Text_i) (with the predictor tokens, i.e. the training-time Pred(Enc(Text))) and Enc(Code_i) are
exported; then

* the top singular values of D = Enc(Text) − Enc(Code) (rows = examples) — the paper reports their mean over the
  top 100 (JEPA concentrates the Text→Code difference in few directions);
* the least-squares linear-map residual min_X ‖Enc(Text)·X − Enc(Code)‖_F (fp64 ``lstsq``); it is 0 whenever
  N ≤ d and Enc(Text) has full row rank, so it is only meaningful for N > d (reported with N and d);
* a 2-D PCA projection of both sets of embeddings (PNG);
* collapse diagnostics over the whole split (:func:`collapse_report`): the JEPA distance on matched pairs and on
  mismatched pairs (the targets rolled by one example), the mean cosine of matched pairs and of all mismatched
  pairs (i ≠ j), the per-dimension variance and effective rank of Enc(Text) and Enc(Code), and retrieval accuracy
  Enc(Text_i) → Enc(Code_i) among all N codes by cosine (top-1, top-5; ties count as misses).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["top_singular_values", "linear_map_residual", "pca_2d", "encode_views", "collapse_report",
           "analyze_embeddings"]


def top_singular_values(enc_text: torch.Tensor, enc_code: torch.Tensor, k: int = 100) -> torch.Tensor:
    """Largest ``k`` singular values of D = enc_text − enc_code.

    Args:
        enc_text, enc_code: (N, D) embeddings.

    Returns:
        (min(k, N, D),) float64, descending.
    """
    d = (enc_text.double() - enc_code.double())
    return torch.linalg.svdvals(d)[:k]


def linear_map_residual(enc_text: torch.Tensor, enc_code: torch.Tensor) -> float:
    """min_X ‖A X − B‖_F with A = enc_text (N, D), B = enc_code (N, D), solved in float64."""
    a, b = enc_text.double(), enc_code.double()
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return float(torch.linalg.norm(a @ x - b))


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2) projection on the top-2 principal components (centred, float64, deterministic SVD)."""
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    return xc @ vh[:2].T


@torch.no_grad()
def encode_views(model, dataset, collate, *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Enc(Text) and Enc(Code) (float32, CPU) for every example of a JEPA dataset, in order."""
    from conceptlm.jepa.forward import run_jepa_batch

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    texts, codes = [], []
    for s in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]).to(device)
        out = run_jepa_batch(model, batch)
        texts.append(out.enc_text.float().cpu())
        codes.append(out.enc_code.float().cpu())
    model.train(was)
    return torch.cat(texts), torch.cat(codes)


def collapse_report(enc_text: torch.Tensor, enc_code: torch.Tensor, *, metric: str = "cosine",
                    temperature: float = 0.07, pred_is_text: bool = True) -> dict:
    """Collapse diagnostics of a whole split (N ≥ 2 examples).

    Args:
        enc_text, enc_code: (N, D) Enc(Text) and Enc(Code) (the predicting view with its predictor tokens).
        metric, temperature: the JEPA distance (``jepa.metric``; InfoNCE's negatives are then the whole split).
        pred_is_text: text→code (Pred = Enc(Text)); False for code→text.

    Returns:
        ``jepa_matched`` / ``jepa_mismatched`` (mean distance, mismatched = targets rolled by one example),
        ``cos_matched`` (mean cos(Text_i, Code_i)) / ``cos_mismatched`` (mean over all i ≠ j),
        ``enc_{text,code}_var`` (mean per-dimension variance), ``enc_{text,code}_erank`` (effective rank, at most
        min(N, D)), ``retrieval_top1`` / ``retrieval_top5`` (Enc(Text) → Enc(Code) among the N codes, cosine).
    """
    from conceptlm.jepa.collapse import (
        cosine_matched_mismatched,
        effective_rank,
        mean_dim_variance,
        mismatched,
        retrieval_accuracy,
    )
    from conceptlm.jepa.losses import jepa_distance

    pred, target = (enc_text, enc_code) if pred_is_text else (enc_code, enc_text)
    pred, target = pred.float(), target.float()

    def dist(t: torch.Tensor) -> float:
        return float(jepa_distance(pred, t, metric, temperature=temperature).double().mean())

    cos_m, cos_mis = cosine_matched_mismatched(enc_text, enc_code)
    acc = retrieval_accuracy(enc_text, enc_code, ks=(1, 5))
    return {
        "jepa_metric": metric,
        "jepa_matched": dist(target), "jepa_mismatched": dist(mismatched(target)),
        "cos_matched": cos_m, "cos_mismatched": cos_mis,
        "enc_text_var": float(mean_dim_variance(enc_text)), "enc_code_var": float(mean_dim_variance(enc_code)),
        "enc_text_erank": float(effective_rank(enc_text)), "enc_code_erank": float(effective_rank(enc_code)),
        "retrieval_top1": acc[1], "retrieval_top5": acc[5],
    }


def analyze_embeddings(enc_text: torch.Tensor, enc_code: torch.Tensor, out_dir: str | Path, *,
                       label: str = "", k: int = 100, metric: str = "cosine", temperature: float = 0.07,
                       pred_is_text: bool = True) -> dict:
    """Write ``embeddings.safetensors``, ``analysis.json``, ``projection.png`` into ``out_dir``; return the
    summary (mean of the top-k singular values, linear-map residual, N, d, mean cosine(Text, Code), and the
    :func:`collapse_report` entries when N ≥ 2)."""
    from safetensors.torch import save_file

    from conceptlm.core.io import atomic_write_text
    from conceptlm.plots.embeddings import plot_projection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-embeddings.safetensors"
    save_file({"enc_text": enc_text.contiguous(), "enc_code": enc_code.contiguous()}, str(tmp))
    tmp.replace(out / "embeddings.safetensors")
    sv = top_singular_values(enc_text, enc_code, k)
    n, d = enc_text.shape
    summary = {
        "n": n, "d": d,
        "top_singular_mean": float(sv.mean()),
        "top_singular_values": [float(v) for v in sv],
        "linear_map_residual": linear_map_residual(enc_text, enc_code),
        "residual_meaningful": n > d,
        "mean_cosine_text_code": float(torch.nn.functional.cosine_similarity(enc_text.double(),
                                                                             enc_code.double()).mean()),
    }
    if n >= 2:
        summary.update(collapse_report(enc_text, enc_code, metric=metric, temperature=temperature,
                                       pred_is_text=pred_is_text))
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=2))
    proj = pca_2d(torch.cat([enc_text, enc_code]))
    summary["projection_png"] = str(plot_projection(proj[:n], proj[n:], out / "projection.png",
                                                    title=f"PCA of Enc(Text) and Enc(Code) {label}".strip()))
    return summary
