"""The policy-loss methods of GRPO and PPO (``trainers/policy_loss.py``): our per-token path reproduces TRL's loss,
gradients and metrics; entropy-shaped advantages equal TRL's loss on hand-shaped advantages (no gradient through the
entropy); KL-Cov and Clip-Cov select and change exactly the tokens the paper's rule names, whatever the row order;
invalid or unsupported settings are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.losses import grpo_loss_weights
from llm_entreg.losses.covariance import clipped_by_ppo, token_keys
from llm_entreg.ops.reference import reference_token_stats
from llm_entreg.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

from .grpo_helpers import generation_batch, grpo_fields, grpo_trainer, loss_and_grads


def _policy_pieces(trainer, inputs):
    """Per-token log-probs (float32, detached), the float64 reference entropy, advantages, mask and DAPO weights."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, k, compute_entropy=True)
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -k - 1:-1].double()
    mask = inputs["completion_mask"].bool()
    entropy = reference_token_stats(logits, inputs["completion_ids"].masked_fill(~mask, -100),
                                    dtype=torch.float64).entropy
    adv = inputs["advantages"]
    adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(-1, k).float()
    weights = grpo_loss_weights(mask, "dapo", dapo_token_count=trainer._dapo_token_count(inputs, "train"))
    return logps, entropy, adv, mask, weights, ids, attn, k


@pytest.mark.parametrize("extra", [{}, {"loss_type": "grpo", "beta": 0.04}, {"num_iterations": 2, "delta": 1.5}])
def test_our_policy_path_reproduces_trls_loss_gradients_and_metrics(default, tmp_path, extra):
    model = default.load_model()
    fields = {"beta": 0.0, **extra}
    trainer = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, **fields)
    inputs = generation_batch(trainer)
    if "num_iterations" in extra:  # an off-policy step: old log-probs that differ from the current ones
        old = _policy_pieces(trainer, inputs)[0]
        inputs["old_per_token_logps"] = old - 0.05 * torch.randn_like(old)
    trainer._metrics["train"].clear()
    loss_trl, grads_trl = loss_and_grads(trainer, inputs)
    metrics_trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    mask = inputs["completion_mask"].bool()
    ours, _, _ = trainer._own_policy_loss(trainer.model, inputs, mask, "train")
    ours.backward()
    torch.testing.assert_close(ours.detach(), loss_trl, atol=1e-6, rtol=1e-5)
    for name, p in trainer.model.named_parameters():
        if name in grads_trl:
            torch.testing.assert_close(p.grad, grads_trl[name], atol=1e-6, rtol=1e-4, msg=name)
    assert {"entropy", "clip_ratio/region_mean"} <= metrics_trl.keys()
    for key in metrics_trl.keys() & {"kl", "entropy", "clip_ratio/region_mean"}:  # kl: only with beta != 0
        assert trainer._metrics["train"][key][-1] == pytest.approx(metrics_trl[key], abs=1e-6)


def test_entropy_shaped_advantages_equal_trls_loss_on_hand_shaped_advantages(default, tmp_path):
    model = default.load_model()
    shaped = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "s", beta=0.0,
                          entropy_advantage_coef=0.4, entropy_advantage_clip=2.0)
    plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", beta=0.0)
    inputs = generation_batch(plain)
    _, entropy, adv, mask, _, _, _, _ = _policy_pieces(plain, inputs)
    by_hand = adv + torch.minimum(0.4 * entropy.float(), adv.abs() / 2.0)
    assert (torch.sign(by_hand[mask]) == torch.sign(adv[mask])).all() and not torch.equal(by_hand, adv)
    loss_s, grads_s = loss_and_grads(shaped, inputs)
    loss_p, grads_p = loss_and_grads(plain, {**inputs, "advantages": by_hand})  # TRL's loss, advantages constant
    torch.testing.assert_close(loss_s, loss_p, atol=2e-6, rtol=1e-5)
    for name in grads_p:  # equal gradients: nothing flows through the entropy in the shaped advantage
        torch.testing.assert_close(grads_s[name], grads_p[name], atol=2e-6, rtol=1e-4, msg=name)
    assert shaped._metrics["train"]["entropy_advantage/mean_shift"][-1] > 0


