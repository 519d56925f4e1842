"""What the benchmarks write: system info, peak-RSS readers, ratios, the markdown tables and the .json/.md files.

Shared by the kernel benchmark (:mod:`llm_entreg.bench.head`, :mod:`llm_entreg.bench.sizes`) and the step benchmark
(:mod:`llm_entreg.bench.step`); how to read the tables: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

STAMP = "%Y-%m-%dT%H:%M:%SZ"


# ----------------------------------------------------------------------------------------------------------------------
# Process memory (Linux /proc) and the machine
# ----------------------------------------------------------------------------------------------------------------------
def proc_status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM`` ...); None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(modules=("trl", "transformers", "triton", "liger_kernel")) -> dict:
    """Python and torch versions, and those of ``modules`` (None: not importable)."""
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in modules:
        try:
            v[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001
            v[mod] = None
    return v


def device_info(device: torch.device) -> dict:
    """The kernel benchmark's device block: CPU model and threads; GPU name, memory, CUDA and TF32 setting."""
    info = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        info["name"] = f"{info['cpu_model']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    return info


def step_device_info(device: torch.device) -> dict:
    """The step benchmark's device block."""
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda)
    else:
        info["name"] = f"{platform.processor() or platform.machine()} CPU ({info['cpu_count']} cores, " \
                       f"{info['torch_threads']} torch threads)"
    return info


def subprocess_env() -> dict:
    """This environment with the checkout that holds :mod:`llm_entreg` first on ``PYTHONPATH``, for a benchmark's
    fresh-interpreter measurements."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def write_files(report: dict, markdown: str) -> None:
    """``report`` as JSON and ``markdown`` to the paths in ``report["files"]``."""
    Path(report["files"]["json"]).write_text(json.dumps(report, indent=2) + "\n")
    Path(report["files"]["markdown"]).write_text(markdown)


# ----------------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------------
def mib(b):
    return None if b is None else b / 2**20


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_time(s: dict | None) -> str:
    """``median (min–max)`` in ms of a timing summary; ``error`` / ``-``."""
    if not s:
        return "-"
    if "error" in s:
        return "error"
    return f"{s['median_s'] * 1e3:,.1f} ({s['min_s'] * 1e3:,.1f}–{s['max_s'] * 1e3:,.1f})"


def fmt_load(load) -> str:
    return "n/a" if not load else ", ".join(f"{x:.2f}" for x in load)


# ----------------------------------------------------------------------------------------------------------------------
# Kernel benchmark (head)
# ----------------------------------------------------------------------------------------------------------------------
def median_of(res: dict, mode: str, key: str = "median_s"):
    """A timing figure of one implementation's result (``mode`` fwd or fwdbwd); None when not measured."""
    return res.get(mode, {}).get(key) if isinstance(res.get(mode), dict) else None


def mem_of(res: dict, mode: str, key: str = "peak_extra_bytes"):
    """A memory figure of one implementation's result; None unless measured without error."""
    mem = res.get("memory", {}).get(mode, {})
    return mem.get(key) if mem.get("status") == "ok" else None


def _div(a, b):
    return None if a is None or b in (None, 0) else a / b


def head_ratios(results: dict) -> dict:
    """Time ratios vs ``trl_chunked`` and memory ratios vs ``naive``, all from this run."""
    trl = results.get("trl_chunked", {})
    naive = results.get("naive", {})
    out = {}
    for spec, res in results.items():
        if res.get("status") != "ok":
            continue
        out[spec] = {
            "fwd_time_vs_trl_chunked": _div(median_of(res, "fwd"), median_of(trl, "fwd")),
            "fwdbwd_time_vs_trl_chunked": _div(median_of(res, "fwdbwd"), median_of(trl, "fwdbwd")),
            # On a shared machine the fastest repeat and the process CPU time are less disturbed by other jobs.
            "fwd_min_time_vs_trl_chunked": _div(median_of(res, "fwd", "min_s"), median_of(trl, "fwd", "min_s")),
            "fwdbwd_min_time_vs_trl_chunked": _div(median_of(res, "fwdbwd", "min_s"),
                                                   median_of(trl, "fwdbwd", "min_s")),
            "fwdbwd_cpu_time_vs_trl_chunked": _div(
                median_of(res, "fwdbwd", "cpu_median_s"), median_of(trl, "fwdbwd", "cpu_median_s")
            ),
            "fwd_time_vs_naive": _div(median_of(res, "fwd"), median_of(naive, "fwd")),
            "fwdbwd_time_vs_naive": _div(median_of(res, "fwdbwd"), median_of(naive, "fwdbwd")),
            "fwd_mem_vs_naive": _div(mem_of(res, "fwd"), mem_of(naive, "fwd")),
            "fwdbwd_mem_vs_naive": _div(mem_of(res, "fwdbwd"), mem_of(naive, "fwdbwd")),
            "fwdbwd_mem_excl_grads_vs_naive": _div(
                mem_of(res, "fwdbwd", "peak_extra_excl_grads_bytes"),
                mem_of(naive, "fwdbwd", "peak_extra_excl_grads_bytes"),
            ),
        }
    return out


