"""Regenerate every table and figure of docs/experiments.md on the exploration task (offline, CPU).

Runs the sweeps (finished trials are reused: a rerun only draws the figures again), the decode-temperature
comparison on their final models, and writes docs/img/experiments/*.png and docs/data/experiments/results.json and
tables.md. About 35 minutes on a 2-core CPU for a-f, 15 more for g.

    python scripts/experiments.py                      # everything
    python scripts/experiments.py --only e,f           # some experiments (the sweeps they need run or are reused)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llm_entreg.sweep import build_config, run_sweep  # noqa: E402
from llm_entreg.sweep.pick import per_prompt_values, series  # noqa: E402
from llm_entreg.sweep.report import seed_band  # noqa: E402
from llm_entreg.sweep.stats import bootstrap_interval, paired_difference  # noqa: E402
from llm_entreg.sweep.store import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "0,1,2"
#: Sequence level, matched to the token level's β = 0.1: the per-sequence sum of ~2.96 tokens (the warm start's mean
#: completion length on the held-out prompts, <eos> included) times β_seq equals the token mean times 0.1.
SEQUENCE_COEF = round(0.1 / 2.96, 4)
#: H-DPO's α: 1 is DPO; below 1 sharpens (the paper: 0.9-0.95).
HDPO_ALPHAS = (1.0, 0.95, 0.9, 0.8)
#: β of the entropy term on the pseudo-labelled examples.
PSEUDO_BETAS = (0.0, 0.1, 0.3, 1.0)
SWEEPS = {
    "grid": dict(source="sweep_explore"),
    "schedules": dict(source="explore_schedules"),
    "sequence": dict(source="explore_grpo", entropy_coef=f"0,{SEQUENCE_COEF}",
                     overrides=["entropy_level=sequence", "entropy_loss_agg_mode=seq-mean-token-sum"]),
    "reward": dict(source="explore_grpo", entropy_coef="0,0.01,0.03,0.1",
                   overrides=["entropy_level=reward", "entropy_loss_agg_mode=null"]),
    "kl": dict(source="explore_grpo", entropy_coef="0,0.1", overrides=["beta=0.1"]),
    # (g) the other methods; fractions scaled to ~380 tokens per step (the papers' 2e-4 would select one token)
    "rloo": dict(source="rloo_entropy", entropy_coef="0,0.1"),
    "clip_cov": dict(source="explore_grpo", entropy_coef="0", overrides=["policy_loss_mode=clip_cov",
                                                                         "clip_cov_ratio=0.02"]),
    "two_epochs": dict(source="explore_grpo", entropy_coef="0", overrides=["num_iterations=2"]),
    "kl_cov": dict(source="explore_grpo", entropy_coef="0", overrides=["num_iterations=2", "policy_loss_mode=kl_cov",
                                                                       "kl_cov_ratio=0.02"]),
    "entropy_adv": dict(source="explore_grpo", entropy_coef="0", overrides=["entropy_advantage_coef=0.4"]),
    "clamp": dict(source="explore_grpo", entropy_coef="0.1", overrides=["entropy_clamp_top_p=0.9"]),
    **{f"hdpo_{a}": dict(source="explore_dpo", entropy_coef="0", overrides=[f"hdpo_alpha={a}"])
       for a in HDPO_ALPHAS},
    # (h) pseudo-label self-training, (i) the confidence penalty in plain SFT
    "pseudo": dict(source="pseudo_label", entropy_coef=",".join(map(str, PSEUDO_BETAS))),
    "sft_conf": dict(source="sft_confidence", entropy_coef="0,0.1,0.3"),
}
NEEDS = {"a": ["grid"], "b": ["grid"], "c": ["grid", "schedules"], "d": ["grid", "sequence", "reward"],
         "e": ["grid"], "f": ["grid", "kl"],
         "g": ["grid", "rloo", "clip_cov", "two_epochs", "kl_cov", "entropy_adv", "clamp",
               *(f"hdpo_{a}" for a in HDPO_ALPHAS)],
         "h": ["pseudo"], "i": ["sft_conf"]}
METRICS = ("pass@1", "pass@16", "reward", "distinct_correct", "entropy", "kl_to_reference")


def run_sweeps(names, out: Path, workers: int) -> dict[str, list[dict]]:
    rows = {}
    for name in names:
        spec = SWEEPS[name]
        t0 = time.time()
        config = build_config(spec["source"], ["evaluation.curve_every=50", *spec.get("overrides", [])],
                              entropy_coef=spec.get("entropy_coef"), seeds=SEEDS, out=str(out / name),
                              workers=workers, progress=False)
        result = run_sweep(config)
        print(f"sweep {name}: {result.n_complete}/{len(result.rows)} complete in {time.time() - t0:.0f} s", flush=True)
        rows[name] = [_with_summary(dict(r, sweep=name, dir=str(out / name / r["output_dir"])))
                      for r in result.rows if r.get("status") == "complete"]
    return rows


def _with_summary(row: dict) -> dict:
    """The trial's row with its summary.json (read once) and the trained policy's held-out KL to its start and
    entropy by position."""
    row["summary"] = json.loads((Path(row["dir"]) / "summary.json").read_text())
    after = row["summary"].get("held_out_after") or {}
    row["kl_to_reference"] = after.get("kl_to_reference")
    row["entropy_by_position"] = after.get("entropy_by_position")
    return row


# ------------------------------------------------------------------------------------------------- statistics
def values_by_seed(rows: list[dict], metric: str) -> dict[int, list[float]]:
    """Per seed: per-prompt values where the evaluation kept them (pass@k, reward), else the trial's one number."""
    out = {}
    for row in rows:
        if metric in ("pass@1", "pass@16", "reward"):
            values = per_prompt_values(row, metric)
        else:
            values = [row.get(f"val_{metric}") if metric != "kl_to_reference" else row.get("kl_to_reference")]
        if values and values[0] is not None:
            out[int(row["seed"])] = values
    return out


