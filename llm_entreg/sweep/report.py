"""A sweep's report: every grid point's row and curves (from its directory, else from the shared storage),
``results.csv`` / ``results.md`` / ``best.json`` with each configuration's interval and its paired difference from
β = 0, and the plots (matplotlib Agg, no display): the metric and pass@k vs β with 95% intervals, entropy curves as
mean and range over seeds, metric vs entropy within seeds (a correlation), coefficient trajectories. See
docs/sweep.md.

``rows`` are results rows (see :mod:`.store`); ``curves`` maps a trial id to its logged records (``metrics.jsonl``).
Every plot function returns the path it wrote, or ``None`` when there was nothing to draw.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .grid import format_coef
from .pick import (ENTROPY_KEYS, Thresholds, first_key, per_prompt_values, pick_best, score_configs,
                   seed_centred_correlation, series)
from .stats import BOOTSTRAP_SAMPLES
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
    correlation: dict | None = None

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


def report_notes(thr: Thresholds, correlation: dict | None, metric: str) -> list[str]:
    """The flag definitions (and the correlation) under the results tables."""
    notes = [
        (f"collapsed: mean training entropy over the last {thr.window:.0%} of logged steps < "
         f"{thr.collapse_fraction:g} x the mean over the first {thr.window:.0%}; held-out: the sampled completions' "
         f"entropy after training < {thr.collapse_fraction:g} x before."),
        (f"never committed: the entropy did not fall (last window >= first window - {thr.commit_band:.0%}; a rise, "
         f"up to a run-away to the uniform distribution, counts) AND the reward gained < {thr.commit_min_gain:g}; "
         "held-out: the same on the held-out entropy and pass@1 (the greedy reward where not sampled)."),
        ("intervals: 95%, bootstrap over seeds and, within each seed, held-out prompts "
         f"({BOOTSTRAP_SAMPLES} resamples); "
         "'vs β = 0' is the paired difference on the same seeds and prompts. docs/sweep.md ('Signal or noise')."),
        f"pick metric: {metric} (val reward = held_out_after['reward'], greedy decoding, or the last logged "
        "reward-like metric where the recipe has no held-out evaluation).",
    ]
    if correlation is not None:
        notes.append(f"metric vs held-out entropy within seeds (seed-centred): Pearson r = {correlation['r']:.3f}, "
                     f"slope {correlation['slope']:.3g} per nat (n = {correlation['n']} trials, "
                     f"{correlation['n_seeds']} seeds); a correlation, not a fit of cause.")
    return notes


def best_document(config: SweepConfig, rows: list[dict], best: dict | None, correlation: dict | None) -> dict:
    """The content of ``best.json``: the pick with its interval, the β = 0 baseline, the paired difference and
    whether it is beyond noise, the rule, the ranking, thresholds, the correlation and trial counts."""
    pick = None
    if best is not None:
        pick = {k: best[k] for k in ("entropy_coef", "schedule", "mean", "ci95", "seeds", "trial_ids", "val_nll",
                                     "collapsed", "never_committed")}
        pick["label"] = f"β={format_coef(best['entropy_coef'])} schedule={best['schedule']}"
    return {
        "metric": config.pick_metric,
        "pick": pick,
        "baseline": best["baseline"] if best else None,
        "paired_diff": best["paired_diff"] if best else None,
        "significant": best["significant"] if best else False,
        "reason": best["reason"] if best else "no trial finished with the pick metric",
        "rule": best["rule"] if best else None,
        "tied_with": best["tied_with"] if best else [],
        "ranking": best["ranking"] if best else [],
        "thresholds": config.thresholds.as_dict(),
        "correlation_metric_vs_entropy": correlation,
        "trials": {"total": len(rows), "complete": sum(r.get("status") == "complete" for r in rows),
                   "failed": sum(r.get("status") == "failed" for r in rows)},
        "base_recipe": config.base_recipe,
        "overrides": config.overrides,
    }


def entropy_points(rows: list[dict], metric: str) -> list[tuple[int, float, float]]:
    """``(seed, final entropy, metric)`` of every complete trial that has both."""
    return [point[:3] for point in _entropy_points_with_coef(rows, metric)]


def _entropy_points_with_coef(rows: list[dict], metric: str) -> list[tuple[int, float, float, float]]:
    """:func:`entropy_points` with each trial's β."""
    points = []
    for row in rows:
        h, _ = entropy_for_scatter(row)
        values = per_prompt_values(row, metric) if _ok(row) else None
        if h is not None and values:
            points.append((int(row["seed"]), h, sum(values) / len(values), float(row["entropy_coef"])))
    return points


