"""Held-out evaluation of a policy on the embedded task: accuracy and reward (greedy and sampled), pass@k and distinct
correct answers over ``num_samples`` samples per prompt, policy entropy, validation NLL, and the per-prompt values
that a sweep's bootstrap resamples. What each metric measures: docs/embedded_default.md ("Held-out evaluation").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import pass_at_k, torch_threads
from .data import Problem, correct_answers, problems_from_dataset
from .rewards import correctness_reward


@dataclass
class Generations:
    """Completions of one generation pass: texts, token ids (up to and including ``<eos>``), per-token entropies."""

    texts: list[str]
    token_ids: list[list[int]]
    entropies: list[list[float]]
    kls: list[list[float]] | None = None
    logprobs: list[list[float]] | None = None  # log-prob of each generated token (temperature 1)


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
    reference=None,
) -> Generations:
    """Generate one completion per prompt (greedy, or sampled at ``temperature`` with no top-k / top-p).

    ``entropies`` holds the entropy of ``softmax(logits / temperature)`` (``temperature`` 1 when greedy) at every
    generated position; with a ``reference`` model, ``kls`` holds ``KL(policy || reference)`` there (both
    distributions at temperature 1, the reference teacher-forced on the same tokens).
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
    kls_out: list[list[float]] = []
    lps_out: list[list[float]] = []
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
                lp = torch.log_softmax(logits.float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()
                kl = None if reference is None else _kl_to(reference, out.sequences, enc["attention_mask"], logits,
                                                           pad_id).cpu()
                new = new.cpu()
                chunk_ids = []
                for row in range(new.shape[0]):
                    toks = new[row].tolist()
                    n = toks.index(eos_id) + 1 if eos_id in toks else len(toks)
                    chunk_ids.append(toks[:n])
                    ents_out.append(ent[row, :n].tolist())
                    lps_out.append(lp[row, :n].tolist())
                    if kl is not None:
                        kls_out.append(kl[row, :n].tolist())
                ids_out += chunk_ids
                texts += tokenizer.batch_decode(chunk_ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return Generations(texts=texts, token_ids=ids_out, entropies=ents_out, kls=kls_out if reference is not None else None,
                       logprobs=lps_out)


def _kl_to(reference, sequences, prompt_mask, logits, pad_id) -> torch.Tensor:
    """``KL(softmax(logits) || reference)`` ``[B, T_new]`` at the generated positions, the reference teacher-forced
    on the prompt and the generated tokens (positions after the end hold padding: read only up to ``<eos>``)."""
    n_new = logits.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], dim=1)
    ref_logits = reference(input_ids=sequences, attention_mask=mask).logits[:, -n_new - 1:-1].float()
    logp = F.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - F.log_softmax(ref_logits, dim=-1))).sum(-1)


@torch.no_grad()
def reference_stats(model, tokenizer, problems, batch_size: int = 256, per_prompt: bool = False) -> dict:
    """Teacher-forced statistics over the correct completions (answer + ``<eos>``): ``nll`` (per token),
    ``seq_nll`` (per sequence) and ``ref_entropy`` (per token, temperature 1); with ``per_prompt``, also
    ``per_prompt_nll`` (each problem's per-token NLL). For a many-answer task the NLL is of the whole set of correct
    answers, ``-log sum_a p(a <eos>)`` per prompt (``nll`` and ``seq_nll`` alike): the NLL of one of them would
    penalize a policy that prefers another."""
    problems = _as_problems(problems)
    was_training = model.training
    model.eval()
    try:
        out = _teacher_forced(model, tokenizer, problems, batch_size)
        if problems and all(correct_answers(p.prompt) is not None for p in problems):
            rows = _answer_set_nll(model, tokenizer, problems, batch_size)
            out.update(nll=_mean(rows), seq_nll=_mean(rows), per_prompt_nll=rows)
    finally:
        model.train(was_training)
    if not per_prompt:
        out.pop("per_prompt_nll")
    return out


def _token_logprobs(model, tokenizer, problems, batch_size):
    """Per problem: the log-probs of its completion tokens (answer + ``<eos>``) and the entropies there."""
    device = next(model.parameters()).device
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        input_ids, labels = encode_supervised(tokenizer, chunk)
        input_ids, labels = input_ids.to(device), labels.to(device)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long()).logits
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        mask = targets != -100
        logp = F.log_softmax(logits, dim=-1)
        token_lp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        yield token_lp, -(logp.exp() * logp).sum(-1), mask


