"""GRPO and PPO with the entropy bonus under 2 data-parallel CPU processes equal the 1-process runs.

Generated batches: the prompt set is exactly one generation batch (4 prompts x 2 completions), and generation is
greedy (``do_sample: false``) so the completions do not depend on how the ranks split the batch or on their random
streams. Plain SGD for the policy (no clipping), so the parameters after the run test the scale of the entropy term.
GRPO's group advantages are then 0 (identical completions), leaving the entropy bonus and the KL term as the whole
policy gradient; PPO's critic-based advantages are not, and its critic (an extra model outside the TRL trainer)
must be averaged over ranks like the policy -- checked on the critic weights saved with the checkpoint.
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

pytestmark = pytest.mark.slow

GENERATED = [
    "data.max_train_samples=4", "num_generations=2", "logging_steps=1", "evaluation.held_out=false", "optim=sgd",
    "learning_rate=0.01", "max_grad_norm=0", "disable_tqdm=true", "generation_kwargs={do_sample: false}",
]
GRPO = [*GENERATED, "max_steps=3", "save_strategy=no", "entropy_controller=target_entropy", "entropy_target=5.0",
        "entropy_coef=0.5", "entropy_coef_delta=0.25", "entropy_coef_max=5"]
GRPO_KEYS = ("loss", "grad_norm", "entropy", "entropy_bonus", "entropy_coef", "kl", "reward",
             "completions/mean_length", "num_tokens")
PPO = [*GENERATED, "max_steps=2", "save_strategy=steps", "save_steps=2", "steps_per_generation=1",
       "num_iterations=2", "entropy_coef=1.0", "rewards.reward_model=null", "rewards.funcs=[correctness]"]
# value_loss / explained_variance / approx_kl are logged as means of per-rank values: compared via the critic weights
PPO_KEYS = ("loss", "grad_norm", "entropy", "entropy_bonus", "entropy_coef", "score", "kl", "num_tokens")


@pytest.fixture(scope="module")
def grpo_single(tmp_path_factory):
    return launch("grpo_entropy.yaml", tmp_path_factory.mktemp("grpo") / "single",
                  [*GRPO, "per_device_train_batch_size=8"])


@pytest.fixture(scope="module")
def ppo_single(tmp_path_factory):
    return launch("ppo_rlhf.yaml", tmp_path_factory.mktemp("ppo") / "single", [*PPO, "per_device_train_batch_size=8"])


def test_grpo_ddp_two_ranks_log_and_update_like_one_process(grpo_single, tmp_path):
    run = launch("grpo_entropy.yaml", tmp_path / "ddp", [*GRPO, "per_device_train_batch_size=4"],
                 config="cpu_ddp_2proc")
    probe = run.probe()
    assert_ranks_agree(probe, world_size=2, distributed_type="MULTI_CPU")
    assert coefficient_trajectory(probe[0]) == pytest.approx([0.0, 0.75, 1.0])
    assert coefficient_trajectory(probe[0]) == pytest.approx(coefficient_trajectory(grpo_single.probe()[0]))
    assert measured_entropy(probe[0]) == pytest.approx(measured_entropy(grpo_single.probe()[0]), rel=1e-5)
    assert_same_metrics(run.metrics(), grpo_single.metrics(), GRPO_KEYS)
    assert_same_update(run, grpo_single)


def _critic_update_error(run, reference) -> float:
    """Relative difference of the critic updates (checkpoint-2 critic minus its start: the policy's backbone and a
    zero head)."""
    start = reference.start_weights()
    a = torch.load(run.out / "checkpoint-2" / "llm_entreg_value.pt", weights_only=False)["value_model"]
    b = torch.load(reference.out / "checkpoint-2" / "llm_entreg_value.pt", weights_only=False)["value_model"]
    assert a.keys() == b.keys()

    def begin(key):
        if key.startswith("backbone."):
            return start["model." + key[len("backbone."):]].double()
        return torch.zeros_like(b[key], dtype=torch.float64)  # the zero-initialised value head

    da = torch.cat([(a[k].double() - begin(k)).flatten() for k in sorted(b)])
    db = torch.cat([(b[k].double() - begin(k)).flatten() for k in sorted(b)])
    assert db.norm() > 0, "the reference critic did not move"
    return ((da - db).norm() / db.norm()).item()


def test_grpo_fused_loss_two_ranks_like_the_default_path_in_one_process(grpo_single, tmp_path):
    """fused_loss=True (gradient formed in the head's forward) on 2 ranks: the same logs and the same update as the
    default path in one process -- the entropy term's global weights and the KL across ranks."""
    run = launch("grpo_entropy.yaml", tmp_path / "ddp_fused", [*GRPO, "per_device_train_batch_size=4",
                                                               "fused_loss=true"], config="cpu_ddp_2proc")
    probe = run.probe()
    assert_ranks_agree(probe, world_size=2, distributed_type="MULTI_CPU")
    assert coefficient_trajectory(probe[0]) == pytest.approx(coefficient_trajectory(grpo_single.probe()[0]))
    assert measured_entropy(probe[0]) == pytest.approx(measured_entropy(grpo_single.probe()[0]), rel=1e-5)
    assert_same_metrics(run.metrics(), grpo_single.metrics(), GRPO_KEYS)
    assert_same_update(run, grpo_single)


@pytest.mark.parametrize("config", ["cpu_ddp_2proc", "cpu_zero2_2proc"], ids=["ddp", "zero2"])
def test_ppo_two_ranks_log_and_update_like_one_process(ppo_single, tmp_path, config):
    if "zero" in config:
        pytest.importorskip("deepspeed")
    run = launch("ppo_rlhf.yaml", tmp_path / config, [*PPO, "per_device_train_batch_size=4"], config=config)
    probe = run.probe()
    assert_ranks_agree(probe, world_size=2, distributed_type="DEEPSPEED" if "zero" in config else "MULTI_CPU")
    assert coefficient_trajectory(probe[0]) == pytest.approx([1.0, 1.0])
    assert_same_metrics(run.metrics(), ppo_single.metrics(), PPO_KEYS)
    assert_same_update(run, ppo_single)
    # The critic too: one shared update from the whole batch (under DeepSpeed it is not wrapped by accelerate)
    assert _critic_update_error(run, ppo_single) < 1e-4
