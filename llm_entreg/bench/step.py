"""End-to-end step benchmark: one DPO and one GRPO optimizer step, our trainers + fused head vs TRL's, on a
randomly initialised Qwen2.5-0.5B-shaped model (or ``--tiny``): step time, GRPO generation apart from the loss step,
peak memory and the losses of every step, side by side. Configurations, timing and memory methods:
docs/benchmarks.md ("End-to-end step benchmark"). Entry points: :func:`build_parser`, :func:`run_step_bench`,
:func:`run_config` (one configuration, in this process) and :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .report import (STAMP, fmt, mib, proc_status_kib, render_step_markdown, reset_peak_rss, step_comparisons,
                     step_device_info, step_short_table, subprocess_env, versions, write_files)

#: Qwen2.5-0.5B (``Qwen/Qwen2.5-0.5B``'s ``config.json``), randomly initialised here.
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
)
#: ``--tiny``: same architecture, seconds on a CPU (odd vocabulary so kernel tiles do not divide it).
TINY = dict(
    vocab_size=4099,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
)
SHAPES = {"qwen2.5-0.5b": QWEN25_05B, "tiny": TINY}

#: Run settings of the two modes (each overridable on the command line).
GPU_DEFAULTS = dict(prompt_len=256, completion_len=256, batch=8, num_generations=4, steps=3, warmup=1)
TINY_DEFAULTS = dict(prompt_len=16, completion_len=16, batch=4, num_generations=2, steps=2, warmup=1)

#: Special tokens of the benchmark tokenizer (ids 0..3); synthetic token ids are drawn from [4, V).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
FIRST_ID = len(SPECIAL_TOKENS)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHILD_TAG = "BENCH_STEP_CHILD_RESULT "


# ----------------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """One benchmarked configuration."""

    name: str
    algo: str  # "dpo" | "grpo"
    impl: str  # "ours" | "trl" | "trl_plain"
    #: Entropy bonus β; None: ``--entropy-coef``. TRL's DPO has no bonus (always 0).
    entropy_coef: float | None = None
    #: Our fused-head backend; None: ``--backend``. Only for ``impl == "ours"``.
    backend: str | None = None
    #: GRPO only: ``EntropyGRPOConfig.fused_loss`` (the loss's gradient formed in the head's forward).
    fused_loss: bool = False
    note: str = ""


BASE_CONFIGS = {
    "dpo_ours": StepConfig("dpo_ours", "dpo", "ours", note="EntropyDPOTrainer, our fused head"),
    "dpo_ours_b0": StepConfig("dpo_ours_b0", "dpo", "ours", entropy_coef=0.0,
                              note="EntropyDPOTrainer at β=0 (loss must equal TRL's)"),
    "dpo_trl": StepConfig("dpo_trl", "dpo", "trl", entropy_coef=0.0, note="trl.DPOTrainer, TRL's fused head"),
    "dpo_trl_plain": StepConfig("dpo_trl_plain", "dpo", "trl_plain", entropy_coef=0.0,
                                note="trl.DPOTrainer, materialising head (float32 [tokens, V] logits)"),
    "grpo_ours": StepConfig("grpo_ours", "grpo", "ours", note="EntropyGRPOTrainer, our fused head"),
    "grpo_ours_b0": StepConfig("grpo_ours_b0", "grpo", "ours", entropy_coef=0.0, note="EntropyGRPOTrainer at β=0"),
    "grpo_ours_fused": StepConfig("grpo_ours_fused", "grpo", "ours", fused_loss=True,
                                  note="EntropyGRPOTrainer, fused_loss=True (loss gradient formed in the head)"),
    "grpo_trl": StepConfig("grpo_trl", "grpo", "trl",
                           note="trl.GRPOTrainer, TRL's fused head, TRL's own entropy_coef = β"),
    "grpo_trl_b0": StepConfig("grpo_trl_b0", "grpo", "trl", entropy_coef=0.0, note="trl.GRPOTrainer at β=0"),
    "grpo_trl_plain": StepConfig("grpo_trl_plain", "grpo", "trl_plain",
                                 note="trl.GRPOTrainer, materialising head, TRL's own entropy_coef = β"),
}
DEFAULT_CONFIGS = "dpo_ours,dpo_ours_b0,dpo_trl,dpo_trl_plain,grpo_ours,grpo_ours_fused,grpo_trl,grpo_trl_plain"
TINY_CONFIGS = DEFAULT_CONFIGS
OUR_BACKENDS = ("auto", "chunked", "triton", "torch")


def parse_configs(spec: str) -> list[StepConfig]:
    """``"dpo_ours,dpo_trl,grpo_ours@chunked"`` -> configurations (``@backend`` only on ours)."""
    out, seen = [], set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        base, _, backend = item.partition("@")
        if base not in BASE_CONFIGS:
            raise ValueError(f"--configs: unknown configuration {base!r}; choose from {sorted(BASE_CONFIGS)}")
        cfg = BASE_CONFIGS[base]
        if backend:
            if cfg.impl != "ours":
                raise ValueError(f"--configs: {item!r}: @backend only applies to our trainers (TRL's head is fixed)")
            if backend not in OUR_BACKENDS:
                raise ValueError(f"--configs: {item!r}: backend must be one of {OUR_BACKENDS}")
            cfg = StepConfig(item, cfg.algo, cfg.impl, cfg.entropy_coef, backend, cfg.note + f" ({backend})")
        if cfg.name in seen:
            raise ValueError(f"--configs: {cfg.name!r} given twice")
        seen.add(cfg.name)
        out.append(cfg)
    if not out:
        raise ValueError("--configs: empty")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ----------------------------------------------------------------------------------------------------------------------
def model_config(shape: str | dict):
    """The ``transformers.Qwen2Config`` of a shape name (``qwen2.5-0.5b``, ``tiny``) or a dict of its fields."""
    from transformers import Qwen2Config

    fields = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    theta = fields.pop("rope_theta", 1e6)
    return Qwen2Config(
        **fields,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        use_sliding_window=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_model(shape: str | dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape``, built directly on ``device`` (fast on a GPU).

    Deterministic in ``seed`` (per device type) without disturbing the caller's RNG state; training mode on.
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    config = model_config(shape)
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model.train()
    return model


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token ``i`` is the text ``t<i>`` (``<pad> <unk> <bos> <eos>`` are 0..3).

    ``"t17 t4 t99"`` encodes to ``[17, 4, 99]`` and back, so any id sequence of the model's vocabulary (Qwen2.5's
    151936 included) is a text TRL's trainers can tokenize, concatenate (prompt + " completion") and decode. No BOS is
    added (like Qwen2.5's tokenizer); TRL appends ``<eos>`` to DPO completions itself.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= FIRST_ID:
        raise ValueError(f"vocab_size: must exceed {FIRST_ID}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(FIRST_ID, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=1 << 20, padding_side="right", clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _ids_text(ids) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def _random_ids(gen: torch.Generator, vocab_size: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(FIRST_ID, vocab_size, (rows, length), generator=gen)


def preference_dataset(vocab_size: int, rows: int, prompt_len: int, completion_len: int, seed: int = 0):
    """``prompt`` / ``chosen`` / ``rejected`` texts of random ids: ``prompt_len`` prompt tokens and exactly
    ``completion_len`` completion tokens each once TRL has appended ``<eos>``."""
    from datasets import Dataset

    if completion_len < 1 or prompt_len < 1:
        raise ValueError("prompt_len and completion_len must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    prompts = _random_ids(gen, vocab_size, rows, prompt_len)
    chosen = _random_ids(gen, vocab_size, rows, completion_len - 1)
    rejected = _random_ids(gen, vocab_size, rows, completion_len - 1)
    return Dataset.from_dict({
        "prompt": [_ids_text(p) for p in prompts],
        # a leading space: TRL tokenizes prompt + completion as one text
        "chosen": [" " + _ids_text(c) for c in chosen],
        "rejected": [" " + _ids_text(r) for r in rejected],
    })


def prompt_dataset(vocab_size: int, rows: int, prompt_len: int, seed: int = 0):
    """``prompt`` texts of ``prompt_len`` random ids (GRPO)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed + 1)
    return Dataset.from_dict({"prompt": [_ids_text(p) for p in _random_ids(gen, vocab_size, rows, prompt_len)]})


