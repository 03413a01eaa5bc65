"""`miniclip classify`: which caption fits an image (or each of several), once or in an interactive loop."""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..data.pixels import IMAGE_SUFFIXES, load_rgb
from ..errors import ConfigError, DataError
from ..runtime import open_encoder
from ..ui import charts, tables
from ..ui.console import err, out, warn
from ..ui.console import error as show_error
from ..ui.progress import CountProgress
from . import command
from .common import Backend, Checkpoint, Device, print_json

DEFAULT_PROMPTS = 3
# Linux's PATH_MAX. A longer line is a paste gone wrong, not a path, and shlex.split takes quadratic time on it
# (a 10 MB line would hang the loop for half an hour).
MAX_PATH_CHARS = 4096
# Far above what the text encoder reads (the tokenizer keeps its context length); longer is a paste gone wrong.
MAX_CAPTION_CHARS = 1000
GLOB_CHARACTERS = "*?["


def clean_dropped_path(text: str) -> str:
    """A path as terminals paste a dragged file: maybe quoted, maybe with backslash-escaped spaces,
    maybe a file:// URL."""
    text = text.strip()
    if text.startswith("file://"):
        from urllib.parse import unquote

        text = unquote(text[len("file://"):])
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as typed
        return text.strip("'\"")
    return " ".join(parts) if parts else ""


def _check_captions(captions: list[str]) -> list[str]:
    captions = [c.strip() for c in captions if c.strip()]
    for caption in captions:
        if len(caption) > MAX_CAPTION_CHARS:
            raise ConfigError(f"a caption of {len(caption):,} characters ({caption[:30]!r}...); captions have at most "
                              f"{MAX_CAPTION_CHARS:,}: shorten it")
    if len(captions) < 2:
        raise ConfigError("classify needs at least two captions to choose between, e.g. -c 'a dog' -c 'a cat'")
    return captions


def _a_regular_file(path: Path) -> Path:
    """`path` if it is a file to read; a FIFO or device is refused unopened (opening a FIFO waits for a writer)."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give one image file here (`miniclip classify FOLDER -c ...` "
                        "classifies a folder's images)")
    if not path.exists():
        raise DataError(f"{path}: image not found; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket), which classify does not read; "
                        "give an image file")
    return path


def find_images(given: list[str]) -> tuple[list[Path], list[str]]:
    """The image files that the command line names, and a note for each folder or pattern with files skipped.

    A file is taken as named; a folder gives its image files (by suffix), not its sub-folders'; a glob pattern
    (quoted, so that miniclip expands it) gives its matching image files, `**` reaching into sub-folders. Of a
    folder's or a pattern's files, the ones without an image suffix and those that are not regular files are
    skipped, unopened, and counted in the note; hidden files are not looked at."""
    images, notes = [], []
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for text in given:
        path = Path(text).expanduser()
        if path.is_dir():
            # Hidden files are left out, as a glob leaves them out: macOS's ._photo.jpg is not an image.
            found = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
            nothing = (f"{path}: no image files ({suffixes}) in this folder; its sub-folders are not searched: "
                       f"give a pattern such as '{path}/**/*.jpg'")
        elif not path.exists() and any(c in text for c in GLOB_CHARACTERS):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            found = [p for p in map(Path, matches) if not p.is_dir()]
            if not found:
                raise DataError(f"{text}: no file matches this pattern; check its folder and spelling")
            nothing = f"{text}: matches no image files ({suffixes}); check the pattern"
        else:
            images.append(_a_regular_file(path))
            continue
        usable = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not usable:
            raise DataError(nothing)
        skipped = [p.name for p in sorted(set(found) - set(usable))]
        if skipped:
            notes.append(f"{text}: skipped {len(skipped)} file(s) that are not image files "
                         f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})")
        images += usable
    return images, notes


@command("classify")
def classify_command(
    images: Optional[List[str]] = typer.Argument(
        None, help="Image files, folders (their images, not their sub-folders') or quoted glob patterns "
                   "('photos/*.jpg', 'photos/**/*.jpg'). Omit for the interactive loop.", show_default=False),
    captions: Optional[List[str]] = typer.Option(None, "--caption", "-c", help="A candidate caption; give two or more."),
    model_dir: Path = typer.Option(..., "--model", "-m", help="A run folder written by `miniclip train`, or an exported RUN/onnx folder."),
    which: Checkpoint = "best",
    backend: Backend = "auto",
    device: Device = "auto",
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per image, one per line."),
):
    """Score captions against images: for one image, a probability per caption as a table and a bar chart;
    for several, a table with a row per image.

    With no image, an interactive loop: drag an image into the terminal (or type its path), enter
    captions (three by default, or the -c ones), see the chart; an empty line ends.

    Examples:

        miniclip classify photo.jpg -c "a dog" -c "a cat" -c "a car" --model artifacts/runs/f30k

        miniclip classify photos/ 'more/*.png' -c "a dog" -c "a cat" --model artifacts/runs/f30k --json

        miniclip classify --model artifacts/runs/f30k
    """
    fixed = _check_captions(captions or []) if images or captions else []
    paths, notes = find_images(images) if images else ([], [])
    for note in notes:
        warn(note)
    encoder = open_encoder(model_dir, backend, which, device)

    def score(path: Path, texts: list[str]) -> dict:
        probabilities = encoder.caption_probabilities(path, texts)
        return {"image": str(path), "scores": [{"caption": c, "probability": p} for c, p in zip(texts, probabilities)]}

    def show(result: dict) -> None:
        texts = [s["caption"] for s in result["scores"]]
        probabilities = [s["probability"] for s in result["scores"]]
        # Captions are the user's text: brackets in them are not Rich markup.
        out.print(tables.probability_table([escape(t) for t in texts], probabilities))
        out.print(charts.probability_bars(texts, [100 * p for p in probabilities]), markup=False)

    if len(paths) == 1:
        result = score(paths[0], fixed)
        print_json(result) if json_out else show(result)
    elif paths:
        _classify_several(score, paths, fixed, json_out)
    else:
        _interactive(score, show, fixed, json_out)


def _classify_several(score, paths: list[Path], texts: list[str], json_out: bool) -> None:
    """One JSON line per image as it is scored, or a table of them all; an image that cannot be read is skipped."""
    results = []
    # The bar is for the table only: a live display on a terminal would take over stdout and the JSON lines.
    bar = contextlib.nullcontext(lambda done, total: None) if json_out else CountProgress("classifying images")
    with bar as progress:
        for done, path in enumerate(paths, 1):
            try:
                result = score(path, texts)
            except DataError as problem:
                warn(f"{problem}; skipped")
                continue
            finally:
                progress(done, len(paths))
            results.append(result)
            if json_out:
                print_json(result)
    if not results:
        raise DataError(f"none of the {len(paths)} images could be read (see the warnings above); "
                        "re-save them as JPEG or PNG")
    if not json_out:
        out.print(_images_table(results, out.width))


def _images_table(results: list[dict], width: int) -> Table:
    """A row per image: its best caption and probability, then every caption's probability where they fit."""
    try:
        folder = os.path.commonpath([os.path.dirname(r["image"]) for r in results])
    except ValueError:  # absolute and relative paths mixed
        folder = ""
    names = [os.path.relpath(r["image"], folder) if folder else r["image"] for r in results]
    captions = [s["caption"] for s in results[0]["scores"]]
    table = Table(title=f"images in {escape(folder)}" if folder and folder != "." else None)
    table.add_column("image")
    table.add_column("best caption")
    table.add_column("probability", justify="right")
    fixed_width = max(map(len, names)) + max(map(len, captions)) + len("probability") + 10  # cells' padding, borders
    every_caption = fixed_width + sum(max(len(c), len("100.0%")) + 3 for c in captions) <= width
    for caption in captions if every_caption else []:
        table.add_column(escape(caption), justify="right")
    for name, result in zip(names, results):
        probabilities = [s["probability"] for s in result["scores"]]
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        cells = [f"{100 * p:.1f}%" for p in probabilities] if every_caption else []
        table.add_row(escape(name), escape(captions[best]), f"{100 * probabilities[best]:.1f}%", *cells)
    return table


