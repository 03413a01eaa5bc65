"""Caption-file layouts: find the caption file of a dataset, parse it into images with their captions, split.

Layouts read: Flickr token files, Kaggle `captions.txt`, Flickr30k Kaggle `results.csv`, Karpathy JSON,
COCO captions JSON, and plain CSV / TSV / JSONL with an image and a caption column. Whatever bytes a caption
file holds, the outcome is a CaptionSet or a DataError (one line naming the file and the fix), never another
exception: the CLI shows DataError as a message and everything else as a bug.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import random
import re
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import ConfigError, DataError

SPLITS = ("train", "val", "test")

# Column (CSV/TSV header) or key (JSONL) names, in the order they are preferred when several are present.
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img", "image_name")
CAPTION_KEYS = ("caption", "text", "comment", "sentence", "title")

# Beside a Flickr8k caption file; the official release calls its validation split "dev".
FLICKR8K_SPLIT_FILES = (
    ("Flickr_8k.trainImages.txt", "train"),
    ("Flickr_8k.devImages.txt", "val"),
    ("Flickr_8k.testImages.txt", "test"),
)

# Folder search, highest priority first. Within one priority, files in the folder itself win over files in
# its subfolders, then sorted name.
_SEARCH: tuple[tuple[tuple[str, ...], str], ...] = (
    (("dataset_*.json",), "dataset_*.json (Karpathy)"),
    (("captions_*.json",), "captions_*.json (COCO)"),
    (("*.token", "*.token.txt"), "*.token / *.token.txt (Flickr)"),
    (("captions.txt",), "captions.txt (Kaggle)"),
    (("results.csv",), "results.csv (Flickr30k Kaggle)"),
    (("captions.csv", "captions.tsv", "captions.jsonl"), "captions.csv / .tsv / .jsonl"),
)
_ANY_TABLE = (".csv", ".tsv", ".jsonl")
# COCO's caption JSON, the largest caption file in common use, is about 90 MB; a bigger one is something else,
# and reading it would only fill the memory.
MAX_CAPTION_FILE_BYTES = 2 * 1024**3
_KNOWN_LAYOUTS = ", ".join(desc for _, desc in _SEARCH) + ", or one .csv/.tsv/.jsonl with image and caption columns"

_SPLIT_ALIASES = {
    "train": "train", "training": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}

# `<image>#<n><TAB>` opens every line of a Flickr token file; some copies have spaces instead of the tab.
_TOKEN_LINE = re.compile(r"^[^\t]+#\d+\t")
_TOKEN_SPACED = re.compile(r"^(?P<image>\S+)#\d+\s+(?P<caption>.*)$")
_CAPTION_NUMBER = re.compile(r"#\d+$")
_MAX_EXAMPLES = 3
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")  # inside a caption: a quoted multi-line field, a JSON "\n"
# CLIP's captions are about 12 words, and the model reads 64 tokens at most; a longer caption is a scrape gone
# wrong, and one long word of it makes tokenizer training quadratic. Cut, not skipped: the start is still a caption.
MAX_CAPTION_CHARS = 1000
# A quoted caption may run over this many lines (line breaks in a scraped caption); a quote that does not close
# by then is a stray one, read as text, so that it cannot swallow the records after it.
_MAX_RECORD_LINES = 5
# A line that starts with an image file name and a delimiter opens a record; it is never inside a caption.
_RECORD_START = re.compile(r"^\s*[^,\t\"]+\.(?:jpe?g|png|webp|gif|bmp|tiff?)\s*[,\t]", re.IGNORECASE)


@dataclass(frozen=True)
class ImageCaptions:
    image: Path  # absolute, normalised path of the image file; existence is checked by drop_missing_images
    captions: tuple[str, ...]  # stripped, non-empty, in file order
    split: str | None  # "train" | "val" | "test", or None when the dataset says nothing about this image


@dataclass
class CaptionSet:
    layout: str  # human-readable layout name, e.g. "Flickr token file"
    caption_file: Path
    image_root: Path  # the folder the image names in the caption file are relative to
    items: list[ImageCaptions]  # one per image, in first-seen order
    skipped: int  # malformed lines/records and empty captions
    skipped_examples: list[str]  # at most 3, e.g. "line 17: no tab between image and caption"
    has_splits: bool
    empty_captions: int = 0  # how many of `skipped` were an image with an empty caption
    cut_captions: int = 0  # captions over MAX_CAPTION_CHARS, cut to that length (not skipped)


# ----------------------------------------------------------------------------------------------- parsing


class _Group:
    __slots__ = ("name", "captions", "split", "where")

    def __init__(self, name: str, split: str | None, where: str):
        self.name = name
        self.captions: list[str] = []
        self.split = split
        self.where = where  # first line/record naming this image, for the outside-the-folder message


class _Parsed:
    """Captions grouped by image name as a parser finds them, plus what it had to skip."""

    def __init__(self, file: Path, layout: str):
        self.file = file
        self.layout = layout
        self.groups: dict[str, _Group] = {}
        self.skipped = 0
        self.empty_captions = 0
        self.cut_captions = 0
        self.examples: list[str] = []
        self.split_coco: str | None = None  # e.g. "train2017", a folder name worth trying as image root

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {why}")

    def add(self, image: str, caption: str, split: str | None, where: str) -> None:
        image, caption = image.strip(), _one_line(caption)
        if len(caption) > MAX_CAPTION_CHARS:
            self.cut_captions += 1
            caption = caption[:MAX_CAPTION_CHARS].rstrip()
        if not image:
            self.skip(where, "no image name")
            return
        if not caption:
            self.empty_captions += 1
            self.skip(where, "empty caption")
            return
        # './a.jpg' and 'a.jpg' are one image.
        key = os.path.normpath(image)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(key, split, where)
        elif group.split is None:
            group.split = split
        group.captions.append(caption)


def _one_line(text: str) -> str:
    """`text` stripped, its line breaks as spaces, and any lone surrogate (half an emoji, from a truncated
    JSON "\\ud83d") as "?": the tokenizer cannot take one."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return _LINE_BREAKS.sub(" ", text.strip())


