"""The run's curves (``plots.py``): one PNG with a panel per logged quantity; missing series are skipped."""

from __future__ import annotations

from llm_entreg.plots import plot_training_curves


def test_curves_png_is_written_with_missing_series_skipped(tmp_path):
    history = [{"step": i, "loss": 1.0 / i, "entropy": 2.0 - 0.01 * i, "entropy_coef": 0.1} for i in range(1, 30)]
    path = plot_training_curves(history, tmp_path / "sub" / "curves.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = plot_training_curves([], tmp_path / "empty.png")
    assert empty.read_bytes()[:4] == b"\x89PNG"
