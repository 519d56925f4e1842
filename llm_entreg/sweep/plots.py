"""A sweep's plots (matplotlib Agg, no display): reward/NLL vs β, entropy curves, reward vs entropy with the
``R = -a exp(H) + b`` fit, and the coefficient trajectories.

``rows`` are results rows (see :mod:`.store`); ``curves`` maps a trial id to its logged records
(``metrics.jsonl``). Every function returns the path it wrote, or ``None`` when there was nothing to draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .grid import format_coef
from .pick import ENTROPY_KEYS, fit_exp_entropy, first_key, series

LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(row) -> bool:
    return row.get("status") == "complete"


def _num(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def zero_position(coefs) -> tuple[float, float | None]:
    """Where β = 0 sits on a log axis: one decade (more for wide ranges) left of the smallest positive β, and
    the break between them (geometric midpoint), or ``(1.0, None)`` when no β is positive."""
    positive = [c for c in coefs if c > 0]
    if not positive:
        return 1.0, None
    lo, hi = min(positive), max(positive)
    gap = max(1.0, round(math.log10(hi / lo) / 4))
    x0 = lo / 10 ** gap
    return x0, math.sqrt(x0 * lo)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _colors(coefs):
    """β -> colour: log-scaled viridis for β > 0, black for β = 0."""
    plt = _plt()
    positive = sorted({c for c in coefs if c > 0})
    cmap = plt.get_cmap("viridis")
    out = {0.0: "black"}
    for i, c in enumerate(positive):
        out[c] = cmap(0.1 + 0.8 * (i / max(1, len(positive) - 1)))
    return out


def plot_reward_vs_beta(rows: list[dict], path, best: dict | None = None, title: str = "") -> Path | None:
    """Validation reward (and NLL when logged) vs β on a log axis, β = 0 at a separate, labelled tick."""
    done = [r for r in rows if _ok(r) and _num(r.get("val_reward")) is not None]
    if not done:
        return None
    plt = _plt()
    has_nll = any(_num(r.get("val_nll")) is not None for r in done)
    panels = [("val_reward", "validation reward")] + ([("val_nll", "validation NLL (nats/token)")] if has_nll else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    coefs = sorted({float(r["entropy_coef"]) for r in done})
    x0, brk = zero_position(coefs)

    def xpos(c):
        return x0 if c == 0 else c

    schedules = sorted({r["schedule"] for r in done})
    for ax, (key, label) in zip(axes[0], panels):
        for si, sched in enumerate(schedules):
            by_coef = defaultdict(list)
            for r in done:
                if r["schedule"] == sched and _num(r.get(key)) is not None:
                    by_coef[float(r["entropy_coef"])].append(float(r[key]))
            if not by_coef:
                continue
            xs = sorted(by_coef)
            means = [sum(by_coef[c]) / len(by_coef[c]) for c in xs]
            marker = MARKERS[si % len(MARKERS)]
            line, = ax.plot([xpos(c) for c in xs], means, marker=marker, linestyle=LINESTYLES[si % len(LINESTYLES)],
                            label=f"{sched} (mean over seeds)" if any(len(v) > 1 for v in by_coef.values()) else sched)
            for c in xs:
                if len(by_coef[c]) > 1:
                    ax.scatter([xpos(c)] * len(by_coef[c]), by_coef[c], color=line.get_color(), alpha=0.35, s=14,
                               marker=marker)
        if best is not None and key in ("val_reward", "val_nll") and _num(best.get(key)) is not None:
            ax.scatter([xpos(best["entropy_coef"])], [best[key]], marker="*", s=260, color="red", zorder=5,
                       label=f"pick: β={format_coef(best['entropy_coef'])} {best['schedule']}")
        ax.set_xscale("log")
        if brk is not None:
            ax.axvline(brk, color="gray", linestyle=":", linewidth=1)
            ticks = [x0] + [10.0 ** e for e in range(math.floor(math.log10(min(c for c in coefs if c > 0))),
                                                     math.ceil(math.log10(max(coefs))) + 1)]
            ax.set_xticks(ticks)
            ax.set_xticklabels(["β = 0"] + [f"1e{int(round(math.log10(t)))}" for t in ticks[1:]])
            ax.minorticks_off()
            ax.set_xlim(x0 / 10 ** 0.3, max(coefs) * 10 ** 0.3)
        else:
            ax.set_xticks([x0])
            ax.set_xticklabels(["β = 0"])
        ax.set_xlabel("entropy coefficient β (log scale; β = 0 left of the dotted break)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs β")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _trial_label(row, multi_sched: bool, multi_seed: bool) -> str:
    label = f"β={format_coef(float(row['entropy_coef']))}"
    if multi_sched:
        label += f" {row['schedule']}"
    if multi_seed:
        label += f" s{row['seed']}"
    return label


def _curve_plot(rows, curves, path, keys, ylabel, title, symlog=False) -> Path | None:
    plt = _plt()
    drawn = []
    for row in rows:
        history = curves.get(row["id"]) or []
        key = first_key(history, keys)
        if key:
            drawn.append((row, series(history, key)))
    if not drawn:
        return None
    coefs = [float(r["entropy_coef"]) for r, _ in drawn]
    colors = _colors(coefs)
    schedules = sorted({r["schedule"] for r, _ in drawn})
    multi_sched, multi_seed = len(schedules) > 1, len({r["seed"] for r, _ in drawn}) > 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, (steps, values) in sorted(drawn, key=lambda d: (float(d[0]["entropy_coef"]), d[0]["schedule"], d[0]["seed"])):
        style = LINESTYLES[schedules.index(row["schedule"]) % len(LINESTYLES)]
        ax.plot(steps, values, linestyle=style, color=colors[float(row["entropy_coef"])], alpha=0.85,
                marker="." if len(steps) < 30 else None, label=_trial_label(row, multi_sched, multi_seed))
    if symlog:
        positive = [v for _, (_, vals) in drawn for v in vals if v > 0]
        if positive:
            ax.set_yscale("symlog", linthresh=min(positive) / 2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(drawn) > 8 else 1)
    return _save(fig, path)


def plot_entropy_curves(rows: list[dict], curves: dict[str, list[dict]], path) -> Path | None:
    """Training policy entropy per logged step, one line per trial (colour = β, line style = schedule)."""
    return _curve_plot(rows, curves, path, ENTROPY_KEYS, "policy entropy (nats/token, training batches)",
                       "entropy curves per β")


def plot_coef_trajectories(rows: list[dict], curves: dict[str, list[dict]], path) -> Path | None:
    """The coefficient actually used at each logged step (``entropy_coef``): schedules decay, controllers move."""
    return _curve_plot(rows, curves, path, ("entropy_coef",), "entropy coefficient β_t (symlog)",
                       "coefficient trajectories", symlog=True)


def entropy_for_scatter(row: dict) -> tuple[float | None, str]:
    """The entropy a trial ended at: held-out policy entropy when evaluated, else the last-window training mean."""
    if _num(row.get("val_entropy")) is not None:
        return float(row["val_entropy"]), "held-out policy entropy after training (nats/token)"
    if _num(row.get("entropy_last")) is not None:
        return float(row["entropy_last"]), "training entropy, mean of the last 20% of steps (nats/token)"
    return None, ""


def plot_reward_vs_entropy(rows: list[dict], path) -> tuple[Path | None, dict | None]:
    """Validation reward vs final entropy per trial, with the least-squares fit R = -a exp(H) + b."""
    points, xlabel = [], ""
    for row in rows:
        h, label = entropy_for_scatter(row)
        if _ok(row) and h is not None and _num(row.get("val_reward")) is not None:
            points.append((row, h, float(row["val_reward"])))
            xlabel = xlabel or label
    if not points:
        return None, None
    plt = _plt()
    colors = _colors([float(r["entropy_coef"]) for r, _, _ in points])
    fig, ax = plt.subplots(figsize=(7, 5))
    seen = set()
    for row, h, r in points:
        c = float(row["entropy_coef"])
        ax.scatter([h], [r], color=colors[c], s=40, edgecolor="k", linewidth=0.5,
                   label=None if c in seen else f"β={format_coef(c)}")
        seen.add(c)
    fit = fit_exp_entropy([h for _, h, _ in points], [r for _, _, r in points])
    if fit is not None:
        import numpy as np

        hs = np.linspace(min(p[1] for p in points), max(p[1] for p in points), 100)
        ax.plot(hs, -fit["a"] * np.exp(hs) + fit["b"], color="red",
                label=f"fit R = -{fit['a']:.3g}·exp(H) + {fit['b']:.3g} (R²={fit['r2']:.2f}, n={fit['n']})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation reward")
    ax.set_title("reward vs entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path), fit


def plot_all(rows: list[dict], curves: dict[str, list[dict]], out_dir, best: dict | None = None,
             title: str = "") -> dict[str, Path]:
    """All four plots into ``out_dir``; returns name -> path for those that had data."""
    out_dir = Path(out_dir)
    written = {
        "reward_vs_beta": plot_reward_vs_beta(rows, out_dir / "reward_vs_beta.png", best, title),
        "entropy_curves": plot_entropy_curves(rows, curves, out_dir / "entropy_curves.png"),
        "reward_vs_entropy": plot_reward_vs_entropy(rows, out_dir / "reward_vs_entropy.png")[0],
        "coef_trajectories": plot_coef_trajectories(rows, curves, out_dir / "coef_trajectories.png"),
    }
    return {k: v for k, v in written.items() if v is not None}
