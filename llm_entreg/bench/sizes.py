"""Time vs N per implementation, for several vocabularies, in ONE process: a table and a log-log plot.

Each (V, N) point is one :func:`llm_entreg.bench.head.run_bench` run (correctness guard, timings, optional memory),
so the ratios at a point come from one run. The plot has one panel per V; dashed lines are the floors ``8NdV`` and
``6NdV`` at the matmul rate measured in the run (the largest N's rate of that V).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .head import DTYPES, build_parser as head_parser, run_bench
from .report import device_info, fmt, median_of, mem_of, mib, versions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_sizes.py", description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="2048,4096,8192,16384,32768,65536", help="token counts N (comma list)")
    p.add_argument("--vocabs", default="128256,151936,262144", help="vocabulary sizes V (comma list)")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", default="trl_chunked,ours_triton,ours_fused_loss,liger")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", choices=("both", "fwdbwd", "off"), default="fwdbwd")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench_out/sizes")
    p.add_argument("--check-tokens", type=int, default=16)
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_sizes(args: argparse.Namespace, log=print) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for vocab in _ints(args.vocabs):
        for n in _ints(args.ns):
            argv = ["--n", str(n), "--d", str(args.d), "--vocab", str(vocab), "--dtype", args.dtype,
                    "--impls", args.impls, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                    "--memory", args.memory, "--out", str(out), "--check-tokens", str(args.check_tokens),
                    "--tag", "sizes"]
            if args.device:
                argv += ["--device", args.device]
            rep = run_bench(head_parser().parse_args(argv), argv, log=lambda s: None)
            point = {"n": n, "vocab": vocab, "matmul_tflops": rep["matmul_reference"]["flops_per_s"] / 1e12,
                     "impls": {}}
            for spec, res in rep["results"].items():
                point["impls"][spec] = {
                    "status": res.get("status"),
                    "fwd_ms": None if median_of(res, "fwd") is None else 1e3 * median_of(res, "fwd"),
                    "fwdbwd_ms": None if median_of(res, "fwdbwd") is None else 1e3 * median_of(res, "fwdbwd"),
                    "fwdbwd_peak_extra_excl_grads_mib": mib(mem_of(res, "fwdbwd", "peak_extra_excl_grads_bytes")),
                    "fraction_of_mm": (res.get("fwdbwd") or {}).get("fraction_of_mm"),
                    "reason": res.get("reason") or (res.get("fwdbwd") or {}).get("error"),
                }
            points.append(point)
            _write(args, points, out, final=False)  # a run cut short keeps every finished point
            log(f"V={vocab} N={n}: " + ", ".join(
                f"{s} {fmt(v['fwdbwd_ms'], ',.1f')} ms" for s, v in point["impls"].items()))
    return _write(args, points, out, final=True)


def _write(args: argparse.Namespace, points: list, out: Path, final: bool) -> dict:
    """``sizes.json`` and ``sizes.md`` (after every point), and the plot (at the end)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"config": {k: v for k, v in vars(args).items()}, "device": device_info(device),
              "meta": versions(), "points": points, "complete": final}
    (out / "sizes.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sizes.md").write_text(render(report))
    if final:
        plot(report, out / "sizes.png")
    return report


def render(report: dict) -> str:
    cfg = report["config"]
    impls = list(dict.fromkeys(s for p in report["points"] for s in p["impls"]))
    lines = [f"### Time vs N, d={cfg['d']}, {cfg['dtype']} — {report['device']['name']}", "",
             f"fwd+bwd median ms (of {cfg['repeats']}); in brackets: fraction of the matmul rate measured at that "
             "point; `-`: skipped or failed (see sizes.json)", "",
             "| V | N | matmul TFLOP/s | " + " | ".join(impls) + " |",
             "|---|---|---|" + "---|" * len(impls)]
    for p in report["points"]:
        cells = []
        for s in impls:
            r = p["impls"].get(s, {})
            if r.get("fwdbwd_ms") is None:
                cells.append("-")
            else:
                frac = r.get("fraction_of_mm")
                cells.append(f"{r['fwdbwd_ms']:,.1f}" + ("" if frac is None else f" ({100 * frac:.0f}%)"))
        lines.append(f"| {p['vocab']} | {p['n']} | {p['matmul_tflops']:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({p["vocab"] for p in report["points"]})
    impls = list(dict.fromkeys(s for p in report["points"] for s in p["impls"]))
    d = report["config"]["d"]
    fig, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4), squeeze=False)
    for ax, vocab in zip(axes[0], vocabs):
        pts = sorted((p for p in report["points"] if p["vocab"] == vocab), key=lambda p: p["n"])
        for s in impls:
            xy = [(p["n"], p["impls"][s]["fwdbwd_ms"]) for p in pts if p["impls"].get(s, {}).get("fwdbwd_ms")]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=s)
        rate = pts[-1]["matmul_tflops"] * 1e12
        ns = [p["n"] for p in pts]
        for factor, style in ((8, "--"), (6, ":")):
            ax.plot(ns, [1e3 * factor * n * d * vocab / rate for n in ns], "k" + style, lw=0.8,
                    label=f"{factor}NdV at {rate / 1e12:.0f} TFLOP/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"V = {vocab}")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fused LM head log-prob + entropy, d = {d}, {report['config']['dtype']}, {report['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    report = run_sizes(args)
    print(render(report))
    return 0