def summarize(group: list[dict], baseline: list[dict]) -> dict:
    """Mean and 95% interval of every metric, and the paired difference from ``baseline`` (same seeds, prompts)."""
    out = {"seeds": sorted(int(r["seed"]) for r in group)}
    for metric in METRICS:
        values, base = values_by_seed(group, metric), values_by_seed(baseline, metric)
        if not values:
            continue
        entry = bootstrap_interval(values).as_dict()
        entry["vs_baseline"] = vs_baseline(values, base) if base and group is not baseline else None
        out[metric] = entry
    return out


def vs_baseline(values: dict[int, list[float]], base: dict[int, list[float]]) -> dict:
    """The paired difference from the baseline (same seeds and prompts), and whether it is beyond the noise."""
    diff = paired_difference(values, base)
    return {**diff.as_dict(), "beyond_noise": diff.lo > 0 or diff.hi < 0}


def select(rows: list[dict], coef: float, schedule: str = "constant") -> list[dict]:
    return [r for r in rows if float(r["entropy_coef"]) == coef and r["schedule"] == schedule]


# --------------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path.relative_to(ROOT))


def curve_band(rows: list[dict], key: str):
    """Steps, mean, min and max over seeds of a logged ``held_out/*`` (or training) key."""
    runs = []
    for row in rows:
        if "history" not in row:
            row["history"] = read_metrics(Path(row["dir"]) / "metrics.jsonl")
        steps, values = series(row["history"], key)
        runs.append(dict(zip(steps, values)))
    return seed_band(runs)


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str) -> str:
    keys = [("held_out/entropy", "held-out entropy (nats/token)"),
            ("held_out/distinct_correct", "distinct correct answers (of 32)"),
            ("held_out/pass@1", "held-out pass@1"), ("held_out/pass@16", "held-out pass@16")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (key, label) in zip(axes, keys):
        for name, rows in groups.items():
            steps, mean, lo, hi = curve_band(rows, key)
            line, = ax.plot(steps, mean, label=name)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (line: mean over 3 seeds; band: their range; 64 held-out prompts, 32 samples each)")
    return _save(fig, path)


def plot_intervals(table: dict[str, dict], metrics, path: Path, title: str) -> str:
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2))
    names = list(table)
    for ax, metric in zip(axes, metrics):
        for i, name in enumerate(names):
            entry = table[name].get(metric)
            if entry is None:
                continue
            lo, hi = entry["ci95"]
            ax.errorbar([i], [entry["mean"]], yerr=[[entry["mean"] - lo], [hi - entry["mean"]]], fmt="o", capsize=4,
                        color="red" if (entry.get("vs_baseline") or {}).get("beyond_noise") else "C0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} (mean, 95% interval)")
        ax.grid(alpha=0.3)
    fig.suptitle(title + " (red: beyond noise vs the baseline)")
    return _save(fig, path)


