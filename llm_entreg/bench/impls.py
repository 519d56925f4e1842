"""The implementations the kernel benchmark times, by name: a registry of small builders, one per family.

A spec is ``NAME`` or ``NAME@PARAMS`` (``trl_chunked@C``, ``ours_chunked@TCxVC``, ``ours_fused_loss@MIB``,
``ours_triton@FWD/DZ+knob+...``); :func:`resolve_impl` turns it into an :class:`Impl` for a device, or into the
reason it cannot run there. What each implementation runs: docs/benchmarks.md ("What is measured").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from llm_entreg.ops import linear_logprob_and_entropy

if TYPE_CHECKING:  # imported where used: it needs triton
    from llm_entreg.ops import triton_linear

DEFAULT_IMPLS = "naive,trl_chunked,ours_chunked,ours_triton,liger"
#: TRL's add_fused_lm_head vocabulary chunk.
TRL_CHUNK_SIZE = 32768
#: The Triton head's module-level knobs an ``ours_triton@...`` spec may set, and those that only the tiles mode reads.
TRITON_KNOBS = ("MIN_SPLITS", "DZ_GROUP", "SPLIT_FASTEST", "GEMM_BUFFER_BYTES", "ACC_BYTES")
TILES_KNOBS = ("MIN_SPLITS", "DZ_GROUP", "SPLIT_FASTEST")


@dataclass
class Impl:
    """One implementation: ``fn(hidden, weight, targets) -> (logprobs, entropy or None)``."""

    name: str
    fn: Callable
    #: FLOPs of forward+backward in units of N*d*V (8 with a recomputing backward, 6 when the logits are kept).
    fwdbwd_flop_factor: int = 8
    has_entropy: bool = True
    #: ``loss_fn(hidden, weight, targets, g_lp, g_h) -> scalar`` to backpropagate; default uses both outputs.
    loss_fn: Callable | None = None
    #: whether ``loss_fn`` is the benchmark's loss (``sum g_lp logp + g_H H``), so its gradients can be checked.
    loss_is_reference: bool = False
    #: ``tuning()`` is the context every run of this implementation (forward and backward) happens in.
    tuning: Callable[[], ContextManager] = nullcontext
    note: str = ""


@dataclass(frozen=True)
class ImplRequest:
    """What a builder gets: the whole ``spec``, its name ``base`` and ``param`` (after ``@``), the device, and the
    ``--token-chunk`` / ``--vocab-chunk`` of a plain ``ours_chunked``."""

    spec: str
    base: str
    param: str | None
    device: torch.device
    token_chunk: int | None = None
    vocab_chunk: int | None = None


#: ``name -> builder(request) -> (Impl, "") or (None, reason)``, in the order ``--impls`` lists them.
REGISTRY: dict[str, Callable[[ImplRequest], "tuple[Impl | None, str]"]] = {}


def register(*names: str):
    """Decorator: ``builder`` makes the implementations ``names``."""

    def add(builder):
        for name in names:
            REGISTRY[name] = builder
        return builder

    return add


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"ours_triton@+tiles"`` -> ``("ours_triton", "+tiles")``; no ``@``: ``(spec, None)``."""
    base, _, param = spec.partition("@")
    return base, (param or None)


def resolve_impl(spec: str, device: torch.device, token_chunk=None, vocab_chunk=None) -> tuple[Impl | None, str]:
    """The :class:`Impl` of ``spec`` on ``device``, or ``(None, reason)`` when it cannot run here; ``ValueError`` for
    a spec that names no implementation or carries a bad parameter."""
    base, param = parse_spec(spec)
    builder = REGISTRY.get(base)
    if builder is None:
        raise ValueError(f"--impls: unknown implementation {spec!r}; choose from {ALL_IMPLS} (with @params)")
    return builder(ImplRequest(spec, base, param, device, token_chunk, vocab_chunk))


