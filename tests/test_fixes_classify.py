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
