"""A tiny learned reward model for the embedded default, trained with TRL's ``RewardTrainer`` and cached on disk.

A sequence classifier with one output that ``GRPOTrainer`` takes as a reward function (loaded or by path). Its input
format, the hand-set likelihood readout and the cache: docs/embedded_default.md ("The learned reward model").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from ..utils import package_version, torch_threads
from .cache import build_once
from .warmstart import cache_root, load_warm_start

if TYPE_CHECKING:  # pragma: no cover
    from . import EmbeddedDefault

#: Bump when the training procedure or the saved layout changes: old cache entries are then ignored.
FORMAT_VERSION = 1
MARKER = "reward_model.json"
INITS = ("warmstart", "scratch")
READOUTS = ("likelihood", "linear")

# Constants of the likelihood readout (see the module docstring). Scales are chosen so that the constant channel
# dominates every RMS norm after layer A (K^2 >> the policy's residual energy) while the marker in the embedding is
# negligible for the policy's own norms (EPS^2 << the embedding energy).
_K = 1000.0  # constant channel written by layer A
_EPS = 1e-3  # one-hot marker of the alphabet tokens in the embedding
_ALPHA = 0.01  # scale of the copied logits in the residual
_GATE = 20.0  # MLP gate pre-activation of the current token's unit (silu(20) ~ 20)
_PREV_AMPLITUDE = 80.0  # q.k amplitude per rotary pair of the previous-token head
_PREV_PAIRS = 4  # rotary pairs (highest frequencies) used by the previous-token head


@dataclass(frozen=True)
class RewardModelConfig:
    """Everything that determines the trained reward model besides the embedded default it is built from.

    Args:
        seed: score-head initialisation, scratch backbone and batch order; default 0.
        init: ``"warmstart"`` (default): the backbone is the SFT warm-started policy, as in InstructGPT;
            ``"scratch"``: a randomly initialised model of the warm start's shape.
        readout: ``"likelihood"`` (default): the score starts as the backbone's mean token log-likelihood (two
            hand-set layers on top, see the module docstring); ``"linear"``: a random linear head on the last token.
        max_steps: ``RewardTrainer`` optimizer steps; default 200 (0: no training, the initialisation itself).
        batch_size: preference pairs per step; default 32.
        lr: peak learning rate (AdamW, linear warm-up then cosine decay); default 3e-4.
        warmup_steps: default 10. weight_decay: default 0.0.
        n_train: use the first ``n_train`` pairs of the default's preference train split (None: all of it).
        n_eval: held-out (validation) pairs for the reported accuracy (None: all of them).
        center_rewards_coefficient: ``RewardConfig.center_rewards_coefficient`` (None: off).
    """

    seed: int = 0
    init: str = "warmstart"
    readout: str = "likelihood"
    max_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    n_train: int | None = None
    n_eval: int | None = None
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout: expected one of {READOUTS}, got {self.readout!r}")
        for name in ("max_steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (name == "batch_size" and v < 1):
                raise ValueError(f"{name}: expected a {'positive' if name == 'batch_size' else 'non-negative'} int, "
                                 f"got {v!r}")
        for name in ("n_train", "n_eval"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected None or a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Scoring (GRPO's way)


def encode_texts(tokenizer, prompts, completions) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt + completion`` exactly as ``GRPOTrainer`` does for a model reward function: plain text
    concatenation, no special tokens, right padding."""
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    return tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)


@torch.no_grad()
def score_texts(model, tokenizer, prompts, completions, batch_size: int = 256) -> list[float]:
    """Reward of each ``(prompt, completion)`` pair: ``model(**inputs).logits[:, 0]`` on the GRPO-style encoding
    (:func:`encode_texts`). Completions are plain text (no ``<eos>``), as GRPO decodes them."""
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"prompts / completions: {len(prompts)} vs {len(completions)} items")
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = encode_texts(tokenizer, prompts[i : i + batch_size], completions[i : i + batch_size])
            device = next(model.parameters()).device
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return out


def pairwise_accuracy(model, tokenizer, dataset, batch_size: int = 256) -> float:
    """Fraction of preference pairs (``prompt`` / ``chosen`` / ``rejected``) whose chosen completion scores higher
    than the rejected one; ties count one half (so a constant model scores 0.5)."""
    prompts = list(dataset["prompt"])
    chosen = score_texts(model, tokenizer, prompts, list(dataset["chosen"]), batch_size)
    rejected = score_texts(model, tokenizer, prompts, list(dataset["rejected"]), batch_size)
    if not prompts:
        raise ValueError("dataset: empty")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return wins / len(prompts)


