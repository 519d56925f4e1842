"""The "triton" backend (materialized logits and fused LM head) against the float64 reference, forward and backward.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which tests/ops/conftest.py sets (and
restores) before triton is first imported; with CUDA they are compiled and run on the GPU. Sizes are small and odd
(N=37, d=24, V=301) and the kernels' block sizes are lowered so that every loop runs several times with ragged
edges. If triton was imported earlier in the session without the interpreter, this module reruns itself in a fresh
process (see ``test_rerun_in_fresh_process``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from llm_entreg.ops import (  # noqa: E402
    linear_logprob_and_entropy,
    linear_token_stats,
    logprob_and_entropy,
    token_stats,
)
from llm_entreg.ops import triton_linear, triton_logits  # noqa: E402
from llm_entreg.ops.reference import reference_linear_token_stats, reference_token_stats  # noqa: E402

pytestmark = pytest.mark.interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")
IGNORE = -100


def _kernels_runnable() -> bool:
    if DEVICE == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    kernels = (triton_logits._logits_fwd_kernel, triton_linear._linear_fwd_kernel, triton_linear._linear_dz_kernel)
    stdlib = (triton.language.standard.sum, triton.language.standard.max)
    return all(isinstance(k, InterpretedFunction) for k in kernels + stdlib)


RUNNABLE = _kernels_runnable()
needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="triton was imported without TRITON_INTERPRET=1; covered by test_rerun_in_fresh_process"
)


@pytest.mark.skipif(RUNNABLE, reason="the kernels run in this process")
def test_rerun_in_fresh_process():
    """Triton was imported before the interpreter could be switched on: run this file again in a clean process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks much smaller than the sizes, so that every loop runs several times and ends on a ragged edge."""
    monkeypatch.setattr(triton_logits, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(triton_linear, "BLOCK_N", 16)
    monkeypatch.setattr(triton_linear, "BLOCK_V", 64)
    monkeypatch.setattr(triton_linear, "BLOCK_D", 16)
    # On CUDA the kernels launch with kernel_config's device defaults: force the small tiles there too.
    monkeypatch.setattr(triton_linear, "_OVERRIDES", {})
    if DEVICE == "cuda":
        triton_linear.set_kernel_config("fwd", "16x64x16w4s2")
        triton_linear.set_kernel_config("dz", "16x64x16w4s2")


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _grad_close(actual, expected, dtype, what, compute=None):
    """fp32: tight. bf16 compute: dz and the GEMMs are bf16, so the tolerance scales with the largest entry."""
    assert actual.dtype == dtype, f"{what}: gradient dtype {actual.dtype}, expected the input's {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite gradient"
    scale = expected.abs().max().item()
    if (compute or dtype) == torch.float32:
        _close(actual, expected, 1e-5 * max(scale, 1.0), 1e-4, what)
    else:
        _close(actual, expected, 1e-2 * scale, 1e-2, what)
        rel = (actual.double() - expected).norm() / expected.norm()
        assert rel < 5e-3, f"{what}: relative error {rel:.3g}"


def _check_forward(stats, ref, valid, extras, what):
    assert stats.logprobs.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    for name in ("logprobs", "entropy", *[e for e in extras if e != "is_top1"]):
        got, exp = getattr(stats, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        _close(got, exp, 2e-5, 2e-5, f"{what} {name}")
        assert (got[~valid] == 0).all(), f"{what} {name}: ignored positions must be 0"
    if "is_top1" in extras:
        assert stats.is_top1.dtype == torch.bool
        assert torch.equal(stats.is_top1, ref.is_top1), f"{what} is_top1"
    for name in set(("mean_logits", "is_top1", "log_sum_sq_probs")) - set(extras):
        assert getattr(stats, name) is None


# ---------------------------------------------------------------- materialized logits


LOGITS_CASES = [
    # id, seed, dtype, lead shape, temperature, -inf columns, grads, extras, non-contiguous input
    ("fp32-both", 11, torch.float32, (37,), 1.0, False, "both", EXTRAS, False),
    ("fp32-masked-T", 12, torch.float32, (3, 13), 0.7, True, "both", EXTRAS, True),
    ("bf16-masked-lp-only", 13, torch.bfloat16, (37,), 1.6, True, "lp", ("is_top1",), False),
    ("bf16-entropy-only", 14, torch.bfloat16, (2, 19), 1.0, False, "h", (), True),
]


@needs_kernels
@pytest.mark.parametrize("case", LOGITS_CASES, ids=[c[0] for c in LOGITS_CASES])
def test_logits_kernel_matches_float64_reference(case):
    _, seed, dtype, lead, temperature, masked, grads, extras, strided = case
    n_vocab = 301
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, n_vocab, generator=gen) * 4
    targets = torch.randint(0, n_vocab, lead, generator=gen)
    flat_l, flat_t = logits.view(-1, n_vocab), targets.view(-1)
    if masked:
        flat_l[:5, :64] = float("-inf")  # a whole first block: m stays -inf for a block
        flat_l[5:10, 128:192] = float("-inf")  # a whole middle block
        flat_l[:, 250:260] = float("-inf")  # masked vocabulary columns
        flat_t[:5] = torch.randint(64, 250, (5,), generator=gen)
        flat_t[5:10] = torch.randint(0, 128, (5,), generator=gen)
        flat_t[(flat_t >= 250) & (flat_t < 260)] = 3 + 64
    # some targets are the argmax, one row has a tie at its maximum (the first occurrence wins)
    flat_t[10:16] = flat_l[10:16].argmax(-1)
    top = flat_l[16].max()
    flat_l[16, 7], flat_l[16, 200] = top + 1, top + 1
    flat_t[16], flat_t[17] = 200, 7
    flat_l[17] = flat_l[16]
    flat_t[torch.rand(flat_t.shape, generator=gen) < 0.2] = IGNORE
    flat_t[16], flat_t[17] = 200, 7
    logits = logits.to(dtype)
    if strided:  # a non-contiguous [.., V] view: vocabulary stride != 1
        logits = logits.transpose(-1, 0).contiguous().transpose(-1, 0)
        assert not logits.is_contiguous()
    logits = logits.to(DEVICE).requires_grad_(True)
    targets = targets.to(DEVICE)
    valid = targets != IGNORE

    stats = token_stats(logits, targets, temperature=temperature, backend="triton", extras=extras)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, temperature=temperature, dtype=torch.float64, extras=EXTRAS)
    assert stats.logprobs.shape == targets.shape
    _check_forward(stats, ref, valid, extras, "logits")
    if "is_top1" in extras:
        assert bool(stats.is_top1.view(-1)[17]) and not bool(stats.is_top1.view(-1)[16])

    g_lp = torch.randn(lead, generator=gen).to(DEVICE) if grads in ("both", "lp") else None
    g_h = torch.randn(lead, generator=gen).to(DEVICE) if grads in ("both", "h") else None

    def loss(s):
        total = 0.0
        if g_lp is not None:
            total = total + (g_lp.to(s.logprobs.dtype) * s.logprobs).sum()
        if g_h is not None:
            total = total + (g_h.to(s.entropy.dtype) * s.entropy).sum()
        return total

    (grad,) = torch.autograd.grad(loss(stats), [logits])
    (ref_grad,) = torch.autograd.grad(loss(ref), [ref_in])
    assert (grad.view(-1, n_vocab)[~valid.view(-1)] == 0).all(), "ignored rows must get zero gradient"
    if masked:
        assert (grad.view(-1, n_vocab)[:, 250:260] == 0).all(), "-inf logits must get exactly zero gradient"
    _grad_close(grad, ref_grad, dtype, "dlogits")


@needs_kernels
def test_logits_kernel_extreme_logits_are_finite():
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(9, 301, generator=gen) * 1e4).clamp(-1e4, 1e4)
    logits[0] = 0.0  # uniform row
    logits[1, :] = -1e4
    logits[1, 5] = 1e4  # one-hot row
    targets = torch.randint(0, 301, (9,), generator=gen)
    logits = logits.to(DEVICE).requires_grad_(True)
    targets = targets.to(DEVICE)
    lp, h = logprob_and_entropy(logits, targets, temperature=0.9, backend="triton")
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, temperature=0.9, dtype=torch.float64)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    _close(lp, ref.logprobs, 1e-3, 1e-6, "logprobs")
    _close(h, ref.entropy, 1e-4, 1e-5, "entropy")
    g = torch.randn(9, generator=gen).to(DEVICE)
    (grad,) = torch.autograd.grad((g * lp).sum() + (g * h).sum(), [logits])
    (ref_grad,) = torch.autograd.grad((g.double() * ref.logprobs).sum() + (g.double() * ref.entropy).sum(), [ref_in])
    assert torch.isfinite(grad).all()
    # z / T of |z| ~ 1e4 is rounded to fp32 (ulp ~ 1e-3), which moves p by ~1e-3 relative: a looser tolerance.
    _close(grad, ref_grad, 2e-3 * ref_grad.abs().max().item(), 1e-2, "dlogits")


@needs_kernels
def test_logits_kernel_all_ignored():
    logits = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    stats = token_stats(logits, targets, backend="triton", extras=EXTRAS)
    for t in stats:
        assert not t.any()
    (grad,) = torch.autograd.grad(stats.logprobs.sum() + stats.entropy.sum(), [logits])
    assert not grad.any()


# ---------------------------------------------------------------- fused LM head


_COMPILE_ROW_GRAD = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llm_entreg.ops import triton_logits

fn = triton_logits._logits_bwd_kernel
sig = {"logits_ptr": "*fp32", "stride_n": "i64", "stride_v": "constexpr", "targets_ptr": "*i64",
       "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "g_lp_ptr": "*fp32", "g_h_ptr": "*fp32",
       "dlogits_ptr": "*bf16", "stride_dn": "i64", "V": "i32", "temperature": "fp32", "ignore_index": "i64",
       "col_offset": "i32", "BLOCK_V": "constexpr", "HAS_G_LP": "constexpr", "HAS_G_H": "constexpr",
       "ROUND_BF16": "constexpr", "NARROW_IN_PLACE": "constexpr"}
out = {}
for narrow in (False, True):
    const = {"stride_v": 1, "BLOCK_V": 4096, "HAS_G_LP": True, "HAS_G_H": True, "ROUND_BF16": False,
             "NARROW_IN_PLACE": narrow}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    out[str(narrow)] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
print("PTX" + json.dumps(out))
"""


