"""Opening any image file, reading it as RGB, and the evaluation transform, in PIL and NumPy only (no PyTorch), so
the ONNX runtime and the PyTorch model see identical pixels.

open_image is the one place an image file is opened: the dataset check, training, the cache, shards, classify,
eval and export all go through it, so what it refuses is refused everywhere."""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The only PIL plugins ever tried. Left to itself PIL tries every plugin whatever the file's name, and some
# run programs (EPS starts Ghostscript on any file beginning %!PS) or parse formats no photo dataset holds.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Above any camera photo a caption dataset holds (a 48 MP phone photo passes) and below PIL's own guard
# (a warning at 89 MP, an error at 179 MP). Decoding 50 MP takes 150 MB per loader process, for an image the
# model sees at 128 px: a bigger one is a mistake or an attack, not a training example. One limit for every
# command, checked on the header's size before any pixel is decoded.
MAX_PIXELS = 50_000_000
_FIX = "re-save it as JPEG or PNG"


class ImageError(DataError):
    """An image file that cannot be used. `problem` ('truncated (...)') is what the dataset check reports;
    the message adds the file and the fix."""

    def __init__(self, where, problem: str, fix: str = _FIX):
        super().__init__(f"{where}: {problem}; {fix}")
        self.problem = problem


def _regular_file(path: Path) -> BinaryIO:
    """`path` opened for reading, after stat has shown it is a regular file: opening a FIFO blocks until
    something writes to it, and a device (a link to /dev/zero) never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(path, "missing (no such file)", "check the path") from None
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})", "check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise ImageError(path, "not an image (a folder)", "give an image file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ImageError(path, f"not a regular file ({kind})", "give an image file, not a pipe, socket or device")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})", "check the file's permissions") from None


class _Prefix(io.RawIOBase):
    """The file `f` as if it ended after `size` bytes, without copying them (a JPEG can be large)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.pos = f, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = max(0, offset + {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence])
        return self.pos

    def readinto(self, buffer) -> int:
        self.f.seek(self.pos)
        n = self.f.readinto(memoryview(buffer)[:max(0, self.size - self.pos)])
        self.pos += n
        return n


def _without_zero_padding(f: BinaryIO) -> BinaryIO:
    """A JPEG without the zeros that end it, when they follow no end marker (FF D9). A preallocating downloader
    cut off leaves the first part of the JPEG then zeros up to the full size, and libjpeg decodes zeros as
    valid (grey) data; without them the decoder runs out of data and says "truncated". A sound JPEG ends on
    FF D9, so for it this costs reading its last byte. The zeros are found a block at a time from the end, so
    a huge (sparse) file costs time, not memory."""
    end = f.seek(0, os.SEEK_END)
    f.seek(end - 1)
    if f.read(1) != b"\0":
        return f
    zeros = bytes(1 << 20)
    while end > 0:
        start = max(0, end - len(zeros))
        f.seek(start)
        block = f.read(end - start)
        if block != zeros[:len(block)]:  # a memcmp: ~GB/s through a run of zeros
            end = start + len(block.rstrip(b"\0"))
            break
        end = start
    f.seek(max(0, end - 2))
    return f if f.read(2) == b"\xff\xd9" else _Prefix(f, end)  # zeros after a complete image are harmless


def _problem(exc: Exception) -> str:
    """What a PIL exception says about the file, as the dataset check reports it."""
    if isinstance(exc, UnidentifiedImageError):
        return ("not an image (text, or not a supported image format: miniclip reads JPEG, PNG, WebP, BMP, GIF "
                "and TIFF)")
    if isinstance(exc, Image.DecompressionBombError):
        return (f"too large (above {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, over the "
                f"{MAX_PIXELS // 1_000_000}-megapixel limit)")
    detail = str(exc) or type(exc).__name__
    kind = "truncated" if "truncated" in detail.lower() or isinstance(exc, EOFError) else "unreadable"
    return f"{kind} ({detail[:80]})"


@contextmanager
def open_image(path: Path | BinaryIO, name: str | None = None) -> Iterator[Image.Image]:
    """The image at `path` (a file name, or an open binary file such as an image in a shard; `name` then
    says where it came from), with its header read and no pixel decoded yet.

    Refused with an ImageError: anything that is not a regular file (never opened), a zero-byte file, a
    format outside FORMATS, a header above MAX_PIXELS. PIL's errors raised while the caller decodes inside
    the `with` block become ImageErrors too, so every way an image fails reads the same."""
    where = name or path
    owned = isinstance(path, (str, os.PathLike))  # a file we open is ours to close; a caller's file is not
    f = _regular_file(Path(path)) if owned else path
    try:
        if f.seek(0, os.SEEK_END) == 0:
            raise ImageError(where, "not an image (empty file)", "re-download it")
        f.seek(0)
        # Our size test replaces PIL's bomb warning, which would print a raw line for a file refused anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(f, formats=FORMATS)
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(where, f"too large ({width}x{height} = {width * height / 1e6:.0f} megapixels, "
                                    f"above the {MAX_PIXELS // 1_000_000}-megapixel limit)", "downscale it")
        if im.format in ("JPEG", "MPO"):  # MPO: a phone's multi-picture JPEG
            unpadded = _without_zero_padding(f)
            if unpadded is not f:
                im = Image.open(unpadded, formats=["JPEG"])
        with im:
            yield im
    # PIL's format plugins raise many types on damaged data (OSError, SyntaxError, struct.error, EOFError...);
    # every one of them means this file cannot be used, which is what the caller needs to know.
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
            TypeError, KeyError) as exc:
        raise ImageError(where, _problem(exc)) from None
    finally:
        if owned:
            f.close()


def load_rgb(path: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Any mode PIL reads (L, RGBA, CMYK, P, 16-bit) as 8-bit RGB, turned upright by its EXIF orientation;
    transparency is composited on white, and a GIF gives its first frame.

    `path` may be an open binary file (an image read from a shard); `name` then says where it came from."""
    with open_image(path, name) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: PIL's convert would clip at 255 rather than rescale.
            array = np.asarray(im, dtype=np.float32)
            peak = 65535.0 if array.max(initial=0) > 255 else 255.0
            im = Image.fromarray((array * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
        if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(canvas, im)
        return im.convert("RGB")


def normalise(im: Image.Image, mean, std) -> np.ndarray:
    """RGB image -> float32 c h w, (x/255 - mean) / std."""
    array = np.asarray(im, dtype=np.float32) / 255.0  # h w c
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # 'h w c -> c h w'


def resize_centre_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic), then cut the centre square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def eval_pixels(path: Path, size: int, mean, std) -> np.ndarray:
    """The evaluation input for one image file: 3 x size x size float32."""
    return normalise(resize_centre_crop(load_rgb(path), size), mean, std)
