"""Benchmarks as a library: the fused LM head's kernels (:mod:`.head`, over :mod:`.impls`), time vs size
(:mod:`.sizes`), where a head's GPU time goes (:mod:`.profile`), and whole DPO / GRPO optimizer steps (:mod:`.step`);
:mod:`.report` writes their results. Commands and measured figures: docs/benchmarks.md.
"""

from .head import main

__all__ = ["main"]
