"""What several commands share: opening a dataset, reporting what was skipped, printing JSON."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..data import shapes
from ..data.checks import drop_unusable_images, find_unusable_images, summarise
from ..data.image_folder import ImageFolder
from ..data.layouts import (
    MAX_CAPTION_CHARS,
    CaptionSet,
    ImageCaptions,
    drop_missing_images,
    load_caption_set,
    select_split,
)
from ..data.shards import is_shard_spec
from ..errors import CheckpointError, DataError
from ..ui.console import info, warn

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
        empty, malformed = caption_set.empty_captions, caption_set.skipped - caption_set.empty_captions
        what = ", ".join(part for part in (f"{empty} empty caption(s)" if empty else "",
                                           f"{malformed} malformed line(s)" if malformed else "") if part)
        warn(f"{caption_set.caption_file}: skipped {what}, e.g. " + "; ".join(caption_set.skipped_examples))
    if caption_set.cut_captions:
        warn(f"{caption_set.caption_file}: cut {caption_set.cut_captions} caption(s) over {MAX_CAPTION_CHARS:,} "
             "characters to that length")
    return caption_set


def split_items(caption_set: CaptionSet, split: str, seed: int = 0, check_images: bool = True) -> list[ImageCaptions]:
    """The split's items whose image exists and, with `check_images` (train and eval), can be used."""
    items = select_split(caption_set, split, seed=seed)
    kept, missing, examples = drop_missing_images(items)
    if missing:
        warn(f"{caption_set.caption_file}: {missing} of {len(items)} images in split '{split}' are missing "
             f"under {caption_set.image_root} and were skipped, e.g. {', '.join(examples)}")
    if check_images:
        try:
            kept, problems = drop_unusable_images(kept)
        except DataError as exc:
            raise DataError(f"{caption_set.image_root}: split '{split}': {exc}") from None
        if problems:
            warn(f"{caption_set.image_root}: {len(problems)} of {len(kept) + len(problems)} images in split "
                 f"'{split}' cannot be used and were skipped: {summarise(problems)}")
    return kept


def scan_folder(root: str | Path) -> ImageFolder:
    """A zero-shot folder without the images that cannot be used, each skipped one counted in a warning."""
    folder = ImageFolder.scan(root)
    problems = find_unusable_images(folder.paths)
    if problems:
        warn(f"{folder.root}: {len(problems)} of {len(folder.paths)} images cannot be used and were skipped: "
             f"{summarise(problems)}")
        folder = folder.without({path for path, _ in problems})
    return folder


JSON_DECIMALS = 4


def _json_ready(value, where: str):
    """`value` with its floats rounded to JSON_DECIMALS (69.39999999999999 -> 69.4), or to as many significant
    digits when smaller than 1e-3, so that a parity difference of 3e-7 does not read as 0. NaN or infinity
    is refused: it cannot be a right result, and JSON has no way to write it."""
    if isinstance(value, dict):
        return {key: _json_ready(v, f"{where}.{key}" if where else str(key)) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value):
            raise CheckpointError(f"the result's {where} is {value}, which cannot be right; nothing was printed: the "
                                  "model's weights are broken, retrain, e.g. with a lower --lr")
        return round(value, JSON_DECIMALS) if abs(value) >= 1e-3 else float(f"{value:.{JSON_DECIMALS}g}")
    return value


def print_json(payload: dict) -> None:
    text = json.dumps(_json_ready(payload, ""), default=str, allow_nan=False)
    # Plain print: Rich would wrap long lines and break the JSON.
    print(text)


def dataset_name(path: str | None) -> str:
    if path is None:
        return BUILTIN_NAME
    p = Path(path).expanduser().resolve()
    if is_shard_spec(path) and not p.is_dir():  # 'shards/{000000..000005}.tar' -> shards
        return p.parent.name or "run"
    return (p.parent.name if p.is_file() else p.name) or "run"


def run_dataset(config) -> str | None:
    """The dataset a run's own evaluation reads when none is given: its training dataset (None: the built-in
    one), or for a run trained on shards, which hold training images only, its --val-data dataset."""
    if config.data.layout != "shards":
        return config.data.path
    if config.data.val_path is None:
        raise DataError(f"this run trained on shards ({config.data.path}) without --val-data, so it has no "
                        "dataset of its own to evaluate on; pass --data DATASET")
    return config.data.val_path




# Options several commands share, declared once.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="best or last.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
Backend = Annotated[str, typer.Option("--backend", help="auto (onnx for an exported onnx/ folder, else torch), torch, onnx (the int8 export, no PyTorch needed) or onnx-fp32.")]
Split = Annotated[str, typer.Option("--split", help="train, val, test or all.")]
ZeroShot = Annotated[Optional[Path], typer.Option("--zero-shot", help="Image folder CLASS/IMAGE for zero-shot classification.")]
Templates = Annotated[Optional[List[str]], typer.Option("--template", help="Prompt with {} for the class name; repeat to average several. Default: the run's.")]
AllowOutside = Annotated[bool, typer.Option("--allow-outside-paths", help="Accept caption-file image paths outside the dataset folder.")]
