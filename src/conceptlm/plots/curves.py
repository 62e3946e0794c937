"""Training curves from ``metrics.jsonl`` files (reads metrics only; never imports training code)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["plot_curves", "curve_points"]


def curve_points(rows: list[dict], key: str, *, split: str, x: str = "step",
                 scale: float = 1.0) -> list[tuple[float, float]]:
    """``(x * scale, key)`` for the metric rows of ``split`` that log both columns, in file order."""
    return [(r[x] * scale, r[key]) for r in rows if r.get("split") == split and key in r and x in r]


def plot_curves(runs: Mapping[str, str | Path], output: str | Path, *, keys: tuple[str, ...] = ("loss",),
                title: str | None = None, x: str = "step", x_scale: Mapping[str, float] | None = None,
                x_label: str | None = None, splits: tuple[str, ...] = ("train", "eval")) -> Path:
    """Plot train (solid) and eval (dashed, markers) curves of ``keys`` for each labelled run into a PNG.

    Args:
        runs: label -> run folder or metrics.jsonl path.
        output: PNG path (written atomically).
        keys: metric names to plot, one panel each.
        x: the x axis: ``"step"`` or a logged column such as ``"tokens_seen"``.
        x_scale: label -> factor applied to ``x`` (e.g. FLOPs per token, to plot against compute).
        x_label: axis label (default: ``x``).
        splits: which rows to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptlm.core.metrics import read_metrics

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, path) in enumerate(runs.items()):
            path = Path(path)
            metrics = path / "metrics.jsonl" if path.is_dir() else path
            if not metrics.is_file():
                from conceptlm.core.errors import ConceptLMError

                raise ConceptLMError(f"{metrics}: no metrics file (is '{label}' a run folder?)")
            rows = read_metrics(metrics)
            color = f"C{i}"
            scale = (x_scale or {}).get(label, 1.0)
            for split, style in (("train", dict(ls="-")), ("eval", dict(ls="--", marker="o", ms=3))):
                if split not in splits:
                    continue
                pts = curve_points(rows, key, split=split, x=x, scale=scale)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=color, label=f"{label} ({split})", **style)
        ax.set_xlabel(x_label or ("optimizer step" if x == "step" else x))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(output)
    return output