def render_head_markdown(report: dict) -> str:
    """The kernel benchmark's markdown: header, results table, ratios, full-size check, notes."""
    cfg, dev, mm = report["config"], report["device"], report["matmul_reference"]
    lines = [
        f"### N={cfg['n']}, d={cfg['d']}, V={cfg['vocab']}, {cfg['dtype']} — {dev['name']}",
        "",
        f"- command: `{report['meta']['command']}`",
        f"- date (UTC): {report['meta']['date_utc']}; torch {report['meta']['torch']}, trl {report['meta']['trl']}; "
        f"median of {cfg['repeats']} timed runs after {cfg['warmup']} warmup ({cfg['order']} order); "
        f"load average at start/end: {fmt_load(report['meta'].get('loadavg_start'))} / "
        f"{fmt_load(report['meta'].get('loadavg_end'))}",
        f"- matmul reference `[{mm['shape'][0]}, {mm['shape'][1]}] @ [{mm['shape'][1]}, {mm['shape'][2]}]` "
        f"{cfg['dtype']}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s",
        "",
    ]
    lines += _head_results_table(report["results"])
    lines += _head_ratios_table(report["ratios"])
    lines += _head_sampled_table(report["results"])
    lines += ["", "Notes: " + "; ".join(f"`{s}`: {r['note']}" for s, r in report["results"].items() if r.get("note")),
              f"FLOPs: {cfg['flops']}. Loss: {cfg['loss']}. Peak extra memory: "
              + ("allocator peak minus the baseline after the inputs exist" if dev["device"].startswith("cuda")
                 else "peak RSS (VmHWM, reset via clear_refs) minus RSS right before the call, one fresh subprocess "
                      "per implementation and mode")
              + "; 'excl. grads' subtracts the bytes of hidden.grad and weight.grad.", ""]
    return "\n".join(lines)


def _head_check_cell(chk: dict) -> str:
    grad = [chk.get("grad_rel_err_hidden"), chk.get("grad_rel_err_weight")]
    grad_s = "n/a" if grad[0] is None else f"{max(grad):.1e}"
    check = (f"{'ok' if chk.get('passed') else 'FAILED'} {fmt(chk.get('max_abs_diff_logprobs'), '.1e')} / "
             f"{fmt(chk.get('max_abs_diff_entropy'), '.1e', 'n/a')} / {grad_s}")
    if "error" in chk:
        check += f" ({chk['error'][:80]})"
    return check


