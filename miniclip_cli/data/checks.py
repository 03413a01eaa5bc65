"""The one-time check of a dataset's images, when a command opens the dataset to train or evaluate on it.

A zero-byte file, a text file named .jpg (a Git LFS pointer), a download cut short, a thumbnail-sized image or a
decompression bomb is found here, once, and skipped with a reason, instead of stopping a loader process hours
into training. PIL and the standard library only, so the ONNX runtime path can use it without PyTorch.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError
from .layouts import ImageCaptions
# MAX_PIXELS lives with the opener, which enforces it for every command; the check reports it.
from .pixels import MAX_PIXELS, ImageError, open_image  # noqa: F401

# A 1x1 tracking pixel or a 4x4 placeholder holds nothing to learn from; at 8 px a side a crop still has detail.
MIN_SIDE = 8
# A complete JPEG ends on its end-of-image marker (FF D9). One that does not is cut short, or carries extra
# bytes after the marker (some cameras append data); only those are decoded to tell which.
JPEG_END = b"\xff\xd9"
KINDS = ("missing", "not a regular file", "not an image", "truncated", "too small", "too large", "unreadable")


def _jpeg_ends_cleanly(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 2))
        return f.read() == JPEG_END


def image_problem(path: str | Path) -> str | None:
    """Why the image at `path` cannot be used for training or evaluation, or None when it can.

    The answer starts with one of KINDS, then the detail:
      not a regular file: a FIFO, socket or device (a link to /dev/zero), never opened;
      not an image: zero bytes, a folder, text, or a format outside pixels.FORMATS (EPS, PDF...);
      truncated:    a JPEG that does not end on its end marker and then fails to decode (decoded at 1/8 scale,
                    only when the ending is wrong: ~1 ms for a 500x375 photo), one cut short and padded with
                    zeros, a PNG whose chunks do not verify (CRCs, no decompression), or any other format that
                    fails a full decode;
      too small:    shorter side below MIN_SIDE (8) px;
      too large:    above MAX_PIXELS (50 megapixels), from the header.
    The file is opened by pixels.open_image, as every command opens it. Headers only for a sound JPEG or PNG:
    Flickr8k's 7,000 images check in about a second.
    """
    path = Path(path)
    try:
        with open_image(path) as im:
            width, height = im.size
            if min(width, height) < MIN_SIDE:
                return f"too small ({width}x{height} px, under {MIN_SIDE} px a side)"
            if im.format in ("JPEG", "MPO"):
                if not _jpeg_ends_cleanly(path):
                    im.draft(None, (1, 1))  # decode at 1/8 scale: the whole stream is still read
                    im.load()
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
    except ImageError as exc:
        return exc.problem
    return None


def find_unusable_images(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """(path, problem) for each path whose image cannot be used, in the given order."""
    found = []
    for path in paths:
        problem = image_problem(path)
        if problem is not None:
            found.append((Path(path), problem))
    return found


def summarise(problems: list[tuple[Path, str]], examples: int = 3) -> str:
    """'2 not an image, 1 truncated; e.g. a.jpg: truncated (...)' for a warning or an error."""
    counts = Counter(next((k for k in KINDS if problem.startswith(k)), "unreadable") for _, problem in problems)
    by_kind = ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])
    shown = "; ".join(f"{path.name}: {problem}" for path, problem in problems[:examples])
    return f"{by_kind}; e.g. {shown}"


def drop_unusable_images(items: list[ImageCaptions], max_bad_fraction: float = 0.1
                         ) -> tuple[list[ImageCaptions], list[tuple[Path, str]]]:
    """The items whose image passes image_problem, and (path, problem) for the others.

    A few bad files are normal in scraped data; more than `max_bad_fraction` of them means a broken download
    or unfetched Git LFS files, which is better said at once (DataError) than trained around.
    """
    problems = dict(find_unusable_images(item.image for item in items))
    kept = [item for item in items if item.image not in problems]
    found = [(item.image, problems[item.image]) for item in items if item.image in problems]
    if not found:
        return kept, []
    if not kept:
        raise DataError(f"none of the {len(items)} images can be used ({summarise(found)}); "
                        "re-download the images (after a git clone, run `git lfs pull`)")
    if len(found) / len(items) > max_bad_fraction:
        raise DataError(f"{len(found)} of {len(items)} images cannot be used, more than the "
                        f"{max_bad_fraction:.0%} a healthy dataset has ({summarise(found)}); "
                        "re-download or re-save the images")
    return kept, found