# -------------------------------------------------------------------------------------------- experiments
def experiment_ab(grid: list[dict], img: Path) -> dict:
    """a: β too small -> collapse; b: β too large -> never commits (here: runs away to the uniform distribution)."""
    base = select(grid, 0.0)
    configs = {"β = 0": base, "β = 0.01": select(grid, 0.01), "β = 0.03": select(grid, 0.03),
               "β = 0.1": select(grid, 0.1), "β = 0.3": select(grid, 0.3)}
    table = {name: summarize(rows, base) for name, rows in configs.items()}
    for name, rows in configs.items():
        table[name]["collapsed_held_out"] = sum(bool(r.get("collapsed_held_out")) for r in rows)
        table[name]["never_committed_held_out"] = sum(bool(r.get("never_committed_held_out")) for r in rows)
        table[name]["collapsed"] = sum(bool(r.get("collapsed")) for r in rows)
        table[name]["never_committed"] = sum(bool(r.get("never_committed")) for r in rows)
    before = {"pass@1": lambda r: r["summary"]["held_out_before"]["pass_at_k"]["1"],
              "pass@16": lambda r: r["summary"]["held_out_before"]["pass_at_k"]["16"],
              "distinct_correct": lambda r: r["summary"]["held_out_before"]["distinct_correct"],
              "entropy": lambda r: r["summary"]["held_out_before"]["entropy"]}
    start = {k: bootstrap_interval(_seed_level(base, value)).as_dict() for k, value in before.items()}
    figure = plot_curves(configs, img / "collapse_curves.png", "GRPO on the exploration task, constant β")
    return {"table": table, "warm_start": start, "figure": figure}


def experiment_c(grid: list[dict], schedules: list[dict], img: Path) -> dict:
    """c: decay (linear, exponential) vs constant at the same starting β, and the two controllers."""
    base = select(schedules, 0.0)
    configs = {"β = 0": base}
    for sched in ("constant", "linear", "exponential", "target_entropy", "learned_alpha"):
        configs[f"0.1 {sched}"] = select(schedules, 0.1, sched)
    table = {name: summarize(rows, base) for name, rows in configs.items()}
    figure = plot_intervals(table, ("pass@1", "pass@16", "distinct_correct", "entropy"), img / "schedules.png",
                            "schedules and controllers from β = 0.1")
    curves = plot_curves({k: v for k, v in configs.items()}, img / "schedules_curves.png",
                         "schedules and controllers from β = 0.1")
    return {"table": table, "figure": figure, "curves": curves}


def experiment_d(grid: list[dict], sequence: list[dict], reward: list[dict], img: Path) -> dict:
    """d: the formulation: token level, sequence level (matched), entropy in the reward (a small grid of α)."""
    base = select(grid, 0.0)
    configs = {"β = 0": base, "token 0.1": select(grid, 0.1), f"sequence {SEQUENCE_COEF}": select(sequence, SEQUENCE_COEF)}
    for alpha in (0.01, 0.03, 0.1):
        configs[f"reward α={alpha}"] = select(reward, alpha)
    table = {name: summarize(rows, base) for name, rows in configs.items() if rows}
    figure = plot_intervals(table, ("pass@1", "pass@16", "distinct_correct", "entropy"), img / "formulations.png",
                            "token level, sequence level, entropy in the reward")
    return {"table": table, "figure": figure, "sequence_coef": SEQUENCE_COEF}