@pytest.mark.slow
def test_in_place_bf16_dz_has_a_barrier_between_loads_and_stores():
    """The gemm mode writes bf16 dz over the fp32 logits of the same row: the store of column c overwrites fp32
    element c // 2, which another warp loads. Compiled for Hopper (sm_90, no GPU needed: Triton's bundled ptxas, in a
    process without the interpreter), the kernel must put a CTA barrier between the block's loads and its stores.
    The interpreter runs a block as one array operation and cannot show the race."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ROW_GRAD], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or "PTX" not in proc.stdout:
        pytest.skip(f"cannot compile for sm_90 here (a Triton build without the NVIDIA backend or ptxas?): "
                    f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else proc.stdout[-200:]}")
    ptx = json.loads(proc.stdout.split("PTX", 1)[1])
    plain, narrow = ptx["False"], ptx["True"]
    assert plain.count("bar.sync") == 0
    assert narrow.count("bar.sync") == 1
    lines = narrow.splitlines()
    barrier = next(i for i, line in enumerate(lines) if "bar.sync" in line)
    loads = [i for i, line in enumerate(lines) if "ld.global" in line and ".b32" in line]
    stores = [i for i, line in enumerate(lines) if "st.global" in line and ".b16" in line]
    # every load of the logits comes before the barrier and the dz stores of the loop after it (the stores before
    # it are the ignored-row branch, which writes zeros and reads nothing)
    assert loads and max(loads) < barrier
    assert len([i for i in stores if i > barrier]) >= 8


@needs_kernels
def test_row_grad_into_a_narrower_view_of_the_logits():
    """row_grad with out = a bf16 view over the fp32 logits' own bytes (the gemm mode's layout) = into a separate
    buffer, bit for bit, over several blocks per row. On a GPU also at the gemm mode's own sizes (4096-column
    blocks, 8 warps), where without the barrier a warp's stores overwrite logits another warp has yet to load."""
    gen = torch.Generator().manual_seed(5)
    # interpreter: MAX_BLOCK_V = 64, three blocks per row; GPU: the issue case's 3584-column backward chunk (one
    # masked 4096 block) and a row of 2.5 blocks
    sizes = [(6, 150)] if DEVICE == "cpu" else [(6, 150), (512, 3584), (256, 10240)]
    for n, v in sizes:
        z = torch.randn(n, v, generator=gen).mul_(3).to(DEVICE)
        targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
        lp, ent, lse, *_ = triton_logits.row_stats(z, targets, 1.0, -100)
        g1, g2 = torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)
        separate = torch.empty(n, v, dtype=torch.bfloat16, device=DEVICE)
        triton_logits.row_grad(z, targets, lse, ent, g1, g2, 1.0, -100, separate)
        narrow = z.view(torch.bfloat16).view(n, 2 * v)[:, :v]
        got = triton_logits.row_grad(z, targets, lse, ent, g1, g2, 1.0, -100, narrow)
        assert got.data_ptr() == z.data_ptr()
        torch.testing.assert_close(got, separate, atol=0, rtol=0, msg=lambda m: f"n={n}, V={v}: {m}")


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
    _check_forward(stats, ref, valid, extras, "linear")
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
        _grad_close(g, e, p.dtype, f"grad_{name}", compute)
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
    _check_forward(stats, ref, valid, EXTRAS, "gemm mode")
    g1, g2 = (torch.randn(targets.shape, generator=gen).to(DEVICE) for _ in range(2))
    got = torch.autograd.grad((g1 * stats.logprobs).sum() + (g2 * stats.entropy).sum(), params)
    exp = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        _grad_close(g, e, p.dtype, f"grad_{name}", dtype)
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
    _close(lp, ref.logprobs, 2e-5, 2e-5, "logprobs")
    _close(h, ref.entropy, 2e-5, 2e-5, "entropy")
    g1, g2 = (torch.randn(targets.shape, generator=gen).to(DEVICE) for _ in range(2))
    got = torch.autograd.grad((g1 * lp).sum() + (g2 * h).sum(), params)
    exp = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        _grad_close(g, e, p.dtype, f"grad_{name}", compute)


def test_backward_plan_at_the_issue_size():
    """N = 16384, d = 4096, V = 151936, bf16: one token chunk, dz + fp32 grad_hidden accumulator <= 512 MiB."""
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
    _close(lp, ref.logprobs, 2e-5, 2e-5, "logprobs")
    _close(h, ref.entropy, 2e-5, 2e-5, "entropy")
    exp = torch.autograd.grad(ref.logprobs.sum() - 0.3 * ref.entropy.sum(), ref_params)
    for name, g, e, p in zip(("hidden", "weight", "bias"), got, exp, params):
        _grad_close(g, e, p.dtype, f"grad_{name}")


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
    _grad_close(grad, ref_grad, torch.float32, "grad_hidden")

    ignored = torch.full_like(targets, IGNORE)
    weight.requires_grad_(True)
    stats = linear_token_stats(hidden, weight, ignored, bias=bias, backend="triton", extras=EXTRAS)
    for t in stats:
        assert t.shape == ignored.shape and not t.any()
    gh, gw = torch.autograd.grad(stats.logprobs.sum() + stats.entropy.sum(), [hidden, weight])
    assert not gh.any() and not gw.any()
