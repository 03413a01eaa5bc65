"""Datasets too large for one folder: WebDataset-style tar shards, written by `miniclip shard` and streamed in training.

A shard is a plain tar file. Each sample is a run of adjacent members sharing a key (the name up to its first
dot): `<key>.jpg` (or .jpeg/.png/.webp) and `<key>.json` (`{"captions": [...]}`) or `<key>.txt` (one caption).
`manifest.json` beside the shards counts each one's samples and captions, so training knows the epoch length
without reading the shards; shards without it are counted by reading their headers once.

Training reads a list of shards: a brace pattern (`shards/{000000..000005}.tar`), one .tar, or a folder of them.
Members are only ever read into memory, never extracted, so a crafted member name cannot write anywhere.
No PyTorch here (`miniclip shard` runs without it); the training stream is data/images.py's ShardDataset.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..run_files import atomic_write
from .layouts import ImageCaptions, clean_caption
from .pixels import load_rgb

MANIFEST = "manifest.json"
FORMAT = "miniclip-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95  # for images that were not JPEG: visually lossless, a third of the PNG's size on photos
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a bigger member is no training image; it is skipped, not read
MAX_CAPTION_BYTES = 1024 * 1024  # a sample's captions: hundreds of captions at layouts.MAX_CAPTION_CHARS
# The least a sample can take in a tar: two members (an image, a caption), each at least a 512-byte header.
MIN_SAMPLE_BYTES = 1024
MAX_PATTERN_NAMES = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ------------------------------------------------------------------------------------------- naming shards


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: 'a/{000..002}.tar' -> a/000.tar a/001.tar a/002.tar; '{x,y}' lists too.

    A range keeps the width of a zero-padded end, as bash does. Several braces multiply out, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise DataError(f"{pattern!r}: unbalanced braces; write a shard range as 'DIR/{{000000..000009}}.tar'")
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.group(1), numbers.group(2)
        if int(first) > int(last):
            raise DataError(f"{pattern!r}: range {{{body}}} runs backwards; write the smaller number first")
        if int(last) - int(first) >= MAX_PATTERN_NAMES:
            raise DataError(f"{pattern!r}: range {{{body}}} names over {MAX_PATTERN_NAMES:,} shards; check the numbers")
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"{pattern!r}: {{{body}}} is neither a range like {{000000..000009}} nor a list like {{a,b}}")
    names = [head + choice + rest for choice in choices for rest in expand_braces(tail)]
    if len(names) > MAX_PATTERN_NAMES:
        raise DataError(f"{pattern!r}: names over {MAX_PATTERN_NAMES:,} shards; check the pattern")
    return names


def _caption_like(path: Path) -> bool:
    return path.suffix.lower() in (".txt", ".csv", ".tsv", ".jsonl", ".token") or (
        path.suffix.lower() == ".json" and path.name != MANIFEST)


def is_shard_spec(spec: str | os.PathLike | None) -> bool:
    """Whether `--data` names shards: a brace pattern or a .tar file, or a folder holding a shard manifest or
    .tar files and no caption file."""
    if spec is None:
        return False
    text = os.fspath(spec)
    if "{" in text or text.lower().endswith(".tar"):
        return True
    folder = Path(text).expanduser()
    if not folder.is_dir():
        return False
    if (folder / MANIFEST).is_file():
        return True
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return any(p.suffix.lower() == ".tar" for p in files) and not any(_caption_like(p) for p in files)


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int  # images
    captions: int  # image-caption pairs


@dataclass(frozen=True)
class ShardSet:
    """The shards a training run reads, with their counts."""

    spec: str  # as given: a pattern, a .tar or a folder
    shards: tuple[Shard, ...]

    def size(self, captions: str) -> int:
        """Samples in one pass: images ("one" caption drawn each time) or image-caption pairs ("all")."""
        return sum(s.captions if captions == "all" else s.samples for s in self.shards)


_MANIFEST_FIX = (f"write the shards again with `miniclip shard`, or delete {MANIFEST} to have them counted from "
                 "their contents")


def _manifest_counts(folder: Path) -> dict[str, tuple[int, int]]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    refusal = f"{path}: not a shard manifest written by `miniclip shard`; {_MANIFEST_FIX}"
    try:
        if path.stat().st_size > MAX_MEMBER_BYTES:
            raise DataError(refusal)
        manifest = json.loads(path.read_text(encoding="utf-8"))
        counts = {s["name"]: (s["samples"], s["captions"]) for s in manifest["shards"]}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        raise DataError(refusal) from None
    for name, numbers in counts.items():
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise DataError(f"{path}: the counts of {str(name)[:60]!r} are not whole numbers of at least 0; "
                            f"{_MANIFEST_FIX}")
    return counts


def _check_counts(path: Path, counts: tuple[int, int]) -> None:
    """Refuse manifest counts that the shard's size cannot hold: an epoch of them would never end."""
    size = path.stat().st_size
    samples, captions = counts
    # A caption takes at least a character and a separator of the caption member.
    if samples > size // MIN_SAMPLE_BYTES or captions > size // 2:
        raise DataError(f"{path.parent / MANIFEST}: lists {samples:,} samples and {captions:,} captions for "
                        f"{path.name}, more than its {size:,} bytes can hold; {_MANIFEST_FIX}")


