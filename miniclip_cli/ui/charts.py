"""Terminal charts drawn with plotext (6.x's figure API), returned as plain strings."""

from __future__ import annotations

import plotext as plt


def _figure(width: int, height: int):
    figure = plt.figure
    figure.clear()
    figure.plot_size(width, height)
    return figure


def _render(figure) -> str:
    return figure.build().string(colorless=True)


def probability_bars(labels: list[str], percents: list[float], width: int = 70) -> str:
    """Horizontal bars of each label's probability, 0-100%, the first label on top."""
    short = [label if len(label) <= 28 else label[:27] + "…" for label in labels]
    figure = _figure(width, 3 * len(labels) + 4)
    # plotext draws the first bar at the bottom; reverse so the table and the chart read in one order.
    labels_text = [f"{p:.1f}%" for p in percents[::-1]]
    figure.draw(figure.bar(short[::-1], percents[::-1], orientation="h", width=0.6, labeled=labels_text))
    figure.ruler(0).lim(0, 100)
    figure.title("probability (%)")
    return _render(figure)


def value_bars(labels: list[str], values: list[float], title: str, width: int = 70) -> str:
    """Horizontal bars of arbitrary non-negative values (sizes, latencies)."""
    figure = _figure(width, 3 * len(labels) + 4)
    figure.draw(figure.bar(labels[::-1], values[::-1], orientation="h", width=0.6,
                           labeled=[f"{v:.3g}" for v in values[::-1]]))
    figure.ruler(0).lim(0, max(values, default=1) * 1.1 or 1)
    figure.title(title)
    return _render(figure)


def training_curves(history: list[dict], width: int = 70, height: int = 16) -> str:
    """Training loss (left axis) and validation mean recall (right axis) per epoch."""
    epochs = [float(r["epoch"]) for r in history]
    figure = _figure(width, height)
    loss = figure.signal(epochs, [r["train_loss"] for r in history])
    loss.label("train loss (left)")
    loss.lines()
    figure.draw(loss)
    if any("val_mean_recall" in r for r in history):
        points = [(float(r["epoch"]), r["val_mean_recall"]) for r in history if "val_mean_recall" in r]
        recall = figure.signal([p[0] for p in points], [p[1] for p in points], yside="right")
        recall.label("val mean recall % (right)")
        recall.lines()
        figure.draw(recall)
    figure.label("epoch", axis="x")
    return _render(figure)