@torch.no_grad()
def _teacher_forced(model, tokenizer, problems, batch_size) -> dict:
    tot_nll = tot_ent = 0.0
    tot_tok = 0
    rows: list[float] = []
    for token_lp, ent, mask in _token_logprobs(model, tokenizer, problems, batch_size):
        nll = -token_lp
        tot_nll += nll[mask].sum().item()
        tot_ent += ent[mask].sum().item()
        tot_tok += int(mask.sum())
        rows += ((nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    n = max(len(problems), 1)
    return {"nll": tot_nll / max(tot_tok, 1), "seq_nll": tot_nll / n, "ref_entropy": tot_ent / max(tot_tok, 1),
            "per_prompt_nll": rows}


@torch.no_grad()
def _answer_set_nll(model, tokenizer, problems, batch_size) -> list[float]:
    """``-log sum_a p(a <eos> | prompt)`` over each problem's correct answers."""
    pairs = [(i, Problem(p.task, p.prompt, a)) for i, p in enumerate(problems) for a in correct_answers(p.prompt)]
    seq_lp: list[float] = []
    for token_lp, _, mask in _token_logprobs(model, tokenizer, [q for _, q in pairs], batch_size):
        seq_lp += (token_lp * mask).sum(-1).tolist()
    by_problem: list[list[float]] = [[] for _ in problems]
    for (i, _), lp in zip(pairs, seq_lp):
        by_problem[i].append(lp)
    return [-torch.logsumexp(torch.tensor(lps, dtype=torch.float64), 0).item() for lps in by_problem]


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


#: The k of the reported pass@k (those <= num_samples).
PASS_AT_K = (1, 4, 16)


def evaluate(
    model,
    tokenizer,
    problems,
    reward_funcs: Sequence[Callable] | None = None,
    reward_weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    num_samples: int = 16,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    greedy: bool = True,
    sampled: bool = True,
    num_threads: int | None = None,
    reference=None,
) -> dict:
    """Evaluate ``model`` on held-out ``problems`` (a list of :class:`Problem` or a dataset with a ``prompt`` column).

    See the module docstring for the metrics: floats, plus ``pass_at_k`` (``{"1": ..., "4": ..., "16": ...}`` for the
    k <= ``num_samples``) and ``per_prompt`` (lists, one value per problem: ``reward`` (greedy), ``correct`` (correct
    samples out of ``num_samples``), ``nll``). With a ``reference`` model (e.g. the warm start), ``kl_to_reference``: the
    mean per-token ``KL(policy || reference)`` over the sampled tokens. ``greedy=False`` / ``sampled=False`` skip those
    passes (their keys are then absent). Runs on the model's device in eval mode and restores the training mode afterwards.
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
                         max_new_tokens, batch_size, seed, greedy, sampled, reference)


def _evaluate(model, tokenizer, problems, reward_funcs, reward_weights, temperature, num_samples, max_new_tokens,
              batch_size, seed, greedy, sampled, reference=None) -> dict:
    prompts = [p.prompt for p in problems]
    metrics: dict = {"num_prompts": float(len(problems))}
    per_prompt: dict[str, list] = {}
    if greedy:
        g = generate_completions(model, tokenizer, prompts, False, 1.0, max_new_tokens, batch_size, seed)
        metrics["accuracy"] = _mean(correctness_reward(prompts, g.texts, answer=[p.answer for p in problems]))
        per_prompt["reward"] = _total_rewards(prompts, g.texts, problems, reward_funcs, reward_weights)
        metrics["reward"] = _mean(per_prompt["reward"])
        metrics["greedy_entropy"] = _mean(e for ents in g.entropies for e in ents)
    if sampled:
        metrics.update(_sampled_metrics(model, tokenizer, problems, reward_funcs, reward_weights, temperature,
                                        num_samples, max_new_tokens, batch_size, seed, per_prompt, reference))
    ref = reference_stats(model, tokenizer, problems, batch_size, per_prompt=True)
    per_prompt["nll"] = ref.pop("per_prompt_nll")
    metrics.update(ref)
    metrics["per_prompt"] = per_prompt
    return metrics


def _sampled_metrics(model, tokenizer, problems, reward_funcs, reward_weights, temperature, n, max_new_tokens,
                     batch_size, seed, per_prompt, reference=None) -> dict:
    """Metrics of ``n`` samples per prompt: accuracy, reward, entropy (overall and by decode position), length,
    pass@k, distinct correct answers, and the KL to ``reference`` when given."""
    prompts = [p.prompt for p in problems]
    rep_prompts = [p for p in prompts for _ in range(n)]
    rep_problems = [p for p in problems for _ in range(n)]
    s = generate_completions(model, tokenizer, rep_prompts, True, temperature, max_new_tokens, batch_size, seed,
                             reference)
    correct = correctness_reward(rep_prompts, s.texts, answer=[p.answer for p in rep_problems])
    counts = [int(sum(correct[i * n:(i + 1) * n])) for i in range(len(problems))]
    distinct = [len({s.texts[i * n + j].strip() for j in range(n) if correct[i * n + j]}) for i in range(len(problems))]
    per_prompt["correct"] = counts
    return {
        "num_samples": float(n),
        "sampled_accuracy": _mean(correct),
        "sampled_reward": _mean(_total_rewards(rep_prompts, s.texts, rep_problems, reward_funcs, reward_weights)),
        "entropy": _mean(e for ents in s.entropies for e in ents),
        "completion_length": _mean(len(ids) for ids in s.token_ids),
        "pass_at_k": {str(k): _mean(pass_at_k(n, c, k) for c in counts) for k in PASS_AT_K if k <= n},
        "distinct_correct": _mean(distinct),
        "entropy_by_position": [_mean(ents[t] for ents in s.entropies if len(ents) > t)
                                for t in range(max((len(e) for e in s.entropies), default=0))],
        **({} if s.kls is None else {"kl_to_reference": _mean(k for kls in s.kls for k in kls)}),
    }
