"""The two consoles: results on stdout, progress, warnings and errors on stderr (so --json stays clean)."""

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    err.print(message, soft_wrap=True)
