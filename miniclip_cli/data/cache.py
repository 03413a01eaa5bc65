"""Decode a dataset's training images once into a memory-mapped uint8 array, reused by later epochs and runs.

Decoding a 500x375 JPEG costs about 1.5 ms of a core; a model step on a GPU costs far less per pair, so
decoding every epoch bounds GPU training (issue 4). The cache holds each image resized so its short side is
`cache_size(image_size)` (a quarter above the model's input, room for the random crops) and centre-cropped
to a square, the way evaluation frames an image. It is keyed by every image's path, size and modification
time plus the resolution, so a changed, added or removed image builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .pixels import load_rgb, resize_centre_crop

VERSION = 1
INDEX, PIXELS = "index.json", "pixels.npy"


def cache_size(image_size: int) -> int:
    return round(image_size * 1.25)


def default_root() -> Path:
    return Path(os.environ.get("MINICLIP_CACHE", Path("artifacts") / "cache"))


def cache_key(paths: list[Path], size: int) -> str:
    digest = hashlib.sha1(f"miniclip-cache/{VERSION}/{size}".encode())
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


class PixelCache:
    """Read side: image i as a PIL image, or a DataError when it could not be decoded at build time. The
    array is opened lazily, so each loader process maps it itself."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        self.paths, self.size, self.broken = index["paths"], index["size"], set(index["broken"])
        self._pixels = None

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, i: int) -> np.ndarray:
        """Image i as h w 3 uint8 (a copy, safe to hand to torch)."""
        if i in self.broken:
            raise DataError(f"{self.paths[i]}: could not be decoded when the cache was built; re-save it as JPEG or PNG")
        if self._pixels is None:
            self._pixels = np.load(self.folder / PIXELS, mmap_mode="r")
        return np.array(self._pixels[i])

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels(i))

    def __getstate__(self):  # loader processes map the file themselves rather than receive a copy
        return {**self.__dict__, "_pixels": None}


def open_cache(paths: list[Path], image_size: int, root: Path | None = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[PixelCache, bool]:
    """The cache for these images, built first when there is none (returns whether it was built)."""
    size = cache_size(image_size)
    root = Path(root or default_root())
    folder = root / cache_key(paths, size)
    if (folder / INDEX).is_file():
        return PixelCache(folder), False
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        pixels = np.lib.format.open_memmap(staging / PIXELS, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        broken = []

        def decode(i: int) -> None:
            try:
                pixels[i] = np.asarray(resize_centre_crop(load_rgb(paths[i]), size))
            except DataError:
                broken.append(i)

        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, _ in enumerate(pool.map(decode, range(len(paths))), start=1):
                if progress and (done % 256 == 0 or done == len(paths)):
                    progress(done, len(paths))
        pixels.flush()
        index = {"version": VERSION, "size": size, "paths": [str(p) for p in paths], "broken": sorted(broken)}
        (staging / INDEX).write_text(json.dumps(index), encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:  # another process (a second rank) finished the same cache first: use theirs
            if not (folder / INDEX).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PixelCache(folder), True
