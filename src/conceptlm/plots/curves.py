"""Training curves from ``metrics.jsonl`` files (reads metrics only; never imports training code)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(runs: Mapping[str, str | Path], output: str | Path, *, keys: tuple[str, ...] = ("loss",),
                title: str | None = None) -> Path:
    """Plot train (solid) and eval (dashed, markers) curves of ``keys`` for each labelled run into a PNG.

    Args:
        runs: label -> run folder or metrics.jsonl path.
        output: PNG path (written atomically).
        keys: metric names to plot, one panel each.
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
            for split, style in (("train", dict(ls="-")), ("eval", dict(ls="--", marker="o", ms=3))):
                pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=color, label=f"{label} ({split})", **style)
        ax.set_xlabel("optimizer step")
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