def write_report(config: SweepConfig, rows: list[dict], curves: dict[str, list[dict]]) -> SweepResult:
    """results.csv, results.md, best.json and (``config.plots``) the plots into the sweep directory."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored_base = score_configs(rows, config.pick_metric)  # the bootstrap, once for the pick, table and plot
    best = pick_best(rows, config.tie_tolerance, config.pick_metric, scored=scored_base)
    scored = scored_base[0]
    correlation = seed_centred_correlation(entropy_points(rows, config.pick_metric))
    title = f"β sweep: {Path(config.source or config.base_recipe).name}"
    paths: dict[str, Path] = {}
    if config.plots:
        paths.update(draw_plots(rows, curves, out, best, title, config.pick_metric, correlation, scored))
    notes = report_notes(config.thresholds, correlation, config.pick_metric)
    paths["results.csv"] = write_results_csv(rows, out / "results.csv")
    paths["results.md"] = write_results_md(rows, best, out / "results.md", title=title, notes=notes,
                                           configs=config_table(rows, scored))
    write_json(out / "best.json", best_document(config, rows, best, correlation))
    paths["best.json"] = out / "best.json"
    return SweepResult(rows, best, paths, correlation)


def config_table(rows: list[dict], scored: list[dict]) -> list[dict]:
    """One entry per configuration: the scored metric with its intervals, and held-out means over its seeds."""
    table = []
    for c in sorted(scored, key=lambda c: (c["entropy_coef"], c["schedule"])):
        members = [r for r in rows if r.get("id") in c["trial_ids"]]
        entry = dict(c)
        for key in ("val_entropy", "val_pass@1", "val_pass@16", "val_distinct_correct"):
            values = [_num(r.get(key)) for r in members]
            values = [v for v in values if v is not None]
            entry[key] = sum(values) / len(values) if values else None
        for flag in ("collapsed", "never_committed", "collapsed_held_out", "never_committed_held_out"):
            entry[f"n_{flag}"] = sum(bool(r.get(flag)) for r in members)
        table.append(entry)
    return table


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


def _log_beta_axis(ax, coefs) -> callable:
    """A log β axis with β = 0 at a separate, labelled tick; returns the β -> x position map."""
    x0, brk = zero_position(coefs)
    ax.set_xscale("log")
    positive = [c for c in coefs if c > 0]
    if brk is not None:
        ax.axvline(brk, color="gray", linestyle=":", linewidth=1)
        ticks = [x0] + [10.0 ** e for e in range(math.floor(math.log10(min(positive))),
                                                 math.ceil(math.log10(max(positive))) + 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["β = 0"] + [f"1e{round(math.log10(t))}" for t in ticks[1:]])
        ax.minorticks_off()
        ax.set_xlim(x0 / 10 ** 0.3, max(positive) * 10 ** 0.3)
    else:
        ax.set_xticks([x0])
        ax.set_xticklabels(["β = 0"])
    ax.set_xlabel("entropy coefficient β (log scale; β = 0 left of the dotted break)")
    return lambda c: x0 if c == 0 else c


def _metric_panel(ax, scored: list[dict], label: str, best: dict | None) -> None:
    """Mean and 95% interval per configuration vs β, one line per schedule; β = 0's interval as a band."""
    coefs = sorted({c["entropy_coef"] for c in scored})
    xpos = _log_beta_axis(ax, coefs)
    base = next((c for c in scored if c["entropy_coef"] == 0), None)
    if base is not None:
        ax.axhspan(base["ci95"][0], base["ci95"][1], color="black", alpha=0.08, label="β = 0: 95% interval")
    schedules = sorted({c["schedule"] for c in scored if c["entropy_coef"] > 0})
    for si, sched in enumerate(schedules):
        points = sorted([c for c in scored if c["schedule"] == sched or c["entropy_coef"] == 0],
                        key=lambda c: c["entropy_coef"])
        xs = [xpos(c["entropy_coef"]) for c in points]
        means = [c["mean"] for c in points]
        err = [[c["mean"] - c["ci95"][0] for c in points], [c["ci95"][1] - c["mean"] for c in points]]
        ax.errorbar(xs, means, yerr=err, marker=MARKERS[si % len(MARKERS)], linestyle=LINESTYLES[si % len(LINESTYLES)],
                    capsize=3, label=f"{sched}: mean over seeds, 95% interval")
        for c, x in zip(points, xs):
            if c.get("significant"):
                ax.annotate("*", (x, c["ci95"][1]), ha="center", va="bottom", fontsize=12, color="red")
    if best is not None and best.get("metric") and label.startswith(best["metric"]):
        ax.scatter([xpos(best["entropy_coef"])], [best["mean"]], marker="*", s=260, color="red", zorder=5,
                   label=f"pick: β={format_coef(best['entropy_coef'])} {best['schedule']}")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs β (* beyond noise vs β = 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_metric_vs_beta(rows: list[dict], path, best: dict | None = None, title: str = "",
                        metric: str = "reward", scored: list[dict] | None = None) -> Path | None:
    """The pick metric, and pass@1 / pass@16 where the held-out evaluation sampled, vs β with 95% intervals
    (``scored``: the pick metric's :func:`score_configs` configurations, when already computed)."""
    panels = [(metric, f"{metric} (held-out)")]
    for extra in ("pass@1", "pass@16"):
        if extra != metric and any(_num(r.get(f"val_{extra}")) is not None for r in rows if _ok(r)):
            panels.append((extra, f"{extra} (held-out)"))
    given = {metric: scored} if scored is not None else {}
    scored = [(given[m] if m in given else score_configs(rows, m)[0], label) for m, label in panels]
    scored = [(s, label) for s, label in scored if s]
    if not scored:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(scored), figsize=(6 * len(scored), 4.5), squeeze=False)
    for ax, (configs, label) in zip(axes[0], scored):
        _metric_panel(ax, configs, label, best)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _config_bands(rows, curves, keys) -> dict[tuple, tuple[list[int], list[float], list[float], list[float]]]:
    """Per configuration: steps, and the mean, min and max over its seeds of the first logged key (steps that every
    seed logged)."""
    groups: dict[tuple, list[dict[int, float]]] = defaultdict(list)
    for row in rows:
        history = curves.get(row["id"]) or []
        key = first_key(history, keys)
        if key:
            steps, values = series(history, key)
            groups[(float(row["entropy_coef"]), row["schedule"])].append(dict(zip(steps, values)))
    bands = {config: seed_band(runs) for config, runs in groups.items()}
    return {config: band for config, band in bands.items() if band[0]}


