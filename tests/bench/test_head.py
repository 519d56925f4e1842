"""llm_entreg.bench.head (scripts/bench_head.py, ``llm-entreg bench``): the --quick run writes its JSON + markdown,
every implementation passes its correctness guard, times and memory figures are real numbers; a broken implementation
is never timed; each run of an implementation happens inside its tuning context."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llm_entreg.bench import head
from llm_entreg.bench.impls import Impl


def _run(argv, log=lambda s: None):
    return head.run_bench(head.build_parser().parse_args(argv), argv, log=log)


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
    assert on_disk["meta"]["command"].startswith("python scripts/bench_head.py --quick")
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
    real = head.resolve_impl

    def resolve(spec, device, token_chunk=None, vocab_chunk=None):
        impl, reason = real(spec, device, token_chunk, vocab_chunk)
        if spec == "ours_chunked":
            good = impl.fn
            impl.fn = lambda h, w, t: (lambda lp, ent: (lp, ent + 0.01))(*good(h, w, t))
        return impl, reason

    monkeypatch.setattr(head, "resolve_impl", resolve)
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


def test_fused_loss_impl_and_full_size_sampled_check(tmp_path, monkeypatch):
    """The loss-fused implementation passes both guards (its gradients are checked: its loss_fn is the benchmark's
    loss); the full-size sampled check catches an implementation that is right on the first tokens only."""
    real = head.resolve_impl

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

    monkeypatch.setattr(head, "resolve_impl", resolve)
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
    ref = head.sampled_reference((hidden, weight, targets, g1, g2), rows, cols, chunk=16)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)  # float64 throughout
    lp, ent = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    ((g1 * lp).sum() + (g2 * ent).sum()).backward()
    torch.testing.assert_close(ref["logprobs"], lp[rows].detach())
    torch.testing.assert_close(ref["entropy"], ent[rows].detach())
    torch.testing.assert_close(ref["grad_hidden"], hidden.grad[rows])
    torch.testing.assert_close(ref["grad_weight"], weight.grad[cols])


def test_every_run_of_an_impl_is_inside_its_tuning_context():
    """Forward, backward, the guard and the full-size check all run with the implementation's settings in force."""
    state = {"inside": False, "entries": 0}

    @contextmanager
    def tuning():
        state["inside"], state["entries"] = True, state["entries"] + 1
        try:
            yield
        finally:
            state["inside"] = False

    class Checked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            assert state["inside"], "forward outside the tuning context"
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            assert state["inside"], "backward outside the tuning context"
            return g

    from llm_entreg.bench.impls import naive_logprob_entropy

    impl = Impl("checked", lambda h, w, t: naive_logprob_entropy(Checked.apply(h), w, t), tuning=tuning)
    inputs = head.make_inputs(16, 8, 29, torch.float32, torch.device("cpu"), seed=0)
    head.run_fwd(impl, inputs)
    head.run_fwdbwd(impl, inputs)
    assert inputs[0].grad is not None and not state["inside"]
    assert head.check_slice(impl, inputs, 8, torch.float32)["passed"]
    rows, cols = torch.tensor([1, 5]), torch.tensor([int(inputs[2][1]), 3])
    ref = head.sampled_reference(inputs, rows, cols)
    assert head.check_sampled(impl, inputs, ref, rows, cols, torch.float32)["passed"]
    assert state["entries"] == 5 and not state["inside"]


def test_render_recomputes_ratios_and_rewrites_the_markdown(tmp_path, capsys):
    report = _run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--impls", "naive,ours_chunked",
                   "--memory", "off", "--repeats", "1", "--warmup", "0"])
    path = Path(report["files"]["json"])
    saved = json.loads(path.read_text())
    saved["ratios"] = {}
    path.write_text(json.dumps(saved))
    Path(report["files"]["markdown"]).unlink()
    assert head.main(["--render", str(path)]) == 0
    again = json.loads(path.read_text())
    assert set(again["ratios"]) == {"naive", "ours_chunked"}
    assert again["ratios"]["naive"]["fwdbwd_time_vs_naive"] == pytest.approx(1.0)
    md = path.with_suffix(".md").read_text()
    assert "| ours_chunked | ok " in md and md in capsys.readouterr().out


def test_finalize_args_fills_quick_and_full_sizes():
    quick = head.finalize_args(head.build_parser().parse_args(["--quick"]))
    assert (quick.n, quick.d, quick.vocab, quick.memory, quick.threads) == (128, 64, 3001, "fwdbwd", 1)
    full = head.finalize_args(head.build_parser().parse_args(["--n", "7"]))
    assert (full.n, full.d, full.vocab, full.repeats, full.memory) == (7, 512, 151936, 5, "both")
    with pytest.raises(SystemExit):
        head.finalize_args(head.build_parser().parse_args(["--quick", "--warmup", "-1"]))