def experiment_f(grid: list[dict], kl: list[dict], img: Path) -> dict:
    """f: KL to the reference alone vs KL + entropy: where the policy is (KL) and its spread (entropy)."""
    base = select(grid, 0.0)
    configs = {"neither": base, "entropy 0.1": select(grid, 0.1), "KL 0.1": select(kl, 0.0),
               "KL 0.1 + entropy 0.1": select(kl, 0.1)}
    table = {name: summarize(rows, base) for name, rows in configs.items()}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, entry in table.items():
        k, h = entry["kl_to_reference"], entry["entropy"]
        ax.errorbar([k["mean"]], [h["mean"]], xerr=[[k["mean"] - k["ci95"][0]], [k["ci95"][1] - k["mean"]]],
                    yerr=[[h["mean"] - h["ci95"][0]], [h["ci95"][1] - h["mean"]]], fmt="o", capsize=4, label=name)
    ax.set_xlabel("KL(trained policy || warm start), held-out samples (nats/token)")
    ax.set_ylabel("held-out entropy after training (nats/token)")
    ax.set_title("KL anchors where the policy is; entropy keeps its spread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return {"table": table, "figure": _save(fig, img / "kl_vs_entropy.png")}


def experiment_g(rows: dict[str, list[dict]], img: Path) -> dict:
    """g: the other methods, each against its own baseline (same recipe, same seeds, the method off)."""
    grid = rows["grid"]
    groups = {
        "grpo": {"β = 0": select(grid, 0.0), "entropy bonus β = 0.1": select(grid, 0.1),
                 "Clip-Cov (ratio 0.02)": select(rows["clip_cov"], 0.0),
                 "entropy-shaped advantages (α 0.4, κ 2)": select(rows["entropy_adv"], 0.0),
                 "clamped bonus β = 0.1, top-p 0.9": select(rows["clamp"], 0.1)},
        "kl_cov": {"β = 0, 2 epochs per rollout": select(rows["two_epochs"], 0.0),
                   "KL-Cov (ratio 0.02, 2 epochs)": select(rows["kl_cov"], 0.0)},
        "rloo": {"RLOO, β = 0": select(rows["rloo"], 0.0), "RLOO, β = 0.1": select(rows["rloo"], 0.1)},
        "hdpo": {f"DPO α = {a}" if a == 1.0 else f"H-DPO α = {a}": select(rows[f"hdpo_{a}"], 0.0)
                 for a in HDPO_ALPHAS},
    }
    out = {}
    for name, configs in groups.items():
        baseline = next(iter(configs.values()))
        table = {label: summarize(group, baseline) for label, group in configs.items() if group}
        figure = plot_intervals(table, ("pass@1", "pass@16", "distinct_correct", "entropy"),
                                img / f"methods_{name}.png", f"{name}: each method against its baseline")
        out[name] = {"table": table, "figure": figure}
    return out


def _seed_level(rows: list[dict], value) -> dict[int, list[float]]:
    return {int(r["seed"]): [value(r)] for r in rows}


def _interval_row(rows: list[dict], base: list[dict], value) -> dict:
    """Mean, 95% interval over seeds, and the paired difference from ``base`` (same seeds), of a per-trial value."""
    entry = bootstrap_interval(_seed_level(rows, value)).as_dict()
    if [id(r) for r in rows] != [id(r) for r in base]:  # not the baseline itself
        entry["vs_baseline"] = vs_baseline(_seed_level(rows, value), _seed_level(base, value))
    return entry


def experiment_h(pseudo: list[dict], img: Path) -> dict:
    """h: pseudo-label self-training: does an entropy term on the pseudo-labelled examples stop the model from
    amplifying its own confident mistakes?"""
    for row in pseudo:
        row["rounds"] = row["summary"]["rounds"]
    base = select(pseudo, 0.0)
    last = {"accuracy": lambda r: r["rounds"][-1]["accuracy"],
            "confident_wrong_share": lambda r: r["rounds"][-1]["confident_wrong_share"],
            "coverage": lambda r: r["rounds"][-1]["coverage"], "ece": lambda r: r["rounds"][-1]["ece"],
            "slice_accuracy": lambda r: r["rounds"][-1]["slice_accuracy"],
            "entropy": lambda r: r["rounds"][-1]["entropy"]}
    table = {f"β = {b}": {"seeds": sorted(int(r["seed"]) for r in select(pseudo, b)),
                          **{k: _interval_row(select(pseudo, b), base, f) for k, f in last.items()}}
             for b in PSEUDO_BETAS if select(pseudo, b)}
    start = {k: bootstrap_interval(_seed_level(base, lambda r, k=k: r["rounds"][0][k])).as_dict()
             for k in ("accuracy", "slice_accuracy", "ece", "confident_wrong", "entropy")}
    keys = [("confident_wrong_share", "confident-and-wrong share of the pool"), ("coverage", "pool coverage"),
            ("accuracy", "held-out accuracy (greedy)"), ("ece", "held-out ECE")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (key, label) in zip(axes, keys):
        for b in PSEUDO_BETAS:
            rows = select(pseudo, b)
            if not rows:
                continue
            rounds = [[r["rounds"][i].get(key) for r in rows] for i in range(len(rows[0]["rounds"]))]
            xs = [i for i, col in enumerate(rounds) if all(isinstance(v, (int, float)) for v in col)]
            mean = [sum(rounds[i]) / len(rounds[i]) for i in xs]
            line, = ax.plot(xs, mean, marker="o", label=f"β = {b}")
            ax.fill_between(xs, [min(rounds[i]) for i in xs], [max(rounds[i]) for i in xs], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("pseudo-label self-training, entropy term on the pseudo-labelled examples (mean and range over 3 seeds)")
    return {"table": table, "warm_start": start, "figure": _save(fig, img / "pseudo_label.png")}


def experiment_i(sft: list[dict], img: Path) -> dict:
    """i: the confidence penalty in plain SFT: held-out accuracy, NLL, calibration and entropy."""
    from transformers import AutoModelForCausalLM

    from llm_entreg.pseudo_label import held_out
    from llm_entreg.tasks import build_default

    defaults = {seed: build_default(seed=seed, task="add") for seed in sorted({int(r["seed"]) for r in sft})}
    for row in sft:
        default = defaults[int(row["seed"])]
        model = AutoModelForCausalLM.from_pretrained(Path(row["dir"]) / "final")
        row["calibration"] = held_out(model, default.tokenizer, default.problems("test")[:512], 0.9)
    base = select(sft, 0.0)
    table = {}
    for b in (0.0, 0.1, 0.3):
        rows = select(sft, b)
        if rows:
            table[f"β = {b}"] = {"seeds": sorted(int(r["seed"]) for r in rows),
                                 **{k: _interval_row(rows, base, lambda r, k=k: r["calibration"][k])
                                    for k in ("accuracy", "ece", "mean_confidence", "entropy")},
                                 "nll": _interval_row(rows, base, lambda r: r["val_nll"])}
    figure = plot_intervals(table, ("accuracy", "nll", "ece", "entropy"), img / "sft_confidence.png",
                            "SFT with a confidence penalty")
    return {"table": table, "figure": figure}


def _entropy_at(model, tokenizer, problems, temperature, seed) -> float:
    from llm_entreg.tasks import evaluate

    return evaluate(model, tokenizer, problems, temperature=temperature, num_samples=16, greedy=False,
                    max_new_tokens=4, seed=seed, num_threads=1)["entropy"]


def matching_temperature(model, tokenizer, problems, target: float, seed: int) -> float:
    """The decode temperature at which ``model``'s sampled entropy equals ``target`` (bisection on [1, 4])."""
    lo, hi = 1.0, 4.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _entropy_at(model, tokenizer, problems, mid, seed) < target else (lo, mid)
    return (lo + hi) / 2


def experiment_e(grid: list[dict], img: Path) -> dict:
    """e: the β = 0 model decoded at the temperature that matches the β = 0.1 model's entropy at T = 1."""
    from transformers import AutoModelForCausalLM

    from llm_entreg.tasks import build_default, evaluate

    runs = {"β = 0, T = 1": [], "β = 0, T = T*": [], "β = 0.1, T = 1": []}
    temperatures = {}
    for plain, reg in zip(sorted(select(grid, 0.0), key=lambda r: r["seed"]),
                          sorted(select(grid, 0.1), key=lambda r: r["seed"])):
        seed = int(plain["seed"])
        default = build_default(seed=seed, task="between")
        problems = default.problems("test")[:256]
        model = AutoModelForCausalLM.from_pretrained(Path(plain["dir"]) / "final")
        t_star = matching_temperature(model, default.tokenizer, problems[:64], reg["val_entropy"], seed)
        temperatures[seed] = t_star
        hot = evaluate(model, default.tokenizer, problems, temperature=t_star, num_samples=32, greedy=False,
                       max_new_tokens=4, seed=seed, num_threads=1)
        runs["β = 0, T = 1"].append(plain)
        runs["β = 0.1, T = 1"].append(reg)
        runs["β = 0, T = T*"].append({"seed": seed, "val_entropy": hot["entropy"],
                                       "val_distinct_correct": hot["distinct_correct"],
                                       "entropy_by_position": hot["entropy_by_position"],
                                       "per_prompt": {**hot["per_prompt"], "num_samples": 32}})
    table = {name: summarize(rows, runs["β = 0, T = 1"]) for name, rows in runs.items()}
    for name, rows in runs.items():
        positions = [r["entropy_by_position"] for r in rows]
        table[name]["entropy_by_position"] = [sum(p[t] for p in positions) / len(positions) for t in range(3)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ks = [1, 2, 4, 8, 16, 32]
    from llm_entreg.utils import pass_at_k

    for name, rows in runs.items():
        curve = [sum(sum(pass_at_k(32, c, k) for c in r["per_prompt"]["correct"]) / len(r["per_prompt"]["correct"])
                     for r in rows) / len(rows) for k in ks]
        axes[0].plot(ks, curve, marker="o", label=name)
        axes[1].plot([1, 2, 3], table[name]["entropy_by_position"], marker="o", label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("k")
    axes[0].set_title("held-out pass@k (mean over 3 seeds)")
    axes[1].set_xticks([1, 2, 3])
    axes[1].set_xticklabels(["1st digit", "2nd digit / <eos>", "3rd token"])
    axes[1].set_title("entropy by decode position (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return {"table": table, "temperatures": temperatures, "figure": _save(fig, img / "temperature.png")}


def _cell(entry: dict | None, digits: int = 3) -> str:
    if not isinstance(entry, dict) or "mean" not in entry:
        return ""
    lo, hi = entry["ci95"]
    text = f"{entry['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    diff = entry.get("vs_baseline")
    if diff:
        mark = " **" if diff["beyond_noise"] else ""
        text += f"<br>Δ {diff['mean']:+.{digits}f} [{diff['ci95'][0]:+.{digits}f}, {diff['ci95'][1]:+.{digits}f}]{mark}"
    return text


def markdown_tables(results: dict) -> str:
    """Every experiment's table in markdown: mean [95% interval] over 3 seeds x held-out prompts, and the paired
    difference from the baseline row (** beyond noise: the interval excludes 0)."""
    columns = ("pass@1", "pass@16", "reward", "distinct_correct", "entropy", "kl_to_reference", "accuracy",
               "slice_accuracy", "confident_wrong_share", "coverage", "ece", "mean_confidence", "nll")
    out = []
    tables = [(key, (results.get(key) or {}).get("table")) for key in ("ab", "c", "d", "e", "f", "h", "i")]
    tables += [(f"g ({name})", part["table"]) for name, part in (results.get("g") or {}).items()]
    for key, table in tables:
        if not table:
            continue
        used = [c for c in columns if any(isinstance(row.get(c), dict) for row in table.values())]
        out.append(f"### {key}\n\n| configuration | " + " | ".join(used) + " |")
        out.append("|---" * (len(used) + 1) + "|")
        for name, row in table.items():
            out.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in used) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b,c,d,e,f,g,h,i", help="experiments to run, e.g. e,f")
    parser.add_argument("--out", default=str(ROOT / "runs" / "experiments"), help="sweep directories")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    t0 = time.time()
    rows = run_sweeps(sorted({s for e in wanted for s in NEEDS[e]}, key=list(SWEEPS).index), Path(args.out),
                      args.workers)
    img, data = ROOT / "docs" / "img" / "experiments", ROOT / "docs" / "data" / "experiments"
    results_path = data / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "a" in wanted or "b" in wanted:
        results["ab"] = experiment_ab(rows["grid"], img)
    if "c" in wanted:
        results["c"] = experiment_c(rows["grid"], rows["schedules"], img)
    if "d" in wanted:
        results["d"] = experiment_d(rows["grid"], rows["sequence"], rows["reward"], img)
    if "e" in wanted:
        results["e"] = experiment_e(rows["grid"], img)
    if "f" in wanted:
        results["f"] = experiment_f(rows["grid"], rows["kl"], img)
    if "g" in wanted:
        results["g"] = experiment_g(rows, img)
    if "h" in wanted:
        results["h"] = experiment_h(rows["pseudo"], img)
    if "i" in wanted:
        results["i"] = experiment_i(rows["sft_conf"], img)
    results["seconds"] = round(time.time() - t0)
    results["last_run"] = ",".join(wanted)
    data.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    (data / "tables.md").write_text(markdown_tables(results))
    print(f"done in {results['seconds']} s -> {results_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