def seed_band(runs: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, mean, min, max)`` over the runs (each step -> value) at the steps every run logged."""
    steps = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    values = [[r[s] for r in runs] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _band_plot(rows, curves, path, keys, ylabel, title, symlog=False) -> Path | None:
    bands = _config_bands(rows, curves, keys)
    if not bands:
        return None
    plt = _plt()
    colors = _colors([c for c, _ in bands])
    schedules = sorted({s for _, s in bands})
    fig, ax = plt.subplots(figsize=(8, 5))
    for (coef, sched), (steps, mean, lo, hi) in sorted(bands.items()):
        color = colors[coef]
        label = f"β={format_coef(coef)}" + (f" {sched}" if len(schedules) > 1 else "")
        ax.plot(steps, mean, color=color, linestyle=LINESTYLES[schedules.index(sched) % len(LINESTYLES)], label=label)
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
    if symlog:
        positive = [v for (_, mean, _, _) in bands.values() for v in mean if v > 0]
        if positive:
            ax.set_yscale("symlog", linthresh=min(positive) / 2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (line: mean over seeds; band: their range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(bands) > 8 else 1)
    return _save(fig, path)


def plot_entropy_curves(rows: list[dict], curves: dict[str, list[dict]], path) -> Path | None:
    """Training policy entropy per logged step: per configuration, the mean over seeds and the range as a band."""
    return _band_plot(rows, curves, path, ENTROPY_KEYS, "policy entropy (nats/token, training batches)",
                      "entropy per configuration")


def plot_coef_trajectories(rows: list[dict], curves: dict[str, list[dict]], path) -> Path | None:
    """The coefficient actually used at each logged step (``entropy_coef``): schedules decay, controllers move."""
    return _band_plot(rows, curves, path, ("entropy_coef",), "entropy coefficient β_t (symlog)",
                      "coefficient trajectories", symlog=True)


def entropy_for_scatter(row: dict) -> tuple[float | None, str]:
    """The entropy a trial ended at: held-out policy entropy when evaluated, else the last-window training mean."""
    if _num(row.get("val_entropy")) is not None:
        return float(row["val_entropy"]), "held-out policy entropy after training (nats/token)"
    if _num(row.get("entropy_last")) is not None:
        return float(row["entropy_last"]), "training entropy, mean of the last 20% of steps (nats/token)"
    return None, ""


def plot_metric_vs_entropy(rows: list[dict], path, metric: str, correlation: dict | None) -> Path | None:
    """Metric vs final entropy within seeds: each trial's values minus its seed's means, coloured by β, with the
    least-squares line of the centred values; labelled as the correlation it is."""
    points = _entropy_points_with_coef(rows, metric)
    if len(points) < 2:
        return None
    by_seed: dict[int, list] = defaultdict(list)
    for seed, h, v, _ in points:
        by_seed[seed].append((h, v))
    means = {s: (sum(h for h, _ in p) / len(p), sum(v for _, v in p) / len(p)) for s, p in by_seed.items()}
    plt = _plt()
    colors = _colors([c for *_, c in points])
    fig, ax = plt.subplots(figsize=(7, 5))
    seen = set()
    for seed, h, v, c in points:
        ax.scatter([h - means[seed][0]], [v - means[seed][1]], color=colors[c], s=40, edgecolor="k", linewidth=0.5,
                   label=None if c in seen else f"β={format_coef(c)}")
        seen.add(c)
    if correlation is not None:
        xs = [h - means[s][0] for s, h, *_ in points]
        line = [min(xs), max(xs)]
        ax.plot(line, [correlation["slope"] * x for x in line], color="red",
                label=f"within-seed correlation r = {correlation['r']:.2f} (n={correlation['n']})")
    ax.set_xlabel("held-out entropy after training, minus its seed's mean (nats/token)")
    ax.set_ylabel(f"{metric}, minus its seed's mean")
    ax.set_title(f"{metric} vs entropy within seeds (a correlation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def draw_plots(rows: list[dict], curves: dict[str, list[dict]], out_dir, best: dict | None = None,
               title: str = "", metric: str = "reward", correlation: dict | None = None,
               scored: list[dict] | None = None) -> dict[str, Path]:
    """Every plot into ``out_dir``: name -> path for those that had data (``scored``: the configurations of
    :func:`score_configs` for ``metric``, when already computed)."""
    out_dir = Path(out_dir)
    written = {
        "metric_vs_beta": plot_metric_vs_beta(rows, out_dir / "metric_vs_beta.png", best, title, metric, scored),
        "entropy_curves": plot_entropy_curves(rows, curves, out_dir / "entropy_curves.png"),
        "coef_trajectories": plot_coef_trajectories(rows, curves, out_dir / "coef_trajectories.png"),
        "metric_vs_entropy": plot_metric_vs_entropy(rows, out_dir / "metric_vs_entropy.png", metric, correlation),
    }
    return {k: v for k, v in written.items() if v is not None}
