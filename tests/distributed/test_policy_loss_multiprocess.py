"""Clip-Cov and KL-Cov under 2 data-parallel CPU processes select the same tokens as 1 process on the same global
batch: the covariance's means, KL-Cov's top fraction and Clip-Cov's random subset are taken over every rank's tokens.
PPO (critic advantages, 2 epochs per rollout so the ratio and the KL-Cov penalty are not trivial); large fractions so
that many tokens are selected; the logged selected fraction, the loss and the update must agree."""

from __future__ import annotations

import pytest
from distributed_helpers import assert_same_metrics, assert_same_update, launch

pytestmark = pytest.mark.slow

PPO = ["data.max_train_samples=4", "num_generations=2", "logging_steps=1", "evaluation.held_out=false", "optim=sgd",
       "learning_rate=0.01", "max_grad_norm=0", "disable_tqdm=true", "generation_kwargs={do_sample: false}",
       "max_steps=2", "save_strategy=no", "steps_per_generation=1", "num_iterations=2", "entropy_coef=0.0",
       "rewards.reward_model=null", "rewards.funcs=[correctness]"]
MODES = {
    "kl_cov": ["policy_loss_mode=kl_cov", "kl_cov_ratio=0.3", "ppo_kl_coef=5.0"],
    "clip_cov": ["policy_loss_mode=clip_cov", "clip_cov_ratio=0.3", "clip_cov_lb=-1e9", "clip_cov_ub=1e9"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_select_and_update_like_one_process(tmp_path, mode):
    single = launch("ppo_rlhf.yaml", tmp_path / "single", [*PPO, *MODES[mode], "per_device_train_batch_size=8"])
    ddp = launch("ppo_rlhf.yaml", tmp_path / "ddp", [*PPO, *MODES[mode], "per_device_train_batch_size=4"],
                 config="cpu_ddp_2proc")
    key = f"{mode}/selected_frac"
    assert all(0 < r[key] < 1 for r in single.metrics())
    assert_same_metrics(ddp.metrics(), single.metrics(), ("loss", "grad_norm", key, "entropy"))
    assert_same_update(ddp, single)