def _head_results_table(results: dict) -> list[str]:
    lines = [
        "| impl | check max\\|Δlogp\\| / max\\|ΔH\\| / grad rel err | fwd ms median (min–max) "
        "| fwd+bwd ms median (min–max) | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd+bwd excl. grads MiB "
        "| fwd+bwd TFLOP/s | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, res in results.items():
        if res.get("status") == "skipped":
            lines.append(f"| {spec} | skipped: {res['reason']} | | | | | | | |")
            continue
        fb = res.get("fwdbwd", {})
        frac = None if fb.get("fraction_of_mm") is None else 100 * fb["fraction_of_mm"]
        lines.append(
            f"| {spec} | {_head_check_cell(res.get('check', {}))} | {fmt_time(res.get('fwd'))} "
            f"| {fmt_time(res.get('fwdbwd'))} "
            f"| {fmt(mib(mem_of(res, 'fwd')), ',.1f')} | {fmt(mib(mem_of(res, 'fwdbwd')), ',.1f')} "
            f"| {fmt(mib(mem_of(res, 'fwdbwd', 'peak_extra_excl_grads_bytes')), ',.1f')} "
            f"| {fmt(fb.get('tflops'), '.3f')} | {fmt(frac, '.0f')} |"
        )
    return lines


def _head_ratios_table(ratios: dict) -> list[str]:
    lines = ["", "Ratios (same run; time vs `trl_chunked` — of medians unless marked min (fastest repeat) or CPU "
             "(median process CPU time, all threads) — memory vs `naive`):", "",
             "| impl | fwd time / trl | fwd+bwd time / trl | fwd+bwd min time / trl | fwd+bwd CPU time / trl "
             "| fwd+bwd time / naive | fwd mem / naive | fwd+bwd mem / naive | fwd+bwd mem excl. grads / naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in ratios.items():
        lines.append(
            f"| {spec} | {fmt(r['fwd_time_vs_trl_chunked'], '.3f')} | {fmt(r['fwdbwd_time_vs_trl_chunked'], '.3f')} "
            f"| {fmt(r.get('fwdbwd_min_time_vs_trl_chunked'), '.3f')} "
            f"| {fmt(r.get('fwdbwd_cpu_time_vs_trl_chunked'), '.3f')} "
            f"| {fmt(r['fwdbwd_time_vs_naive'], '.3f')} | {fmt(r['fwd_mem_vs_naive'], '.3f')} "
            f"| {fmt(r['fwdbwd_mem_vs_naive'], '.3f')} | {fmt(r['fwdbwd_mem_excl_grads_vs_naive'], '.3f')} |"
        )
    return lines


def _head_sampled_table(results: dict) -> list[str]:
    sampled = {s: r["check_sampled"] for s, r in results.items() if "check_sampled" in r}
    if not sampled:
        return []
    k_s = next(iter(sampled.values())).get("token_rows", "?")
    lines = ["", f"Full-size check against float64 on {k_s} sampled token rows (log-prob, entropy, grad_hidden "
             f"rows) and {k_s} sampled vocabulary rows (grad_weight rows):", "",
             "| impl | max\\|Δlogp\\| | max\\|ΔH\\| | grad_hidden rel err | grad_weight rel err | |",
             "|---|---|---|---|---|---|"]
    for spec, c in sampled.items():
        lines.append(f"| {spec} | {fmt(c.get('max_abs_diff_logprobs'), '.1e')} "
                     f"| {fmt(c.get('max_abs_diff_entropy'), '.1e', 'n/a')} "
                     f"| {fmt(c.get('grad_rel_err_hidden'), '.1e', 'n/a')} "
                     f"| {fmt(c.get('grad_rel_err_weight'), '.1e', 'n/a')} "
                     f"| {'ok' if c.get('passed') else 'FAILED ' + c.get('error', '')[:60]} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Step benchmark
# ----------------------------------------------------------------------------------------------------------------------
def _sfmt(x, spec: str = ".3f", none: str = "—") -> str:
    return fmt(x, spec, none)


def step_comparisons(results: dict) -> dict:
    """Per configuration: time and memory vs TRL's fused head of the same algorithm; first-loss agreement of each
    of ours with each TRL configuration at the same β (TRL's DPO has none: β=0)."""
    return {"ratios": {name: _step_ratio(r, results.get(f"{r['algo']}_trl")) for name, r in results.items()},
            "first_loss_agreement": _step_agreement(results)}


def _step_ratio(r: dict, ref: dict | None) -> dict:
    row = {}
    if ref and ref.get("status") == "ok" and r.get("status") == "ok":
        for key in ("step_s", "loss_step_s", "gen_score_s"):
            if r.get(key) is not None and ref.get(key):
                row[f"{key}_vs_trl"] = r[key] / ref[key]
        for key in ("peak_mem_bytes", "steady_peak_mem_bytes", "peak_mem_above_baseline_bytes"):
            if r.get(key) is not None and ref.get(key):
                row[f"{key.replace('_bytes', '')}_vs_trl"] = r[key] / ref[key]
    return row


def _step_agreement(results: dict) -> list[dict]:
    agreement = []
    for name, r in results.items():
        if r.get("impl") != "ours" or r.get("status") != "ok":
            continue
        for other, o in results.items():
            if o.get("impl") == "ours" or o.get("algo") != r["algo"] or o.get("status") != "ok":
                continue
            if o.get("entropy_coef") != r.get("entropy_coef"):
                continue
            a, b = r["first_loss"], o["first_loss"]
            # every step's loss: after the first optimizer step they also depend on the gradients
            steps = [abs(x - y) for x, y in zip(r["losses"], o["losses"]) if x is not None and y is not None]
            metrics = {k: {"ours": r["first_log"][k], "trl": o["first_log"][k],
                           "abs_diff": abs(r["first_log"][k] - o["first_log"][k])}
                       for k in sorted(set(r["first_log"]) & set(o["first_log"])) if k != "loss"}
            agreement.append({
                "ours": name, "trl": other, "entropy_coef": r["entropy_coef"], "ours_loss": a, "trl_loss": b,
                "abs_diff": abs(a - b), "rel_diff": abs(a - b) / max(abs(b), 1e-12),
                "ours_losses": r["losses"], "trl_losses": o["losses"],
                "max_abs_diff_all_steps": max(steps) if steps else None, "first_step_metrics": metrics,
            })
    return agreement


def render_step_markdown(report: dict) -> str:
    """The step benchmark's markdown: header, one row per configuration, loss agreement, notes."""
    cfg, dev = report["config"], report["device"]
    shape = cfg["model"]
    cuda = dev["device"].startswith("cuda")
    mem_label = "peak alloc MiB" if cuda else "peak RSS MiB"
    lines = [
        f"### End-to-end step: Qwen2-architecture {cfg['shape']} (V={shape['vocab_size']}, d={shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers), {cfg['dtype']} — {dev['name']}",
        "",
        f"- command: `{report['meta']['command']}`",
        f"- date (UTC): {report['meta']['date_utc']}; torch {report['meta']['torch']}, trl {report['meta']['trl']}, "
        f"transformers {report['meta']['transformers']}",
        f"- batch {cfg['batch']} (DPO: pairs; GRPO: completions, {cfg['num_generations']} per prompt), prompt "
        f"{cfg['prompt_len']} + completion {cfg['completion_len']} tokens; median of {cfg['steps']} timed optimizer "
        f"steps after {cfg['warmup']} warm-up; gradient checkpointing "
        f"{'on' if cfg['gradient_checkpointing'] else 'off'}; "
        f"our backend `{cfg['backend']}`; GRPO num_iterations {cfg['grpo_iterations'] or cfg['steps']}; "
        f"isolation {cfg['isolation']}",
        *([] if report["meta"].get("complete", True) else
          [f"- **partial**: {len(report['results'])} of {len(cfg['configs'])} configurations so far"]),
        "",
        f"| config | head | β | status | step s | GRPO gen+score s | GRPO loss step s | time / trl | {mem_label} "
        f"| steady {mem_label} | mem / trl | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = report["comparisons"]["ratios"]
    lines += [_step_row(name, r, ratios.get(name, {})) for name, r in report["results"].items()]
    lines += _step_agreement_table(report["comparisons"]["first_loss_agreement"])
    lines += [
        "",
        "Notes: step time = wall-clock between the ends of consecutive optimizer steps (synchronised). GRPO: "
        "gen+score = `_generate_and_score_completions` (generation, rewards, no-grad log-prob passes); loss step = "
        "the rest (forward + backward + optimizer); step = gen+score + loss step. "
        + ("Memory: `torch.cuda.max_memory_allocated`, reset per configuration (peak: from model build on; steady: "
           "timed steps only)." if cuda else
           "Memory: process peak RSS (VmHWM reset per configuration)"
           + ("; in-process, so indicative (later configurations reuse freed memory)."
              if cfg["isolation"] == "inprocess" else ", one fresh process per configuration.")),
        "",
    ]
    return "\n".join(lines)


def _step_row(name: str, r: dict, ra: dict) -> str:
    error = " ".join(str(r.get("error", "")).replace("|", "/").split())[:120]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {error}"
    loss_ratio = "" if ra.get("loss_step_s_vs_trl") is None else f" (loss step {ra['loss_step_s_vs_trl']:.2f})"
    return (
        f"| {name} | {r.get('head', '—')} | {_sfmt(r.get('entropy_coef'), 'g')} | {status} "
        f"| {_sfmt(r.get('step_s'))} | {_sfmt(r.get('gen_score_s'))} | {_sfmt(r.get('loss_step_s'))} "
        f"| {_sfmt(ra.get('step_s_vs_trl'), '.2f')}{loss_ratio} | {_sfmt(mib(r.get('peak_mem_bytes')), ',.0f')} "
        f"| {_sfmt(mib(r.get('steady_peak_mem_bytes')), ',.0f')} | {_sfmt(ra.get('peak_mem_vs_trl'), '.2f')} "
        f"| {_sfmt(r.get('first_loss'), '.6g')} |"
    )


def _step_agreement_table(agreement: list[dict]) -> list[str]:
    if not agreement:
        return []
    lines = ["", "Loss agreement, ours vs TRL at the same β (same seed, weights and data):", "",
             "| ours | trl | β | ours first loss | trl first loss | abs diff | max abs diff, every step's loss |",
             "|---|---|---|---|---|---|---|"]
    for a in agreement:
        lines.append(f"| {a['ours']} | {a['trl']} | {a['entropy_coef']:g} | {a['ours_loss']:.8g} "
                     f"| {a['trl_loss']:.8g} | {a['abs_diff']:.2e} | {_sfmt(a['max_abs_diff_all_steps'], '.2e')} |")
    return lines


def step_short_table(report: dict) -> str:
    """The few columns the step benchmark prints last."""
    rows = [f"{'config':<22} {'status':<7} {'step s':>9} {'gen s':>8} {'loss s':>8} {'peak MiB':>10} "
            f"{'first loss':>12}"]
    for name, r in report["results"].items():
        rows.append(f"{name:<22} {r['status']:<7} {_sfmt(r.get('step_s'), '.4f'):>9} "
                    f"{_sfmt(r.get('gen_score_s'), '.3f'):>8} {_sfmt(r.get('loss_step_s'), '.4f'):>8} "
                    f"{_sfmt(mib(r.get('peak_mem_bytes')), ',.0f'):>10} {_sfmt(r.get('first_loss'), '.6g'):>12}")
    return "\n".join(rows)
