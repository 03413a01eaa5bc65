"""Reading any image as RGB and the evaluation transform, in PIL and NumPy only (no PyTorch), so the
ONNX runtime and the PyTorch model see identical pixels."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_rgb(path: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Any mode PIL reads (L, RGBA, CMYK, P, 16-bit) as 8-bit RGB; transparency is composited on white.

    `path` may be an open binary file (an image read from a shard); `name` then says where it came from."""
    where = name or path
    try:
        with Image.open(path) as im:
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
    except FileNotFoundError:
        raise DataError(f"{where}: image not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a folder, not an image; give an image file") from None
    except Image.DecompressionBombError:
        limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
        raise DataError(f"{where}: more than {limit:.0f} megapixels, which PIL refuses to open as a possible "
                        "decompression bomb; downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DataError(f"{where}: cannot be read as an image ({exc}); re-save it as JPEG or PNG") from None


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
