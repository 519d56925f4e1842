"""DPO with the entropy bonus under 2 data-parallel CPU processes equals DPO in 1 process on the same global batch.

Set-up shared by every run: the embedded default, a training set of exactly the global batch (8 preference pairs),
so every optimizer step sees the same 8 pairs however they are split over ranks and accumulation steps; plain SGD
(no clipping), so the parameters after the run are the start minus the sum of the step gradients, and a scaling
error in the entropy term (a missing or doubled world-size / accumulation factor) changes them; the Skywork-OR1
target-entropy controller, whose coefficient depends on the measured entropy all-reduced over ranks (target 5 nats is
never reached, so β goes 0 -> 0.75 -> 1.0 -> 1.25: a large bonus next to the DPO loss).

Compared with the 1-process run (per_device 8): 2 DDP ranks x 4, DeepSpeed ZeRO-2 2 ranks x 4, and DeepSpeed ZeRO-3
2 ranks x 2 x gradient accumulation 2; then a checkpoint resume under 2 DDP ranks through ``llm-entreg train
--accelerate-config``.
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import (
    assert_ranks_agree,
    assert_same_metrics,
    assert_same_update,
    coefficient_trajectory,
    launch,
    measured_entropy,
)

from llm_entreg.trainers.mixin import STATE_FILE

pytestmark = pytest.mark.slow

RECIPE = "dpo_entropy.yaml"
COMMON = [
    "data.max_train_samples=8", "max_steps=4", "logging_steps=1", "save_strategy=steps", "save_steps=2",
    "evaluation.held_out=false", "optim=sgd", "learning_rate=0.01", "max_grad_norm=0", "disable_tqdm=true",
    "entropy_controller=target_entropy", "entropy_target=5.0", "entropy_coef=0.5", "entropy_coef_delta=0.25",
    "entropy_coef_max=5",
]
KEYS = ("loss", "grad_norm", "entropy", "entropy/chosen", "entropy/rejected", "entropy_bonus", "entropy_coef",
        "rewards/margins", "logps/chosen", "num_tokens", "epoch")
TRAJECTORY = [0.0, 0.75, 1.0, 1.25]  # β used at steps 1..4 (no measurement before step 1)
# Logged as a mean over the accumulation window's micro-batches of per-micro-batch (all-rank) means -- TRL's own
# convention for its `entropy`, which ours follow -- so they equal the global token mean only at GA 1. The bonus,
# its `entropy_bonus` metric and the controller's measured entropy are global token means at any GA.
PER_MICRO_BATCH = ("entropy", "entropy/chosen", "entropy/rejected")


@pytest.fixture(scope="session")
def dpo_single(tmp_path_factory):
    return launch(RECIPE, tmp_path_factory.mktemp("dpo") / "single", [*COMMON, "per_device_train_batch_size=8"])


@pytest.fixture(scope="session")
def dpo_ddp(tmp_path_factory):
    return launch(RECIPE, tmp_path_factory.mktemp("dpo") / "ddp", [*COMMON, "per_device_train_batch_size=4"],
                  config="cpu_ddp_2proc")


def test_single_process_reference(dpo_single):
    probe = dpo_single.probe()
    assert list(probe) == [0] and probe[0][0]["world_size"] == 1
    assert coefficient_trajectory(probe[0]) == pytest.approx(TRAJECTORY)
    assert [r["entropy_coef"] for r in dpo_single.metrics()] == pytest.approx(TRAJECTORY)


def test_ddp_two_ranks_log_and_update_like_one_process(dpo_single, dpo_ddp):
    probe = dpo_ddp.probe()
    # Really 2 processes (gloo DDP on the CPU), each with the same coefficient trajectory and global counts
    assert_ranks_agree(probe, world_size=2, distributed_type="MULTI_CPU")
    assert coefficient_trajectory(probe[0]) == pytest.approx(TRAJECTORY)
    steps = [[r for r in probe[rank] if r["event"] == "step"] for rank in (0, 1)]
    # The ranks held different token counts at some step: a mean of per-rank means would not pass what follows
    assert any(a["local_tokens"] != b["local_tokens"] for a, b in zip(*steps, strict=True))
    assert all(a["local_tokens"] + b["local_tokens"] == a["window_counts"][0] for a, b in zip(*steps, strict=True))
    # Logged global entropy, entropy term and loss equal the 1-process values; so do the parameter updates and
    # the entropy the controller measured
    assert_same_metrics(dpo_ddp.metrics(), dpo_single.metrics(), KEYS)
    assert_same_update(dpo_ddp, dpo_single)
    assert measured_entropy(probe[0]) == pytest.approx([r["entropy"] for r in dpo_single.metrics()], rel=1e-5)


def test_ddp_resume_continues_the_coefficient_trajectory(dpo_ddp, tmp_path):
    """Resume the 2-rank run from its step-2 checkpoint, through the real CLI re-launch (``--accelerate-config``):
    steps 3-4 repeat the uninterrupted run's values. Every rank restores the state itself; a rank that did not would
    apply another β and change the logged (rank-averaged) loss and the shared update."""
    ckpt = dpo_ddp.out / "checkpoint-2"
    saved = torch.load(ckpt / STATE_FILE, weights_only=False)["coefficient"]
    after_step_2 = [r["coef_state"] for rank in (0, 1) for r in dpo_ddp.probe()[rank]
                    if r["event"] == "log" and r["step"] == 2]
    assert after_step_2 and all(s == pytest.approx(saved) for s in after_step_2)

    resumed = launch(RECIPE, tmp_path / "resumed", [*COMMON, "per_device_train_batch_size=4"],
                     config="cpu_ddp_2proc", cli=True, extra=[f"--resume={ckpt}"])
    assert "launching:" in resumed.log and "accelerate.commands.launch" in resumed.log
    got = resumed.metrics()
    want = [r for r in dpo_ddp.metrics() if r["step"] > 2]
    # epoch 3.0 at step 3: 2 ranks x 4 pairs = the 8 pairs per step (one process alone would be at epoch 1.5)
    assert [r["epoch"] for r in got] == [3.0, 4.0]
    assert [r["entropy_coef"] for r in got] == pytest.approx(TRAJECTORY[2:])
    # num_tokens included: TRL's DPOTrainer keeps that count in memory only; our checkpoint state carries it
    assert_same_metrics(got, want, KEYS, rel=1e-5, abs_=1e-6)
    final = torch.load(resumed.out / "checkpoint-4" / STATE_FILE, weights_only=False)["coefficient"]
    assert final == pytest.approx(torch.load(dpo_ddp.out / "checkpoint-4" / STATE_FILE, weights_only=False)["coefficient"])
    assert_same_update(resumed, dpo_ddp, rel=1e-5)


@pytest.mark.parametrize("stage, split", [
    (2, ["per_device_train_batch_size=4"]),
    (3, ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]),
], ids=["zero2", "zero3-ga2"])
def test_deepspeed_two_ranks_log_and_update_like_one_process(dpo_single, tmp_path, stage, split):
    pytest.importorskip("deepspeed")
    run = launch(RECIPE, tmp_path / f"zero{stage}", [*COMMON, "save_strategy=no", *split],
                 config=f"cpu_zero{stage}_2proc")
    probe = run.probe()
    assert_ranks_agree(probe, world_size=2, distributed_type="DEEPSPEED")
    assert coefficient_trajectory(probe[0]) == pytest.approx(TRAJECTORY)
    keys = KEYS if "gradient_accumulation_steps=2" not in split else [k for k in KEYS if k not in PER_MICRO_BATCH]
    assert_same_metrics(run.metrics(), dpo_single.metrics(), keys)
    assert_same_update(run, dpo_single)
    assert measured_entropy(probe[0]) == pytest.approx([r["entropy"] for r in dpo_single.metrics()], rel=1e-5)


def test_loss_fused_dpo_on_two_ranks_equals_one_unfused_process(dpo_single, tmp_path):
    """fused_loss=True (the gradient formed in the head's forward by whole pairs) under 2 DDP ranks: the same logged
    values, coefficient trajectory and update as the unfused 1-process run."""
    run = launch(RECIPE, tmp_path / "fused", [*COMMON, "per_device_train_batch_size=4", "fused_loss=true"],
                 config="cpu_ddp_2proc")
    assert_ranks_agree(run.probe(), world_size=2, distributed_type="MULTI_CPU")
    assert [r["entropy_coef"] for r in run.metrics()] == pytest.approx(TRAJECTORY)
    assert_same_metrics(run.metrics(), dpo_single.metrics(), KEYS)
    assert_same_update(run, dpo_single)
