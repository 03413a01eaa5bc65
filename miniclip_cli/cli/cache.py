"""`miniclip cache`: where the decoded-image cache lives, how big it is, and clearing it."""

from __future__ import annotations

from pathlib import Path

import typer

from ..ui.console import out
from . import command
from .common import JsonFlag, print_json

OLD_ROOT = Path("artifacts") / "cache"  # where miniclip kept it before: in whatever folder a command ran in


@command("cache")
def cache_command(
    clear: bool = typer.Option(False, "--clear", help="Remove every cached dataset (refused while another command builds one)."),
    json_out: JsonFlag = False,
):
    """Show where the decoded-image cache lives, how much disk it takes and what it holds; --clear removes it.

    `miniclip train` decodes a dataset's images once into this cache (hundreds of MB for Flickr8k)
    and reads them from it in later epochs and runs; with a pretrained image tower (--preset lit) the
    tower's features of the images are kept here too. It lives in your user cache folder (~/.cache/miniclip on
    Linux, ~/Library/Caches/miniclip on macOS, %LOCALAPPDATA%/miniclip/cache on Windows); set MINICLIP_CACHE
    to move it, or train with --no-cache to do without it.

    Examples:

        miniclip cache

        miniclip cache --clear

        MINICLIP_CACHE=/scratch/miniclip-cache miniclip train --data ~/datasets/flickr8k
    """
    from ..data.cache import cache_entries, clear_cache, default_root

    root = default_root()
    if clear:
        removed = clear_cache(root)
        freed = sum(e["bytes"] for e in removed)
        if json_out:
            print_json({"folder": str(root), "removed": len(removed), "bytes": freed})
        else:
            out.print(f"removed {len(removed)} cached dataset(s), {freed / 1e6:,.0f} MB, from {root}")
        return
    entries = cache_entries(root)
    total = sum(e["bytes"] for e in entries)
    if json_out:
        print_json({"folder": str(root), "bytes": total, "entries": entries})
        return
    out.print(f"image cache: {root} ({total / 1e6:,.0f} MB in {len(entries)} cached dataset(s))")
    for e in entries:
        what = ("incomplete" if e["images"] is None else f"image-tower features of {e['images']} images"
                if e.get("kind") == "features" else f"{e['images']} images at {e['size']} px")
        out.print(f"  {Path(e['folder']).name}  {what}, {e['bytes'] / 1e6:,.0f} MB, {e['state']}")
    if entries:
        out.print("clear it with `miniclip cache --clear`; set MINICLIP_CACHE to move it")
    if OLD_ROOT.is_dir() and OLD_ROOT.resolve() != root.resolve():
        out.print(f"{OLD_ROOT.resolve()}: a cache from an older miniclip, no longer used; delete that folder to free its space")
