"""Decode a dataset's training images once into a uint8 array file, memory-mapped by later epochs and runs.

Decoding a 500x375 JPEG costs about 1.5 ms of a core; a model step on a GPU costs far less per pair, so
decoding every epoch bounds GPU training. The cache holds each image resized so its short side is
`cache_size(image_size)` (a quarter above the model's input, room for the random crops) and centre-cropped
to a square, the way evaluation frames an image. It is keyed by every image's path, size and modification
time plus the resolution, so a changed, added or removed image builds a new one.

It lives in the user's cache folder (default_root, or $MINICLIP_CACHE): ROOT/KEY/{pixels.npy, index.json}.
Builds and `miniclip cache --clear` hold ROOT's lock; readers need none. index.json is written last and holds
a CRC-32 per image, so a cut-short or overwritten file is found rather than trained on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError, SaveError
from ..run_files import LOCK, atomic_write, lock_folder
from .pixels import load_rgb, resize_centre_crop

VERSION = 2  # 2: a CRC-32 per image in the index
INDEX, PIXELS = "index.json", "pixels.npy"
STAGING = ".building-"
ENTRY = re.compile(r"[0-9a-f]{20}")  # a cache_key: --clear removes only folders named like one
FEATURES_SUFFIX = ".features.npy"  # a frozen image tower's features (features.py): ROOT/KEY.features.npy


def cache_size(image_size: int) -> int:
    return round(image_size * 1.25)


def default_root() -> Path:
    """$MINICLIP_CACHE, else the platform's per-user cache folder: never the folder a command runs in."""
    if os.environ.get("MINICLIP_CACHE"):
        return Path(os.environ["MINICLIP_CACHE"])
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "miniclip" / "cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "miniclip"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home / ".cache") / "miniclip"


def cache_key(paths: list[Path], size: int, salt: str = "") -> str:
    """`salt`: whatever else shapes what is cached (features.py: the tower's weights and the views)."""
    digest = hashlib.sha1(f"miniclip-cache/{VERSION}/{size}{salt}".encode())
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _bytes_in(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False))


class PixelCache:
    """Read side: image i as a PIL image, or a DataError when it could not be decoded at build time or no
    longer matches its checksum. The array is opened lazily, so each loader process maps it itself."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        self.paths, self.size, self.broken = index["paths"], index["size"], set(index["broken"])
        self.crc32 = index["crc32"]
        self.nbytes = _bytes_in(self.folder)  # what the cache takes on disk, for the CLI to report
        self._pixels = None

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, i: int) -> np.ndarray:
        """Image i as h w 3 uint8 (a copy, safe to hand to torch)."""
        if i in self.broken:
            raise DataError(f"{self.paths[i]}: could not be decoded when the cache was built; re-save it as JPEG or PNG")
        if self._pixels is None:
            try:
                self._pixels = np.load(self.folder / PIXELS, mmap_mode="r")
            except (OSError, ValueError) as exc:  # removed by `miniclip cache --clear`, or cut short, since opening
                raise DataError(f"{self.folder / PIXELS}: the image cache cannot be read ({exc}); run again to "
                                "rebuild it") from None
        image = np.array(self._pixels[i])
        # ~75 kB at 280 px: microseconds, against training silently on overwritten bytes.
        if zlib.crc32(image) != self.crc32[i]:
            raise DataError(f"{self.folder / PIXELS}: image {i} ({self.paths[i]}) does not match its checksum, the "
                            "image cache is damaged; run `miniclip cache --clear`, then train again")
        return image

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels(i))

    def __getstate__(self):  # loader processes map the file themselves rather than receive a copy
        return {**self.__dict__, "_pixels": None}


def _problem(folder: Path, count: int, size: int) -> str | None:
    """Why the cache in `folder` cannot be used (None: it can), checked cheaply: the index whole and matching,
    pixels.npy exactly as long as its header says. Each image's checksum is checked when it is read."""
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        if not (isinstance(index, dict) and index.get("version") == VERSION and index.get("size") == size
                and len(index.get("paths", ())) == count and len(index.get("crc32", ())) == count
                and isinstance(index.get("broken"), list)):
            return f"{INDEX} does not describe {count} images at {size} px"
    except (OSError, ValueError) as exc:
        return f"{INDEX} unreadable ({exc})"
    shape = (count, size, size, 3)
    try:
        with open(folder / PIXELS, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):  # what _build writes
                return f"{PIXELS} has an unknown header"
            header = np.lib.format.read_array_header_1_0(f)
            length = f.tell() + int(np.prod(shape))
            actual = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as exc:
        return f"{PIXELS} unreadable ({exc})"
    if header[0] != shape or header[2] != np.uint8 or actual != length:
        return f"{PIXELS} holds {actual} bytes, not the {length} of {count} images at {size} px"
    return None


