"""EntropyGRPOTrainer: TRL's GRPO with our entropy regularizers as the single source of the entropy term.

TRL's GRPOTrainer has an entropy bonus of its own (``entropy_coef``, ``use_adaptive_entropy``). Here the same field
names feed our regularizers instead (token or sequence level, schedules, target-entropy controller, learned α,
global aggregation), and TRL's own bonus is switched off, so the term is applied exactly once. The KL-to-reference
penalty stays TRL's (``beta``, k3 in the loss). Only ``_compute_loss`` is wrapped: the per-token entropies that
TRL's fused-head call already returns (with their graph) are captured, and ``-β · agg(H)`` is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as trl_grpo_module

from ..rl import grpo_token_loss
from .mixin import EntropyRegularizationArguments, EntropyRegularizationMixin

#: GRPO loss types whose per-token loss is a closed-form function of the token's log-prob and entropy.
FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class FusedLossArguments:
    """``fused_loss``: the policy loss's gradient formed inside the LM head's forward (GRPO and PPO configs)."""

    fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Form the gradient of the per-token loss (clipped surrogate, KL, entropy bonus) inside the LM "
            "head's forward pass (llm_entreg.ops.fused_linear_loss: 6NdV instead of 8NdV for the head). Same loss "
            "and gradients as the default path. Supported: loss_type grpo/bnpo/dr_grpo/dapo, token-level "
            "importance sampling, top_entropy_quantile = entropy_bonus_top_quantile = 1, no off-policy mask, no "
            "vLLM importance-sampling correction, text-only models without a router aux loss."
        },
    )

    fused_loss_chunk_mib: int | None = field(
        default=None,
        metadata={
            "help": "fused_loss: memory budget of one token chunk of the loss-fused head, in MiB (its fp32 logits "
            "and their dz). Default: 1024 on CUDA, 256 elsewhere. Larger chunks run faster and take more memory: on "
            "an H200 at 16384 tokens, d 4096, V 151936, the head's forward+backward took 112 ms at 1024 and 101 ms "
            "at 8192 (docs/benchmarks.md)."
        },
    )

    def check_fused_loss_supported(self) -> None:
        """Raise ``ValueError`` naming the first setting that ``fused_loss=True`` does not support."""
        mib = self.fused_loss_chunk_mib
        if mib is not None and (isinstance(mib, bool) or not isinstance(mib, int) or mib < 1):
            raise ValueError(f"fused_loss_chunk_mib: expected a positive number of MiB or None, got {mib!r}")
        if not self.fused_loss:
            return
        unsupported = {
            "loss_type": (self.loss_type not in FUSED_LOSS_TYPES, f"one of {FUSED_LOSS_TYPES}"),
            "importance_sampling_level": (self.importance_sampling_level != "token", "'token'"),
            "top_entropy_quantile": (self.top_entropy_quantile != 1.0, "1.0"),
            "entropy_bonus_top_quantile": (self.entropy_bonus_top_quantile != 1.0, "1.0"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "None"),
            "vllm_importance_sampling_correction": (
                self.use_vllm and self.vllm_importance_sampling_correction, "False (with use_vllm)"),
        }
        for name, (bad, wanted) in unsupported.items():
            if bad:
                raise ValueError(f"{name}: fused_loss=True supports only {wanted}, got {getattr(self, name)!r} "
                                 "(set fused_loss=False for the general path)")


@dataclass
class EntropyGRPOConfig(FusedLossArguments, EntropyRegularizationArguments, GRPOConfig):
    """``trl.GRPOConfig`` whose entropy fields are ours (see :class:`EntropyRegularizationArguments`).

    ``entropy_coef``, ``entropy_target``, ``entropy_coef_min/max/delta`` keep TRL's names but drive our
    regularizers; TRL's ``use_adaptive_entropy`` is replaced by ``entropy_controller="target_entropy"``.
    ``top_entropy_quantile`` keeps TRL's meaning (which tokens the *policy* loss uses, "80/20"); the bonus has its
    own ``entropy_bonus_top_quantile``. ``entropy_level="reward"`` adds ``α · Σ_t H_t`` of each completion to its
    reward before the group normalization (:class:`EntropyReward`).
    """

    use_adaptive_entropy: bool = field(
        default=False,
        metadata={"help": "Not used: set entropy_controller='target_entropy' (Skywork-OR1) instead."},
    )

    def __post_init__(self):
        if self.use_adaptive_entropy:
            raise ValueError(
                "use_adaptive_entropy: TRL's own controller is replaced here; set entropy_controller='target_entropy' "
                "(same entropy_target / entropy_coef_delta / entropy_coef_min / entropy_coef_max fields)"
            )
        super().__post_init__()
        self.validate_entropy_arguments()
        self.check_fused_loss_supported()


class EntropyReward:
    """Entropy in the reward for GRPO: ``α · Σ_t H_t`` of each sampled completion under the current policy.

    Registered as one more reward function (weight 1, logged as ``rewards/entropy_reward/*``), so it enters the
    sequence reward before TRL's group normalization — GRPO's advantages are per sequence, hence the per-sequence
    sum of per-token entropies (the chain-rule estimate of the sequence entropy). α is read at call time, so
    schedules and controllers apply. Costs one no-grad forward of the policy over the completions.
    """

    __name__ = "entropy_reward"

    def __init__(self):
        self.trainer = None

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        trainer = self.trainer
        device = trainer.accelerator.device
        pad = trainer.processing_class.pad_token_id if hasattr(trainer.processing_class, "pad_token_id") else 0
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        p_len = max(len(p) for p in prompt_ids)
        c_len = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((len(prompt_ids), p_len + c_len), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):  # prompts left-padded, completions right
            ids[row, p_len - len(p) : p_len] = torch.as_tensor(list(p))
            ids[row, p_len : p_len + len(c)] = torch.as_tensor(list(c))
            attention[row, p_len - len(p) : p_len + len(c)] = 1
        _, entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids.to(device), attention.to(device), c_len, compute_entropy=True
        )
        mask = attention[:, p_len:].to(device).bool()
        alpha = trainer.entropy_coefficient.value
        return (alpha * (entropy.float() * mask).sum(-1)).tolist()


class EntropyGRPOTrainer(EntropyRegularizationMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with our entropy bonus. Same constructor; ``args`` must be an :class:`EntropyGRPOConfig`.

    Logs TRL's metrics (``entropy``, ``kl``, clip ratios, rewards) plus ``entropy_coef`` and ``entropy_bonus``.
    """

    _name = "EntropyGRPO"
    # TRL's GRPO loss is already scaled for gradient accumulation (`loss_is_scaled_for_ga = True`)
    _trainer_divides_loss_by_ga = False
    # The batch is generated after the data loader: counts come from the generation batch (see _compute_loss)
    _counts_from_batch_samples = False

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None or not isinstance(config, EntropyGRPOConfig):
            raise ValueError(f"args: expected an EntropyGRPOConfig, got {type(config).__name__}")
        # The entropies are captured from `_get_per_token_logps_and_entropies` (already cut to the completion)
        self._entropy_reward = None
        if config.entropy_level == "reward":
            positional = "reward_funcs" not in kwargs and len(args) > 1
            funcs = args[1] if positional else kwargs.get("reward_funcs")
            funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
            self._entropy_reward = EntropyReward()
            if config.reward_weights is not None:
                config.reward_weights = list(config.reward_weights) + [1.0]
            funcs = funcs + [self._entropy_reward]
            if positional:
                args = (args[0], funcs, *args[2:])
            else:
                kwargs["reward_funcs"] = funcs
        with self._our_fused_head(trl_grpo_module, config.fused_head_backend, capture_outputs=False):
            super().__init__(*args, **kwargs)
        if self._entropy_reward is not None:
            self._entropy_reward.trainer = self
        # TRL's own entropy bonus must not apply a second time: ours is the single source of the term
        self._entropy_bonus_enabled = False
        self.use_adaptive_entropy = False
        self._entropy_setup()

    def _entropy_mask(self, inputs) -> torch.Tensor:
        return self._completion_loss_mask(inputs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._entropy_capturing and entropies is not None:
            self._entropy_captured.append(entropies)
        return logps, entropies, aux

    def _compute_loss(self, model, inputs):
        if self.args.fused_loss:
            return self._fused_compute_loss(model, inputs)
        with self._entropy_capture_window() as captured:
            loss = super()._compute_loss(model, inputs)
        if not captured:  # pragma: no cover - would mean TRL stopped computing entropies in its loss
            raise RuntimeError("GRPOTrainer._compute_loss computed no entropies; cannot apply the bonus")
        entropy = captured[0]
        captured.clear()
        mode = "train" if self.model.training else "eval"
        mask = self._entropy_mask(inputs)
        self._entropy_check_finite(loss, entropy, mask)
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        if self.entropy_bonus.entropy_level != "reward":
            return loss + self._entropy_loss(entropy, mask, mode)
        self._entropy_measure_only(entropy, mask, mode)  # the bonus is in the rewards (EntropyReward)
        return loss

    # ------------------------------------------------------------------ the loss-fused path (fused_loss=True)
    def _fused_compute_loss(self, model, inputs):
        """TRL's GRPO loss + our entropy term, with the gradient formed inside the LM head's forward."""
        mask = self._completion_loss_mask(inputs)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        loss, _, _ = fused_policy_loss(self, model, inputs, mask, mode)
        return loss


def fused_policy_loss(trainer, model, inputs, mask, mode):
    """``(loss, logps, entropies)``: TRL's GRPO policy loss (with ``trainer.beta``'s k3 KL) plus our entropy term,
    its gradient formed inside the LM head's forward; ``logps``/``entropies`` ``[B, K]`` are detached.

    The per-token loss is a closed-form function of each completion token's log-prob ``lp`` and entropy ``H`` with
    per-token constants (advantage, old and reference log-probs, mask, the loss type's normalizer, the entropy
    term's aggregation weight), handed to the fused head as ``fused_loss_fn``. TRL's metrics are then logged by
    TRL's own ``_compute_loss`` run on the detached statistics, and ours by the mixin. The caller sets the global
    counts (``_generation_window_counts``) first. Used by ``EntropyGRPOTrainer`` and ``PPOTrainer``.
    """
    if trainer.aux_loss_enabled or any(inputs.get(k) is not None for k in ("pixel_values", "token_type_ids")):
        raise ValueError("fused_loss: MoE router aux loss and multimodal inputs are not supported; "
                         "set fused_loss=False")
    peft_config = getattr(trainer.accelerator.unwrap_model(model), "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):  # virtual tokens shift the head's label grid
        raise ValueError("fused_loss: PEFT prompt learning (virtual tokens) is not supported; use LoRA-style "
                         "adapters or set fused_loss=False")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    b, k = completion_ids.shape
    ga = trainer.current_gradient_accumulation_steps if mode == "train" else 1
    m = mask.float()

    # the loss type's weight per token (TRL's normalizations, including the division by GA)
    if trainer.loss_type == "grpo":
        w = m / (m.sum(-1, keepdim=True).clamp(min=1.0) * b * ga)
    elif trainer.loss_type == "bnpo":
        w = m / (m.sum().clamp(min=1.0) * ga)
    elif trainer.loss_type == "dr_grpo":
        w = m / (b * trainer.max_completion_length * ga)
    else:  # dapo
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            norm = norm * ga / trainer.args.steps_per_generation
        w = m / norm
    # the entropy term's weight per token: it is linear in H, so its gradient w.r.t. a dummy H
    entropy_on = trainer.entropy_bonus.entropy_level != "reward"
    ew = torch.zeros_like(m)
    if entropy_on:
        dummy = torch.zeros_like(m, requires_grad=True)
        with torch.enable_grad():
            term, scale, parts = trainer._entropy_term(dummy, mask, mode)
            if term.requires_grad:
                ew = torch.autograd.grad(term * scale, dummy)[0].detach()

    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = inputs.get("old_per_token_logps")
    ref = inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None
    length = input_ids.shape[1] - 1  # the fused head scores the shifted labels [B, L-1]

    def grid(x):  # a [B, K] completion tensor on the [B, L-1] grid, flattened (prompt positions never read)
        full = torch.zeros(b, length, dtype=torch.float32, device=x.device)
        full[:, -k:] = x.float()
        return full.reshape(-1)

    g_w, g_ew, g_m = grid(w), grid(ew), grid(m)
    g_adv = grid(advantages.expand(b, k))
    g_old = None if old is None else grid(old)
    g_ref = None if ref is None else grid(ref)
    eps_low, eps_high, delta, beta = trainer.epsilon_low, trainer.epsilon_high, trainer.args.delta, trainer.beta
    bias_kl = trainer.args.use_bias_correction_kl

    def loss_fn(lp, ent, rows):
        on = g_m[rows] != 0
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        lp_on = torch.where(on, lp, zero)  # masked-out tokens (tool outputs) contribute exactly 0
        old_r = lp_on.detach() if g_old is None else torch.where(on, g_old[rows].to(lp.dtype), zero)
        ref_r = None if g_ref is None else torch.where(on, g_ref[rows].to(lp.dtype), zero)
        per_token = grpo_token_loss(lp_on, old_r, g_adv[rows].to(lp.dtype), eps_low, eps_high, delta, ref_r, beta,
                                    bias_kl)
        per_token = torch.where(on, per_token, zero)
        return per_token * g_w[rows].to(lp.dtype) + g_ew[rows].to(lp.dtype) * ent

    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-k] = -100
    with trainer.accelerator.autocast():
        mib = trainer.args.fused_loss_chunk_mib
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                    fused_loss_fn=loss_fn, fused_loss_chunk_bytes=None if mib is None else mib * 2**20)
    loss = out.loss
    lp_det, ent_det = out.log_probs[:, -k:], out.entropy[:, -k:]
    trainer._entropy_check_finite(loss, ent_det, mask)

    # TRL's metrics (KL, clip ratios, entropy) from TRL's own code, on the detached statistics
    def stats(*args, **kwargs):
        return lp_det, ent_det, None

    trainer._get_per_token_logps_and_entropies = stats
    try:
        with torch.no_grad():
            GRPOTrainer._compute_loss(trainer, model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
    if entropy_on:
        trainer._entropy_metrics(ent_det, mask, mode, (ew * ent_det).sum() / scale, parts)
    else:
        trainer._entropy_measure_only(ent_det, mask, mode)
    return loss, lp_det, ent_det
