"""llm_entreg.bench.impls: the registry of implementations, their specs and knobs, and what each builds on a CPU."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.bench import impls
from llm_entreg.bench.impls import ALL_IMPLS, REGISTRY, parse_spec, parse_triton_spec, resolve_impl

CPU = torch.device("cpu")
#: The implementations that run on a CPU, and those that say why they cannot.
ON_CPU = ("naive", "trl_chunked", "ours_chunked", "ours_torch", "ours_fused_loss", "ours_fused_loss_chunked")
CUDA_ONLY = ("ours_triton", "liger", "liger_scaled", "liger_scaled_fallback")


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="--impls"):
        resolve_impl("fastest", CPU)


def test_unknown_impl_error_lists_every_name():
    with pytest.raises(ValueError) as err:
        resolve_impl("ours_trition@+tiles", CPU)
    assert str(err.value) == (f"--impls: unknown implementation 'ours_trition@+tiles'; choose from {ALL_IMPLS} "
                              "(with @params)")


def test_registry_holds_every_family_in_order():
    assert ALL_IMPLS == ("naive", "trl_chunked", "ours_chunked", "ours_triton", "ours_torch", "ours_fused_loss",
                         "ours_fused_loss_chunked", "liger", "liger_scaled", "liger_scaled_fallback")
    assert tuple(REGISTRY) == ALL_IMPLS and set(ON_CPU) | set(CUDA_ONLY) == set(ALL_IMPLS)
    # one builder per family: the variants of a family share it
    assert REGISTRY["ours_fused_loss"] is REGISTRY["ours_fused_loss_chunked"]
    assert REGISTRY["liger_scaled"] is REGISTRY["liger_scaled_fallback"]


def test_parse_spec():
    assert parse_spec("naive") == ("naive", None)
    assert parse_spec("ours_triton@+tiles") == ("ours_triton", "+tiles")
    assert parse_spec("trl_chunked@") == ("trl_chunked", None)


@pytest.mark.parametrize("spec", ON_CPU)
def test_each_cpu_family_builds_and_matches_naive(spec):
    impl, reason = resolve_impl(spec, CPU)
    assert impl is not None and reason == "", (spec, reason)
    assert impl.name == spec and impl.note
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(11, 8, generator=gen), torch.randn(37, 8, generator=gen)
    targets = torch.randint(0, 37, (11,), generator=gen)
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)  # float64 reference
    ref_lp, ref_h = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    with impl.tuning(), torch.no_grad():
        lp, ent = impl.fn(hidden, weight, targets)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", CUDA_ONLY)
def test_each_cuda_family_says_why_it_is_skipped_on_a_cpu(spec):
    impl, reason = resolve_impl(spec, CPU)
    assert impl is None and reason


def test_family_parameters():
    assert resolve_impl("trl_chunked@4096", CPU)[0].note == "chunk_size=4096"
    assert resolve_impl("ours_chunked@32x512", CPU)[0].note == "token_chunk=32, vocab_chunk=512"
    assert resolve_impl("ours_chunked", CPU, 64, 128)[0].note == "token_chunk=64, vocab_chunk=128"
    assert resolve_impl("ours_fused_loss@0.5", CPU)[0].note == "loss-fused LM head (chunked, chunk budget 0.5 MiB)"
    naive, fused = resolve_impl("naive", CPU)[0], resolve_impl("ours_fused_loss", CPU)[0]
    assert naive.fwdbwd_flop_factor == 6 and naive.loss_fn is None
    assert fused.fwdbwd_flop_factor == 6 and fused.loss_is_reference
    assert resolve_impl("ours_chunked", CPU)[0].fwdbwd_flop_factor == 8


def test_bad_family_parameters():
    with pytest.raises(ValueError, match=r"--impls: 'ours_chunked@32': expected ours_chunked@<token_chunk>x<vocab"):
        resolve_impl("ours_chunked@32", CPU)
    with pytest.raises(ValueError):
        resolve_impl("trl_chunked@big", CPU)
    with pytest.raises(ValueError):
        resolve_impl("ours_fused_loss@lots", CPU)


def test_triton_spec_is_parsed_then_skipped_on_cpu_with_its_reason():
    for spec in ("ours_triton", "ours_triton@64x64x32w4s2", "ours_triton@64x64x32/128x128x64w4s2+splits1+group2",
                 "ours_triton@+splits1+group1000000+tokenfirst",
                 "ours_triton@+splits4", "ours_triton@+tiles", "ours_triton@+gemm+buf96+acc64"):
        impl, reason = resolve_impl(spec, CPU)
        assert impl is None and "CUDA" in reason, spec
    for bad in ("ours_triton@128x128", "ours_triton@64x64x32/64x64x32/64x64x32", "ours_triton@+split4",
                "ours_triton@+tokenlast",
                "ours_triton@+group0", "ours_triton@+buf0", "ours_triton@+gemmm",
                "ours_triton@64x64x32+gemm", "ours_triton@+gemm+splits2"):
        with pytest.raises(ValueError, match="--impls"):
            resolve_impl(bad, CPU)


def test_bad_triton_knob_messages():
    with pytest.raises(ValueError) as err:
        resolve_impl("ours_triton@+gemmm", CPU)
    assert str(err.value) == ("--impls: 'ours_triton@+gemmm': unknown knob 'gemmm' (splitsN, groupN with N >= 1, "
                              "tokenfirst, tiles, gemm)")
    with pytest.raises(ValueError) as err:
        resolve_impl("ours_triton@+gemm+splits2", CPU)
    assert str(err.value) == ("--impls: 'ours_triton@+gemm+splits2': tile configurations and splitsN/groupN/tokenfirst "
                              "apply to the tiles mode, not +gemm")
    with pytest.raises(ValueError, match=r"expected ours_triton@FWD\[/DZ\]\[\+splitsN\]\[\+groupN\]"):
        resolve_impl("ours_triton@64x64x32/64x64x32/64x64x32", CPU)


def test_triton_settings_become_tuning_keywords():
    pytest.importorskip("triton")
    from llm_entreg.ops import triton_linear

    default = parse_triton_spec("ours_triton", None)
    assert default.mode is None and default.fwd is None and default.knobs == default.defaults
    kw = parse_triton_spec("ours_triton@+gemm+buf96+acc64", "+gemm+buf96+acc64").tuning_kwargs()
    assert kw["head_mode"] == "gemm" and kw["gemm_buffer_bytes"] == 96 * 2**20 and kw["acc_bytes"] == 64 * 2**20
    assert kw["min_splits"] == triton_linear.MIN_SPLITS and kw["fwd"] is None
    # version 1's launch order: the knobs alone mean the tiles mode
    v1 = parse_triton_spec("x", "+splits1+group1000000+tokenfirst").tuning_kwargs()
    assert v1["head_mode"] == "tiles" and v1["min_splits"] == 1 and v1["dz_group"] == 1000000
    assert v1["split_fastest"] is False
    cfg = parse_triton_spec("x", "64x64x32/128x128x64w4s2")
    assert cfg.mode == "tiles" and str(cfg.fwd) == "64x64x32w8s3" and str(cfg.dz) == "128x128x64w4s2"
    assert parse_triton_spec("x", "+buf96+tiles").mode == "tiles"
    # the knobs apply only inside the implementation's own tuning context
    before = {k: getattr(triton_linear, k) for k in impls.TRITON_KNOBS}
    with triton_linear.tuning(**kw):
        assert triton_linear.GEMM_BUFFER_BYTES == 96 * 2**20 and triton_linear.head_mode(CPU) == "gemm"
    assert {k: getattr(triton_linear, k) for k in impls.TRITON_KNOBS} == before
