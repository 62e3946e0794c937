"""2-D scatter of paired embeddings (Text vs Code), from precomputed projections."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_projection"]


def plot_projection(text_xy, code_xy, output: str | Path, *, title: str = "", max_pairs_drawn: int = 60) -> Path:
    """Scatter Text (blue) and Code (orange) points; thin lines join the first ``max_pairs_drawn`` pairs.

    Args:
        text_xy, code_xy: (N, 2) arrays/tensors.
        output: PNG path (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, c = [list(map(float, col)) for col in zip(*[tuple(r) for r in text_xy.tolist()])], \
        [list(map(float, col)) for col in zip(*[tuple(r) for r in code_xy.tolist()])]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i in range(min(max_pairs_drawn, len(t[0]))):
        ax.plot([t[0][i], c[0][i]], [t[1][i], c[1][i]], color="0.8", lw=0.5, zorder=1)
    ax.scatter(t[0], t[1], s=6, label="Enc(Text)", zorder=2)
    ax.scatter(c[0], c[1], s=6, label="Enc(Code)", zorder=2)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    tmp = output.with_name(f".tmp-{output.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(output)
    return output
