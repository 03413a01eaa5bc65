"""The two consoles: results on stdout, progress, warnings and errors on stderr (so --json stays clean)."""

from rich.console import Console
from rich.markup import escape

# Messages are plain text: escape() keeps their brackets (pip install 'miniclip[distill]', crop_scale [0.3, 1.0],
# a file named data[1].txt) from being read as Rich markup and dropped. emoji=False keeps a path, caption or device
# name holding ':smile:' as typed: Rich would print an emoji, in messages and in table cells alike.

out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)
_speaker = {"prefix": ""}


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    err.print(message, soft_wrap=True)


def only_rank_zero_speaks(rank: int) -> None:
    """Under torchrun every process runs the same command; only rank 0 prints. The others keep their errors
    (see `error`), named by rank, so that a fault on one process or node is not silent."""
    out.quiet = err.quiet = rank != 0
    _speaker["prefix"] = f"rank {rank}: " if rank else ""


def error(message: str) -> None:
    quiet, err.quiet = err.quiet, False
    try:
        err.print(f"{_speaker['prefix']}[bold red]error:[/] {escape(message)}", soft_wrap=True)
    finally:
        err.quiet = quiet