def open_shards(spec: str) -> ShardSet:
    """The shards `spec` names, each counted (from manifest.json where it lists them, else by reading it)."""
    given = os.path.expanduser(os.fspath(spec))
    folder = Path(given)
    if "{" not in given and folder.is_dir():
        paths = sorted(p for p in folder.glob("*.tar") if p.is_file())
        if not paths:
            raise DataError(f"{folder}: holds no .tar shards; write them with `miniclip shard DATA --out {folder}`")
    else:
        paths = [Path(name) for name in expand_braces(given)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: missing ({len(missing)} of the {len(paths)} shards {spec!r} names); "
                            f"check the pattern against the files in {missing[0].parent}")
    manifests: dict[Path, dict] = {}
    shards = []
    for path in paths:
        if path.parent not in manifests:
            manifests[path.parent] = _manifest_counts(path.parent)
        counts = manifests[path.parent].get(path.name)
        if counts is None:
            counts = _count(path)
        else:
            _check_counts(path, counts)
        shards.append(Shard(path.resolve(), *counts))
    if not sum(s.samples for s in shards):
        raise DataError(f"{spec}: the shards hold no samples (an image with a .json or .txt caption under one key)")
    return ShardSet(str(spec), tuple(shards))


# ------------------------------------------------------------------------------------------- reading shards


def _key_and_extension(name: str) -> tuple[str, str]:
    """'a/b/000123.jpg' -> ('a/b/000123', 'jpg'): WebDataset's rule, the extension starts at the first dot of
    the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _parse_captions(extension: str, data: bytes) -> list[str]:
    text = data.decode("utf-8")
    if extension == "txt":
        return [clean_caption(text)] if text.strip() else []
    value = json.loads(text)
    captions = value.get("captions", value.get("caption", value.get("text"))) if isinstance(value, dict) else value
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        return []
    return [clean_caption(c) for c in captions if isinstance(c, str) and c.strip()]


def read_samples(path: Path, images: bool = True) -> Iterator[tuple[str, tuple[str, bytes] | None, list[str], str | None]]:
    """(key, (extension, image bytes) or None, captions, problem) per sample, in file order.

    `problem` says why the sample cannot be used (no image, no caption, caption not UTF-8 JSON); with
    images=False the image is not read (counting, the tokenizer), only noted."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _key_and_extension(member.name)
                if key is not None and member_key != key:
                    yield _sample(path, key, files)
                    files = {}
                key = member_key
                if member.size > (MAX_CAPTION_BYTES if extension in ("json", "txt") else MAX_MEMBER_BYTES):
                    files[extension] = None
                elif extension in ("json", "txt") or (images and extension in IMAGE_EXTENSIONS):
                    files[extension] = tar.extractfile(member).read()
                elif extension in IMAGE_EXTENSIONS:
                    files[extension] = b""  # there, but not needed
            if key is not None:
                yield _sample(path, key, files)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar shard ({exc}); write it again with `miniclip shard`") from None


