"""Small helpers shared by the run, the sweep and the embedded tasks (no trainer): torch threads, package versions,
the unbiased pass@k estimator, the first/last window means of a curve."""

from __future__ import annotations

import contextlib
import math

import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op thread count inside the block and restore it after (None: leave it alone)."""
    if n is None:
        yield
        return
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads: expected None or a positive int, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def package_version(name: str) -> str:
    """The installed version of a distribution (``"unknown"`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``, the
    probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(k):  # C(n - c, k) / C(n, k) as a product: exact without big binomials
        prob_all_wrong *= (n - c - i) / (n - i)
    return 1.0 - prob_all_wrong


def window_size(n_values: int, window: float = 0.2) -> int:
    """How many values the first (and the last) ``window`` fraction of ``n_values`` holds: at least one."""
    return max(1, math.ceil(window * n_values - 1e-9))


def window_means(values: list[float], window: float = 0.2) -> tuple[float | None, float | None]:
    """Means over the first and the last ``window`` fraction of ``values`` (at least one value each)."""
    if not values:
        return None, None
    k = window_size(len(values), window)
    return sum(values[:k]) / k, sum(values[-k:]) / k