def naive_logprob_entropy(hidden, weight, targets):
    """Materialized logits, ``log_softmax``, ``gather``, ``H = -(p log p).sum()`` (also the float64 reference)."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


# ----------------------------------------------------------------------------------------------------------------------
# Builders, in the order of ALL_IMPLS
# ----------------------------------------------------------------------------------------------------------------------
@register("naive")
def build_naive(req: ImplRequest):
    return Impl(req.spec, naive_logprob_entropy, fwdbwd_flop_factor=6, note="materialized logits"), ""


@register("trl_chunked")
def build_trl_chunked(req: ImplRequest):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as exc:  # pragma: no cover - TRL is a dependency
        return None, f"trl.kernels.ChunkedLogProbFunction not importable: {exc}"
    chunk = int(req.param) if req.param else TRL_CHUNK_SIZE

    def trl_fn(hidden, weight, targets):
        lp, ent, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, chunk, None, 1.0, ("entropy",))
        return lp, ent

    return Impl(req.spec, trl_fn, note=f"chunk_size={chunk}"), ""


@register("ours_chunked")
def build_ours_chunked(req: ImplRequest):
    from llm_entreg.ops.chunked import TOKEN_CHUNK, VOCAB_CHUNK, chunked_linear_token_stats

    tc, vc = req.token_chunk, req.vocab_chunk
    if req.param:
        try:
            tc_s, vc_s = req.param.lower().split("x")
            tc, vc = int(tc_s), int(vc_s)
        except ValueError:
            raise ValueError(f"--impls: {req.spec!r}: expected ours_chunked@<token_chunk>x<vocab_chunk>") from None
    kind = "cuda" if req.device.type == "cuda" else "cpu"
    note = f"token_chunk={tc or TOKEN_CHUNK[kind]}, vocab_chunk={vc or VOCAB_CHUNK[kind]}"
    if tc is None and vc is None:

        def ours_fn(hidden, weight, targets):
            return linear_logprob_and_entropy(hidden, weight, targets, backend="chunked")
    else:

        def ours_fn(hidden, weight, targets):
            st = chunked_linear_token_stats(hidden, weight, None, targets, 1.0, -100, (), None, tc, vc)
            return st.logprobs, st.entropy

    return Impl(req.spec, ours_fn, note=note), ""


@register("ours_triton")
def build_ours_triton(req: ImplRequest):
    try:
        from llm_entreg.ops import triton_available

        if not triton_available():
            return None, "triton not importable"
        from llm_entreg.ops import triton_linear
    except Exception as exc:
        return None, f"llm_entreg.ops.triton_linear not importable: {exc}"
    settings = parse_triton_spec(req.spec, req.param)  # bad knobs fail on any device
    if req.device.type != "cuda":
        return None, "CUDA only (on the CPU Triton runs only under TRITON_INTERPRET=1, far too slow to time)"

    def triton_fn(hidden, weight, targets):
        return linear_logprob_and_entropy(hidden, weight, targets, backend="triton")

    def tuned():
        return triton_linear.tuning(**settings.tuning_kwargs())

    return Impl(req.spec, triton_fn, tuning=tuned, note=settings.note(req.device)), ""


@register("ours_torch")
def build_ours_torch(req: ImplRequest):
    def torch_fn(hidden, weight, targets):
        return linear_logprob_and_entropy(hidden, weight, targets, backend="torch")

    return Impl(req.spec, torch_fn, fwdbwd_flop_factor=6, note="materializing reference backend"), ""


@register("ours_fused_loss", "ours_fused_loss_chunked")
def build_ours_fused_loss(req: ImplRequest):
    from llm_entreg.ops import fused_linear_loss
    from llm_entreg.ops.fused_loss import CHUNK_BUDGET_BYTES, CUDA_CHUNK_BUDGET_BYTES

    cuda = req.device.type == "cuda"
    backend = "triton" if req.base == "ours_fused_loss" and cuda else "chunked"
    budget = int(float(req.param) * 2**20) if req.param else (CUDA_CHUNK_BUDGET_BYTES if cuda else CHUNK_BUDGET_BYTES)

    def fl_fn(hidden, weight, targets):
        zero = lambda lp, h, rows: torch.zeros_like(lp)  # noqa: E731 - forward only: statistics
        _, stats = fused_linear_loss(hidden, weight, targets, zero, backend=backend, chunk_budget_bytes=budget)
        return stats.logprobs, stats.entropy

    def fl_loss(hidden, weight, targets, g_lp, g_h):
        g1, g2 = g_lp.detach().float(), g_h.detach().float()

        def loss_fn(lp, h, rows):
            return g1[rows].to(lp.dtype) * lp + g2[rows].to(h.dtype) * h

        loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, backend=backend, chunk_budget_bytes=budget)
        return loss

    return Impl(req.spec, fl_fn, fwdbwd_flop_factor=6, loss_fn=fl_loss, loss_is_reference=True,
                note=f"loss-fused LM head ({backend}, chunk budget {budget / 2**20:g} MiB)"), ""


@register("liger")
def build_liger(req: ImplRequest):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    if req.device.type != "cuda":
        return None, "Liger's kernels are Triton/CUDA only"

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def liger_fn(hidden, weight, targets):
        return -first(liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")).float(), None

    def liger_loss(hidden, weight, targets, g_lp, g_h):
        # Liger computes the input gradients inside its forward and scales them by a scalar in its backward,
        # so a per-token upstream gradient is not supported: a summed CE loss is the closest equivalent.
        return first(liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum"))

    return Impl(req.spec, liger_fn, fwdbwd_flop_factor=6, has_entropy=False, loss_fn=liger_loss,
                note="log-prob only (no entropy); fwd+bwd on reduction='sum'"), ""


@register("liger_scaled", "liger_scaled_fallback")
def build_liger_scaled(req: ImplRequest):
    try:
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as lsce
    except Exception as exc:
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    if req.device.type != "cuda":
        return None, "benchmarked on CUDA only"
    fallback_cls = lsce._FusedLinearPPOFallbackFunction
    fn_cls = fallback_cls
    if req.base == "liger_scaled":
        try:
            dev = req.device if req.device.index is not None else torch.device("cuda", 0)
            fn_cls = lsce._resolve_implementation(dev)
        except Exception as exc:
            return None, f"Liger's sm90 kernel not importable ({type(exc).__name__}: {str(exc)[:160]})"
    fallback = fn_cls is fallback_cls

    def scaled_fn(hidden, weight, targets):
        if fallback:
            nll, ent = fn_cls.apply(hidden, weight, targets, 1.0, -100, True)
        else:
            nll, ent = fn_cls.apply(hidden, weight, targets, 1.0, -100, 1, True)
        return -nll.float(), ent.float()

    return Impl(req.spec, scaled_fn, note=f"Liger fused linear scaled CE, {fn_cls.__name__}"), ""


#: Every implementation name, in registration order (the order ``--impls`` help and its errors list them).
ALL_IMPLS = tuple(REGISTRY)


# ----------------------------------------------------------------------------------------------------------------------
# ours_triton@FWD[/DZ][+knob...]
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TritonSettings:
    """The Triton head's settings of one ``ours_triton@...`` spec: mode (None: the device default), forced launch
    configurations, and every knob of :data:`TRITON_KNOBS` (the module's own value unless the spec sets it)."""

    mode: str | None = None
    fwd: "triton_linear.KernelConfig | None" = None
    dz: "triton_linear.KernelConfig | None" = None
    knobs: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    def tuning_kwargs(self) -> dict:
        """Keywords of :func:`llm_entreg.ops.triton_linear.tuning`."""
        k = self.knobs
        return dict(head_mode=self.mode, fwd=self.fwd, dz=self.dz, min_splits=k["MIN_SPLITS"],
                    dz_group=k["DZ_GROUP"], split_fastest=k["SPLIT_FASTEST"],
                    gemm_buffer_bytes=k["GEMM_BUFFER_BYTES"], acc_bytes=k["ACC_BYTES"])

    def note(self, device: torch.device) -> str:
        """What the benchmark's table says about this implementation (the launch configurations on ``device``)."""
        from llm_entreg.ops import triton_linear

        dev = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        cfgs = {k: str(triton_linear.kernel_config(k, dev, torch.bfloat16)) for k in ("fwd", "dz")}
        if self.fwd is not None:
            cfgs = {"fwd": str(self.fwd), "dz": str(self.dz)}
        if (self.mode or triton_linear.head_mode(dev)) == "gemm":
            return (f"Triton LM head, gemm mode: cuBLAS fp32 logits into a "
                    f"{self.knobs['GEMM_BUFFER_BYTES'] / 2**20:g} MiB buffer + Triton row kernels, fp32 accumulator "
                    f"<= {self.knobs['ACC_BYTES'] / 2**20:g} MiB")
        return (f"fused Triton LM head, tiles mode (fwd {cfgs['fwd']}, dz {cfgs['dz']}"
                f"{'' if self.fwd else ' for bf16'}"
                + "".join(f", {k}={v}" for k, v in self.knobs.items() if v != self.defaults[k]) + ")")


def parse_triton_spec(spec: str, param: str | None) -> TritonSettings:
    """The :class:`TritonSettings` of ``ours_triton@param``: ``FWD[/DZ]`` launch configurations (tiles mode),
    ``+tiles`` / ``+gemm``, ``+bufN`` / ``+accN`` (MiB), ``+splitsN``, ``+groupN``, ``+tokenfirst``."""
    from llm_entreg.ops import triton_linear

    defaults = {k: getattr(triton_linear, k) for k in TRITON_KNOBS}
    out = TritonSettings(knobs=dict(defaults), defaults=defaults)
    if not param:
        return out
    cfg_part, *extra = param.split("+")
    parts = cfg_part.split("/") if cfg_part else []
    if len(parts) > 2:
        raise ValueError(f"--impls: {spec!r}: expected ours_triton@FWD[/DZ][+splitsN][+groupN]")
    try:
        if parts:
            out.fwd = triton_linear.KernelConfig.parse(parts[0])
            out.dz = triton_linear.KernelConfig.parse(parts[-1])
        for knob in extra:
            out.mode = _apply_knob(knob, out.knobs, out.mode, triton_linear.HEAD_MODES)
    except ValueError as exc:
        raise ValueError(f"--impls: {spec!r}: {exc}") from None
    tiles_knobs = bool(parts) or any(out.knobs[k] != defaults[k] for k in TILES_KNOBS)
    if out.mode == "gemm" and tiles_knobs:
        raise ValueError(f"--impls: {spec!r}: tile configurations and splitsN/groupN/tokenfirst apply to the "
                         "tiles mode, not +gemm")
    if out.mode is None and tiles_knobs:
        out.mode = "tiles"
    return out


def _apply_knob(knob: str, knobs: dict, mode: str | None, head_modes) -> str | None:
    """Sets one ``+knob`` in ``knobs``; returns the mode after it."""
    if knob in head_modes:
        return knob
    if knob.startswith("buf") and knob[3:].isdigit() and int(knob[3:]) > 0:
        knobs["GEMM_BUFFER_BYTES"] = int(knob[3:]) * 2**20
        return mode or "gemm"
    if knob.startswith("acc") and knob[3:].isdigit() and int(knob[3:]) > 0:
        knobs["ACC_BYTES"] = int(knob[3:]) * 2**20
        return mode
    if knob == "tokenfirst":
        knobs["SPLIT_FASTEST"] = False
        return mode
    name = "MIN_SPLITS" if knob.startswith("splits") else "DZ_GROUP" if knob.startswith("group") else None
    value = knob.removeprefix("splits").removeprefix("group")
    if name is None or not value.isdigit() or int(value) < 1:
        raise ValueError(f"unknown knob {knob!r} (splitsN, groupN with N >= 1, tokenfirst, tiles, gemm)")
    knobs[name] = int(value)
    return mode
