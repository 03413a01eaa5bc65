"""The `miniclip` command: a Typer app with one thin module per subcommand (parse, call, render)."""

from __future__ import annotations

import functools
import os
from importlib import metadata

import typer

from ..errors import MiniclipError
from ..ui.console import err, error

app = typer.Typer(
    name="miniclip",
    help="Train, evaluate and use a small CLIP model (image-text dual encoder), from scratch, on a laptop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
)
TRAINING_PACKAGES = {"torch", "torchvision", "safetensors", "onnx"}
_debug = {"on": os.environ.get("MINICLIP_DEBUG", "") not in ("", "0")}


def version() -> str:
    try:
        return metadata.version("miniclip")
    except metadata.PackageNotFoundError:  # run from a source folder that was never installed
        from .. import __version__

        return __version__


def _print_version(asked: bool) -> None:
    if asked:
        print(f"miniclip {version()}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or set MINICLIP_DEBUG=1)."),
          _version: bool = typer.Option(False, "--version", help="Print miniclip's version and exit.",
                                        is_eager=True, callback=_print_version)):
    if debug:
        _debug["on"] = True


def command(name: str):
    """Register a subcommand whose MiniclipErrors become one red line on stderr and their exit code, and whose
    Ctrl-C is one line and exit code 130 (the shell's for SIGINT) rather than a traceback."""

    def register(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except MiniclipError as problem:
                if _debug["on"]:
                    raise
                error(str(problem))
                raise typer.Exit(problem.exit_code) from None
            except KeyboardInterrupt:
                if _debug["on"]:
                    raise
                err.print(f"[yellow]interrupted[/]: `miniclip {name}` stopped before it finished")
                raise typer.Exit(130) from None
            except ModuleNotFoundError as missing:
                if _debug["on"] or missing.name not in TRAINING_PACKAGES:
                    raise
                error(f"`miniclip {name}` needs {missing.name}, which this PyTorch-free install lacks; run `pip install .` "
                      "in miniclip's source folder for the full install (for PyTorch alone: `pip install torch "
                      "torchvision`), or use `--backend onnx`, which runs without it")
                raise typer.Exit(6) from None

        app.command(name)(run)
        return function

    return register


def main() -> None:
    app()


# Imported last: each module registers its commands on `app` through `command`.
from . import cache, classify, deploy, evaluate, search, serve, shard, train  # noqa: E402, F401
