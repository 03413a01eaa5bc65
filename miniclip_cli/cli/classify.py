"""`miniclip classify`: which caption fits an image, once or in an interactive loop."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError, DataError, MiniclipError
from ..runtime import open_encoder
from ..ui import charts, tables
from ..ui.console import err, out
from ..ui.console import error as show_error
from . import command
from .common import Backend, Checkpoint, Device, JsonFlag, print_json

DEFAULT_PROMPTS = 3


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
    if len(captions) < 2:
        raise ConfigError("classify needs at least two captions to choose between, e.g. -c 'a dog' -c 'a cat'")
    return captions


@command("classify")
def classify_command(
    image: Optional[Path] = typer.Argument(None, help="Image file. Omit for the interactive loop."),
    captions: Optional[List[str]] = typer.Option(None, "--caption", "-c", help="A candidate caption; give two or more."),
    model_dir: Path = typer.Option(..., "--model", "-m", help="A run folder written by `miniclip train`, or an exported RUN/onnx folder."),
    which: Checkpoint = "best",
    backend: Backend = "auto",
    device: Device = "auto",
    json_out: JsonFlag = False,
):
    """Score captions against an image: a probability per caption, as a table and a bar chart.

    With no image, an interactive loop: drag an image into the terminal (or type its path), enter
    captions (three by default, or the -c ones), see the chart; an empty line ends.

    Examples:

        miniclip classify photo.jpg -c "a dog" -c "a cat" -c "a car" --model artifacts/runs/f30k

        miniclip classify --model artifacts/runs/f30k
    """
    if image is not None:
        given = _check_captions(captions or [])
        if image.is_dir():
            raise DataError(f"{image}: is a folder; give one image file (for a folder of classes use `miniclip eval --zero-shot`)")
        if not image.exists():
            raise DataError(f"{image}: image not found; check the path")
    encoder = open_encoder(model_dir, backend, which, device)

    def score(path: Path, texts: list[str]) -> dict:
        probabilities = encoder.caption_probabilities(path, texts)
        return {"image": str(path), "scores": [{"caption": c, "probability": p} for c, p in zip(texts, probabilities)]}

    def show(result: dict) -> None:
        texts = [s["caption"] for s in result["scores"]]
        probabilities = [s["probability"] for s in result["scores"]]
        out.print(tables.probability_table(texts, probabilities))
        out.print(charts.probability_bars(texts, [100 * p for p in probabilities]))

    if image is not None:
        result = score(image, given)
        print_json(result) if json_out else show(result)
        return
    _interactive(score, show, captions or [], json_out)


def _interactive(score, show, fixed_captions: list[str], json_out: bool) -> None:
    err.print("Drag an image into this terminal (or type its path) and press Enter; an empty line quits.")
    while True:
        try:
            raw = err.input("image> ")
        except EOFError:
            return
        path_text = clean_dropped_path(raw)
        if not path_text:
            return
        texts = list(fixed_captions)
        if not texts:
            err.print(f"Enter captions, one per line ({DEFAULT_PROMPTS} by default; an empty line ends early):")
            while len(texts) < DEFAULT_PROMPTS:
                try:
                    line = err.input(f"caption {len(texts) + 1}> ").strip()
                except EOFError:
                    break
                if not line:
                    break
                texts.append(line)
        try:
            result = score(Path(path_text).expanduser(), _check_captions(texts))
        except MiniclipError as error:  # a bad path or too few captions: say so and ask again
            show_error(str(error))
            continue
        print_json(result) if json_out else show(result)