def _ask(prompt: str, limit: int, what: str) -> str | None:
    """A line typed at `prompt`, stripped, or None at the end of input. A line longer than `limit` is refused here,
    before anything parses it, and asked for again."""
    while True:
        try:
            line = err.input(prompt)
        except EOFError:
            return None
        if len(line) <= limit:
            return line.strip()
        show_error(f"that line has {len(line):,} characters, and {what} has at most {limit:,}; enter it again")


def _ask_image() -> Path | None:
    """The path of a readable image, asked for until one is given; None on an empty line or the end of input."""
    while True:
        line = _ask("image> ", MAX_PATH_CHARS, "a path")
        text = clean_dropped_path(line) if line else ""
        if not text:
            return None
        path = Path(text).expanduser()
        try:
            load_rgb(_a_regular_file(path))
        except DataError as problem:
            show_error(str(problem))
            continue
        return path


def _ask_captions() -> list[str] | None:
    """Up to DEFAULT_PROMPTS captions, at least two; None at the end of input before two were given."""
    err.print(f"Enter captions, one per line ({DEFAULT_PROMPTS} by default; after two, an empty line ends early):")
    texts = []
    while len(texts) < DEFAULT_PROMPTS:
        line = _ask(f"caption {len(texts) + 1}> ", MAX_CAPTION_CHARS, "a caption")
        if line is None:
            return texts if len(texts) >= 2 else None
        if line:
            texts.append(line)
        elif len(texts) >= 2:
            break
        else:
            err.print("classify needs at least two captions to choose between; enter another")
    return texts


def _interactive(score, show, fixed_captions: list[str], json_out: bool) -> None:
    err.print("Drag an image into this terminal (or type its path) and press Enter; an empty line quits.")
    while True:
        path = _ask_image()
        texts = fixed_captions or (_ask_captions() if path else None)
        if path is None or texts is None:
            return
        try:
            result = score(path, texts)
        except DataError as problem:  # the file changed since it was checked
            show_error(str(problem))
            continue
        print_json(result) if json_out else show(result)