def synthetic_reward(completion_ids, **kwargs) -> list[float]:
    """A cheap deterministic reward with spread inside a group (so the advantages are not all zero)."""
    return [float(sum(int(t) % 7 for t in c)) / max(1, len(c)) for c in completion_ids]


# ----------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------------
class _Memory:
    """Peak memory of one configuration: CUDA allocator peak, or the CPU's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.method = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (peak not resettable)"

    def current(self) -> int | None:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        kib = proc_status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        kib = proc_status_kib("VmHWM")
        if kib is None:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepRecorder:
    """Wall-clock of each optimizer step (end to end), GRPO generation time per step, per-step losses."""

    def __init__(self, device: torch.device, memory: _Memory, warmup: int):
        from transformers import TrainerCallback

        self.device, self.memory, self.warmup = device, memory, warmup
        self.train_begin = None
        self.ends: list[float] = []
        self.gen: dict[int, float] = {}
        self.losses: dict[int, list[float]] = {}
        self.peak_after_warmup_reset = None
        rec = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _sync(rec.device)
                rec.train_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync(rec.device)
                rec.ends.append(time.perf_counter())
                if len(rec.ends) == rec.warmup:  # the timed steps' own peak from here on
                    rec.peak_after_warmup_reset = rec.memory.peak()
                    rec.memory.reset()

        self.callback = Callback()

    @property
    def step(self) -> int:
        return len(self.ends)

    def wrap(self, trainer) -> None:
        training_step = trainer.training_step

        def timed_training_step(*args, **kwargs):
            out = training_step(*args, **kwargs)
            self.losses.setdefault(self.step, []).append(float(out.detach().float().mean()))
            return out

        trainer.training_step = timed_training_step
        if hasattr(trainer, "_generate_and_score_completions"):
            generate = trainer._generate_and_score_completions

            def timed_generate(*args, **kwargs):
                _sync(self.device)
                t0 = time.perf_counter()
                out = generate(*args, **kwargs)
                _sync(self.device)
                self.gen[self.step] = self.gen.get(self.step, 0.0) + time.perf_counter() - t0
                return out

            trainer._generate_and_score_completions = timed_generate

    def durations(self) -> list[float]:
        starts = [self.train_begin] + self.ends[:-1]
        return [e - s for s, e in zip(starts, self.ends)]


def _median(xs):
    return statistics.median(xs) if xs else None


@contextmanager
def _materialising_head(trl_module):
    """While a TRL trainer's ``__init__`` runs, its ``add_fused_lm_head`` calls install a materialising head.

    Same arguments and outputs, computed by :func:`llm_entreg.integrations.install_fused_head` with the ``torch``
    reference backend, which builds the ``[tokens, V]`` logits (only of the scored positions) and their softmax in
    float32.
    """
    from llm_entreg.integrations import install_fused_head

    original = trl_module.add_fused_lm_head
    calls = []

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        calls.append(model)
        install_fused_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                           outputs=outputs, backend="torch")

    trl_module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        trl_module.add_fused_lm_head = original
    if not calls:
        raise RuntimeError(f"{trl_module.__name__} did not call add_fused_lm_head; the plain head was not installed")


def _trl_kernel(device: torch.device) -> str:
    """Which kernel TRL's ``add_fused_lm_head`` runs on ``device`` (TRL 1.16: Triton on CUDA/XPU when importable,
    scoring only the positions with a label; elsewhere chunked torch over every position)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton

        return "triton" if _use_triton(device) else "chunked torch"
    except ImportError:  # pragma: no cover - another TRL layout
        return "triton" if device.type == "cuda" else "chunked torch"


