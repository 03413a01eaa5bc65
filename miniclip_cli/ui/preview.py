"""Small previews of images in a terminal: the kitty or iTerm2 inline-image protocols where the terminal speaks
one, otherwise half-block characters (each cell two pixels: the upper in the foreground colour of '▀', the
lower in the background colour), which any 24-bit-colour terminal shows."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image
from rich.console import Console, Group
from rich.text import Text

from ..data.pixels import load_rgb
from ..errors import DataError

CELLS = 16  # a preview's width in terminal columns


def protocol() -> str:
    """kitty, iterm or blocks, from what the terminal says it is."""
    if os.environ.get("KITTY_WINDOW_ID") or os.environ.get("TERM") == "xterm-kitty":
        return "kitty"
    if os.environ.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm"):
        return "iterm"
    return "blocks"


def half_blocks(image: Image.Image, cells: int = CELLS) -> Text:
    """The image squeezed into `cells` columns, two pixel rows to a line."""
    width, height = image.size
    rows = max(1, round(cells * height / width / 2))  # a cell is about twice as tall as wide
    pixels = image.resize((cells, 2 * rows), Image.BILINEAR).load()
    text = Text()
    for row in range(rows):
        for x in range(cells):
            top, bottom = pixels[x, 2 * row], pixels[x, 2 * row + 1]
            text.append("▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        text.append("\n")
    return text


def _png(image: Image.Image) -> str:
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.standard_b64encode(buffer.getvalue()).decode("ascii")


def _inline(image: Image.Image, kind: str, cells: int) -> str:
    data = _png(image)
    if kind == "iterm":
        return f"\x1b]1337;File=inline=1;width={cells};preserveAspectRatio=1:{data}\x07"
    chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]  # kitty takes at most 4096 bytes a chunk
    parts = []
    for i, chunk in enumerate(chunks):
        keys = f"a=T,f=100,c={cells}," if i == 0 else ""
        parts.append(f"\x1b_G{keys}m={int(i < len(chunks) - 1)};{chunk}\x1b\\")
    return "".join(parts)


def show(console: Console, items: list[tuple[str, Path]], cells: int = CELLS) -> None:
    """One preview per (label, image path), under each other; an unreadable image is named, not fatal."""
    kind = protocol()
    for label, path in items:
        try:
            image = load_rgb(path)
        except DataError as exc:
            console.print(Text(f"{label}  (no preview: {exc})"))
            continue
        if kind == "blocks":
            console.print(Group(Text(label, style="bold"), half_blocks(image, cells)))
        else:
            console.print(Text(label, style="bold"))
            console.file.write(_inline(image, kind, cells) + "\n")
            console.file.flush()
