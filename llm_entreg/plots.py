"""Plots of a run's logged curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("loss", ("loss",)),
    ("policy entropy (nats/token)", ("entropy", "entropy/chosen", "entropy/rejected")),
    ("entropy coefficient", ("entropy_coef",)),
    ("reward", ("rewards/accuracies", "rewards/margins", "reward")),
)


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """One PNG with a panel per quantity: loss, entropy, coefficient, reward. Missing series are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = [(r.get("step", i + 1), r[key]) for i, r in enumerate(history) if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