# ----------------------------------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------------------------------
def _trainer_args(settings: dict, device: torch.device, out_dir: str) -> dict:
    cuda = device.type == "cuda"
    return dict(
        output_dir=out_dir,
        max_steps=settings["warmup"] + settings["steps"],
        per_device_train_batch_size=settings["batch"],
        gradient_accumulation_steps=1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=settings["seed"],
        data_seed=settings["seed"],
        use_cpu=not cuda,
        bf16=cuda and settings["dtype"] == "bf16",
        gradient_checkpointing=settings["gradient_checkpointing"],
        dataloader_num_workers=0,
        **({} if settings.get("learning_rate") is None else {"learning_rate": settings["learning_rate"]}),
    )


def _build_trainer(cfg: StepConfig, settings: dict, device: torch.device, tokenizer, out_dir: str):
    """Model (+ reference), data and trainer of ``cfg``; returns ``(trainer, entropy_coef, head)``."""
    from trl.trainer import dpo_trainer as trl_dpo_module
    from trl.trainer import grpo_trainer as trl_grpo_module

    from llm_entreg.ops import resolve_backend

    beta = settings["entropy_coef"] if cfg.entropy_coef is None else cfg.entropy_coef
    backend = cfg.backend or settings["backend"]
    model = build_model(settings["shape"], device, DTYPES[settings["dtype"]], settings["seed"])
    plain_ctx = nullcontext()
    if cfg.impl == "ours":
        head = f"ours ({resolve_backend(backend, device)})"
    elif cfg.impl == "trl":
        head = f"trl fused ({_trl_kernel(device)})"
    else:
        head = "materialising (fp32 logits)"
        plain_ctx = _materialising_head(trl_dpo_module if cfg.algo == "dpo" else trl_grpo_module)
    common = _trainer_args(settings, device, out_dir)
    build = _build_dpo if cfg.algo == "dpo" else _build_grpo
    with plain_ctx:
        trainer, beta = build(cfg, settings, device, tokenizer, model, common, beta, backend)
    return trainer, beta, head


def _build_dpo(cfg: StepConfig, settings: dict, device, tokenizer, model, common: dict, beta: float, backend: str):
    from trl import DPOConfig, DPOTrainer

    from llm_entreg.trainers import EntropyDPOConfig, EntropyDPOTrainer

    total = settings["warmup"] + settings["steps"]
    data = preference_dataset(len(tokenizer), settings["batch"] * total, settings["prompt_len"],
                              settings["completion_len"], settings["seed"])
    # the reference = the policy's initial weights
    ref = build_model(settings["shape"], device, DTYPES[settings["dtype"]], settings["seed"])
    ref.eval()
    dpo = dict(common, max_length=None)
    if cfg.impl == "ours":
        args = EntropyDPOConfig(**dpo, entropy_coef=beta, fused_head_backend=backend)
        cls = EntropyDPOTrainer
    else:
        args, cls = DPOConfig(**dpo), DPOTrainer
        beta = 0.0
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer, beta


def _build_grpo(cfg: StepConfig, settings: dict, device, tokenizer, model, common: dict, beta: float, backend: str):
    from trl import GRPOConfig, GRPOTrainer

    from llm_entreg.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    if settings["batch"] % settings["num_generations"]:
        raise ValueError(f"--batch {settings['batch']} is not a multiple of --num-generations "
                         f"{settings['num_generations']}")
    total = settings["warmup"] + settings["steps"]
    prompts_per_step = settings["batch"] // settings["num_generations"]
    data = prompt_dataset(len(tokenizer), prompts_per_step * total, settings["prompt_len"], settings["seed"])
    grpo = dict(
        common,
        num_generations=settings["num_generations"],
        max_completion_length=settings["completion_len"],
        # every completion has exactly completion_len tokens (a random model would rarely stop anyway)
        generation_kwargs={"min_new_tokens": settings["completion_len"]},
        num_iterations=settings["grpo_iterations"] or settings["steps"],
        entropy_coef=beta,  # ours: our regularizer's β; TRL's: TRL's own entropy bonus at the same β
    )
    if cfg.impl == "ours":
        args = EntropyGRPOConfig(**grpo, fused_head_backend=backend, fused_loss=cfg.fused_loss)
        cls = EntropyGRPOTrainer
    else:
        args, cls = GRPOConfig(**grpo), GRPOTrainer
    trainer = cls(model=model, reward_funcs=synthetic_reward, args=args, train_dataset=data,
                  processing_class=tokenizer)
    return trainer, beta