def _sample(path: Path, key: str, files: dict) -> tuple[str, tuple[str, bytes] | None, list[str], str | None]:
    image = next(((e, files[e]) for e in IMAGE_EXTENSIONS if e in files), None)
    where = f"{path.name}:{key}"
    if image is not None and image[1] is None:
        return key, None, [], f"{where}.{image[0]}: over {MAX_MEMBER_BYTES // 2**20} MB, skipped"
    captions, problem = [], None
    for extension in ("json", "txt"):
        if extension not in files:
            continue
        if files[extension] is None:
            problem = f"{where}.{extension}: over {MAX_CAPTION_BYTES // 1024:,} KB of captions, skipped"
            break
        try:
            captions = _parse_captions(extension, files[extension])
        except (UnicodeDecodeError, ValueError):
            problem = f"{where}.{extension}: not UTF-8 {extension.upper()}, skipped"
        except RecursionError:
            problem = f"{where}.{extension}: JSON nested too deeply to be captions, skipped"
        break
    if image is None:
        problem = f"{where}: no image (.jpg, .jpeg, .png or .webp), skipped"
    elif not captions and problem is None:
        problem = f"{where}: no caption (.json with \"captions\" or .txt), skipped"
    return key, image, captions, problem


def _count(path: Path) -> tuple[int, int]:
    samples = captions = 0
    for _, _, caps, problem in read_samples(path, images=False):
        if problem is None:
            samples, captions = samples + 1, captions + len(caps)
    return samples, captions


def shard_captions(shard_set: ShardSet) -> Iterator[str]:
    """Every caption in the shards, images unread: for training the tokenizer."""
    for shard in shard_set.shards:
        for _, _, captions, problem in read_samples(shard.path, images=False):
            if problem is None:
                yield from captions


# ------------------------------------------------------------------------------------------- writing shards


def _jpeg_bytes(path: Path) -> bytes:
    """The file itself when it is a JPEG (no second lossy encoding), else the image re-encoded as one."""
    data = path.read_bytes()
    if data.startswith(JPEG_MAGIC):
        return data
    buffer = io.BytesIO()
    load_rgb(io.BytesIO(data), name=str(path)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: the same data, the same shard bytes
    tar.addfile(info, io.BytesIO(data))


def check_shard_output(out: Path, shard_size: int) -> None:
    """Refuse a shard size below 1, and an --out that is a file or already holds shards (mixing two sets
    would train on both)."""
    out = Path(out).expanduser()
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    if out.is_file():
        raise ConfigError(f"{out}: is a file; --out takes a folder for the shards")
    if out.is_dir() and ((out / MANIFEST).exists() or any(out.glob("*.tar"))):
        raise ConfigError(f"{out}: already holds shards; choose an empty --out or delete them first")


def write_shards(items: list[ImageCaptions], out: Path, shard_size: int, seed: int = 0, source: dict | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write `items` as shards 000000.tar, 000001.tar, ... of `shard_size` samples under `out`, then
    manifest.json; returns the manifest. Samples are shuffled (seeded) first, so that every shard is a
    sample of the whole dataset rather than one stretch of the caption file."""
    out = Path(out).expanduser()
    check_shard_output(out, shard_size)
    if not items:
        raise DataError("no images to write; check the dataset and --split")
    order = list(items)
    random.Random(seed).shuffle(order)
    count = (len(order) + shard_size - 1) // shard_size
    width = max(6, len(str(count - 1)))
    listed = []
    for number in range(count):
        chunk = order[number * shard_size:(number + 1) * shard_size]
        name = f"{number:0{width}d}.tar"
        payloads = []
        for offset, item in enumerate(chunk):
            key = f"{number * shard_size + offset:09d}"
            captions = json.dumps({"captions": list(item.captions), "source": item.image.name}, ensure_ascii=False)
            payloads.append((key, _jpeg_bytes(item.image), captions.encode("utf-8")))
            if progress is not None:
                progress(number * shard_size + offset + 1, len(order))

        def write(tmp: Path, payloads=payloads) -> None:
            with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for key, image, captions in payloads:
                    _add(tar, f"{key}.jpg", image)
                    _add(tar, f"{key}.json", captions)

        atomic_write(out / name, write)
        listed.append({"name": name, "samples": len(chunk), "captions": sum(len(i.captions) for i in chunk)})
    manifest = {"format": FORMAT, "version": 1, **(source or {}), "seed": seed, "shard_size": shard_size,
                "samples": len(order), "captions": sum(s["captions"] for s in listed), "shards": listed}
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    return manifest
