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


def test_held_out_panels_draw_the_curve_and_before_after(tmp_path):
    history = [{"step": i, "loss": 1.0 / i, "entropy": 1.0} for i in range(1, 11)]
    curve = [{"step": 5, "held_out/pass@1": 0.7, "held_out/pass@16": 0.95, "held_out/distinct_correct": 5.0,
              "held_out/entropy": 0.8}]
    before = {"pass_at_k": {"1": 0.6, "16": 0.99}, "distinct_correct": 11.0, "entropy": 1.3}
    after = {"pass_at_k": {"1": 0.9, "16": 0.96}, "distinct_correct": 2.0, "entropy": 0.2}
    import matplotlib.pyplot as plt

    drawn = []
    original = plt.Axes.plot

    def spy(ax, *args, **kwargs):
        drawn.append((ax.get_title(), kwargs.get("label"), list(args[0]), list(args[1])))
        return original(ax, *args, **kwargs)

    plt.Axes.plot = spy
    try:
        plot_training_curves(history, tmp_path / "c.png", held_out_curve=curve, before=before, after=after)
    finally:
        plt.Axes.plot = original
    held = {label: (xs, ys) for title, label, xs, ys in drawn if title.startswith("held-out")}
    assert held["pass@16"] == ([0, 5, 10], [0.99, 0.95, 0.96])  # before, the recorded curve, after
    assert held["distinct_correct"] == ([0, 5, 10], [11.0, 5.0, 2.0])
    assert "pass@4" not in held  # recorded nowhere: no line


def _history(**series):
    n = len(next(iter(series.values())))
    return [{"step": i + 1, **{k: v[i] for k, v in series.items()}} for i in range(n)]


def test_each_algorithm_gets_its_own_panels_and_a_constant_coefficient_none():
    from llm_entreg.plots import training_panels

    dpo = _history(loss=[1, 0.9], entropy=[2, 1.9], entropy_coef=[0.02, 0.02], **{
        "rewards/accuracies": [0.5, 0.6], "rewards/margins": [0.01, 0.07]})
    titles = [t for t, _ in training_panels(dpo, "dpo")]
    assert titles == ["loss", "policy entropy (nats/token)", "DPO reward accuracy", "DPO reward margin"]
    ppo = _history(loss=[1, 0.9], entropy=[2, 1.9], entropy_coef=[0.1, 0.05], reward=[0.2, 0.4], kl=[0.0, 0.01],
                   value_loss=[0.3, 0.2], explained_variance=[0.1, 0.4])
    assert [t for t, _ in training_panels(ppo, "ppo")] == [
        "loss", "policy entropy (nats/token)", "entropy coefficient", "reward", "KL to reference",
        "critic value loss", "critic explained variance"]
    grpo = _history(loss=[1, 0.9], reward=[0.2, 0.4], kl=[0.0, 0.01])
    assert [t for t, _ in training_panels(grpo, "grpo")] == ["loss", "reward", "KL to reference"]


def test_a_constant_coefficient_is_named_in_the_entropy_title(tmp_path):
    import matplotlib.pyplot as plt

    titles = []
    original = plt.Axes.set_title

    def spy(ax, label, *args, **kwargs):
        titles.append(label)
        return original(ax, label, *args, **kwargs)

    plt.Axes.set_title = spy
    try:
        plot_training_curves(_history(loss=[1, 0.9], entropy=[2, 1.9], entropy_coef=[0.02, 0.02]),
                             tmp_path / "c.png", algorithm="dpo")
    finally:
        plt.Axes.set_title = original
    assert titles == ["loss", "policy entropy (nats/token); β = 0.02 (constant)"]
