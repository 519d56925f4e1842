"""Plots of a run's logged curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

#: Training panels: title -> logged keys drawn in it.
PANELS = {
    "loss": ("loss",),
    "policy entropy (nats/token)": ("entropy", "entropy/chosen", "entropy/rejected"),
    "entropy coefficient": ("entropy_coef",),
    "DPO reward accuracy": ("rewards/accuracies",),
    "DPO reward margin": ("rewards/margins",),
    "reward": ("reward",),
    "KL to reference": ("kl",),
    "critic value loss": ("value_loss",),
    "critic explained variance": ("explained_variance",),
}
#: The panels each algorithm gets (when logged); other algorithms get every logged one.
ALGORITHM_PANELS = {
    "dpo": ("loss", "policy entropy (nats/token)", "entropy coefficient", "DPO reward accuracy", "DPO reward margin"),
    "grpo": ("loss", "policy entropy (nats/token)", "entropy coefficient", "reward", "KL to reference"),
    "rloo": ("loss", "policy entropy (nats/token)", "entropy coefficient", "reward", "KL to reference"),
    "sft": ("loss", "policy entropy (nats/token)", "entropy coefficient"),
    "ppo": ("loss", "policy entropy (nats/token)", "entropy coefficient", "reward", "KL to reference",
            "critic value loss", "critic explained variance"),
}
#: Held-out curves (``evaluation.curve_every``) and their before/after values: label, record keys, summary keys.
HELD_OUT_PANELS = (
    ("held-out pass@k", ("held_out/pass@1", "held_out/pass@4", "held_out/pass@16"), ("1", "4", "16")),
    ("held-out spread", ("held_out/distinct_correct", "held_out/entropy"), ("distinct_correct", "entropy")),
)


def _held_out_value(metrics: dict | None, key: str):
    if not metrics:
        return None
    value = metrics.get("pass_at_k", {}).get(key) if key.isdigit() else metrics.get(key)
    return value if isinstance(value, (int, float)) else None


def _draw_held_out(ax, label, keys, summary_keys, curve, before, after, last_step):
    """A held-out quantity: its curve over training where recorded, else (or also) its value before and after."""
    ax.set_title(label)
    for key, skey in zip(keys, summary_keys):
        points = [(r["step"], r[key]) for r in curve if isinstance(r.get(key), (int, float))]
        start, end = _held_out_value(before, skey), _held_out_value(after, skey)
        if start is not None:
            points = [(0, start)] + points
        if end is not None:
            points.append((last_step, end))
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix("held_out/"))


def _series(history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r.get("step", i + 1), r[key]) for i, r in enumerate(history) if isinstance(r.get(key), (int, float))]


def training_panels(history: list[dict], algorithm: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """The training panels to draw: the algorithm's, those with a logged series, and the coefficient only when it
    moves (a constant β is named in the entropy panel's title instead)."""
    titles = ALGORITHM_PANELS.get(algorithm or "", tuple(PANELS))
    panels = []
    for title in titles:
        keys = tuple(k for k in PANELS[title] if _series(history, k))
        if not keys:
            continue
        if title == "entropy coefficient" and len({v for _, v in _series(history, "entropy_coef")}) == 1:
            continue
        panels.append((title, keys))
    return panels


def plot_training_curves(history: list[dict], path: str | Path, title: str = "", held_out_curve: list[dict] = (),
                         before: dict | None = None, after: dict | None = None, algorithm: str | None = None) -> Path:
    """One PNG with a panel per logged quantity of the algorithm (loss, entropy, a moving coefficient; DPO accuracy
    and margin; reward and KL; the critic's loss for PPO) and, with a held-out evaluation, pass@k and the spread
    (distinct correct answers, entropy) before, during and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = training_panels(history, algorithm)
    held = [p for p in HELD_OUT_PANELS if held_out_curve or before or after]
    n = max(1, len(panels) + len(held))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    last_step = max([r.get("step", 0) for r in history] + [r.get("step", 0) for r in held_out_curve] + [1])
    coefs = {v for _, v in _series(history, "entropy_coef")}
    for ax, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            xs, ys = zip(*_series(history, key))
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        if label.startswith("policy entropy") and len(coefs) == 1:
            label += f"; β = {next(iter(coefs)):.3g} (constant)"
        ax.set_title(label)
    for ax, (label, keys, summary_keys) in zip(list(axes.flat)[len(panels):], held):
        _draw_held_out(ax, label, keys, summary_keys, list(held_out_curve), before, after, last_step)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels) + len(held):
            ax.set_visible(False)
    return _finish(fig, [ax for ax in axes.flat if ax.get_visible()], "optimizer step", path, title)


def _finish(fig, axes, xlabel: str, path: str | Path, title: str) -> Path:
    """Label, grid and legend the panels, title the figure, write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel(xlabel)
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


#: The pseudo-label loop's panels: title -> per-round keys.
PSEUDO_LABEL_PANELS = {
    "pseudo-labels": ("coverage", "pseudo_accuracy", "confident_wrong_share", "slice_confident_wrong_share"),
    "held-out accuracy": ("accuracy", "slice_accuracy"),
    "calibration": ("ece", "confident_wrong", "mean_confidence"),
    "held-out entropy (nats/token)": ("entropy",),
}


def plot_pseudo_label_rounds(records: list[dict], path: str | Path, title: str = "") -> Path:
    """One PNG with the pseudo-label loop's metrics per round (round 0: the warm start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PSEUDO_LABEL_PANELS), figsize=(5 * len(PSEUDO_LABEL_PANELS), 3.8))
    for ax, (label, keys) in zip(axes, PSEUDO_LABEL_PANELS.items()):
        for key in keys:
            points = [(r["round"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                      and r[key] == r[key]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_title(label)
    return _finish(fig, list(axes), "round", path, title)
