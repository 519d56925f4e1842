"""Per-token pieces of Clip-Cov / KL-Cov and entropy-shaped advantages (``losses/covariance.py``), by hand."""

from __future__ import annotations

import math

import torch

from llm_entreg.losses.covariance import (clip_cov_token_loss, clipped_by_ppo, kl_cov_token_loss, shaped_advantages,
                                          token_covariance, token_keys)


def test_shaped_advantages_by_hand_never_flip_a_sign_and_carry_no_entropy_gradient():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.1, -0.3])
    entropy = torch.tensor([2.0, 0.5, 3.0, 1.0, 0.1], requires_grad=True)
    shaped = shaped_advantages(adv, entropy, coef=0.4, clip=2.0)
    # min(0.4 H, |A| / 2): 0.5 (capped), 0.2, 0 (A = 0), 0.05 (capped), 0.04
    torch.testing.assert_close(shaped, torch.tensor([1.5, -0.8, 0.0, 0.15, -0.26]))
    assert (torch.sign(shaped) == torch.sign(adv)).all()
    assert not shaped.requires_grad  # sg(H): the term is a constant to the optimizer


def test_covariance_of_log_prob_and_advantage_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, 0.0, -1.0])
    cov = token_covariance(logp, adv, mean_logp=-2.0, mean_adv=0.0)
    torch.testing.assert_close(cov, torch.tensor([1.0, 0.0, 1.0]))
    assert not cov.requires_grad


def test_clip_cov_cuts_the_gradient_of_the_selected_tokens_only():
    logp = torch.tensor([-1.0, -1.2, -0.5], requires_grad=True)
    old = torch.tensor([-1.1, -1.2, -1.0])
    adv = torch.tensor([1.0, -2.0, 1.0])
    selected = torch.tensor([True, False, False])
    loss = clip_cov_token_loss(logp, old, adv, selected, 0.2, 0.2)
    ratio = torch.exp(logp.detach() - old)
    expected = torch.stack([torch.tensor(0.0), -ratio[1] * -2.0, torch.tensor(-1.2)])  # token 3: e^0.5 clipped at 1.2
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0 and logp.grad[2] == 0  # token 3 is cut by the PPO clip itself
    assert clipped_by_ppo(logp, old, adv, 0.2, 0.2).tolist() == [False, False, True]


def test_kl_cov_adds_the_absolute_log_ratio_on_the_selected_tokens():
    logp = torch.tensor([-1.0, -0.5], requires_grad=True)
    old = torch.tensor([-1.5, -1.0])
    adv = torch.tensor([2.0, 2.0])
    loss = kl_cov_token_loss(logp, old, adv, torch.tensor([True, False]), kl_coef=1.5)
    r = math.exp(0.5)
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0 * r + 1.5 * 0.5, -2.0 * r]))  # unclipped


def test_token_keys_ignore_padding_and_batch_order_and_change_with_the_step():
    ids = torch.tensor([[0, 5, 6, 7, 8], [9, 9, 1, 2, 3]])
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0: one pad token on the left
    keys = token_keys(ids, attn, completion_length=2, step=3)
    assert keys.shape == (2, 2) and ((keys >= 0) & (keys < 1)).all() and keys.unique().numel() == 4
    unpadded = token_keys(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long), 2, 3)
    torch.testing.assert_close(keys[0:1], unpadded)  # padding does not change the key
    swapped = token_keys(ids.flip(0), attn.flip(0), 2, 3)
    torch.testing.assert_close(swapped.flip(0), keys)  # neither does the row order
    assert not torch.equal(token_keys(ids, attn, 2, 4), keys)
    # roughly uniform: the keys of many tokens spread over [0, 1)
    many = token_keys(torch.arange(4000).reshape(400, 10), torch.ones(400, 10, dtype=torch.long), 10, 0)
    assert abs(many.mean().item() - 0.5) < 0.02 and many.min() < 0.01 and many.max() > 0.99
