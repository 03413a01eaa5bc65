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
    # The percentages go beside the labels: plotext centres a bar's own label on the bar, so a 0% bar's label
    # is cut off at the axis (".0%").
    longest = max(map(len, short), default=0)
    names = [f"{label:<{longest}} {p:5.1f}%" for label, p in zip(short, percents)]
    figure = _figure(width, 3 * len(labels) + 4)
    # plotext draws the first bar at the bottom; reverse so the table and the chart read in one order.
    figure.draw(figure.bar(names[::-1], percents[::-1], orientation="h", width=0.6))
    figure.ruler(0).lim(0, 100).ticks([0, 25, 50, 75, 100])
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
    """Training loss (left axis) and validation mean recall (right axis) per epoch.

    The legend is the title: plotext's legend box sits inside the frame, over the start of the curves. The two
    curves have different markers, since the chart is drawn without colour."""
    epochs = [float(r["epoch"]) for r in history]
    losses = [r["train_loss"] for r in history]
    figure = _figure(width, height)
    figure.legend(False)
    loss = figure.signal(epochs, losses, marker="hd")
    loss.lines()
    figure.draw(loss)
    if len(set(losses)) == 1:  # plotext pads a single value by ±1 either side, below zero for a loss under 1
        figure.ruler(1, "left").lim(0, 2 * losses[0] or 1)
    title = "train loss ▀▄ (left axis)"
    points = [(float(r["epoch"]), r["val_mean_recall"]) for r in history if "val_mean_recall" in r]
    if points:
        recall = figure.signal([e for e, _ in points], [v for _, v in points], marker="dot", yside="right")
        recall.lines()
        figure.draw(recall)
        # Recall from 0: a single point then sits high, apart from a single loss point at mid-height.
        figure.ruler(1, "right").lim(0, 1.1 * max(v for _, v in points) or 1)
        title += "  ·  val mean recall % • (right axis)"
    if len(set(epochs)) == 1:  # one point in the middle, rather than at the edge of a 0-2 axis
        figure.ruler(0).lim(epochs[0] - 1, epochs[0] + 1)
    if len(set(epochs)) <= 12:  # whole epochs, not plotext's 1.17, 1.33, ...
        figure.ruler(0).ticks(sorted(set(epochs)), [f"{e:g}" for e in sorted(set(epochs))])
    figure.title(title)
    figure.label("epoch", axis="x")
    return _render(figure)
