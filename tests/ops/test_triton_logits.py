"""The Triton kernels on materialized logits (``ops/triton_logits.py``) against the float64 reference, forward and
backward, at small odd sizes with lowered block sizes (every loop runs several times with ragged edges)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from llm_entreg.ops import (  # noqa: E402
    logprob_and_entropy,
    token_stats,
)
from llm_entreg.ops import triton_logits  # noqa: E402
from llm_entreg.ops.reference import reference_token_stats  # noqa: E402

from .triton_helpers import (  # noqa: E402
    DEVICE, EXTRAS, IGNORE, RUNNABLE, assert_close, assert_grad_close, check_forward, needs_kernels,
    rerun_in_fresh_process,
)

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("triton_small_blocks")]


@pytest.mark.skipif(RUNNABLE, reason="the kernels run in this process")
def test_rerun_in_fresh_process():
    """Triton was imported before the interpreter could be switched on: run this file again in a clean process."""
    rerun_in_fresh_process(__file__)


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
    check_forward(stats, ref, valid, extras, "logits")
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
    assert_grad_close(grad, ref_grad, dtype, "dlogits")


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
    assert_close(lp, ref.logprobs, 1e-3, 1e-6, "logprobs")
    assert_close(h, ref.entropy, 1e-4, 1e-5, "entropy")
    g = torch.randn(9, generator=gen).to(DEVICE)
    (grad,) = torch.autograd.grad((g * lp).sum() + (g * h).sum(), [logits])
    (ref_grad,) = torch.autograd.grad((g.double() * ref.logprobs).sum() + (g.double() * ref.entropy).sum(), [ref_in])
    assert torch.isfinite(grad).all()
    # z / T of |z| ~ 1e4 is rounded to fp32 (ulp ~ 1e-3), which moves p by ~1e-3 relative: a looser tolerance.
    assert_close(grad, ref_grad, 2e-3 * ref_grad.abs().max().item(), 1e-2, "dlogits")


@needs_kernels
def test_logits_kernel_all_ignored():
    logits = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    stats = token_stats(logits, targets, backend="triton", extras=EXTRAS)
    for t in stats:
        assert not t.any()
    (grad,) = torch.autograd.grad(stats.logprobs.sum() + stats.entropy.sum(), [logits])
    assert not grad.any()


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
