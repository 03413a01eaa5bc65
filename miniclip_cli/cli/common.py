"""What several commands share: opening a dataset, reporting what was skipped, printing JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import shapes
from ..data.layouts import CaptionSet, ImageCaptions, drop_missing_images, load_caption_set, select_split
from ..ui.console import info, out, warn

BUILTIN_NAME = "shapes"


def open_dataset(path: str | None, allow_outside: bool = False, quiet: bool = False) -> CaptionSet:
    """The caption set at `path`, or the built-in shapes dataset (generated on first use) when None."""
    if path is None:
        root = shapes.default_root()
        if not (root / "COMPLETE").is_file() and not quiet:
            info(f"generating the built-in shapes dataset in {root} ...")
        path = shapes.generate(root)
    caption_set = load_caption_set(Path(path).expanduser(), allow_outside=allow_outside)
    if not quiet:
        info(f"data: {caption_set.caption_file} ({caption_set.layout}), {len(caption_set.items)} images")
    if caption_set.skipped:
        warn(f"{caption_set.caption_file}: skipped {caption_set.skipped} malformed line(s), e.g. "
             + "; ".join(caption_set.skipped_examples))
    return caption_set


def split_items(caption_set: CaptionSet, split: str, seed: int = 0) -> list[ImageCaptions]:
    items = select_split(caption_set, split, seed=seed)
    kept, missing, examples = drop_missing_images(items)
    if missing:
        warn(f"{caption_set.caption_file}: {missing} of {len(items)} images in split '{split}' are missing "
             f"under {caption_set.image_root} and were skipped, e.g. {', '.join(examples)}")
    return kept


def print_json(payload: dict) -> None:
    # Plain print: Rich would wrap long lines and break the JSON.
    print(json.dumps(payload, default=str))


def dataset_name(path: str | None) -> str:
    if path is None:
        return BUILTIN_NAME
    p = Path(path).expanduser().resolve()
    return (p.parent.name if p.is_file() else p.name) or "run"


__all__ = ["open_dataset", "split_items", "print_json", "dataset_name", "out"]
