"""classify on several images, folders and globs; the interactive loop's checks; charts, progress and consoles."""

import io
import json
import os
import shutil

import pytest
from rich.console import Console
from rich.progress import Progress

from .conftest import make_image, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _interactive(runner, trained_run, typed, *extra):
    from miniclip_cli.cli import app

    result = runner.invoke(app, ["classify", "--model", str(trained_run), "--json", *extra], input=typed)
    assert result.exit_code == 0, result.output
    return result


def _json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# 4. Charts.

def test_probability_bars_label_zero_percent_in_full():
    from miniclip_cli.ui.charts import probability_bars

    chart = probability_bars(["a dog", "a cat", "a car"], [0.0, 99.96, 0.04])
    for name, shown in (("a dog", " 0.0%"), ("a cat", "100.0%"), ("a car", " 0.0%")):
        assert any(name in line and shown in line for line in chart.splitlines()), (name, chart)
    assert " .0%" not in chart


def _frame(chart: str) -> tuple[list[str], list[float], list[float]]:
    """The rows inside a chart's frame, and the numbers at its left and right axis ticks."""
    lines = chart.splitlines()
    top = next(i for i, line in enumerate(lines) if "┌" in line)
    bottom = max(i for i, line in enumerate(lines) if "└" in line)
    rows, left, right = [], [], []
    for line in lines[top + 1:bottom]:
        start, end = line.index("┤" if "┤" in line else "│"), line.rindex("├" if "├" in line else "│")
        rows.append(line[start + 1:end])
        if "┤" in line:
            left.append(float(line[:start]))
        if "├" in line:
            right.append(float(line[end + 1:]))
    return rows, left, right


@pytest.mark.parametrize("recall", [0.0, 12.5])
def test_training_curves_with_one_validation_point(recall):
    from miniclip_cli.ui.charts import training_curves

    rows, left, right = _frame(training_curves([{"epoch": 1, "train_loss": 0.4, "val_mean_recall": recall}]))
    assert left and right and min(left) >= 0 and min(right) >= 0
    assert sum(row.strip() != "" for row in rows) >= 1  # the point is drawn


def test_training_curves_keep_the_legend_off_the_data():
    from miniclip_cli.ui.charts import training_curves

    history = [{"epoch": e, "train_loss": 3 - 0.2 * e, "val_mean_recall": 5.0 * e} for e in range(1, 8)]
    chart = training_curves(history)
    assert "train loss" in chart and "val mean recall" in chart
    rows, _, _ = _frame(chart)
    assert not any(corner in row for row in rows for corner in "┌┐└┘"), chart  # no legend box inside the frame


# 5. Progress.

def test_the_cache_bar_goes_once_the_cache_is_built():
    from miniclip_cli.ui.progress import TrainProgress

    console = Console(file=io.StringIO(), record=True, width=100)
    progress = TrainProgress()
    progress.progress = Progress(console=console)
    with progress:
        progress.on_cache_progress(1, 2)
        assert [t.description for t in progress.progress.tasks] == ["caching decoded images"]
        progress.on_cache_progress(2, 2)
        assert progress.progress.tasks == []
    console.print(progress.progress)
    assert "caching" not in console.export_text()  # the final render has no finished cache bar


# 6. Rich does not turn :smile: in a user's text into an emoji.

def test_emoji_codes_in_user_text_are_printed_as_typed(runner, trained_run, tmp_path, tiny_dataset):
    from miniclip_cli.ui import console

    for printer in (console.out, console.err):
        assert printer.render_str("photo:smile:.jpg").plain == "photo:smile:.jpg"
    result = run_cli(runner, "classify", tmp_path / "photo:smile:.jpg", "-c", "a", "-c", "b", "--model", trained_run,
                     code=2)
    assert "photo:smile:.jpg" in result.output
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "a :smile: [b]cat", "-c", "a dog", "--model", trained_run)
    # Once in the table, once in the chart; Rich markup in a caption is printed as typed, too.
    assert result.stdout.count("a :smile: [b]cat") == 2 and "😄" not in result.stdout
