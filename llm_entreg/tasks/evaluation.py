"""Held-out evaluation of a policy on the embedded task: accuracy and reward (greedy and sampled), policy entropy,
validation NLL. What each metric measures: docs/embedded_default.md ("Held-out evaluation").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import torch_threads
from .data import Problem, problems_from_dataset
from .rewards import correctness_reward


@dataclass
class Generations:
    """Completions of one generation pass: texts, token ids (up to and including ``<eos>``), per-token entropies."""

    texts: list[str]
    token_ids: list[list[int]]
    entropies: list[list[float]]


def _as_problems(problems) -> list[Problem]:
    if isinstance(problems, (list, tuple)) and (not problems or isinstance(problems[0], Problem)):
        return list(problems)
    return problems_from_dataset(problems)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    do_sample: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
) -> Generations:
    """Generate one completion per prompt (greedy, or sampled at ``temperature`` with no top-k / top-p).

    ``entropies`` holds the entropy of ``softmax(logits / temperature)`` (``temperature`` 1 when greedy) at every
    generated position.
    """
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature: must be > 0 when sampling, got {temperature}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts: list[str] = []
    ids_out: list[list[int]] = []
    ents_out: list[list[float]] = []
    t_ent = temperature if do_sample else 1.0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
                gen_kwargs = dict(
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
                if do_sample:
                    gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                out = model.generate(**enc, **gen_kwargs)
                new = out.sequences[:, enc["input_ids"].shape[1] :]
                logits = torch.stack(out.logits, dim=1)  # [B, T_new, V], raw (unprocessed) logits
                ent = _entropy(logits / t_ent).cpu()
                new = new.cpu()
                chunk_ids = []
                for row in range(new.shape[0]):
                    toks = new[row].tolist()
                    n = toks.index(eos_id) + 1 if eos_id in toks else len(toks)
                    chunk_ids.append(toks[:n])
                    ents_out.append(ent[row, :n].tolist())
                ids_out += chunk_ids
                texts += tokenizer.batch_decode(chunk_ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return Generations(texts=texts, token_ids=ids_out, entropies=ents_out)


@torch.no_grad()
def reference_stats(model, tokenizer, problems, batch_size: int = 256) -> dict[str, float]:
    """Teacher-forced statistics over the correct completions (answer + ``<eos>``): ``nll`` (per token),
    ``seq_nll`` (per sequence) and ``ref_entropy`` (per token, temperature 1)."""
    problems = _as_problems(problems)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tot_nll = tot_ent = 0.0
    tot_tok = 0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            input_ids, labels = encode_supervised(tokenizer, chunk)
            input_ids, labels = input_ids.to(device), labels.to(device)
            logits = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long()).logits
            logits, targets = logits[:, :-1].float(), labels[:, 1:]
            mask = targets != -100
            logp = F.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            tot_nll += nll[mask].sum().item()
            tot_ent += ent[mask].sum().item()
            tot_tok += int(mask.sum())
    finally:
        model.train(was_training)
    n = max(len(problems), 1)
    return {
        "nll": tot_nll / max(tot_tok, 1),
        "seq_nll": tot_nll / n,
        "ref_entropy": tot_ent / max(tot_tok, 1),
    }


def encode_supervised(tokenizer, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` = ``<bos> prompt answer <eos>`` and ``labels`` with -100 on ``<bos>``, the prompt
    and padding (the same tokens TRL's SFT / DPO trainers score in the standard prompt-completion format)."""
    prompt_ids = tokenizer([p.prompt for p in problems])["input_ids"]
    full_ids = tokenizer([p.prompt + p.answer + tokenizer.eos_token for p in problems])["input_ids"]
    width = max(len(x) for x in full_ids)
    input_ids = torch.full((len(problems), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(problems), width), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        input_ids[i, : len(f)] = torch.tensor(f)
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
    return input_ids, labels


def _total_rewards(prompts, texts, problems, reward_funcs, reward_weights) -> list[float]:
    kwargs = {"answer": [p.answer for p in problems], "task": [p.task for p in problems]}
    totals = [0.0] * len(texts)
    for func, w in zip(reward_funcs, reward_weights, strict=True):
        values = func(prompts=prompts, completions=texts, completion_ids=None, **kwargs)
        totals = [t + w * (0.0 if v is None else float(v)) for t, v in zip(totals, values, strict=True)]
    return totals


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate(
    model,
    tokenizer,
    problems,
    reward_funcs: Sequence[Callable] | None = None,
    reward_weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    num_samples: int = 1,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    greedy: bool = True,
    sampled: bool = True,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on held-out ``problems`` (a list of :class:`Problem` or a dataset with a ``prompt`` column).

    See the module docstring for the metrics. ``greedy=False`` / ``sampled=False`` skip those passes (their keys are
    then absent). Runs on the model's device in eval mode and restores the training mode afterwards.
    ``num_threads`` sets torch's intra-op threads for this call only (None: leave them alone); 1 is the fastest for
    the embedded tiny model on a CPU, many times so on a busy machine.
    """
    problems = _as_problems(problems)
    if not problems:
        raise ValueError("problems: empty")
    reward_funcs = list(reward_funcs) if reward_funcs is not None else [correctness_reward]
    reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
    if len(reward_weights) != len(reward_funcs):
        raise ValueError(f"reward_weights: expected {len(reward_funcs)} weights, got {len(reward_weights)}")
    if sampled and num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    with torch_threads(num_threads):
        return _evaluate(model, tokenizer, problems, reward_funcs, reward_weights, temperature, num_samples,
                         max_new_tokens, batch_size, seed, greedy, sampled)


def _evaluate(model, tokenizer, problems, reward_funcs, reward_weights, temperature, num_samples, max_new_tokens,
              batch_size, seed, greedy, sampled) -> dict[str, float]:
    prompts = [p.prompt for p in problems]
    metrics: dict[str, float] = {"num_prompts": float(len(problems))}
    if greedy:
        g = generate_completions(model, tokenizer, prompts, False, 1.0, max_new_tokens, batch_size, seed)
        metrics["accuracy"] = _mean(correctness_reward(prompts, g.texts, answer=[p.answer for p in problems]))
        metrics["reward"] = _mean(_total_rewards(prompts, g.texts, problems, reward_funcs, reward_weights))
        metrics["greedy_entropy"] = _mean(e for ents in g.entropies for e in ents)
    if sampled:
        rep_prompts = [p for p in prompts for _ in range(num_samples)]
        rep_problems = [p for p in problems for _ in range(num_samples)]
        s = generate_completions(model, tokenizer, rep_prompts, True, temperature, max_new_tokens, batch_size, seed)
        metrics["sampled_accuracy"] = _mean(
            correctness_reward(rep_prompts, s.texts, answer=[p.answer for p in rep_problems])
        )
        metrics["sampled_reward"] = _mean(_total_rewards(rep_prompts, s.texts, rep_problems, reward_funcs,
                                                         reward_weights))
        metrics["entropy"] = _mean(e for ents in s.entropies for e in ents)
        metrics["completion_length"] = _mean(len(ids) for ids in s.token_ids)
    metrics.update(reference_stats(model, tokenizer, problems, batch_size))
    return metrics
