"""`miniclip index` and `miniclip search`: find photos in a folder by caption or by example."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..data.pixels import IMAGE_SUFFIXES
from ..errors import ConfigError, DataError
from ..ui.console import info, out, warn
from ..ui.progress import CountProgress
from . import command
from .common import Backend, Device, JsonFlag


PREVIEWS = 5  # more would push the table off the screen


@command("index")
def index_command(
    folder: Path = typer.Argument(..., help="The folder of photos; every image below it is embedded."),
    model_dir: Path = typer.Option(..., "--model", "-m", help="A run folder written by `miniclip train`."),
    backend: Backend = "torch",
    device: Device = "auto",
    index_path: Optional[Path] = typer.Option(None, "--index", help="Index file. Default: FOLDER/.miniclip/index-RUN.npz."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Start a new index instead of updating this one."),
    float32: bool = typer.Option(False, "--float32", help="Store float32 features (twice the size): scores equal "
                                 "eval's bit for bit rather than within 1e-5. Default for a new index: 16-bit."),
    json_out: JsonFlag = False,
):
    """Embed every image below FOLDER (jpg, png, webp, bmp, gif, tiff) into one index file for `miniclip search`.

    Run it again after adding, changing or deleting photos: only new and changed files are embedded, deleted
    ones are dropped. Stopped early (Ctrl-C, a kill), it keeps what it embedded; the next run continues.
    Unreadable files are skipped and counted. Symlinks out of the folder and hidden folders are not followed.

    Examples:

        miniclip index ~/Pictures --model artifacts/runs/f30k

        miniclip index ~/Pictures --model artifacts/runs/f30k --backend onnx     # int8, no PyTorch needed
    """
    from ..index import index_folder, load

    if not folder.expanduser().is_dir():
        raise DataError(f"{folder}: no such folder; give the folder that holds your photos")
    encoder = load(model_dir, backend, device)
    try:
        with CountProgress("embedding", rate=True) as bar:
            index, stats = index_folder(folder, encoder, index_path, rebuild, progress=bar,
                                        storage="float32" if float32 else None)
    except KeyboardInterrupt:
        info("the images embedded so far are saved in the index; run the same command again to continue")
        raise
    summary = {"index": str(index.file), "images": len(index), "new": stats.new, "changed": stats.changed,
               "removed": stats.removed, "unchanged": stats.unchanged, "unreadable": stats.unreadable}
    if stats.unreadable:
        warn(f"{index.root}: {stats.unreadable} file(s) could not be read as images and were skipped, e.g. "
             + "; ".join(stats.unreadable_examples))
    if json_out:
        print(json.dumps(summary))
        return
    info(f"{len(index)} images in {index.file}: {stats.new} new, {stats.changed} changed, {stats.removed} removed, "
         f"{stats.unchanged} unchanged" + (f", {stats.unreadable} unreadable" if stats.unreadable else ""))


@command("search")
def search_command(
    queries: List[str] = typer.Argument(..., help="Captions or image paths (a path that exists is an image query)."),
    folder: Path = typer.Option(Path("."), "--in", help="The indexed folder. Default: the current folder."),
    top: int = typer.Option(10, "--top", "-t", help="How many results."),
    negatives: Optional[List[str]] = typer.Option(None, "--negative", "-n", help="A caption or image to move away from; repeatable."),
    text: bool = typer.Option(False, "--text", help="Read every query as a caption, even one that names a file."),
    model_dir: Optional[Path] = typer.Option(None, "--model", "-m", help="Run folder. Default: the one that built the index."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch, onnx or onnx-fp32. Default: the index's."),
    index_path: Optional[Path] = typer.Option(None, "--index", help="Index file. Default: the one in --in DIR/.miniclip."),
    device: Device = "auto",
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Previews of the top results, when stdout is a terminal."),
    paths_only: bool = typer.Option(False, "--paths", help="Print only the paths, one a line, for pipes."),
    json_out: bool = typer.Option(False, "--json", help='Print [{"path", "score", "rank"}, ...].'),
):
    """Find the photos of an indexed folder that best match a caption, or look like an image.

    Scores are cosine similarities, the ones `classify` and `eval` compute. Several queries are averaged
    (their unit features); each --negative is subtracted.

    Examples:

        miniclip search "a dog running on the beach"                 # in the current folder's index

        miniclip search "a dog running on the beach" --in ~/Pictures

        miniclip search ./holiday/IMG_0042.jpg --top 5                # images like this one

        miniclip search "a red car" -n "night" --paths | xargs -d '\\n' feh
    """
    from ..index import find_index, load, load_index, search

    if json_out and paths_only:
        raise ConfigError("--json and --paths each choose the output; give one")
    if top < 1:
        raise ConfigError(f"--top {top}: give 1 or more")
    file = index_path.expanduser() if index_path else find_index(folder, model_dir)
    index = load_index(file)
    recorded = index.model
    run = model_dir or Path(recorded["run"])
    if model_dir is None and not run.is_dir():
        raise DataError(f"{file}: built with {run}, which is gone; give the model with --model RUN")
    encoder = load(run, backend or recorded["backend"], device)
    if encoder.backend != recorded["backend"]:
        warn(f"the index holds {recorded['backend']} features and the query uses {encoder.backend}: scores "
             "differ slightly from a search with one backend")
    hits = search(index, encoder, [_query(q, text) for q in queries], [_query(q, text) for q in negatives or []], top)
    if json_out:
        print(json.dumps([{"path": str(h.path), "score": round(h.score, 4), "rank": h.rank} for h in hits]))
    elif paths_only:
        print("\n".join(str(h.path) for h in hits))
    else:
        out.print(_table(hits, ", ".join(queries), len(index)))
        if preview and out.is_terminal:
            from ..ui.preview import show

            show(out, [(f"{h.rank}. {h.score:.4f}  {h.path.name}", h.path) for h in hits[:PREVIEWS]])


def _query(query: str, text_only: bool) -> str | Path:
    """An existing file is an image query; anything else is a caption."""
    if text_only:
        return query
    path = Path(query).expanduser()
    if path.is_dir():
        raise DataError(f"{query}: is a folder; give an image file, or use --text to search for these words")
    if path.is_file():
        return path
    if os.path.splitext(query)[1].lower() in IMAGE_SUFFIXES:
        warn(f"{query}: no such file, so it is searched as a caption")
    return query


def _table(hits, query: str, total: int) -> Table:
    table = Table(title=f"{escape(query)}  ·  top {len(hits)} of {total} images", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", escape(str(hit.path)))
    return table