def _off_policy(trainer, inputs, seed=0):
    logps = _policy_pieces(trainer, inputs)[0]
    g = torch.Generator().manual_seed(seed)
    return {**inputs, "old_per_token_logps": logps - 0.1 * torch.randn(logps.shape, generator=g)}


def test_kl_cov_penalizes_exactly_the_top_covariance_tokens(default, tmp_path):
    model = default.load_model()
    trainer = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, beta=0.0,
                           policy_loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=2.0)
    inputs = _off_policy(trainer, generation_batch(trainer))
    logps, _, adv, mask, weights, _, _, _ = _policy_pieces(trainer, inputs)
    old = inputs["old_per_token_logps"]
    cov = (logps.double() - logps[mask].double().mean()) * (adv.double() - adv[mask].double().mean())
    n = max(int(0.1 * mask.sum().item()), 1)
    cut = cov[mask].topk(n).values[-1]
    selected = mask & (cov >= cut)
    expected = (weights * (-adv * torch.exp(logps - old) + 2.0 * selected * (logps - old).abs())).sum()
    loss, _ = loss_and_grads(trainer, inputs)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert trainer._metrics["train"]["kl_cov/selected_frac"][-1] == pytest.approx(
        selected.sum().item() / mask.sum().item())
    assert 0 < selected.sum() < mask.sum()


def test_clip_cov_cuts_a_random_share_of_the_in_band_tokens_whatever_the_row_order(default, tmp_path):
    model = default.load_model()
    trainer = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, beta=0.0,
                           policy_loss_mode="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    inputs = _off_policy(trainer, generation_batch(trainer), seed=1)
    logps, _, adv, mask, weights, ids, attn, k = _policy_pieces(trainer, inputs)
    old = inputs["old_per_token_logps"]
    candidates = mask & ~clipped_by_ppo(logps, old, adv, trainer.epsilon_low, trainer.epsilon_high)
    keys = token_keys(ids, attn, k, trainer.state.global_step)
    n = max(int(0.2 * mask.sum().item()), 1)
    selected = candidates & (keys <= keys[candidates].kthvalue(n).values)
    ratio = torch.exp(logps - old)
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high) * adv)
    expected = (weights * torch.where(selected, torch.zeros_like(surrogate), surrogate)).sum()
    loss, _ = loss_and_grads(trainer, inputs)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert selected.sum() >= n and trainer._metrics["train"]["clip_cov/selected_frac"][-1] > 0
    perm = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(3))
    shuffled = {key: v[perm] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == perm.shape[0] else v
                for key, v in inputs.items()}
    loss_shuffled, _ = loss_and_grads(trainer, shuffled)
    torch.testing.assert_close(loss_shuffled, loss, atol=1e-6, rtol=1e-5)  # the same tokens were cut


@pytest.mark.parametrize("fields, message", [
    ({"policy_loss_mode": "cov"}, "^policy_loss_mode: expected one of"),
    ({"policy_loss_mode": "kl_cov", "kl_cov_ratio": 0.0}, "^kl_cov_ratio: expected a fraction"),
    ({"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, "^clip_cov_lb: must be below clip_cov_ub"),
    ({"entropy_advantage_clip": 1.0}, "^entropy_advantage_clip: must be > 1"),
    ({"entropy_advantage_coef": -0.1}, "^entropy_advantage_coef: must be >= 0"),
    ({"policy_loss_mode": "kl_cov", "fused_loss": True}, "^fused_loss: not with policy_loss_mode='kl_cov'"),
    ({"policy_loss_mode": "clip_cov", "importance_sampling_level": "sequence"},
     "^importance_sampling_level: policy_loss_mode='clip_cov' supports only 'token'"),
    ({"entropy_advantage_coef": 0.4, "loss_type": "sapo"}, "^loss_type: entropy_advantage_coef > 0 supports only"),
])
def test_invalid_or_unsupported_settings_are_refused_naming_the_field(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        EntropyGRPOConfig(**grpo_fields(tmp_path, **fields))