def clean_caption(text: str) -> str:
    """A caption as every reader of captions hands it on: one line of valid Unicode, cut to MAX_CAPTION_CHARS."""
    return _one_line(text)[:MAX_CAPTION_CHARS].rstrip()


def _lines(text: str):
    """(line number, line without its end) for every line; only \\n ends a line, so \\x85 or \\u2028 in a
    caption cannot shift the numbers the messages quote."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.rstrip("\r")


def _split_name(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return _SPLIT_ALIASES.get(value.strip().lower())


def _parse_token(text: str, parsed: _Parsed) -> None:
    for number, line in _lines(text):
        if not line.strip():
            continue
        where = f"line {number}"
        if "\t" in line:
            image, caption = line.split("\t", 1)
            # '#<n>' numbers the captions of one image; it is not part of the file name.
            image = _CAPTION_NUMBER.sub("", image.strip())
        else:
            match = _TOKEN_SPACED.match(line)
            if not match:
                parsed.skip(where, "no tab between image and caption")
                continue
            image, caption = match["image"], match["caption"]
        parsed.add(image, caption, None, where)


def _records(text: str, is_header):
    """(line number, line) for the non-blank lines, without the first one when is_header(it) says it is one."""
    first = True
    for number, line in _lines(text):
        if not line.strip():
            continue
        if first:
            first = False
            if is_header(line.strip().lower().replace(" ", "").replace('"', "")):
                continue
        yield number, line


def _strict_fields(text: str, delimiter: str) -> list[list[str]] | None:
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error:
        return None


def _spanning_record(lines: list[str], index: int, delimiter: str, width: int) -> tuple[list[str], int] | None:
    """(fields, lines taken) when line `index` opens a quoted field that closes within _MAX_RECORD_LINES lines
    into exactly `width` fields, and none of the lines it takes starts like a record of its own; else None.

    A caption may hold a line break inside quotes, but a stray quote must not swallow the lines after it."""
    if '"' not in lines[index] or _strict_fields(lines[index], delimiter) is not None:
        return None  # no quote, or one that closes on its own line
    for end in range(index + 2, min(index + _MAX_RECORD_LINES, len(lines)) + 1):
        if _RECORD_START.match(lines[end - 1]):
            return None
        rows = _strict_fields("\n".join(lines[index:end]), delimiter)
        if rows is not None:
            return (rows[0], end - index) if len(rows) == 1 and len(rows[0]) == width else None
    return None


def _parse_kaggle(text: str, parsed: _Parsed) -> None:
    lines = [line for _, line in _lines(text)]
    taken_until = 0  # line number of the last line a multi-line caption took
    for number, line in _records(text, lambda header: header == "image,caption"):
        if number <= taken_until:
            continue
        where = f"line {number}"
        spanning = _spanning_record(lines, number - 1, ",", 2)
        if spanning is not None:
            (image, caption), taken = spanning
            taken_until = number + taken - 1
            parsed.add(image, caption, None, where)
            continue
        if "," not in line:
            parsed.skip(where, "no comma between image and caption")
            continue
        image, caption = line.split(",", 1)
        if '"' in line:
            # Kaggle quotes captions that hold a comma; one line read by csv rules gives exactly two fields
            # then. Anything else (a stray quote) is read literally so it cannot swallow the following lines.
            try:
                fields = next(csv.reader([line]), [])
            except csv.Error:
                fields = []
            if len(fields) == 2:
                image, caption = fields
        parsed.add(image, caption, None, where)


def _parse_pipe(text: str, parsed: _Parsed) -> None:
    for number, line in _records(text, lambda header: header.startswith("image_name|")):
        where = f"line {number}"
        parts = line.split("|", 2)
        if len(parts) != 3:
            # The real results.csv has such a line: "2199200615.jpg| 4 A dog runs across the grass ."
            parsed.skip(where, "expected 'image| number| caption' (a '|' is missing)")
            continue
        image, number_field, caption = parts
        if not number_field.strip().isdigit():
            parsed.skip(where, f"comment number {number_field.strip()[:20]!r} is not a number")
            continue
        parsed.add(image, caption, None, where)


def _find_column(names: list[str], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key in names:
            return names.index(key)
    return None


def _parse_delimited(text: str, parsed: _Parsed, delimiter: str) -> None:
    kind = "TSV" if delimiter == "\t" else "CSV"
    lines = [line for _, line in _lines(text)]
    header: list[str] | None = None
    image_col = caption_col = split_col = None
    taken_until = 0  # index of the line after the last one a multi-line record took
    for index, line in enumerate(lines):
        if index < taken_until or not line.strip():
            continue
        where = f"line {index + 1}"
        spanning = _spanning_record(lines, index, delimiter, len(header)) if header is not None else None
        if spanning is not None:
            row, taken = spanning
            taken_until = index + taken
        else:
            try:
                row = next(csv.reader([line], delimiter=delimiter, strict=True), [])
            except csv.Error:
                # A quote that does not close as csv rules want is text, as in the Kaggle layout.
                try:
                    row = next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
                except csv.Error as exc:
                    raise DataError(f"{parsed.file}: {where}: cannot be read as {kind} ({exc}); "
                                    "fix the quoting on that line") from None
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            image_col = _find_column(header, IMAGE_KEYS)
            caption_col = _find_column(header, CAPTION_KEYS)
            split_col = _find_column(header, ("split",))
            if image_col is not None and caption_col is not None:
                continue
            if delimiter == "\t" and len(row) == 2:
                # A bare two-column TSV: the first line is already data.
                header, image_col, caption_col, split_col = ["image", "caption"], 0, 1, None
            else:
                raise DataError(
                    f"{parsed.file}: the first line of this {kind} names no image column (one of: "
                    f"{', '.join(IMAGE_KEYS)}) and caption column (one of: {', '.join(CAPTION_KEYS)}); "
                    "add such a header line"
                )
        assert image_col is not None and caption_col is not None
        if len(row) <= max(image_col, caption_col):
            parsed.skip(where, f"expected {len(header)} columns, found {len(row)}")
            continue
        if caption_col == len(header) - 1:
            # An unquoted delimiter inside the last column (a caption with a comma) splits it; rejoin.
            caption = delimiter.join(row[caption_col:])
        else:
            caption = row[caption_col]
        split = _split_name(row[split_col]) if split_col is not None and split_col < len(row) else None
        parsed.add(row[image_col], caption, split, where)


def _parse_jsonl(text: str, parsed: _Parsed) -> None:
    for number, line in _lines(text):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            parsed.skip(where, "not valid JSON")
            continue
        if not isinstance(record, dict):
            parsed.skip(where, "not a JSON object")
            continue
        keys = {key.lower(): value for key, value in record.items()}
        image = next((keys[k] for k in IMAGE_KEYS if isinstance(keys.get(k), str)), None)
        if image is None:
            parsed.skip(where, f"no image key (one of: {', '.join(IMAGE_KEYS)})")
            continue
        caption = next((keys[k] for k in CAPTION_KEYS + ("captions",) if k in keys), None)
        captions = caption if isinstance(caption, list) else [caption]
        if caption is None or not all(isinstance(c, str) for c in captions) or not captions:
            parsed.skip(where, f"no caption text (keys: {', '.join(CAPTION_KEYS)})")
            continue
        for one in captions:
            parsed.add(image, one, _split_name(keys.get("split")), where)


def _load_json(text: str, file: Path) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        where = f"line {exc.lineno}: " if isinstance(exc, json.JSONDecodeError) else ""
        raise DataError(f"{file}: {where}not valid JSON ({reason}); re-download or fix the file") from None


def _parse_karpathy(data: dict, parsed: _Parsed) -> None:
    for index, entry in enumerate(data["images"], start=1):
        where = f"image {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            parsed.skip(where, "no 'filename'")
            continue
        name = entry["filename"]
        folder = entry.get("filepath")
        if isinstance(folder, str) and folder.strip():
            name = f"{folder.strip()}/{name.strip()}"
        split = _split_name(entry.get("split"))  # restval (COCO's extra training images) maps to train
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            parsed.skip(where, "no 'sentences'")
            continue
        for sentence in sentences:
            if isinstance(sentence, dict):
                raw = sentence.get("raw")
                tokens = sentence.get("tokens")
                if not isinstance(raw, str) and isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
                    raw = " ".join(tokens)
            else:
                raw = sentence
            if not isinstance(raw, str):
                parsed.skip(where, "a sentence without 'raw' text")
                continue
            parsed.add(name, raw, split, where)


def _parse_coco(data: dict, parsed: _Parsed) -> None:
    names: dict[int | str, str] = {}
    images = data.get("images")
    for index, entry in enumerate(images if isinstance(images, list) else [], start=1):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(image_id, (int, str)) or not isinstance(entry.get("file_name"), str):
            parsed.skip(f"image {index}", "no 'id' and 'file_name'")
            continue
        names.setdefault(image_id, entry["file_name"])
    by_image: dict[int | str, list[tuple[str, str]]] = {}
    for index, entry in enumerate(data["annotations"], start=1):
        where = f"annotation {index}"
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        if not isinstance(image_id, (int, str)) or not isinstance(entry.get("caption"), str):
            parsed.skip(where, "no 'image_id' and 'caption'")
            continue
        if image_id not in names:
            parsed.skip(where, f"image_id {image_id!r:.30} is not in 'images'")
            continue
        by_image.setdefault(image_id, []).append((entry["caption"], where))
    # Images in the order the file lists them, which is the order COCO tools use.
    for image_id, name in names.items():
        for caption, where in by_image.get(image_id, ()):
            parsed.add(name, caption, None, where)


# ----------------------------------------------------------------------------------------- finding files


def _listing(folder: Path) -> list[tuple[int, str, Path]]:
    """(depth, relative name, path) of the files (all but folders) in `folder` and in its immediate subfolders."""
    found: list[tuple[int, str, Path]] = []
    try:
        top = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return found
    for entry in top:
        if entry.name.startswith("."):
            continue  # macOS '._captions.txt' resource forks and other hidden files
        # Not only regular files: a captions.txt that links to a device is found, and refused by _read_text
        # with a reason, rather than reported as no caption file at all.
        try:
            if not entry.is_dir():
                found.append((0, entry.name, Path(entry.path)))
            else:
                for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    if not sub.name.startswith(".") and not sub.is_dir():
                        found.append((1, f"{entry.name}/{sub.name}", Path(sub.path)))
        except OSError:
            continue
    return found


def _find_caption_file(folder: Path) -> Path:
    files = _listing(folder)
    for patterns, _ in _SEARCH:
        hits = [
            (depth, "lemma" in path.name.lower(), rel, path)
            for depth, rel, path in files
            if any(fnmatch.fnmatchcase(path.name.lower(), p.lower()) for p in patterns)
        ]
        if hits:
            # The lemmatised Flickr8k.lemma.token.txt sorts before Flickr8k.token.txt but has worse captions.
            return min(hits)[3]
    tables = [(depth, rel, path) for depth, rel, path in files if path.suffix.lower() in _ANY_TABLE]
    if len(tables) == 1:
        return tables[0][2]
    if len(tables) > 1:
        names = ", ".join(rel for _, rel, _ in sorted(tables)[:5])
        raise DataError(
            f"{folder}: several possible caption files ({names}{', ...' if len(tables) > 5 else ''}); "
            "pass the caption file itself instead of the folder"
        )
    raise DataError(f"{folder}: no caption file found; expected one of: {_KNOWN_LAYOUTS} (see README 'Data layouts')")


def _read_text(file: Path) -> str:
    """The text of a regular file of at most MAX_CAPTION_FILE_BYTES: a device (/dev/zero) or a pipe behind a
    caption file's name would never end."""
    try:
        # O_NONBLOCK: opening a named pipe would wait for a writer; a regular file ignores the flag.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{file}: not a regular file (a device, pipe or socket); give the caption file itself")
            raw = b"" if info.st_size > MAX_CAPTION_FILE_BYTES else handle.read(MAX_CAPTION_FILE_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    size = max(info.st_size, len(raw))  # the read is bounded too, should the file grow meanwhile
    if size > MAX_CAPTION_FILE_BYTES:
        raise DataError(f"{file}: {size:,} bytes, over the {MAX_CAPTION_FILE_BYTES:,} a caption file may hold; "
                        "check that this is the caption file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}: is not UTF-8 text (bad byte at offset {exc.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 '{file.name}' > '{file.stem}.utf8{file.suffix}'"
        ) from None


def _first_line(text: str) -> str:
    for _, line in _lines(text):
        if line.strip():
            return line.strip()
    return ""


def _parse(file: Path, text: str) -> _Parsed:
    name = file.name.lower()
    first = _first_line(text)
    compact = first.lower().replace(" ", "").replace('"', "")

    if name.endswith(".json"):
        data = _load_json(text, file)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            parsed = _Parsed(file, "COCO captions JSON")
            # captions_train2017.json -> images in train2017/
            match = re.fullmatch(r"captions_(.+)\.json", file.name, re.IGNORECASE)
            parsed.split_coco = match[1] if match else None
            _parse_coco(data, parsed)
        elif isinstance(data, dict) and isinstance(data.get("images"), list):
            parsed = _Parsed(file, "Karpathy JSON")
            _parse_karpathy(data, parsed)
        else:
            raise DataError(
                f"{file}: not a Karpathy JSON (an object with 'images' holding 'sentences') nor a COCO captions "
                "JSON (an object with 'images' and 'annotations'); pass a caption file in a known layout"
            )
        return parsed

    if name.endswith((".jsonl", ".ndjson")):
        parser, layout = _parse_jsonl, "JSONL"
    elif name.endswith((".token", ".token.txt")) or _TOKEN_LINE.match(first):
        parser, layout = _parse_token, "Flickr token file"
    elif compact.startswith("image_name|") or name == "results.csv" and "|" in first:
        parser, layout = _parse_pipe, "Flickr30k results.csv"
    elif compact == "image,caption":
        parser, layout = _parse_kaggle, "Kaggle captions.txt" if name == "captions.txt" else "CSV"
    elif name.endswith(".tsv") or name.endswith(".txt") and "\t" in first:
        parser, layout = partial(_parse_delimited, delimiter="\t"), "TSV"
    elif name.endswith(".csv") or name.endswith(".txt") and "," in first:
        parser, layout = partial(_parse_delimited, delimiter=","), "CSV"
    elif not first:
        raise DataError(f"{file}: is empty; it should hold captions (see README 'Data layouts')")
    else:
        raise DataError(
            f"{file}: not a caption file in a known layout; expected {_KNOWN_LAYOUTS} (see README 'Data layouts')"
        )
    parsed = _Parsed(file, layout)
    parser(text, parsed)
    return parsed


# -------------------------------------------------------------------------------- image root and splits


def _escapes(name: str) -> bool:
    return os.path.isabs(name) or name == os.pardir or name.startswith(os.pardir + os.sep)


def _image_root(file: Path, parsed: _Parsed) -> Path:
    here = file.parent
    candidates = [here / "Images", here / "images", here / "flickr30k_images"]
    candidates.append(here / "flickr30k_images" / "flickr30k_images")  # Kaggle's Flickr30k zip nests it twice
    # The original Flickr8k zips unpack to Flickr8k_text/ beside Flicker8k_Dataset/ (sic).
    for base in (here, here.parent):
        candidates += [base / "Flicker8k_Dataset", base / "Flickr8k_Dataset"]
    if parsed.split_coco:
        # COCO keeps its jsons in annotations/, beside train2017/.
        candidates += [here / parsed.split_coco, here.parent / parsed.split_coco]
    candidates.append(here)

    # A few images rather than only the first, so one missing image does not hide the right folder.
    probes = [name for name in list(parsed.groups)[:5] if not _escapes(name)]
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, name)) for name in probes):
            return folder
    return next((folder for folder in candidates if os.path.isdir(folder)), here)