def open_cache(paths: list[Path], image_size: int, root: Path | None = None,
               progress: Callable[[int, int], None] | None = None,
               notice: Callable[[str], None] | None = None, command: str = "train") -> tuple[PixelCache, bool]:
    """The cache for these images, built first when there is none or it is damaged (returns whether it was
    built). `notice` hears of a damaged cache being rebuilt and of waiting for another process's build;
    `command` names this one to such a process."""
    size = cache_size(image_size)
    root = Path(root or default_root())
    folder = root / cache_key(paths, size)
    notice = notice or (lambda message: None)
    if _problem(folder, len(paths), size) is None:
        try:
            return PixelCache(folder), False
        except (OSError, ValueError):  # cleared since the check: rebuild it under the lock
            pass
    waiting = lambda holder: notice(f"{root}: waiting for {holder} to finish with the image cache")  # noqa: E731
    with lock_folder(root, command, waiting=waiting):
        for stale in root.glob(f"{STAGING}*"):  # a builder holds the lock: these are from killed ones
            shutil.rmtree(stale, ignore_errors=True)
        problem = _problem(folder, len(paths), size)
        if problem is None:  # another process built it while this one waited
            return PixelCache(folder), False
        if folder.exists():
            notice(f"{folder}: the image cache is damaged ({problem}); rebuilding it")
            shutil.rmtree(folder)
        _build(paths, size, root, folder, progress)
    return PixelCache(folder), True


def _build(paths: list[Path], size: int, root: Path, folder: Path, progress) -> None:
    shape = (len(paths), size, size, 3)
    needed = int(np.prod(shape))
    fixes = "free space, set MINICLIP_CACHE to a folder on a bigger disk, or train with --no-cache"
    free = shutil.disk_usage(root).free
    if free < needed:
        raise SaveError(f"{root}: the image cache needs {needed / 1e6:,.0f} MB and only {free / 1e6:,.0f} MB are "
                        f"free; {fixes}")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING))
    try:
        broken, crc32 = [], []
        # Plain writes, not a writable memmap: a full disk is then an OSError, where a memmap dies of SIGBUS.
        with open(staging / PIXELS, "xb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            if hasattr(os, "posix_fallocate"):  # claim the space now: no disk fills up halfway through
                try:
                    os.posix_fallocate(f.fileno(), 0, f.tell() + needed)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise  # else a file system that cannot preallocate: the writes below still report ENOSPC
            blank = bytes(size * size * 3)

            def decode(i: int) -> bytes | None:
                try:
                    return np.asarray(resize_centre_crop(load_rgb(paths[i]), size)).tobytes()
                except DataError:
                    return None

            # PIL releases the GIL while decoding and resizing, so threads use every core.
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for i, image in enumerate(pool.map(decode, range(len(paths)))):
                    if image is None:
                        broken.append(i)
                    f.write(image or blank)
                    crc32.append(zlib.crc32(image or blank))
                    done = i + 1
                    if progress and (done % 256 == 0 or done == len(paths)):
                        progress(done, len(paths))
            f.flush()
            os.fsync(f.fileno())
        index = {"version": VERSION, "size": size, "paths": [str(p) for p in paths], "broken": broken, "crc32": crc32}
        atomic_write(staging / INDEX, lambda tmp: tmp.write_text(json.dumps(index), encoding="utf-8"))
        staging.rename(folder)
    except OSError as exc:
        raise SaveError(f"{root}: could not write the image cache ({exc.strerror or exc}); {fixes}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_entries(root: Path | None = None) -> list[dict]:
    """What `miniclip cache` lists: every cache under `root` (and any build in progress or left by a killed
    builder), with its size on disk."""
    root = Path(root or default_root())
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.name.endswith(FEATURES_SUFFIX) and ENTRY.fullmatch(folder.name[: -len(FEATURES_SUFFIX)]):
            entries.append(_features_entry(folder))
            continue
        if folder.is_symlink() or not folder.is_dir() or not (ENTRY.fullmatch(folder.name) or folder.name.startswith(STAGING)):
            continue
        entry = {"folder": str(folder), "bytes": _bytes_in(folder), "images": None, "size": None,
                 "state": "building" if folder.name.startswith(STAGING) else "ok", "kind": "images"}
        if entry["state"] == "ok":
            try:
                index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
                entry.update(images=len(index["paths"]), size=index["size"])
                entry["state"] = "damaged" if _problem(folder, entry["images"], entry["size"]) else "ok"
            except (OSError, ValueError, KeyError, TypeError):
                entry["state"] = "damaged"
        entries.append(entry)
    return entries


def _features_entry(file: Path) -> dict:
    entry = {"folder": str(file), "bytes": file.stat().st_size, "images": None, "size": None, "state": "damaged",
             "kind": "features"}
    try:
        with open(file, "rb") as f:
            np.lib.format.read_magic(f)
            shape = np.lib.format.read_array_header_1_0(f)[0]
        entry.update(images=shape[0], state="ok")
    except (OSError, ValueError, IndexError):
        pass
    return entry


def clear_cache(root: Path | None = None) -> list[dict]:
    """Remove every cache under `root` (the entries removed). Holds the lock, so a cache being built by another
    process raises BusyError rather than vanishing under it; only folders named like a cache are touched, so
    a MINICLIP_CACHE pointed at a folder of other things loses none of them."""
    root = Path(root or default_root())
    if not root.is_dir():
        return []
    with lock_folder(root, "cache --clear"):
        entries = cache_entries(root)
        for entry in entries:
            if entry.get("kind") == "features":
                Path(entry["folder"]).unlink(missing_ok=True)
            else:
                shutil.rmtree(entry["folder"])
    return entries
