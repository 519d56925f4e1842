"""llm_entreg.bench.step (scripts/bench_step.py): the --tiny CPU run of the end-to-end DPO / GRPO step benchmark.

Every configuration (ours and TRL's, DPO and GRPO) trains for real: a finite loss at every step, positive step
times, a peak-memory figure; the JSON and the markdown hold every configuration; at β=0 our DPO trainer's loss is
TRL's (first step and, with a learning rate large enough to move the weights, every later step too), and our GRPO
bonus gives TRL's own GRPO bonus loss at the same β. A configuration that fails is reported, not raised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llm_entreg.bench import step as bench_step
from llm_entreg.bench.report import step_short_table

CONFIGS = ["dpo_ours", "dpo_ours_b0", "dpo_trl", "dpo_trl_plain", "grpo_ours", "grpo_ours_fused", "grpo_trl"]


def _run(argv):
    args = bench_step.build_parser().parse_args(argv)
    return bench_step.run_step_bench(args, argv, log=lambda s: None)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    # lr 1e-3: the second and third losses depend on the first steps' gradients (TRL's default 1e-6 barely moves)
    return _run(["--tiny", "--device", "cpu", "--out", str(out), "--configs", ",".join(CONFIGS),
                 "--learning-rate", "1e-3"])


def test_every_configuration_trains_and_is_measured(report):
    results = report["results"]
    assert list(results) == CONFIGS
    steps, warmup = report["config"]["steps"], report["config"]["warmup"]
    for name, r in results.items():
        assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
        assert len(r["losses"]) == warmup + steps and all(math.isfinite(x) for x in r["losses"]), (name, r["losses"])
        assert math.isfinite(r["first_loss"]) and r["first_loss"] == r["losses"][0]
        assert len(r["step_times_s"]) == steps and all(t > 0 for t in r["step_times_s"]), name
        assert r["step_s"] > 0 and r["peak_mem_bytes"] > 0
    assert results["dpo_ours"]["head"] == "ours (chunked)" and results["dpo_trl"]["trainer"] == "DPOTrainer"
    assert results["dpo_ours"]["trainer"] == "EntropyDPOTrainer" and results["dpo_ours"]["entropy_coef"] == 0.01
    assert results["dpo_trl_plain"]["head"].startswith("materialising")
    for name in ("grpo_ours", "grpo_ours_fused", "grpo_trl"):
        r = results[name]
        # the warm-up and the last timed step generate (num_iterations = steps); the loss step is the rest
        assert r["gen_score_warm"] and r["gen_score_s"] > 0 and r["loss_step_s"] > 0
        assert r["step_s"] == pytest.approx(r["gen_score_s"] + r["loss_step_s"])
        assert sum(g > 0 for g in r["gen_score_times_s"]) == 1
    # the entropy bonus is in our β > 0 loss: β · H̄ below the β = 0 one (H̄ ≈ log V at a random init)
    bonus = results["dpo_ours_b0"]["first_loss"] - results["dpo_ours"]["first_loss"]
    assert bonus == pytest.approx(0.01 * results["dpo_ours"]["first_log"]["entropy"], rel=1e-4)


def test_beta_zero_dpo_and_same_beta_grpo_match_trl(report):
    results = report["results"]
    ours, theirs = results["dpo_ours_b0"], results["dpo_trl"]
    assert ours["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
    assert abs(ours["losses"][-1] - math.log(2)) > 1e-3  # the later losses really checked the updates
    for key in ("logps/chosen", "logps/rejected", "entropy"):
        assert ours["first_log"][key] == pytest.approx(theirs["first_log"][key], rel=1e-5), key
    assert results["dpo_trl_plain"]["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
    # GRPO: our regularizer at β and TRL's own bonus at β, on the same sampled completions
    assert results["grpo_ours"]["losses"] == pytest.approx(results["grpo_trl"]["losses"], rel=1e-5, abs=1e-6)
    # ... and with the gradient formed in the head's forward (fused_loss=True): the same losses, step after step
    assert results["grpo_ours_fused"]["losses"] == pytest.approx(results["grpo_trl"]["losses"], rel=1e-5, abs=1e-6)
    pairs = {(a["ours"], a["trl"]): a for a in report["comparisons"]["first_loss_agreement"]}
    assert pairs[("dpo_ours_b0", "dpo_trl")]["abs_diff"] < 1e-6
    assert pairs[("grpo_ours", "grpo_trl")]["max_abs_diff_all_steps"] < 1e-5
    assert ("dpo_ours", "dpo_trl") not in pairs  # different β: not comparable


def test_json_and_markdown_hold_every_configuration(report):
    json_path, md_path = Path(report["files"]["json"]), Path(report["files"]["markdown"])
    assert json_path.is_file() and md_path.is_file()
    on_disk = json.loads(json_path.read_text())
    assert list(on_disk["results"]) == CONFIGS
    assert on_disk["config"]["model"]["vocab_size"] == bench_step.TINY["vocab_size"]
    assert on_disk["meta"]["trl"] and on_disk["device"]["device"] == "cpu"
    assert on_disk["comparisons"]["ratios"]["dpo_trl"]["step_s_vs_trl"] == pytest.approx(1.0)
    md = md_path.read_text()
    for name in CONFIGS:
        assert f"| {name} | " in md and name in step_short_table(on_disk)


def test_a_failing_configuration_is_reported_not_raised(tmp_path, monkeypatch):
    real = bench_step._build_trainer

    def broken(cfg, *args, **kwargs):
        if cfg.name == "dpo_trl":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(bench_step, "_build_trainer", broken)
    report = _run(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--configs", "dpo_trl,dpo_ours_b0",
                   "--steps", "1"])
    assert report["results"]["dpo_trl"]["status"] == "oom" and "out of memory" in report["results"]["dpo_trl"]["error"]
    assert report["results"]["dpo_ours_b0"]["status"] == "ok"
    assert "oom: " in Path(report["files"]["markdown"]).read_text()


def test_config_parsing():
    cfgs = bench_step.parse_configs("dpo_ours@torch, grpo_trl")
    assert [c.name for c in cfgs] == ["dpo_ours@torch", "grpo_trl"] and cfgs[0].backend == "torch"
    with pytest.raises(ValueError, match="unknown configuration"):
        bench_step.parse_configs("ppo_ours")
    with pytest.raises(ValueError, match="only applies to our trainers"):
        bench_step.parse_configs("dpo_trl@triton")
    tok = bench_step.build_tokenizer(151936)
    assert len(tok) == 151936 and tok("t151935 t4 t17")["input_ids"] == [151935, 4, 17]
    assert tok.decode([151935, 4, 17]) == "t151935 t4 t17"


@pytest.mark.slow
def test_process_isolation_runs_a_configuration_in_a_fresh_interpreter(tmp_path):
    report = _run(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--configs", "dpo_ours_b0", "--steps", "1",
                   "--isolation", "process"])
    r = report["results"]["dpo_ours_b0"]
    assert r["status"] == "ok", r.get("error")
    assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-6) and r["trainer"] == "EntropyDPOTrainer"
    assert report["config"]["isolation"] == "process" and report["meta"]["complete"]
    assert report["meta"]["command"].startswith("python scripts/bench_step.py --tiny --device cpu")
    assert "one fresh process per configuration" in Path(report["files"]["markdown"]).read_text()