def _flickr8k_splits(folder: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    for filename, split in FLICKR8K_SPLIT_FILES:
        path = folder / filename
        if not path.is_file():
            continue
        for _, line in _lines(_read_text(path)):
            if line.strip():
                splits.setdefault(line.strip(), split)
    return splits


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def load_caption_set(path: str | Path, allow_outside: bool = False) -> CaptionSet:
    """Find and parse the caption file at `path` (a dataset folder or the caption file itself).

    Image names that are absolute or lead outside the dataset folder raise DataError unless `allow_outside`.
    """
    # Absolute but not symlink-resolved: a symlinked Images/ should still count as inside the dataset folder.
    given = Path(os.path.abspath(os.fspath(path)))
    if given.is_dir():
        file = _find_caption_file(given)
    elif given.exists():
        file = given  # _read_text refuses what is not a regular file
    else:
        raise DataError(f"{given}: not found; give a dataset folder or a caption file")

    parsed = _parse(file, _read_text(file))
    if not parsed.groups:
        if parsed.examples:
            raise DataError(
                f"{file}: no usable captions in this {parsed.layout} ({parsed.skipped} lines/records skipped, "
                f"first: {parsed.examples[0]}); check the file is in this layout (see README 'Data layouts')"
            )
        raise DataError(f"{file}: no captions found in this {parsed.layout}; it is empty or holds only a header")

    image_root = _image_root(file, parsed)
    try:
        dataset_root = os.path.commonpath([str(file.parent), str(image_root)])
    except ValueError:
        dataset_root = str(file.parent)

    splits = {} if any(g.split for g in parsed.groups.values()) else _flickr8k_splits(file.parent)
    items: list[ImageCaptions] = []
    for group in parsed.groups.values():
        image = os.path.normpath(os.path.join(image_root, group.name))
        if not allow_outside and (os.path.isabs(group.name) or not _inside(image, dataset_root)):
            raise DataError(
                f"{file}: {group.where}: image path {group.name!r} points outside the dataset folder; "
                "pass --allow-outside-paths to allow it"
            )
        split = group.split
        if splits:
            split = splits.get(group.name) or splits.get(os.path.basename(group.name))
        items.append(ImageCaptions(Path(image), tuple(group.captions), split))

    return CaptionSet(
        layout=parsed.layout,
        caption_file=file,
        image_root=image_root,
        items=items,
        skipped=parsed.skipped,
        skipped_examples=parsed.examples,
        has_splits=any(item.split for item in items),
        empty_captions=parsed.empty_captions,
        cut_captions=parsed.cut_captions,
    )


def select_split(cs: CaptionSet, split: str, seed: int = 0, holdout: float = 0.05) -> list[ImageCaptions]:
    """The items of one split ("train", "val" or "dev", "test", "all").

    Without split information in the dataset, a seeded hold-out: the last `holdout` fraction of a shuffled
    list is test, the chunk before it val, so the same seed always gives the same disjoint splits.
    """
    wanted = split.strip().lower() if isinstance(split, str) else ""
    wanted = "all" if wanted == "all" else {"dev": "val", "valid": "val"}.get(wanted, wanted)
    if wanted not in SPLITS + ("all",):
        raise DataError(f"unknown split {split!r}; use one of: train, val, test, all")
    if not 0.0 <= holdout < 0.5:
        raise ConfigError(f"holdout {holdout} must be at least 0 and below 0.5 (the fraction for each of val and test)")
    if wanted == "all":
        return list(cs.items)

    if cs.has_splits:
        chosen = [item for item in cs.items if item.split == wanted]
        available = [s for s in SPLITS if any(item.split == s for item in cs.items)]
    else:
        # Sorting first makes the split independent of the caption file's line order.
        order = sorted(cs.items, key=lambda item: str(item.image))
        random.Random(seed).shuffle(order)
        n = len(order)
        k = int(n * holdout)
        if n >= 3:
            k = max(k, 1)
        parts = {"train": order[: n - 2 * k], "val": order[n - 2 * k : n - k], "test": order[n - k :]}
        members = {id(item) for item in parts[wanted]}
        chosen = [item for item in cs.items if id(item) in members]  # file order, not shuffled order
        available = [s for s in SPLITS if parts[s]]
    if not chosen:
        others = ", ".join(s for s in available if s != wanted) or "none"
        raise DataError(
            f"{cs.caption_file}: has no images in split '{wanted}'; use --split all or one of: {others}"
        )
    return chosen


def drop_missing_images(
    items: list[ImageCaptions], max_missing_fraction: float = 0.1
) -> tuple[list[ImageCaptions], int, list[str]]:
    """Keep the items whose image file exists: (kept, number missing, up to 3 missing paths).

    A few missing images are normal in public datasets (Flickr8k names one that was never released); many
    missing means the images are in the wrong place, which is better said at once than trained around.
    """
    kept: list[ImageCaptions] = []
    missing: list[ImageCaptions] = []
    for item in items:
        # os.path.isfile says False, rather than raising, for names the OS cannot represent.
        (kept if os.path.isfile(item.image) else missing).append(item)
    examples = [str(item.image) for item in missing[:_MAX_EXAMPLES]]
    if not missing:
        return kept, 0, []

    try:
        where = os.path.commonpath([str(item.image.parent) for item in items])
    except ValueError:
        where = str(items[0].image.parent)
    if not kept:
        raise DataError(
            f"{where}: none of the {len(items)} images named in the caption file exist there (e.g. {examples[0]}); "
            "put the images in Images/ beside the caption file"
        )
    fraction = len(missing) / len(items)
    if fraction > max_missing_fraction:
        raise DataError(
            f"{where}: {len(missing)} of {len(items)} images ({fraction:.1%}) named in the caption file are missing, "
            f"more than the {max_missing_fraction:.0%} allowed (e.g. {', '.join(examples)}); "
            "add the missing images or fix the caption file"
        )
    return kept, len(missing), examples
