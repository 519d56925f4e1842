"""scripts/bench_entropy.py / llm_entreg.bench: the --quick run writes its JSON + markdown, every implementation
passes its correctness guard, times and memory figures are real numbers; a broken implementation is never timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_entreg import bench

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, log=lambda s: None):
    return bench.run_bench(bench.build_parser().parse_args(argv), argv, log=log)


@pytest.mark.slow
def test_quick_run_writes_results_and_every_impl_passes(tmp_path):
    # The default set (the skipped ones must say why). A memory subprocess costs a fresh interpreter (TRL's backward
    # alone imports trl.trainer: ~7 s), so the test measures the memory of two of them.
    report = _run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--mem-impls", "naive,ours_chunked",
                   "--mem-jobs", "2"])

    json_path, md_path = Path(report["files"]["json"]), Path(report["files"]["markdown"])
    assert json_path.parent == tmp_path and json_path.is_file() and md_path.is_file()
    on_disk = json.loads(json_path.read_text())
    assert on_disk["config"]["quick"] and on_disk["meta"]["torch"] == torch.__version__
    assert on_disk["meta"]["trl"] and on_disk["device"]["cpu_model"] and on_disk["meta"]["date_utc"]
    md = md_path.read_text()

    results = on_disk["results"]
    ran = ["naive", "trl_chunked", "ours_chunked"]
    assert results["ours_triton"]["status"] == "skipped" and "CUDA" in results["ours_triton"]["reason"]
    if results["liger"]["status"] == "skipped":
        assert results["liger"]["reason"]
    for spec in ran:
        res = results[spec]
        assert res["status"] == "ok", (spec, res)
        assert res["check"]["passed"], (spec, res["check"])
        assert res["check"]["max_abs_diff_logprobs"] < 1e-3 and res["check"]["max_abs_diff_entropy"] < 1e-3
        for mode in ("fwd", "fwdbwd"):
            times = res[mode]["times_s"]
            assert len(times) == on_disk["config"]["repeats"] and all(t > 0 for t in times)
            assert res[mode]["min_s"] <= res[mode]["median_s"] <= res[mode]["max_s"]
            assert res[mode]["tflops"] > 0
        assert f"| {spec} | ok " in md
    for spec in ("naive", "ours_chunked"):
        mem = results[spec]["memory"]["fwdbwd"]
        assert mem["status"] == "ok", (spec, mem)
        assert mem["peak_extra_bytes"] >= 0 and mem["grad_bytes"] == (128 * 64 + 3001 * 64) * 4
    assert results["trl_chunked"]["memory"] == {}
    ratios = on_disk["ratios"]
    assert ratios["trl_chunked"]["fwdbwd_time_vs_trl_chunked"] == pytest.approx(1.0)
    assert ratios["ours_chunked"]["fwdbwd_time_vs_trl_chunked"] > 0
    assert ratios["ours_chunked"]["fwdbwd_mem_vs_naive"] is not None
    assert "Ratios" in md


def test_broken_implementation_fails_the_guard_and_is_not_timed(tmp_path, monkeypatch):
    real = bench.resolve_impl

    def resolve(spec, device, token_chunk=None, vocab_chunk=None):
        impl, reason = real(spec, device, token_chunk, vocab_chunk)
        if spec == "ours_chunked":
            good = impl.fn
            impl.fn = lambda h, w, t: (lambda lp, ent: (lp, ent + 0.01))(*good(h, w, t))
        return impl, reason

    monkeypatch.setattr(bench, "resolve_impl", resolve)
    report = _run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls",
                   "naive,ours_chunked,ours_torch,ours_chunked@32x512", "--memory", "off", "--repeats", "1",
                   "--warmup", "0"])
    bad = report["results"]["ours_chunked"]
    assert bad["status"] == "check_failed" and not bad["check"]["passed"]
    assert bad["check"]["max_abs_diff_entropy"] == pytest.approx(0.01, rel=1e-2)
    assert "fwd" not in bad and "fwdbwd" not in bad
    for spec in ("naive", "ours_torch", "ours_chunked@32x512"):  # the others pass and are timed
        good = report["results"][spec]
        assert good["status"] == "ok" and good["check"]["passed"], (spec, good)
        assert good["fwd"]["median_s"] > 0 and good["fwdbwd"]["median_s"] > 0
    assert "FAILED" in Path(report["files"]["markdown"]).read_text()


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="--impls"):
        bench.resolve_impl("fastest", torch.device("cpu"))


def test_script_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_entropy.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--impls" in proc.stdout


def test_fused_loss_impl_and_full_size_sampled_check(tmp_path):
    """The loss-fused implementation passes both guards (its gradients are checked: its loss_fn is the benchmark's
    loss); the full-size sampled check catches an implementation that is right on the first tokens only."""
    real = bench.resolve_impl

    def resolve(spec, device, token_chunk=None, vocab_chunk=None):
        if spec != "broken_late":
            return real(spec, device, token_chunk, vocab_chunk)
        impl, reason = real("ours_chunked", device, token_chunk, vocab_chunk)
        good = impl.fn

        def late(h, w, t):  # wrong only beyond the first 64 tokens: the small-slice guard cannot see it
            lp, ent = good(h, w, t)
            return lp, ent + (torch.arange(ent.shape[0]) >= 64).float() * 0.5

        impl.fn, impl.name = late, spec
        return impl, reason

    import unittest.mock as mock

    with mock.patch.object(bench, "resolve_impl", resolve), mock.patch.object(bench, "ALL_IMPLS",
                                                                               bench.ALL_IMPLS + ("broken_late",)):
        report = _run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls",
                       "naive,ours_fused_loss,ours_fused_loss@0.5,broken_late", "--memory", "off", "--repeats", "1",
                       "--warmup", "0", "--check-sampled", "24"])
    res = report["results"]
    for spec in ("naive", "ours_fused_loss", "ours_fused_loss@0.5"):
        r = res[spec]
        assert r["status"] == "ok", (spec, r)
        assert r["check"]["grad_rel_err_hidden"] < 1e-4 and r["check"]["grad_rel_err_weight"] < 1e-4
        s = r["check_sampled"]
        assert s["passed"] and s["token_rows"] == 24 and s["vocab_rows"] == 24
        assert s["max_abs_diff_logprobs"] < 1e-4 and s["max_abs_diff_entropy"] < 1e-4
        assert s["grad_rel_err_hidden"] < 1e-4 and s["grad_rel_err_weight"] < 1e-4
        assert r["fwdbwd"]["flop_factor"] == 6
    assert res["ours_fused_loss@0.5"]["note"] == "loss-fused LM head (chunked, chunk budget 0.5 MiB)"
    bad = res["broken_late"]
    assert bad["check"]["passed"] and not bad["check_sampled"]["passed"] and bad["status"] == "check_failed"
    assert "fwdbwd" not in bad
    md = Path(report["files"]["markdown"]).read_text()
    assert "Full-size check against float64 on 24 sampled token rows" in md


def test_sampled_reference_matches_autograd_float64():
    gen = torch.Generator().manual_seed(5)
    n, d, v = 40, 16, 97
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    g1, g2 = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    rows, cols = torch.tensor([0, 7, 39]), torch.tensor([int(targets[7]), 3, 96])
    ref = bench.sampled_reference((hidden, weight, targets, g1, g2), rows, cols, chunk=16)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)  # float64 throughout
    lp, ent = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    ((g1 * lp).sum() + (g2 * ent).sum()).backward()
    torch.testing.assert_close(ref["logprobs"], lp[rows].detach())
    torch.testing.assert_close(ref["entropy"], ent[rows].detach())
    torch.testing.assert_close(ref["grad_hidden"], hidden.grad[rows])
    torch.testing.assert_close(ref["grad_weight"], weight.grad[cols])


def test_triton_spec_is_parsed_then_skipped_on_cpu_with_its_reason():
    for spec in ("ours_triton", "ours_triton@64x64x32w4s2", "ours_triton@64x64x32/128x128x64w4s2+splits1+group2",
                 "ours_triton@+splits1+group1000000+tokenfirst",
                 "ours_triton@+splits4", "ours_triton@+tiles", "ours_triton@+gemm+buf96+acc64"):
        impl, reason = bench.resolve_impl(spec, torch.device("cpu"))
        assert impl is None and "CUDA" in reason, spec
    for bad in ("ours_triton@128x128", "ours_triton@64x64x32/64x64x32/64x64x32", "ours_triton@+split4",
                "ours_triton@+tokenlast",
                "ours_triton@+group0", "ours_triton@+buf0", "ours_triton@+gemmm",
                "ours_triton@64x64x32+gemm", "ours_triton@+gemm+splits2"):
        with pytest.raises(ValueError, match="--impls"):
            bench.resolve_impl(bad, torch.device("cpu"))