# ---------------------------------------------------------------------------------------------------------------
# Model construction


def _alphabet(tokenizer, datasets) -> list[int]:
    """Token ids of every character in the completions (chosen and rejected) of ``datasets``, sorted."""
    ids: set[int] = set()
    for ds in datasets:
        for col in ("chosen", "rejected"):
            for text in ds[col]:
                ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def _config_dict(config, **overrides) -> dict:
    """``config`` as constructor kwargs for a one-output sequence classifier (label maps and architectures dropped)."""
    out = config.to_dict()
    for key in ("id2label", "label2id", "architectures", "_name_or_path", "transformers_version"):
        out.pop(key, None)
    out.update(overrides)
    return out


def _linear_reward_model(lm, tokenizer, seed: int):
    """The policy with its LM head replaced by a random scalar head (InstructGPT's reward-model initialisation)."""
    from transformers import AutoModelForSequenceClassification

    config = lm.config.__class__(**_config_dict(lm.config, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    if any(not k.startswith("score.") for k in missing):
        raise RuntimeError(f"backbone weights missing from the policy: {missing}")
    if any(not k.startswith("lm_head.") for k in unexpected):
        raise RuntimeError(f"unexpected policy weights: {unexpected}")
    return model.float()


def _previous_token_bias(
    inv_freq: torch.Tensor, head_dim: int, amplitude: float = _PREV_AMPLITUDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query / key biases of one head whose RoPE attention score peaks at a relative offset of exactly 1.

    In each rotary plane ``(i, i + head_dim/2)`` the key is ``(1, 0)`` and the query ``A (cos t, -sin t)`` with
    ``t = inv_freq[i]``: the score of query position m on key position n is ``A * cos((m - n - 1) * t)``, and the sum
    over the highest-frequency planes has a single sharp maximum at ``m - n = 1``.
    """
    half = head_dim // 2
    q = torch.zeros(head_dim)
    k = torch.zeros(head_dim)
    for i in range(min(_PREV_PAIRS, half)):
        t = float(inv_freq[i])
        q[i], q[i + half] = amplitude * math.cos(t), -amplitude * math.sin(t)
        k[i] = 1.0
    return q, k


def _check_previous_token_head(
    q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, max_len: int
) -> float:
    """Smallest attention weight the previous-token head puts on offset 1, over query positions 1..max_len-1 (at most
    1023: further the check only costs time)."""
    half = head_dim // 2
    qc = torch.complex(q[:half].double(), q[half:].double())
    kc = torch.complex(k[:half].double(), k[half:].double())
    worst = 1.0
    for m in range(1, min(max_len, 1024)):
        delta = torch.arange(m + 1, dtype=torch.float64)
        phase = torch.polar(torch.ones(m + 1, half, dtype=torch.float64), delta[:, None] * inv_freq[None, :].double())
        scores = (qc[None] * kc.conj()[None] * phase).real.sum(-1) / math.sqrt(head_dim)
        worst = min(worst, float(scores.softmax(0)[1]))
    return worst


@torch.no_grad()
def _likelihood_reward_model(lm, tokenizer, alphabet: list[int]):
    """The policy ``lm`` (a causal LM) plus two hand-set layers whose score is its mean token log-likelihood.

    See the module docstring. Returns a ``...ForSequenceClassification`` whose score on any text is the mean over
    positions ``j`` of ``z_{j-1}[x_j] - mean_a z_{j-1}[a]`` for tokens ``x_j`` of the ``alphabet`` (0 for other
    tokens), where ``z_{j-1}`` are the policy's logits at the previous position (over the alphabet ``a``); the
    first position reads its own logits ``z_0``.
    """
    from transformers import AutoModelForSequenceClassification

    src = lm.config
    lay = _readout_layout(src, len(alphabet))
    cfg = _config_dict(
        src,
        hidden_size=lay.H2,
        head_dim=lay.head_dim,
        num_hidden_layers=lay.L + 2,
        layer_types=list(getattr(src, "layer_types", None) or ["full_attention"] * lay.L) + ["full_attention"] * 2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    if "attention_bias" in cfg:  # Llama: the previous-token head needs query / key biases
        cfg["attention_bias"] = True
    model = AutoModelForSequenceClassification.from_config(src.__class__(**cfg)).float()
    base, old = model.model, lm.model
    for p in model.parameters():
        p.zero_()
    _embed_policy(base, old, alphabet, lay)
    rows = lm.get_output_embeddings().weight[alphabet]  # (alphabet, H)
    _write_copy_layer(base, old, rows - rows.mean(0, keepdim=True), lay, src.max_position_embeddings)
    _write_average_layer(base, old, lay)
    model.score.weight[0, lay.S2] = 1.0
    model.config.likelihood_readout = {"alphabet": alphabet, "policy_hidden_size": lay.H, "policy_layers": lay.L}
    return model


def _readout_layout(src, n: int) -> SimpleNamespace:
    """Sizes and extra residual channels (after the policy's ``H``) of the readout for an alphabet of ``n``."""
    H = src.hidden_size
    n_heads, n_kv = src.num_attention_heads, src.num_key_value_heads
    head_dim = getattr(src, "head_dim", None) or H // n_heads
    if n + 1 > n_kv * head_dim:
        raise ValueError(f"alphabet: {n} tokens do not fit the {n_kv * head_dim} value channels of one layer")
    if n > src.intermediate_size:
        raise ValueError(f"alphabet: {n} tokens exceed intermediate_size={src.intermediate_size}")
    H2 = -(-(H + 3 + 2 * n) // n_heads) * n_heads  # some configs (Llama) insist on a multiple of the heads
    return SimpleNamespace(
        H=H, H2=H2, L=src.num_hidden_layers, n=n, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
        rep=n_heads // n_kv, CONST=H, S=H + 1, S2=H + 2,
        D=[H + 3 + i for i in range(n)],  # copied logits of the previous position
        OH=[H + 3 + n + i for i in range(n)],  # one-hot marker of the current token
        rho=_K / math.sqrt(H2),  # RMS of the residual once the constant channel is written
        keep=math.sqrt(H / H2),  # rescales the policy's norm weights for the wider vector
    )  # fmt: skip


def _embed_policy(base, old, alphabet: list[int], lay: SimpleNamespace) -> None:
    """The policy in the first ``H`` channels, and a one-hot marker channel per alphabet token."""

    def put(dst: torch.nn.Linear, src_lin: torch.nn.Linear):
        out_f, in_f = src_lin.weight.shape
        dst.weight[:out_f, :in_f] = src_lin.weight
        if src_lin.bias is not None:
            dst.bias[:out_f] = src_lin.bias

    base.embed_tokens.weight[:, : lay.H] = old.embed_tokens.weight
    for i, tok in enumerate(alphabet):
        base.embed_tokens.weight[tok, lay.OH[i]] = _EPS
    for new_layer, old_layer in zip(base.layers[: lay.L], old.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(getattr(new_layer.self_attn, name), getattr(old_layer.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(new_layer.mlp, name), getattr(old_layer.mlp, name))
        new_layer.input_layernorm.weight[: lay.H] = old_layer.input_layernorm.weight * lay.keep
        new_layer.post_attention_layernorm.weight[: lay.H] = old_layer.post_attention_layernorm.weight * lay.keep


def _write_copy_layer(base, old, centered: torch.Tensor, lay: SimpleNamespace, max_positions: int) -> None:
    """Layer A: a previous-token head copying the centered alphabet logits, plus the constant channel; its MLP
    writes the current token's copied logit into ``S``."""
    a = base.layers[lay.L]
    a.input_layernorm.weight[: lay.H] = old.norm.weight * lay.keep  # = the policy's final norm on its channels
    inv_freq = base.rotary_emb.inv_freq.detach().cpu().double()
    for amplitude in (_PREV_AMPLITUDE, 2 * _PREV_AMPLITUDE, 4 * _PREV_AMPLITUDE):
        qb, kb = _previous_token_bias(inv_freq, lay.head_dim, amplitude)
        worst = _check_previous_token_head(qb, kb, inv_freq, lay.head_dim, max_positions)
        if worst >= 0.99:
            break
    else:
        raise RuntimeError(f"previous-token head too blurred for this RoPE configuration ({worst:.3f} on offset 1)")
    hd = lay.head_dim
    for h in range(lay.n_heads):
        a.self_attn.q_proj.bias[h * hd : (h + 1) * hd] = qb
    for g in range(lay.n_kv):
        a.self_attn.k_proj.bias[g * hd : (g + 1) * hd] = kb
    for i in range(lay.n + 1):  # (kv head g, dim t) of each value
        g, t = i // hd, i % hd
        row, col = g * hd + t, (g * lay.rep) * hd + t  # col: the first query head of that kv group
        if i < lay.n:
            a.self_attn.v_proj.weight[row, : lay.H] = centered[i]
            a.self_attn.o_proj.weight[lay.D[i], col] = _ALPHA
        else:
            a.self_attn.v_proj.bias[row] = 1.0
            a.self_attn.o_proj.weight[lay.CONST, col] = _K
    for i in range(lay.n):
        a.post_attention_layernorm.weight[lay.D[i]] = lay.rho / _ALPHA  # -> the logit itself
        a.post_attention_layernorm.weight[lay.OH[i]] = lay.rho / _EPS  # -> 1 for the current token, 0 otherwise
        a.mlp.gate_proj.weight[i, lay.OH[i]] = _GATE
        a.mlp.up_proj.weight[i, lay.D[i]] = 1.0
        a.mlp.down_proj.weight[lay.S, i] = 1.0 / torch.nn.functional.silu(torch.tensor(_GATE)).item()


def _write_average_layer(base, old, lay: SimpleNamespace) -> None:
    """Layer B: uniform causal attention averaging the per-token log-likelihood ``S`` into ``S2``; the final norm."""
    b = base.layers[lay.L + 1]
    b.input_layernorm.weight[lay.S] = lay.rho
    b.self_attn.v_proj.weight[0, lay.S] = 1.0
    b.self_attn.o_proj.weight[lay.S2, 0] = 1.0
    b.post_attention_layernorm.weight.fill_(1.0)
    base.norm.weight[: lay.H] = old.norm.weight
    base.norm.weight[lay.H :] = 1.0
    base.norm.weight[lay.S2] = lay.rho


def _trainable_masks(model) -> dict[str, torch.Tensor | None]:
    """For the likelihood readout: which entries ``RewardTrainer`` may update, by parameter name (a 0/1 mask, or
    None for the whole tensor); parameters not listed are frozen.

    Trainable: the policy block of the policy's own layers and embedding (policy channels to policy channels), the
    policy's final norm and its alphabet logit rows (layer A's ``input_layernorm`` / ``v_proj``), and the score scale.
    Everything else keeps its hand-set value: the readout's large gains would amplify any drift of the zero entries
    around them (measured: leaving them trainable drops held-out accuracy from 0.79 to 0.57 within 150 steps).
    With ``weight_decay`` > 0 AdamW still decays the frozen entries of partly trainable tensors (only the tiny
    embedding markers are nonzero there).
    """
    info = model.config.likelihood_readout
    H, L, n = info["policy_hidden_size"], info["policy_layers"], len(info["alphabet"])
    head_dim = model.config.head_dim
    masks: dict[str, torch.Tensor | None] = {}
    params = dict(model.named_parameters())

    def block(name: str, rows: slice | None, cols: slice | None):
        mask = torch.zeros_like(params[name])
        index = tuple(x if x is not None else slice(None) for x in ((rows, cols) if mask.ndim == 2 else (rows,)))
        mask[index] = 1.0
        masks[name] = mask

    block("model.embed_tokens.weight", None, slice(0, H))
    for i in range(L):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            block(pre + f"self_attn.{proj}.weight", None, slice(0, H))
            if pre + f"self_attn.{proj}.bias" in params:
                masks[pre + f"self_attn.{proj}.bias"] = None
        block(pre + "self_attn.o_proj.weight", slice(0, H), None)
        if pre + "self_attn.o_proj.bias" in params:
            block(pre + "self_attn.o_proj.bias", slice(0, H), None)
        block(pre + "mlp.gate_proj.weight", None, slice(0, H))
        block(pre + "mlp.up_proj.weight", None, slice(0, H))
        block(pre + "mlp.down_proj.weight", slice(0, H), None)
        block(pre + "input_layernorm.weight", slice(0, H), None)
        block(pre + "post_attention_layernorm.weight", slice(0, H), None)
    pre = f"model.layers.{L}."
    block(pre + "input_layernorm.weight", slice(0, H), None)
    v = torch.zeros_like(params[pre + "self_attn.v_proj.weight"])
    for i in range(n):
        g, t = divmod(i, head_dim)
        v[g * head_dim + t, :H] = 1.0
    masks[pre + "self_attn.v_proj.weight"] = v
    s2 = H + 2
    block("score.weight", None, slice(s2, s2 + 1))
    return masks


def _restrict_training(model) -> list:
    """Freeze what :func:`_trainable_masks` does not list and mask the gradients of the partly trainable tensors.
    Returns the hook handles (remove them after training)."""
    masks = _trainable_masks(model)
    handles = []
    for name, p in model.named_parameters():
        if name not in masks:
            p.requires_grad_(False)
        elif masks[name] is not None:
            mask = masks[name].to(p.device)
            handles.append(p.register_hook(lambda g, m=mask: g * m))
    return handles


# ---------------------------------------------------------------------------------------------------------------
# Training


def _training_pairs(default: EmbeddedDefault, config: RewardModelConfig):
    train = default.preference_train
    val = default.preference_validation
    if config.n_train is not None and config.n_train < len(train):
        train = train.select(range(config.n_train))
    if config.n_eval is not None and config.n_eval < len(val):
        val = val.select(range(config.n_eval))
    return train, val


def _fingerprint(*datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        rows = [list(ds[col]) for col in ("prompt", "chosen", "rejected")]
        h.update(json.dumps(rows, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def reward_model_key(default: EmbeddedDefault, config: RewardModelConfig | None = None) -> str:
    """Cache key: ``<arch>-<task>-<16 hex digits>`` of the config, the warm start's key and the exact pairs."""
    config = config or RewardModelConfig()
    train, val = _training_pairs(default, config)
    payload = {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "warm_start": default.warm_start_info.get("key") or Path(default.model_path).name,
        "data": _fingerprint(train, val),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    arch = default.warm_start_config.arch
    return f"{arch}-{default.task.task}-{digest}"


def reward_model_dir(
    default: EmbeddedDefault, config: RewardModelConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the reward model of ``(default, config)`` lives (whether or not it exists yet): under ``cache_dir``,
    else next to the default's warm start when that sits in a cache (``<root>/warmstart/<key>``), else under
    :func:`cache_root`."""
    if cache_dir is not None:
        root = cache_root(cache_dir)
    else:
        model_path = Path(default.model_path)
        root = model_path.parent.parent if model_path.parent.name == "warmstart" else cache_root(None)
    return root / "reward_model" / reward_model_key(default, config)


def read_reward_marker(path: str | os.PathLike) -> dict | None:
    """The parsed marker of a reward-model directory, or None if absent / unreadable / incomplete."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("complete") is True else None


def is_valid_reward_model(path: str | os.PathLike, key: str | None = None) -> bool:
    """True when ``path`` holds a complete reward model (marker written last, model and tokenizer files present)
    and, if ``key`` is given, the marker's key matches it."""
    path = Path(path)
    info = read_reward_marker(path)
    if info is None or info.get("format") != FORMAT_VERSION:
        return False
    if key is not None and info.get("key") != key:
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in required)


def _encode_pairs(tokenizer, dataset):
    from datasets import Dataset

    prompts = list(dataset["prompt"])
    chosen = encode_texts(tokenizer, prompts, list(dataset["chosen"]))
    rejected = encode_texts(tokenizer, prompts, list(dataset["rejected"]))

    def unpad(enc):
        return [ids[: int(m.sum())].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]

    return Dataset.from_dict({"chosen_ids": unpad(chosen), "rejected_ids": unpad(rejected)})


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the expected "newly initialized weights" warnings and the progress bars of ``transformers`` inside
    the block (both restored after)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def build_reward_model(default: EmbeddedDefault, config: RewardModelConfig | None = None, tokenizer=None):
    """The untrained reward model of ``(default, config)`` (float32, CPU, train mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or RewardModelConfig()
    with _quiet_transformers():
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(default.model_path)
        lm = load_warm_start(default.model_path)[0]
        if config.init == "scratch":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                lm = AutoModelForCausalLM.from_config(lm.config).float()
        if config.readout == "linear":
            model = _linear_reward_model(lm, tokenizer, config.seed)
        else:
            train, _ = _training_pairs(default, config)
            model = _likelihood_reward_model(lm, tokenizer, _alphabet(tokenizer, [train]))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model, tokenizer


def _checkpointing_flag(config_cls) -> str:
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def train_reward_model(default: EmbeddedDefault, config: RewardModelConfig | None = None, log=None):
    """Build and train the reward model in memory (no cache). Returns ``(model, tokenizer, metrics)``; the metrics
    hold the held-out (validation) pairwise accuracy before and after training, the training-pair accuracy, the
    ``RewardTrainer`` log and the timings."""
    config = config or RewardModelConfig()
    t0 = time.perf_counter()
    train, val = _training_pairs(default, config)
    model, tokenizer = build_reward_model(default, config)
    train_probe = train.select(range(min(512, len(train))))
    before = pairwise_accuracy(model, tokenizer, val)
    train_before = pairwise_accuracy(model, tokenizer, train_probe)
    if log is not None:
        log(f"reward model: held-out pairwise accuracy before training {before:.3f}")
    history, train_seconds = _fit_reward_model(model, tokenizer, train, config) if config.max_steps > 0 else ([], 0.0)
    model.eval()
    after = pairwise_accuracy(model, tokenizer, val)
    metrics = {
        "validation_accuracy_before": before,
        "validation_accuracy": after,
        "train_accuracy_before": train_before,
        "train_accuracy": pairwise_accuracy(model, tokenizer, train_probe),
        "num_validation_pairs": len(val),
        "num_train_pairs": len(train),
        "steps": config.max_steps,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "log_history": history,
    }
    if log is not None:
        log(f"reward model: {config.max_steps} steps in {train_seconds:.1f}s, held-out pairwise accuracy {after:.3f}")
    return model, tokenizer, metrics


def _fit_reward_model(model, tokenizer, train, config: RewardModelConfig) -> tuple[list[dict], float]:
    """Train ``model`` in place with TRL's ``RewardTrainer``; ``(numeric log history, training seconds)``."""
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    dataset = _encode_pairs(tokenizer, train)
    handles = _restrict_training(model) if config.readout == "likelihood" else []
    with tempfile.TemporaryDirectory(prefix="llm_entreg_rm_") as out_dir:
        args = RewardConfig(
            output_dir=out_dir,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            center_rewards_coefficient=config.center_rewards_coefficient,
            max_length=None,
            logging_steps=max(1, config.max_steps // 5),
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=config.seed,
            data_seed=config.seed,
            # TRL turns checkpointing on by default; recent transformers renamed the flag (the old name warns).
            **{_checkpointing_flag(RewardConfig): False},
        )
        with _quiet_transformers():
            trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)  # no per-log print of the metrics dict
            t1 = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t1
        history = [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in trainer.state.log_history]
        del trainer
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return history, train_seconds


# ---------------------------------------------------------------------------------------------------------------
# Cache


def ensure_reward_model(
    default: EmbeddedDefault,
    config: RewardModelConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    num_threads: int | None = 1,
    log=None,
) -> tuple[Path, bool]:
    """Make sure the reward model of ``(default, config)`` is in the cache; train it if not. Returns
    ``(path, from_cache)``.

    ``force`` retrains even over a valid entry. ``num_threads`` sets torch's intra-op threads for the training only
    (restored afterwards; None leaves torch's setting alone); 1, the default, is the fastest for models this small on a
    busy CPU (see :func:`ensure_warm_start`). ``log`` is an optional ``print``-like callable.
    """
    config = config or RewardModelConfig()
    final = reward_model_dir(default, config, cache_dir)
    key = final.name
    def build(tmp: Path) -> dict:
        with torch_threads(num_threads):
            model, tokenizer, metrics = train_reward_model(default, config, log=log)
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return {
            "complete": True,
            "format": FORMAT_VERSION,
            "key": key,
            "config": config.to_dict(),
            "warm_start": default.warm_start_info.get("key") or Path(default.model_path).name,
            "warm_start_path": str(default.model_path),
            "task": default.task.to_dict(),
            "seed": default.seed,
            "input_format": "prompt + completion, add_special_tokens=False, right padding (as GRPOTrainer)",
            "validation_accuracy": metrics["validation_accuracy"],
            "validation_accuracy_before": metrics["validation_accuracy_before"],
            "metrics": metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {
                "torch": torch.__version__,
                "transformers": package_version("transformers"),
                "trl": package_version("trl"),
            },
        }
    return build_once(final, lambda: is_valid_reward_model(final, key), build, MARKER, force)


def load_reward_model(path: str | os.PathLike):
    """``(model, tokenizer)`` loaded from a reward-model directory (model in eval mode, float32, on the CPU)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not is_valid_reward_model(path):
        raise ValueError(f"path: {str(path)!r} is not a complete reward-model checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(path)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer

