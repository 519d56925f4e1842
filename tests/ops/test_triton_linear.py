"""The Triton fused LM head (``ops/triton_linear.py``, tiles and gemm modes) against the float64 reference, forward
and backward, at small odd sizes (N=37, d=24, V=301) with lowered block sizes; its backward plan and kernel configs."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from llm_entreg.ops import (  # noqa: E402
    linear_logprob_and_entropy,
    linear_token_stats,
)
from llm_entreg.ops import triton_linear  # noqa: E402
from llm_entreg.ops.reference import reference_linear_token_stats  # noqa: E402

from .triton_helpers import (  # noqa: E402
    DEVICE, EXTRAS, IGNORE, RUNNABLE, assert_close, assert_grad_close, check_forward, needs_kernels,
    rerun_in_fresh_process,
)

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("triton_small_blocks")]


@pytest.mark.skipif(RUNNABLE, reason="the kernels run in this process")
def test_rerun_in_fresh_process():
    """Triton was imported before the interpreter could be switched on: run this file again in a clean process."""
    rerun_in_fresh_process(__file__)


LINEAR_CASES = [
    # id, seed, input dtype, autocast dtype, bias ("none", "finite", "masked"), temperature, grads, extras
    ("fp32-bias-both", 31, torch.float32, None, "finite", 1.0, "both", EXTRAS),
    ("fp32-nobias-T-lp-only", 32, torch.float32, None, "none", 0.7, "lp", ("mean_logits",)),
    ("fp32-masked-bias-T", 33, torch.float32, None, "masked", 1.3, "both", EXTRAS),
    ("bf16-masked-bias", 34, torch.bfloat16, None, "masked", 0.8, "both", EXTRAS),
    ("bf16-nobias-entropy-only", 35, torch.bfloat16, None, "none", 1.0, "h", ()),
    ("autocast-fp32-as-bf16", 36, torch.float32, torch.bfloat16, "finite", 1.0, "both", ("is_top1",)),
]


def _linear_inputs(gen, dtype, bias_kind, n=37, d=24, n_vocab=301):
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(n_vocab, d, generator=gen) / d**0.25).to(dtype)
    bias = None
    if bias_kind != "none":
        bias = torch.randn(n_vocab, generator=gen)
        if bias_kind == "masked":
            bias[:192] = float("-inf")  # whole blocks, and (with these sizes) a whole vocabulary split
            bias[250:260] = float("-inf")
        bias = bias.to(dtype)
    lo = 192 if bias_kind == "masked" else 0
    targets = torch.randint(lo, n_vocab, (n,), generator=gen)
    targets[(targets >= 250) & (targets < 260)] = 270
    return hidden, weight, bias, targets


@pytest.fixture(params=triton_linear.HEAD_MODES)
def head_mode(request, monkeypatch):
    """Both ways of forming the logits: the Triton tile kernels, and GEMMs into a small fp32 buffer (8 tokens of
    the forward per chunk here) folded by the row kernels."""
    monkeypatch.setattr(triton_linear, "_MODE_OVERRIDE", [request.param])
    monkeypatch.setattr(triton_linear, "GEMM_BUFFER_BYTES", 8 * 301 * 4)
    return request.param


def test_head_mode_override_env_and_device_default(monkeypatch):
    """Override > LLM_ENTREG_TRITON_HEAD > device default ("gemm" on CUDA, "tiles" elsewhere); bad values name the
    setting."""
    monkeypatch.setattr(triton_linear, "_MODE_OVERRIDE", [None])
    monkeypatch.delenv("LLM_ENTREG_TRITON_HEAD", raising=False)
    assert triton_linear.head_mode(torch.device("cpu")) == "tiles"
    assert triton_linear.head_mode(torch.device("cuda", 0)) == "gemm"
    monkeypatch.setenv("LLM_ENTREG_TRITON_HEAD", "tiles")
    assert triton_linear.head_mode(torch.device("cuda", 0)) == "tiles"
    triton_linear.set_head_mode("gemm")
    assert triton_linear.head_mode(torch.device("cuda", 0)) == "gemm"
    triton_linear.set_head_mode(None)
    assert triton_linear.head_mode(torch.device("cpu")) == "tiles"
    monkeypatch.setenv("LLM_ENTREG_TRITON_HEAD", "fast")
    with pytest.raises(ValueError, match="^LLM_ENTREG_TRITON_HEAD: expected one of"):
        triton_linear.head_mode(torch.device("cpu"))
    with pytest.raises(ValueError, match="^head mode: expected one of"):
        triton_linear.set_head_mode("fast")


@needs_kernels
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_kernel_matches_float64_reference(case, head_mode):
    _, seed, dtype, autocast_dtype, bias_kind, temperature, grads, extras = case
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, bias, targets = _linear_inputs(gen, dtype, bias_kind)
    # An exact tie at the maximum in two columns, the first one wins: two blocks of one vocabulary split (masked
    # case), or two splits (columns < 192 and >= 192 fall in different splits with these sizes).
    first_col = 200 if bias_kind == "masked" else 100
    hidden[1] = hidden[0]
    weight[first_col] = weight[260] = hidden[0] * 0.5
    if bias is not None:
        bias[260] = bias[first_col]
    compute = autocast_dtype or dtype
    rounded = [None if t is None else t.to(compute).double() for t in (hidden, weight, bias)]
    z = rounded[0] @ rounded[1].t() + (0 if bias is None else rounded[2])
    targets[10:16] = z[10:16].argmax(-1)  # some targets are the argmax
    targets[torch.rand(targets.shape, generator=gen) < 0.25] = IGNORE
    targets[0], targets[1] = 260, first_col
    hidden, weight, targets = hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    params = [t.requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    valid = targets != IGNORE
    if DEVICE == "cpu":  # with these sizes the forward splits the vocabulary: the merge of splits is tested
        assert triton_linear._num_splits(int(valid.sum()), 301, torch.device(DEVICE))[0] >= 2

    if autocast_dtype is None:
        stats = linear_token_stats(hidden, weight, targets, bias=bias, temperature=temperature, backend="triton",
                                   extras=extras)
    else:
        with torch.autocast(DEVICE, dtype=autocast_dtype):
            stats = linear_token_stats(hidden, weight, targets, bias=bias, temperature=temperature,
                                       backend="triton", extras=extras)
    ref_params = [t.to(DEVICE).requires_grad_(True) for t in rounded if t is not None]
    ref = reference_linear_token_stats(
        ref_params[0], ref_params[1], targets, bias=ref_params[2] if bias is not None else None,
        temperature=temperature, dtype=torch.float64, extras=EXTRAS,
    )
    check_forward(stats, ref, valid, extras, "linear")
    if "is_top1" in extras:
        assert stats.is_top1[1] and not stats.is_top1[0], "tie at the maximum: the first column wins"

    g_lp = torch.randn(targets.shape, generator=gen).to(DEVICE) if grads in ("both", "lp") else None
    g_h = torch.randn(targets.shape, generator=gen).to(DEVICE) if grads in ("both", "h") else None

    def loss(s):
        total = 0.0
        if g_lp is not None:
            total = total + (g_lp.to(s.logprobs.dtype) * s.logprobs).sum()
        if g_h is not None:
            total = total + (g_h.to(s.entropy.dtype) * s.entropy).sum()
        return total

    got = torch.autograd.grad(loss(stats), params)
    exp = torch.autograd.grad(loss(ref), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        assert_grad_close(g, e, p.dtype, f"grad_{name}", compute)
    assert (got[0][~valid] == 0).all(), "ignored tokens must get zero grad_hidden"
    if bias_kind == "masked":
        assert (got[2][:192] == 0).all() and (got[1][250:260] == 0).all(), "-inf columns must get zero gradient"


GEMM_EDGE_CASES = ["fp16-bias-T", "non-contiguous-hidden", "single-token", "all-ignored"]


@needs_kernels
@pytest.mark.parametrize("case", GEMM_EDGE_CASES)
def test_gemm_mode_edge_cases(monkeypatch, case):
    """The gemm mode (buffer of 5 fp32 rows: several forward and backward chunks) on inputs the main cases do not
    cover, against float64: fp16 with a bias and a temperature, a strided hidden state, one token, every target
    ignored."""
    monkeypatch.setattr(triton_linear, "_MODE_OVERRIDE", ["gemm"])
    monkeypatch.setattr(triton_linear, "GEMM_BUFFER_BYTES", 5 * 301 * 4)
    monkeypatch.setattr(triton_linear, "ACC_BYTES", 5 * 24 * 4)
    monkeypatch.setattr(triton_linear, "MIN_TOKEN_CHUNK", 4)
    monkeypatch.setattr(triton_linear, "VOCAB_ALIGN", 64)
    gen = torch.Generator().manual_seed(77)
    dtype = torch.float16 if case == "fp16-bias-T" else torch.float32
    hidden, weight, bias, targets = _linear_inputs(gen, dtype, "finite" if case == "fp16-bias-T" else "none")
    temperature = 0.7 if case == "fp16-bias-T" else 1.0
    if case == "non-contiguous-hidden":
        hidden = torch.randn(37, 48, generator=gen)[:, ::2]
        assert not hidden.is_contiguous()
    elif case == "single-token":
        hidden, targets = hidden[:1], targets[:1]
    elif case == "all-ignored":
        targets = torch.full_like(targets, IGNORE)
    params = [t.to(DEVICE).requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    targets = targets.to(DEVICE)
    stats = linear_token_stats(params[0], params[1], targets, bias=params[2] if bias is not None else None,
                               temperature=temperature, backend="triton", extras=EXTRAS)
    ref_params = [t.detach().double().requires_grad_(True) for t in params]
    ref = reference_linear_token_stats(ref_params[0], ref_params[1], targets,
                                       bias=ref_params[2] if bias is not None else None, temperature=temperature,
                                       dtype=torch.float64, extras=EXTRAS)
    valid = targets != IGNORE
    check_forward(stats, ref, valid, EXTRAS, "gemm mode")
    g1, g2 = (torch.randn(targets.shape, generator=gen).to(DEVICE) for _ in range(2))
    got = torch.autograd.grad((g1 * stats.logprobs).sum() + (g2 * stats.entropy).sum(), params)
    exp = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        assert_grad_close(g, e, p.dtype, f"grad_{name}", dtype)
    if case == "all-ignored":
        assert all((g == 0).all() for g in got)


BACKWARD_CHUNK_CASES = [
    # id, dtype, autocast dtype, DZ_BUFFER elements, ACC_BYTES, expected plan for 29 valid tokens
    # several vocabulary chunks, one token chunk: grad_weight by one GEMM per vocabulary chunk; fp32 grad_hidden
    ("fp32-vocab-chunks", torch.float32, None, 29 * 128, 10**6, (29, 128)),
    ("bf16-vocab-chunks", torch.bfloat16, None, 29 * 128, 10**6, (29, 128)),
    # the fp32 grad_hidden accumulator caps the token chunk: grad_weight accumulated in place in bf16
    ("bf16-token-and-vocab-chunks", torch.bfloat16, None, 8 * 128, 8 * 24 * 4, (8, 128)),
    # the dz buffer caps the token chunk below one aligned vocabulary chunk: grad_weight in an fp32 accumulator
    ("bf16-token-chunks-fp32-acc", torch.bfloat16, None, 5 * 64, 10**6, (5, 64)),
    # fp32 parameters under a bf16 autocast: gradients accumulate directly in the fp32 gradients
    ("autocast-fp32-params", torch.float32, torch.bfloat16, 5 * 64, 10**6, (5, 64)),
]


@needs_kernels
@pytest.mark.parametrize("case", BACKWARD_CHUNK_CASES, ids=[c[0] for c in BACKWARD_CHUNK_CASES])
def test_linear_backward_chunks_tokens_and_vocabulary(monkeypatch, case, head_mode):
    """Small buffers force token chunks and vocabulary chunks; every accumulation path against float64. The "gemm"
    mode gets a buffer of as many fp32 elements, so it plans the same chunks."""
    _, dtype, autocast_dtype, dz_elems, acc_bytes, plan = case
    gen = torch.Generator().manual_seed(41 + len(BACKWARD_CHUNK_CASES) * dz_elems % 97)
    hidden, weight, bias, targets = _linear_inputs(gen, dtype, "finite")
    targets[::5] = IGNORE  # 37 positions, 29 valid
    compute = autocast_dtype or dtype
    monkeypatch.setattr(triton_linear, "DZ_BUFFER_BYTES", dz_elems * compute.itemsize)
    monkeypatch.setattr(triton_linear, "ACC_BYTES", acc_bytes)
    monkeypatch.setattr(triton_linear, "MIN_TOKEN_CHUNK", 4)
    monkeypatch.setattr(triton_linear, "VOCAB_ALIGN", 64 if plan[1] == 64 else 128)
    n_valid = int((targets != IGNORE).sum())
    assert n_valid == 29
    assert triton_linear.backward_plan(n_valid, 301, 24, compute.itemsize, True, dtype == torch.float32) == plan
    monkeypatch.setattr(triton_linear, "GEMM_BUFFER_BYTES", dz_elems * 4)
    assert triton_linear.backward_plan(n_valid, 301, 24, 4, True, dtype == torch.float32, dz_elems * 4) == plan
    hidden, weight, bias, targets = (t.to(DEVICE) for t in (hidden, weight, bias, targets))
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    if autocast_dtype is None:
        lp, h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, temperature=1.1, backend="triton")
    else:
        with torch.autocast(DEVICE, dtype=autocast_dtype):
            lp, h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, temperature=1.1,
                                               backend="triton")
    ref_params = [t.detach().to(compute).double().requires_grad_(True) for t in params]
    ref = reference_linear_token_stats(*ref_params[:2], targets, bias=ref_params[2], temperature=1.1,
                                       dtype=torch.float64)
    assert_close(lp, ref.logprobs, 2e-5, 2e-5, "logprobs")
    assert_close(h, ref.entropy, 2e-5, 2e-5, "entropy")
    g1, g2 = (torch.randn(targets.shape, generator=gen).to(DEVICE) for _ in range(2))
    got = torch.autograd.grad((g1 * lp).sum() + (g2 * h).sum(), params)
    exp = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        assert_grad_close(g, e, p.dtype, f"grad_{name}", compute)


def test_backward_plan_at_a_qwen_sized_head():
    """N = 16384, d = 4096, V = 151936 (the H200 benchmark case), bf16: one token chunk, dz + fp32 grad_hidden accumulator <= 512 MiB."""
    tc, vc = triton_linear.backward_plan(16384, 151936, 4096, 2, True, False)
    assert tc == 16384 and vc % triton_linear.VOCAB_ALIGN == 0
    assert tc * vc * 2 <= triton_linear.DZ_BUFFER_BYTES
    assert tc * vc * 2 + tc * 4096 * 4 <= 512 * 2**20
    # 65536 tokens: token chunks of ACC_BYTES / (4 d) = 16384, the same vocabulary chunk
    assert triton_linear.backward_plan(65536, 151936, 4096, 2, True, False) == (16384, vc)
    # no grad_hidden wanted (frozen embeddings below the head): all tokens in one chunk
    tc2, vc2 = triton_linear.backward_plan(65536, 151936, 4096, 2, False, False)
    assert tc2 == 65536 and tc2 * vc2 * 2 <= triton_linear.DZ_BUFFER_BYTES
    # small problems: one chunk
    assert triton_linear.backward_plan(37, 301, 24, 2, True, False) == (37, 301)
    # a small vocabulary fits one chunk: grad_hidden needs no accumulator, so the token chunk is not capped by it
    tc3, vc3 = triton_linear.backward_plan(10**6, 301, 4096, 2, True, False)
    assert vc3 == 301 and tc3 == triton_linear.DZ_BUFFER_BYTES // 2 // 301


def test_kernel_config_parse_override_and_env(monkeypatch):
    cfg = triton_linear.KernelConfig.parse("128x256x64w8s4")
    assert (cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages) == (128, 256, 64, 8, 4)
    assert str(cfg) == "128x256x64w8s4"
    assert triton_linear.KernelConfig.parse("64x64x32") == triton_linear.KernelConfig(64, 64, 32, 8, 3)
    for bad in ("128x256", "100x128x64", "128x128x8", "a"):
        with pytest.raises(ValueError, match="kernel config"):
            triton_linear.KernelConfig.parse(bad)
    monkeypatch.setattr(triton_linear, "_OVERRIDES", {})
    cpu = torch.device("cpu")
    default = triton_linear.kernel_config("fwd", cpu, torch.float32)
    assert (default.block_n, default.block_v, default.block_d) == (16, 64, 16)  # this file's small blocks
    monkeypatch.setenv("LLM_ENTREG_TRITON_DZ", "32x32x16w4s2")
    assert str(triton_linear.kernel_config("dz", cpu, torch.float32)) == "32x32x16w4s2"
    triton_linear.set_kernel_config("dz", "64x64x64w4s1")
    try:
        assert str(triton_linear.kernel_config("dz", cpu, torch.float32)) == "64x64x64w4s1"
    finally:
        triton_linear.set_kernel_config("dz", None)
    assert str(triton_linear.kernel_config("dz", cpu, torch.float32)) == "32x32x16w4s2"
    with pytest.raises(ValueError, match="kernel"):
        triton_linear.set_kernel_config("bwd", "64x64x64")


@needs_kernels
@pytest.mark.parametrize("split_fastest", [True, False])
def test_linear_kernels_with_a_forced_config(monkeypatch, split_fastest):
    """A config other than the default (different tiles for the two kernels, d not a multiple of BLOCK_D), the
    dz kernel's grouped launch order with several groups, the last one ragged (3 token blocks, groups of 2), and
    both launch orders of the forward."""
    monkeypatch.setattr(triton_linear, "DZ_GROUP", 2)
    monkeypatch.setattr(triton_linear, "SPLIT_FASTEST", split_fastest)
    gen = torch.Generator().manual_seed(61)
    hidden, weight, bias, targets = _linear_inputs(gen, torch.float32, "finite", n=40, d=40, n_vocab=150)
    hidden, weight, bias, targets = (t.to(DEVICE) for t in (hidden, weight, bias, targets))
    params = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    triton_linear.set_kernel_config("fwd", "32x32x32w4s2")
    triton_linear.set_kernel_config("dz", "16x128x16w4s2")
    try:
        lp, h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, backend="triton")
        got = torch.autograd.grad(lp.sum() - 0.3 * h.sum(), params)
    finally:
        triton_linear.set_kernel_config("fwd", None)
        triton_linear.set_kernel_config("dz", None)
    ref_params = [t.detach().double().requires_grad_(True) for t in params]
    ref = reference_linear_token_stats(*ref_params[:2], targets, bias=ref_params[2], dtype=torch.float64)
    assert_close(lp, ref.logprobs, 2e-5, 2e-5, "logprobs")
    assert_close(h, ref.entropy, 2e-5, 2e-5, "entropy")
    exp = torch.autograd.grad(ref.logprobs.sum() - 0.3 * ref.entropy.sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        assert_grad_close(g, e, p.dtype, f"grad_{name}")


@needs_kernels
def test_linear_frozen_head_and_all_ignored():
    gen = torch.Generator().manual_seed(51)
    hidden, weight, bias, targets = _linear_inputs(gen, torch.float32, "finite", n=19)
    hidden, weight, bias, targets = (t.to(DEVICE) for t in (hidden, weight, bias, targets))
    hidden.requires_grad_(True)  # weight and bias frozen (LoRA-style): only grad_hidden is formed
    lp, h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, backend="triton")
    ref_h = hidden.detach().double().requires_grad_(True)
    ref = reference_linear_token_stats(ref_h, weight.double(), targets, bias=bias.double(), dtype=torch.float64)
    (grad,) = torch.autograd.grad(lp.sum() + 0.5 * h.sum(), [hidden])
    (ref_grad,) = torch.autograd.grad(ref.logprobs.sum() + 0.5 * ref.entropy.sum(), [ref_h])
    assert_grad_close(grad, ref_grad, torch.float32, "grad_hidden")

    ignored = torch.full_like(targets, IGNORE)
    weight.requires_grad_(True)
    stats = linear_token_stats(hidden, weight, ignored, bias=bias, backend="triton", extras=EXTRAS)
    for t in stats:
        assert t.shape == ignored.shape and not t.any()
    gh, gw = torch.autograd.grad(stats.logprobs.sum() + stats.entropy.sum(), [hidden, weight])
    assert not gh.any() and not gw.any()


def test_tuning_sets_the_head_settings_inside_and_restores_them_after():
    """``tuning()``: every setting in force inside the block; the previous ones back after it, after an exception,
    and after a bad value; ``None`` leaves a setting as it is; nested blocks restore the outer block's settings."""
    cpu = torch.device("cpu")
    knobs = ("MIN_SPLITS", "DZ_GROUP", "SPLIT_FASTEST", "GEMM_BUFFER_BYTES", "ACC_BYTES")

    def settings():
        return ({k: getattr(triton_linear, k) for k in knobs}, triton_linear.head_mode(cpu),
                {k: triton_linear.kernel_config(k, cpu, torch.float32) for k in triton_linear.KERNELS})

    before = settings()
    with triton_linear.tuning(head_mode="gemm", fwd="32x64x16w4s2", dz=triton_linear.KernelConfig(16, 64, 16, 4, 1),
                              min_splits=3, dz_group=5, split_fastest=False, gemm_buffer_bytes=2**20,
                              acc_bytes=2**21):
        assert (triton_linear.MIN_SPLITS, triton_linear.DZ_GROUP, triton_linear.SPLIT_FASTEST) == (3, 5, False)
        assert (triton_linear.GEMM_BUFFER_BYTES, triton_linear.ACC_BYTES) == (2**20, 2**21)
        assert triton_linear.head_mode(cpu) == "gemm"
        assert str(triton_linear.kernel_config("fwd", cpu, torch.float32)) == "32x64x16w4s2"
        assert str(triton_linear.kernel_config("dz", cpu, torch.float32)) == "16x64x16w4s1"
    assert settings() == before

    with pytest.raises(RuntimeError, match="inside the block"):
        with triton_linear.tuning(head_mode="tiles", dz="64x64x64", min_splits=7, acc_bytes=2**22):
            assert triton_linear.MIN_SPLITS == 7
            raise RuntimeError("inside the block")
    assert settings() == before

    with pytest.raises(ValueError, match="kernel config"):  # the mode is set before the bad config is seen
        with triton_linear.tuning(head_mode="gemm", fwd="128x128", min_splits=2):
            pass
    assert settings() == before

    with triton_linear.tuning(min_splits=2):
        with triton_linear.tuning(dz_group=4):
            assert (triton_linear.MIN_SPLITS, triton_linear.DZ_GROUP) == (2, 4)
            assert triton_linear.head_mode(cpu) == before[1]  # None: left as it is
        assert (triton_linear.MIN_SPLITS, triton_linear.DZ_GROUP) == (2, before[0]["DZ_GROUP"])
    assert settings() == before
