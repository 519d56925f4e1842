"""Shared pieces of the Triton kernel tests: the interpreter check, small blocks, tolerances and forward checks.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which tests/conftest.py sets (and restores)
before triton is first imported; with CUDA they are compiled and run on the GPU. If triton was imported earlier in
this test run without the interpreter, each Triton test module reruns itself in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from llm_entreg.ops import triton_linear, triton_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")
IGNORE = -100


def kernels_runnable() -> bool:
    if DEVICE == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    kernels = (triton_logits._logits_fwd_kernel, triton_linear._linear_fwd_kernel, triton_linear._linear_dz_kernel)
    stdlib = (triton.language.standard.sum, triton.language.standard.max)
    return all(isinstance(k, InterpretedFunction) for k in kernels + stdlib)



RUNNABLE = kernels_runnable()

needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="triton was imported without TRITON_INTERPRET=1; covered by test_rerun_in_fresh_process"
)



def rerun_in_fresh_process(test_file: str) -> None:
    """Run ``test_file`` again in a clean process with the interpreter switched on; assert that it passes."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def use_small_blocks(monkeypatch) -> None:
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


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what, compute=None):
    """fp32: tight. bf16 compute: dz and the GEMMs are bf16, so the tolerance scales with the largest entry."""
    assert actual.dtype == dtype, f"{what}: gradient dtype {actual.dtype}, expected the input's {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite gradient"
    scale = expected.abs().max().item()
    if (compute or dtype) == torch.float32:
        assert_close(actual, expected, 1e-5 * max(scale, 1.0), 1e-4, what)
    else:
        assert_close(actual, expected, 1e-2 * scale, 1e-2, what)
        rel = (actual.double() - expected).norm() / expected.norm()
        assert rel < 5e-3, f"{what}: relative error {rel:.3g}"


def check_forward(stats, ref, valid, extras, what):
    assert stats.logprobs.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    for name in ("logprobs", "entropy", *[e for e in extras if e != "is_top1"]):
        got, exp = getattr(stats, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        assert_close(got, exp, 2e-5, 2e-5, f"{what} {name}")
        assert (got[~valid] == 0).all(), f"{what} {name}: ignored positions must be 0"
    if "is_top1" in extras:
        assert stats.is_top1.dtype == torch.bool
        assert torch.equal(stats.is_top1, ref.is_top1), f"{what} is_top1"
    for name in set(("mean_logits", "is_top1", "log_sum_sq_probs")) - set(extras):
        assert getattr(stats, name) is None
