"""A sweep's report: every grid point's row and curves (from its directory, else from the shared storage),
``results.csv`` / ``results.md`` / ``best.json``, and the plots (matplotlib Agg, no display): reward/NLL vs β,
entropy curves, reward vs entropy with the ``R = -a exp(H) + b`` fit, coefficient trajectories. See docs/sweep.md.

``rows`` are results rows (see :mod:`.store`); ``curves`` maps a trial id to its logged records (``metrics.jsonl``).
Every plot function returns the path it wrote, or ``None`` when there was nothing to draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .grid import format_coef
from .pick import ENTROPY_KEYS, Thresholds, first_key, fit_exp_entropy, pick_best, series
from .runner import base_row, trial_dir
from .spec import SweepConfig
from .store import METRICS_FILE, is_finished, read_metrics, read_trial, write_json, write_results_csv, write_results_md
from .workers import expand_curves, study_state


# ------------------------------------------------------------------------------------------------------- results
@dataclass
class SweepResult:
    rows: list[dict]
    best: dict | None
    paths: dict[str, Path] = field(default_factory=dict)
    fit: dict | None = None

    @property
    def n_failed(self) -> int:
        return sum(r.get("status") == "failed" for r in self.rows)

    @property
    def n_complete(self) -> int:
        return sum(r.get("status") == "complete" for r in self.rows)


def collect(config: SweepConfig, study=None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows and curves of every grid point: the trial's own directory first, the shared storage second."""
    state = study_state(study, [t.id for t in config.trials]) if study is not None else {"rows": {}}
    rows, curves = [], {}
    for trial in config.trials:
        directory = trial_dir(config, trial)
        record = read_trial(directory)
        stored, stored_curves = state["rows"].get(trial.id, (None, None))
        if is_finished(record):
            row = record["row"]
        elif stored is not None and stored.get("status") == "complete":
            row = stored
        elif record and isinstance(record.get("row"), dict):
            row = record["row"]
        elif stored is not None:
            row = stored
        elif record:
            row = {**base_row(trial), "status": "interrupted" if record.get("status") == "running" else
                   record.get("status")}
        else:
            row = {**base_row(trial), "status": "pending"}
        rows.append(row)
        history = read_metrics(directory / METRICS_FILE)
        curves[trial.id] = history or expand_curves(stored_curves)
    return rows, curves


def report_notes(thr: Thresholds, fit: dict | None) -> list[str]:
    """The flag definitions (and the fit) under the results table."""
    notes = [
        (f"collapsed: mean training entropy over the last {thr.window:.0%} of logged steps < "
         f"{thr.collapse_fraction:g} x the mean over the first {thr.window:.0%}."),
        (f"never committed: last-window mean entropy within ±{thr.commit_band:.0%} of the first-window mean AND "
         f"validation reward gained < {thr.commit_min_gain:g} over reward before."),
        "val reward: held_out_after['reward'] (or the last logged reward-like metric; see reward_source in results.csv).",
    ]
    if fit is not None:
        notes.append(f"reward vs entropy fit: R = -{fit['a']:.4g}·exp(H) + {fit['b']:.4g} (R² = {fit['r2']:.3f}, "
                     f"n = {fit['n']}).")
    return notes


def best_document(config: SweepConfig, rows: list[dict], best: dict | None, fit: dict | None) -> dict:
    """The content of ``best.json``: the pick, the rule, the ranking, thresholds, fit and trial counts."""
    doc = {
        "pick": None if best is None else {k: v for k, v in best.items() if k not in ("rule", "ranking", "tied_with")},
        "rule": best["rule"] if best else None,
        "reason": best["reason"] if best else "no trial finished with a validation reward",
        "tied_with": best["tied_with"] if best else [],
        "ranking": best["ranking"] if best else [],
        "thresholds": config.thresholds.as_dict(),
        "fit_reward_vs_entropy": fit,
        "trials": {"total": len(rows), "complete": sum(r.get("status") == "complete" for r in rows),
                   "failed": sum(r.get("status") == "failed" for r in rows)},
        "base_recipe": config.base_recipe,
        "overrides": config.overrides,
    }
    if best is not None:
        doc["pick"]["label"] = f"β={format_coef(best['entropy_coef'])} schedule={best['schedule']}"
    return doc


def write_report(config: SweepConfig, rows: list[dict], curves: dict[str, list[dict]]) -> SweepResult:
    """results.csv, results.md, best.json and (``config.plots``) the four plots into the sweep directory."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = pick_best(rows, config.tie_tolerance)
    title = f"β sweep: {Path(config.source or config.base_recipe).name}"
    paths: dict[str, Path] = {}
    if config.plots:
        written, fit = draw_plots(rows, curves, out, best, title)
        paths.update(written)
    else:
        pairs = [(entropy_for_scatter(r)[0], r.get("val_reward")) for r in rows if r.get("status") == "complete"]
        fit = fit_exp_entropy([h for h, _ in pairs], [reward for _, reward in pairs])
    notes = report_notes(config.thresholds, fit)
    paths["results.csv"] = write_results_csv(rows, out / "results.csv")
    paths["results.md"] = write_results_md(rows, best, out / "results.md", title=title, notes=notes)
    write_json(out / "best.json", best_document(config, rows, best, fit))
    paths["best.json"] = out / "best.json"
    return SweepResult(rows, best, paths, fit)


# --------------------------------------------------------------------------------------------------------- plots
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
            ax.set_xticklabels(["β = 0"] + [f"1e{round(math.log10(t))}" for t in ticks[1:]])
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


def draw_plots(rows: list[dict], curves: dict[str, list[dict]], out_dir, best: dict | None = None,
               title: str = "") -> tuple[dict[str, Path], dict | None]:
    """All four plots into ``out_dir``: name -> path for those that had data, and the reward-vs-entropy fit."""
    out_dir = Path(out_dir)
    written = {
        "reward_vs_beta": plot_reward_vs_beta(rows, out_dir / "reward_vs_beta.png", best, title),
        "entropy_curves": plot_entropy_curves(rows, curves, out_dir / "entropy_curves.png"),
        "coef_trajectories": plot_coef_trajectories(rows, curves, out_dir / "coef_trajectories.png"),
    }
    written["reward_vs_entropy"], fit = plot_reward_vs_entropy(rows, out_dir / "reward_vs_entropy.png")
    return {k: v for k, v in written.items() if v is not None}, fit
