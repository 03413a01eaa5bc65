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


# 1. The interactive loop checks the image when its path is entered, and wants two captions.

def test_interactive_asks_again_for_a_bad_path_before_any_caption(runner, trained_run, tiny_dataset, tmp_path):
    image = tiny_dataset / "Images" / "blue_square_1.png"
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a jpeg")
    typed = f"{tmp_path / 'missing.jpg'}\n{fake}\n{tmp_path}\n{image}\na blue square\na red circle\n\n\n"
    result = _interactive(runner, trained_run, typed)
    assert "missing.jpg" in result.output and "fake.jpg" in result.output and "folder" in result.output
    # Each bad path is refused before captions are asked for: only the good image gets caption prompts.
    assert result.output.count("caption 1>") == 1
    [payload] = _json_lines(result)
    assert payload["image"] == str(image) and len(payload["scores"]) == 2


def test_interactive_refuses_a_fifo_without_opening_it(runner, trained_run, tiny_dataset, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = _interactive(runner, trained_run, f"{fifo}\n{image}\na red circle\na blue square\n\n\n")
    assert "pipe.jpg" in result.output and "not a regular file" in result.output
    assert [p["image"] for p in _json_lines(result)] == [str(image)]


def test_interactive_one_caption_then_empty_line_asks_for_another(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "blue_square_1.png"
    result = _interactive(runner, trained_run, f"{image}\na blue square\n\na red circle\n\n\n")
    assert "at least two captions" in result.output and "-c" not in result.output
    [payload] = _json_lines(result)
    assert payload["image"] == str(image)
    assert [s["caption"] for s in payload["scores"]] == ["a blue square", "a red circle"]


def test_interactive_with_one_fixed_caption_is_refused_at_once(runner, trained_run):
    result = run_cli(runner, "classify", "--model", trained_run, "-c", "a dog", code=3)
    assert "at least two captions" in result.output and "Traceback" not in result.output


# 2. A huge line is refused where it enters, quickly.

def test_a_huge_path_line_is_refused_and_the_loop_asks_again(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = _interactive(runner, trained_run, "x" * 10_000_000 + f"\n{image}\na red circle\na blue square\n\n\n")
    assert "10,000,000 characters" in result.output and len(result.output) < 10_000
    assert [p["image"] for p in _json_lines(result)] == [str(image)]


def test_a_huge_caption_is_refused_and_the_loop_asks_again(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = _interactive(runner, trained_run, f"{image}\n" + "y" * 10_000_000 + "\na red circle\na blue square\n\n\n")
    assert "10,000,000 characters" in result.output and len(result.output) < 10_000
    [payload] = _json_lines(result)
    assert [s["caption"] for s in payload["scores"]] == ["a red circle", "a blue square"]


def test_a_huge_caption_option_is_a_config_error(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "y" * 100_000, "-c", "a dog", "--model", trained_run, code=3)
    assert "100,000 characters" in result.output and len(result.output) < 2_000


# 3. Several images, folders and glob patterns.

@pytest.fixture
def photos(tmp_path):
    """A folder with three images, a text file, a hidden file, a FIFO and a sub-folder with one more image."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name, colour, shape in (("a.png", "red", "circle"), ("b.png", "blue", "square"), ("c.jpg", "green", "circle")):
        make_image(folder / name, colour, shape)
    make_image(folder / "more" / "d.png", "yellow", "square")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a.png").write_bytes(b"\0\5\26\7")  # macOS metadata: hidden, neither read nor counted
    os.mkfifo(folder / "pipe.png")
    return folder


CAPTIONS = ["-c", "a red circle", "-c", "a blue square", "-c", "a green circle"]


def test_classify_a_folder_prints_one_json_line_per_image(runner, trained_run, photos):
    result = run_cli(runner, "classify", photos, *CAPTIONS, "--model", trained_run, "--json")
    payloads = _json_lines(result)
    assert [p["image"] for p in payloads] == [str(photos / name) for name in ("a.png", "b.png", "c.jpg")]
    for payload in payloads:
        assert [s["caption"] for s in payload["scores"]] == ["a red circle", "a blue square", "a green circle"]
        assert abs(sum(s["probability"] for s in payload["scores"]) - 1) < 1e-5
    # notes.txt and the FIFO are counted, never opened; the sub-folder is not searched.
    assert "skipped 2" in result.output and "more/d.png" not in result.stdout and "._a.png" not in result.output


def test_classify_several_images_and_a_glob_in_a_table(runner, trained_run, photos, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, f"{photos}/*.png", *CAPTIONS, "--model", trained_run)
    for needle in ("image", "best caption", "red_circle_0.png", "a.png", "b.png"):
        assert needle in result.stdout, needle
    assert "c.jpg" not in result.stdout and "probability (%)" not in result.stdout  # no bar chart for several


def test_the_table_has_a_column_per_caption_where_they_fit(runner, trained_run, photos):
    result = run_cli(runner, "classify", photos / "a.png", f"{photos}/b*", "-c", "red", "-c", "blue", "-c", "green",
                     "--model", trained_run)
    header = next(line for line in result.stdout.splitlines() if "best caption" in line)
    assert all(caption in header for caption in ("red", "blue", "green")), result.stdout
    assert sum("%" in line for line in result.stdout.splitlines()) == 2  # a row per image
    long = [f"a photograph of a {colour} shape on a plain grey background" for colour in ("red", "blue", "green")]
    result = run_cli(runner, "classify", photos / "a.png", f"{photos}/b*", *(a for c in long for a in ("-c", c)),
                     "--model", trained_run)
    header = next(line for line in result.stdout.splitlines() if "best caption" in line)
    assert not any(caption in header for caption in long) and max(map(len, result.stdout.splitlines())) <= 80


def test_a_recursive_glob_reaches_sub_folders(runner, trained_run, photos):
    result = run_cli(runner, "classify", f"{photos}/**/*.png", *CAPTIONS, "--model", trained_run, "--json")
    assert [p["image"] for p in _json_lines(result)] == [str(photos / n) for n in ("a.png", "b.png", "more/d.png")]


def test_a_bad_image_among_several_is_skipped_with_a_warning(runner, trained_run, photos):
    (photos / "broken.jpg").write_text("not a jpeg")
    result = run_cli(runner, "classify", photos / "broken.jpg", photos / "a.png", *CAPTIONS, "--model", trained_run,
                     "--json")
    assert "broken.jpg" in result.stderr and "warning" in result.stderr
    assert [p["image"] for p in _json_lines(result)] == [str(photos / "a.png")]


@pytest.mark.parametrize("given, code, needle", [
    (["{photos}/a.png", "{photos}/nope.png"], 2, "nope.png"),
    (["{photos}/*.gif"], 2, "*.gif"),
    (["{photos}/pipe.png"], 2, "not a regular file"),
    (["{photos}/more/../notes.txt", "{photos}/notes.txt"], 2, "none of the 2 images"),
    (["{photos}/empty"], 2, "no image files"),
])
def test_unusable_image_arguments_are_one_line_errors(runner, trained_run, photos, given, code, needle):
    (photos / "empty").mkdir()
    args = [g.format(photos=photos) for g in given]
    result = run_cli(runner, "classify", *args, *CAPTIONS, "--model", trained_run, code=code)
    assert needle in result.output and result.output.count("error:") == 1 and "Traceback" not in result.output


def test_one_image_keeps_its_single_object_and_chart(runner, trained_run, photos):
    result = run_cli(runner, "classify", photos / "a.png", *CAPTIONS, "--model", trained_run, "--json")
    assert json.loads(result.stdout)["image"] == str(photos / "a.png")
    result = run_cli(runner, "classify", f"{photos}/a.*", *CAPTIONS, "--model", trained_run)
    assert "probability (%)" in result.stdout and "best caption" not in result.stdout


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


def test_emoji_codes_in_image_names_are_printed_as_typed(runner, trained_run, tmp_path, tiny_dataset):
    image = tmp_path / "cat:smile:.png"
    shutil.copy(tiny_dataset / "Images" / "red_circle_0.png", image)
    result = run_cli(runner, "classify", image, image, "-c", "a cat", "-c", "a dog", "--model", trained_run)
    assert "cat:smile:.png" in result.stdout and "😄" not in result.stdout
