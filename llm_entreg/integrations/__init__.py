"""The one place that patches or wraps other libraries: TRL's fused-head contract on our ops."""

from .trl_head import install_fused_head

__all__ = ["install_fused_head"]