def run_config(cfg: StepConfig, settings: dict) -> dict:
    """Runs one configuration in this process; never raises (a failure is returned as ``status: error``)."""
    device = torch.device(settings["device"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    memory = _Memory(device)
    result = {"name": cfg.name, "algo": cfg.algo, "impl": cfg.impl, "note": cfg.note}
    t_start = time.perf_counter()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = memory.current()
    memory.reset()
    recorder = _StepRecorder(device, memory, settings["warmup"])
    trainer = None
    try:
        trainer, log_first = _train(cfg, settings, device, memory, base, recorder, result, t_start)
    except Exception as exc:  # noqa: BLE001 - a failing configuration is a result, not a crash of the bench
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        result.update(status="oom" if oom else "error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                      traceback=traceback.format_exc(limit=6)[-2000:])
        log_first = {}
    else:
        result["status"] = "ok"
    _memory_result(result, memory, recorder, base)
    _timing_result(result, cfg, settings, recorder, log_first)
    result["total_s"] = time.perf_counter() - t_start
    _free(trainer, device)
    return result


def _train(cfg, settings, device, memory, base, recorder, result, t_start):
    """Builds the trainer of ``cfg`` and trains it (the recorder hooked in); returns it and its first log."""
    from transformers import PrinterCallback

    with tempfile.TemporaryDirectory(prefix="bench_step_") as out_dir:
        tokenizer = build_tokenizer(SHAPES[settings["shape"]]["vocab_size"])
        trainer, beta, head = _build_trainer(cfg, settings, device, tokenizer, out_dir)
        result.update(entropy_coef=beta, head=head, trainer=type(trainer).__name__)
        result["model_mem_bytes"] = None if memory.current() is None or base is None else memory.current() - base
        recorder.wrap(trainer)
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout (the logs are kept)
        trainer.add_callback(recorder.callback)
        _sync(device)
        result["build_s"] = time.perf_counter() - t_start
        # Objects alive now are never garbage: a full collection inside a timed step would only add noise
        gc.collect()
        gc.freeze()
        t_train = time.perf_counter()
        try:
            trainer.train()
        finally:
            gc.unfreeze()
        _sync(device)
        result["train_s"] = time.perf_counter() - t_train
        return trainer, (trainer.state.log_history[0] if trainer.state.log_history else {})


def _memory_result(result: dict, memory: _Memory, recorder: _StepRecorder, base: int | None) -> None:
    steady_peak = memory.peak()
    if recorder.peak_after_warmup_reset is not None:
        result["peak_mem_bytes"] = max(recorder.peak_after_warmup_reset, steady_peak)
        result["steady_peak_mem_bytes"] = steady_peak
    else:
        result["peak_mem_bytes"] = steady_peak
        result["steady_peak_mem_bytes"] = None
    result["baseline_mem_bytes"] = base
    result["peak_mem_above_baseline_bytes"] = (None if base is None or result["peak_mem_bytes"] is None
                                               else result["peak_mem_bytes"] - base)
    result["memory_method"] = memory.method


def _timing_result(result: dict, cfg: StepConfig, settings: dict, recorder: _StepRecorder, log_first: dict) -> None:
    durations = recorder.durations()
    timed = list(range(settings["warmup"], len(durations)))
    result["step_times_s"] = [durations[k] for k in timed]
    result["warmup_times_s"] = durations[: settings["warmup"]]
    result["losses"] = [recorder.losses.get(k, [None])[0] for k in range(len(durations))]
    result["first_loss"] = result["losses"][0] if result["losses"] else None
    keep = ("loss", "entropy", "reward", "logps")
    result["first_log"] = {k: v for k, v in log_first.items()
                           if isinstance(v, (int, float)) and any(w in k for w in keep)}
    if cfg.algo == "grpo":
        gen = [recorder.gen.get(k, 0.0) for k in range(len(durations))]
        result["gen_score_times_s"] = [gen[k] for k in timed]
        timed_gen = [gen[k] for k in timed if gen[k] > 0]
        result["gen_score_warm"] = bool(timed_gen)
        all_gen = timed_gen or [g for g in gen if g > 0]
        result["gen_score_s"] = _median(all_gen)
        result["loss_step_s"] = _median([durations[k] - gen[k] for k in timed])
        result["step_s"] = (None if result["gen_score_s"] is None or result["loss_step_s"] is None
                            else result["gen_score_s"] + result["loss_step_s"])
        result["num_iterations"] = settings["grpo_iterations"] or settings["steps"]
    else:
        result["step_s"] = _median(result["step_times_s"])
    if result["status"] == "ok":
        bad = [x for x in result["losses"] if x is None or not math.isfinite(x)]
        if bad or result["step_s"] is None or len(result["step_times_s"]) != settings["steps"]:
            result.update(status="error", error=f"incomplete run: losses {result['losses']}, "
                                                f"{len(result['step_times_s'])} timed steps")


def _free(trainer, device: torch.device) -> None:
    """Frees everything before the next configuration."""
    if trainer is not None:
        try:
            trainer.accelerator.free_memory()
        except Exception:  # noqa: BLE001
            pass
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_config_subprocess(cfg: StepConfig, settings: dict, timeout: float) -> dict:
    payload = json.dumps({"config": asdict(cfg), "settings": settings})
    cmd = [sys.executable, "-m", "llm_entreg.bench.step", "--_child", payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": cfg.name, "algo": cfg.algo, "impl": cfg.impl, "status": "error",
                "error": f"subprocess timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"name": cfg.name, "algo": cfg.algo, "impl": cfg.impl, "status": "error",
            "error": f"subprocess rc={proc.returncode}: {' | '.join(tail)}"}


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "bench_step.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="End-to-end DPO / GRPO optimizer-step time and peak memory: our trainers + fused head vs TRL's, "
                    "on a randomly initialised Qwen2.5-0.5B-shaped model (or --tiny).",
    )
    p.add_argument("--tiny", action="store_true",
                   help=f"tiny model and lengths that run in seconds on a CPU (V={TINY['vocab_size']}, "
                        f"d={TINY['hidden_size']}, {TINY['num_hidden_layers']} layers; {TINY_DEFAULTS})")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--configs", default=None,
                   help=f"comma list from {sorted(BASE_CONFIGS)}; NAME@BACKEND sets our head's backend "
                        f"(default {DEFAULT_CONFIGS})")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per configuration (default 3; "
                                                           "--tiny: 2); the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps before them (default 1, >= 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="per-device batch: DPO pairs, GRPO completions (default 8; --tiny: 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; --tiny: 16)")
    p.add_argument("--completion-len", type=int, default=None,
                   help="completion tokens (DPO: incl. <eos>; GRPO: generated) (default 256; --tiny: 16)")
    p.add_argument("--num-generations", type=int, default=None,
                   help="GRPO completions per prompt; must divide --batch (default 4; --tiny: 2)")
    p.add_argument("--grpo-iterations", type=int, default=None,
                   help="GRPO num_iterations: steps one generation is reused for (default: --steps, so only the "
                        "warm-up and one timed step generate; 1 = TRL's default, every step generates)")
    p.add_argument("--entropy-coef", type=float, default=0.01,
                   help="β of the entropy bonus of dpo_ours / grpo_ours and of TRL's own GRPO bonus (default 0.01)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="optimizer learning rate (default: TRL's, 1e-6; a larger one makes the losses after the "
                        "first step check the gradients too)")
    p.add_argument("--backend", choices=OUR_BACKENDS, default="auto",
                   help="our fused head's backend (default auto: triton on CUDA, chunked on the CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model weights (default bf16 on CUDA, with bf16 autocast; fp32 on the CPU)")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                   help="TRL's default is on (default on)")
    p.add_argument("--isolation", choices=("inprocess", "process"), default="inprocess",
                   help="inprocess (default): configurations run one after another in this process, memory freed "
                        "between them; process: each in a fresh interpreter (clean CPU RSS; ~10 s import each)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration with --isolation process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on the CPU (default: torch's; --tiny: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out", help="directory for the .json and .md results (default bench_out)")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = TINY_DEFAULTS if args.tiny else GPU_DEFAULTS
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}
    if s["warmup"] < 1 or s["steps"] < 1:
        raise SystemExit("--warmup and --steps must be >= 1 (a step is timed from the end of the previous one)")
    if min(s["batch"], s["prompt_len"], s["completion_len"]) < 1 or s["num_generations"] < 2:
        raise SystemExit("--batch, --prompt-len, --completion-len must be >= 1 and --num-generations >= 2")
    if s["batch"] % s["num_generations"]:
        raise SystemExit(f"--num-generations {s['num_generations']} must divide --batch {s['batch']}")
    s.update(
        shape="tiny" if args.tiny else "qwen2.5-0.5b",
        device=str(device),
        dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
        backend=args.backend,
        entropy_coef=args.entropy_coef,
        learning_rate=args.learning_rate,
        grpo_iterations=args.grpo_iterations,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        seed=args.seed,
        # tiny ops: one thread avoids OpenMP barrier stalls, which dominate on a shared (oversubscribed) CPU
        threads=args.threads if args.threads is not None else (1 if args.tiny and device.type == "cpu" else None),
    )
    if s["dtype"] == "bf16" and device.type != "cuda":
        raise SystemExit("--dtype bf16 is for CUDA (the CPU run is fp32)")
    return s


def _new_report(args, settings: dict, configs: list[StepConfig], device, argv, started) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_step_{device.type}_{settings['shape']}" + (f"_{args.tag}" if args.tag else "")
    return {
        "meta": {
            "date_utc": started.strftime(STAMP),
            "command": "python scripts/bench_step.py " + " ".join(shlex.quote(a) for a in (argv or [])),
            "hostname": platform.node(),
            "complete": False,
            **versions(("trl", "transformers", "accelerate", "triton")),
        },
        "device": step_device_info(device),
        "config": {
            **settings,
            "model": SHAPES[settings["shape"]],
            "configs": [asdict(c) for c in configs],
            "isolation": args.isolation,
        },
        "results": {},
        "files": {"json": str(out_dir / f"{name}.json"), "markdown": str(out_dir / f"{name}.md")},
    }


def _write_report(report: dict, started: _dt.datetime) -> str:
    """Rewrites the report's files (what has finished so far); returns the markdown."""
    finished = _dt.datetime.now(_dt.timezone.utc)
    report["meta"].update(finished_utc=finished.strftime(STAMP), wall_s=(finished - started).total_seconds())
    report["comparisons"] = step_comparisons(report["results"])
    md = render_step_markdown(report)
    write_files(report, md)
    return md


def _log_result(res: dict, name: str, log) -> None:
    if res["status"] == "ok":
        log(f"  {name:<20} step {fmt(res['step_s'], '.4f', '—')} s, "
            f"peak {fmt(mib(res['peak_mem_bytes']), ',.0f', '—')}"
            f" MiB, first loss {fmt(res['first_loss'], '.6g', '—')} ({res['total_s']:.1f} s total)")
    else:
        log(f"  {name:<20} {res['status']}: {res.get('error')}")


def run_step_bench(args: argparse.Namespace, argv: list[str] | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Runs every configuration of ``args`` (from :func:`build_parser`); writes ``<out>/<name>.json`` and ``.md``.

    The files are rewritten after every configuration (``meta.complete`` false until the last one), so a run cut
    short (a device time limit) still leaves the configurations it finished.
    """
    settings = _settings(args)
    configs = parse_configs(args.configs or (TINY_CONFIGS if args.tiny else DEFAULT_CONFIGS))
    device = torch.device(settings["device"])
    if settings["threads"] and device.type == "cpu":
        torch.set_num_threads(settings["threads"])
    started = _dt.datetime.now(_dt.timezone.utc)
    report = _new_report(args, settings, configs, device, argv, started)
    log(f"bench_step: {len(configs)} configurations on {device} ({settings['shape']}, {settings['dtype']}), "
        f"isolation {args.isolation}")
    for cfg in configs:
        log(f"  {cfg.name} ...")
        if args.isolation == "process":
            res = _run_config_subprocess(cfg, settings, args.timeout)
        else:
            res = run_config(cfg, settings)
        report["results"][cfg.name] = res
        _log_result(res, cfg.name, log)
        _write_report(report, started)
    report["meta"]["complete"] = True
    md = _write_report(report, started)
    log("")
    log(md)
    log(f"wrote {report['files']['json']} and {report['files']['markdown']}")
    log("")
    log(step_short_table(report))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:  # the per-configuration "Tokenizing train dataset" bars of `datasets` would drown the results
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if args._child is not None:
        payload = json.loads(args._child)
        settings = payload["settings"]
        if settings.get("threads") and settings["device"] == "cpu":
            torch.set_num_threads(settings["threads"])
        result = run_config(StepConfig(**payload["config"]), settings)
        print(CHILD_TAG + json.dumps(result), flush=True)
        return 0
    report = run_step_bench(args, argv)
    # running out of memory is a result; any other failure makes the exit status 1
    return 1 if any(r["status"] == "error" for r in report["results"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
