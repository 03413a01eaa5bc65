"""A folder's image features in one file, kept up to date incrementally, and searched by text or by example.

No torch here: with an ONNX encoder, indexing and searching run on onnxruntime, PIL and NumPy alone.

The index file (`FOLDER/.miniclip/index-RUN.npz`, NumPy's zip of arrays, no pickle) holds:
  features  n d int16   each unit feature row as x / scale * 32767 (see `_quantise`), or n d float32 when
                        stored with storage="float32" (twice the size; scores then equal eval's bit for bit)
  scales    n   float32 each row's largest |x| (int16 storage only)
  sizes     n   int64   file size in bytes  } a file whose size or modification time differs is re-embedded
  mtimes    n   int64   mtime in ns         }
  paths     zlib of the NUL-joined UTF-8 paths, relative to the folder
  meta      JSON: format, root, the model (run folder, backend, fingerprint of its files), the unreadable files
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.pixels import IMAGE_SUFFIXES, eval_pixels
from .errors import CheckpointError, ConfigError, DataError
from .run_files import CONFIG, TOKENIZER, atomic_write, remove_stale_temporaries
from .runtime import ONNX_DIR, ONNX_FILES, Encoder, normalise_rows, open_encoder

FORMAT = 1
STORAGES = ("int16", "float32")
INDEX_DIR = ".miniclip"
BATCH = 64
# Saving rewrites the whole file; saving only once this many times its own duration has passed keeps the
# cost under ~5% of the run, while a small index (milliseconds to write) is still saved after every batch.
SAVE_COST_RATIO = 20
Progress = Callable[[int, int], None]  # (done, total)


def default_index_path(folder: str | Path, run: str | Path) -> Path:
    return Path(folder).expanduser().resolve() / INDEX_DIR / f"index-{Path(run).expanduser().resolve().name}.npz"


def model_files(run: str | Path, backend: str) -> list[Path]:
    """The files whose bytes decide what `backend` computes for this run folder."""
    run = Path(run).expanduser()
    if backend == "torch":
        return [run / CONFIG, run / TOKENIZER, run / "best.safetensors"]
    precision = "int8" if backend == "onnx" else "fp32"
    return [run / ONNX_DIR / "metadata.json", run / ONNX_DIR / TOKENIZER,
            *(run / ONNX_DIR / name for name in ONNX_FILES[precision])]


def fingerprint(run: str | Path, backend: str) -> str:
    """sha256 (first 16 hex digits) over the model files of `backend`: the same weights give the same print,
    wherever the run folder lies."""
    digest = hashlib.sha256()
    for path in model_files(run, backend):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, so the {backend} model of {run} cannot be identified; "
                                  + ("export it with `miniclip quantize " + str(run) + "`" if backend != "torch"
                                     else "give a run folder written by `miniclip train`"))
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def load(run: str | Path, backend: str = "torch", device: str = "auto") -> Encoder:
    """The model of a run folder as an Encoder: `encode_images(paths)` and `encode_texts(texts)` give unit
    vectors (n d float32). backend: "torch", "onnx" (the int8 export; PyTorch is not imported) or "onnx-fp32".

    The encoder also carries `run` (the resolved folder), `backend` and `fingerprint`, which an index records."""
    run = Path(run).expanduser().resolve()
    encoder = open_encoder(run, backend, device=device)
    encoder.run, encoder.backend, encoder.fingerprint = run, backend, fingerprint(run, backend)
    return encoder


@dataclass
class Hit:
    path: Path
    score: float  # cosine similarity of the query with the image
    rank: int  # 1 = best


@dataclass
class IndexStats:
    new: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    unreadable: int = 0  # files skipped, this run or (unchanged since) an earlier one
    unreadable_examples: list[str] = field(default_factory=list)


@dataclass
class Index:
    """Unit image features of a folder's images, with what is needed to update and check them."""

    root: Path
    model: dict  # {"run", "backend", "fingerprint"}
    paths: list[str]  # relative to root, POSIX separators
    sizes: np.ndarray
    mtimes: np.ndarray
    features: np.ndarray  # n d float32, unit rows (dequantised on load)
    skipped: dict[str, list] = field(default_factory=dict)  # path -> [size, mtime, reason]
    file: Path | None = None
    storage: str = "int16"  # on disk: see STORAGES

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        meta = {"format": FORMAT, "root": str(self.root), "model": self.model, "skipped": self.skipped,
                "storage": self.storage}
        if self.storage == "int16":
            quantised, scales = _quantise(self.features)
            arrays = {"features": quantised, "scales": scales}
        else:
            arrays = {"features": np.asarray(self.features, np.float32)}
        arrays |= {"sizes": np.asarray(self.sizes, np.int64),
                  "mtimes": np.asarray(self.mtimes, np.int64),
                  "paths": np.frombuffer(zlib.compress("\0".join(self.paths).encode("utf-8"), 6), np.uint8),
                  "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        try:
            atomic_write(path, write)
        except OSError as exc:  # a read-only photo folder, a full disk: the earlier index is left as it was
            raise DataError(f"{path}: cannot write the index ({exc.strerror or exc}); give --index PATH in a "
                            "writable folder") from None
        self.file = path


def _quantise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as int16 fixed point scaled per row: the same 2 bytes a value as float16, but 15 bits for the
    row's range where float16 keeps 11, so a stored score is within ~1e-5 of the float32 one (float16: ~1e-4
    at small widths), below the 4 decimals that `search` shows."""
    scales = np.abs(features).max(axis=1) if len(features) else np.zeros(0, np.float32)
    scales = np.maximum(scales, 1e-12).astype(np.float32)
    return np.round(features / scales[:, None] * 32767).astype(np.int16), scales


def load_index(path: str | Path) -> Index:
    """Read an index file written by `Index.save` (or `index_folder`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no index here; build it with `miniclip index FOLDER --model RUN`")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, this miniclip reads {FORMAT}")
            raw = zlib.decompress(data["paths"].tobytes()).decode("utf-8")
            paths = raw.split("\0") if raw else []
            storage = meta.get("storage", "int16")
            features = data["features"].astype(np.float32)
            if storage == "int16":
                features *= (data["scales"] / 32767)[:, None]
            sizes, mtimes = data["sizes"], data["mtimes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable miniclip index ({str(exc)[:100]}); delete it and run "
                        "`miniclip index` again") from None
    if not (len(paths) == len(features) == len(sizes) == len(mtimes)):
        raise DataError(f"{path}: its arrays disagree in length; delete it and run `miniclip index` again")
    root = Path(meta["root"])
    if path.parent.name == INDEX_DIR:  # inside the folder it indexes: follow the folder if it was moved
        root = path.parent.parent.resolve()
    return Index(root, meta["model"], paths, sizes, mtimes, features, meta.get("skipped", {}), path, storage)


def find_index(folder: str | Path, run: str | Path | None = None) -> Path:
    """The index file in FOLDER/.miniclip: the one of `run` when given, else the only one there."""
    folder = Path(folder).expanduser().resolve()
    if run is not None:
        path = default_index_path(folder, run)
        if not path.is_file():
            raise DataError(f"{folder}: no index made with {Path(run).name}; build it with "
                            f"`miniclip index {folder} --model {run}`")
        return path
    found = sorted((folder / INDEX_DIR).glob("index-*.npz"))
    if not found:
        raise DataError(f"{folder}: no index here; build it with `miniclip index {folder} --model RUN`")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{folder}: several indexes ({names}); choose one with --model RUN or --index PATH")
    return found[0]


def scan_folder(root: str | Path) -> dict[str, tuple[int, int]]:
    """Every image file below `root` (by suffix) as relative path -> (size, mtime ns).

    Hidden folders (.miniclip, .git, thumbnails) are skipped; no symlinked folder is entered and a symlinked
    file counts only when it resolves inside `root`, so the index never reaches out of the folder."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder of images")
    found = {}
    for directory, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(directory) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                continue
            try:
                stat = path.stat()
            except OSError:  # a dangling link or a file removed while walking
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def _check_model(index: Index, encoder: Encoder, where: Path) -> None:
    """Refuse an encoder that is not the model the index was built with, naming both."""
    recorded = index.model
    backend = recorded["backend"]
    # Same weights, wherever they lie: compare the print of the files the index's backend read.
    try:
        current = (encoder.fingerprint if getattr(encoder, "backend", None) == backend
                   else fingerprint(encoder.run, backend))
    except CheckpointError:
        current = None
    if current != recorded["fingerprint"]:
        raise ConfigError(f"{where}: built with {recorded['run']} ({backend}, fingerprint {recorded['fingerprint']}), "
                          f"but the model given is {encoder.run} ({encoder.backend}, fingerprint "
                          f"{getattr(encoder, 'fingerprint', None)}); search with --model {recorded['run']}, "
                          f"or rebuild with `miniclip index {index.root} --model {encoder.run} --rebuild`")


def _model_record(encoder: Encoder) -> dict:
    if getattr(encoder, "run", None) is None:
        raise ConfigError("index_folder needs an encoder made by miniclip_cli.load(run, backend), which records "
                          "the model in the index")
    return {"run": str(encoder.run), "backend": encoder.backend, "fingerprint": encoder.fingerprint}


def _pixels_or_problem(path: Path, encoder: Encoder):
    try:
        return eval_pixels(path, encoder.image_size, encoder.mean, encoder.std)
    except DataError as exc:
        return str(exc)


def index_folder(folder: str | Path, encoder: Encoder, index_path: str | Path | None = None, rebuild: bool = False,
                 batch_size: int = BATCH, progress: Progress | None = None, storage: str | None = None
                 ) -> tuple[Index, IndexStats]:
    """Embed every image below `folder` that the index at `index_path` (default FOLDER/.miniclip/index-RUN.npz)
    lacks or holds an older version of, drop the deleted ones, and save.

    The file is rewritten whole (temporary file, then rename) after each batch, or less often once that costs
    more than ~5% of the time, so an interrupted run leaves a complete earlier index that the next run
    continues from. Unreadable images are skipped, counted and remembered until they change.

    storage: "int16" (the default for a new index: 2 bytes a value, scores within ~1e-5 of float32) or "float32";
    None keeps an existing index's."""
    if storage not in (None, *STORAGES):
        raise ConfigError(f"storage {storage!r}: use one of {', '.join(STORAGES)}")
    root = Path(folder).expanduser().resolve()
    files = scan_folder(root)
    if not files:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}); give the folder that "
                        "holds your photos")
    model = _model_record(encoder)
    index_path = Path(index_path).expanduser().resolve() if index_path else default_index_path(root, encoder.run)
    remove_stale_temporaries(index_path.parent) if index_path.parent.is_dir() else None
    old = None
    if index_path.is_file() and not rebuild:
        old = load_index(index_path)
        if old.root != root:
            raise DataError(f"{index_path}: indexes {old.root}, not {root}; give another --index PATH")
        _check_model(old, encoder, index_path)
        if old.model["backend"] != encoder.backend:  # the same weights, but features of one kind per index
            raise ConfigError(f"{index_path}: holds {old.model['backend']} features, not {encoder.backend}; index "
                              f"with --backend {old.model['backend']}, or give --rebuild or another --index PATH")
        if storage not in (None, old.storage):
            raise ConfigError(f"{index_path}: stores {old.storage} features; give --rebuild to store {storage}")

    stats = IndexStats()
    keep, todo = [], []
    old_rows = {p: i for i, p in enumerate(old.paths)} if old else {}
    skipped = {}
    for rel, (size, mtime) in sorted(files.items()):
        row = old_rows.get(rel)
        was_skipped = old.skipped.get(rel) if old else None
        if row is not None and (old.sizes[row], old.mtimes[row]) == (size, mtime):
            keep.append(row)
        elif was_skipped and tuple(was_skipped[:2]) == (size, mtime):
            skipped[rel] = was_skipped
        else:
            todo.append(rel)
            stats.changed += row is not None or bool(was_skipped)
    stats.unchanged = len(keep)
    stats.new = len(todo) - stats.changed
    stats.removed = (len(old.paths) + len(old.skipped) if old else 0) - stats.unchanged - stats.changed - len(skipped)

    dim = old.features.shape[1] if old and len(old) else 0
    index = Index(root, model, [old.paths[i] for i in keep] if old else [],
                  old.sizes[keep] if old else np.zeros(0, np.int64), old.mtimes[keep] if old else np.zeros(0, np.int64),
                  old.features[keep] if old else np.zeros((0, dim), np.float32), skipped,
                  storage=storage or (old.storage if old else "int16"))
    new_paths, new_features, new_stats = [], [], []
    saved_at, save_seconds = time.monotonic(), 0.0

    def save() -> None:
        nonlocal saved_at, save_seconds
        if new_features:
            index.features = np.concatenate([index.features.reshape(-1, new_features[0].shape[1]), *new_features])
            index.paths += new_paths
            index.sizes = np.concatenate([index.sizes, np.array([s for s, _ in new_stats], np.int64)])
            index.mtimes = np.concatenate([index.mtimes, np.array([m for _, m in new_stats], np.int64)])
            new_paths.clear(), new_features.clear(), new_stats.clear()
        start = time.monotonic()
        index.save(index_path)
        saved_at, save_seconds = time.monotonic(), time.monotonic() - start

    if progress:
        progress(0, len(todo))
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes outside the GIL

        def decode(batch: list[str]) -> list:
            return [pool.submit(_pixels_or_problem, root / rel, encoder) for rel in batch]

        try:
            pending = decode(batches[0]) if batches else []
            for number, batch in enumerate(batches):
                loaded = [future.result() for future in pending]
                # The next batch decodes while this one is embedded.
                pending = decode(batches[number + 1]) if number + 1 < len(batches) else []
                good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
                for i, x in enumerate(loaded):
                    if isinstance(x, str):
                        skipped[batch[i]] = [*files[batch[i]], x]
                if good:
                    # Unit rows already (the Encoder's contract): stored as they are, the features eval computes.
                    new_features.append(encoder.encode_pixels(np.stack([loaded[i] for i in good])))
                    new_paths.extend(batch[i] for i in good)
                    new_stats.extend(files[batch[i]] for i in good)
                if progress:
                    progress(min((number + 1) * batch_size, len(todo)), len(todo))
                if time.monotonic() - saved_at >= SAVE_COST_RATIO * save_seconds:
                    save()
        finally:
            save()  # on Ctrl-C or any error too: what was embedded is kept
    stats.unreadable = len(skipped)
    stats.unreadable_examples = [v[2] for v in list(skipped.values())[:3]]
    return index, stats


def query_vector(encoder: Encoder, queries: list[str | Path], negatives: list[str | Path] = ()) -> np.ndarray:
    """d: the unit direction to search along. A Path is an image query, a str a caption. Several queries: the
    mean of their unit features; negatives: minus the mean of theirs; then normalised. For one query this is
    its own feature, so a score is exactly the cosine that `classify` and `eval` compute."""

    def mean(items) -> np.ndarray:
        images = [Path(q).expanduser() for q in items if isinstance(q, Path)]
        texts = [q for q in items if not isinstance(q, Path)]
        parts = []
        if images:
            parts.append(encoder.encode_images(images))
        if texts:
            parts.append(encoder.encode_texts(texts))
        return np.concatenate(parts).mean(axis=0)

    if not queries:
        raise ConfigError("give at least one query: a caption or an image path")
    direction = mean(queries) - (mean(negatives) if negatives else 0)
    return normalise_rows(direction[None, :])[0].astype(np.float32)


def search(index: Index, encoder: Encoder | None, queries: str | Path | list, negatives: list = (), top: int = 10,
           direction: np.ndarray | None = None) -> list[Hit]:
    """The `top` images of the index closest to the queries (see query_vector), best first.

    `encoder` must be the model that built the index (checked by fingerprint); pass `direction` instead to
    search with a vector already computed."""
    if direction is None:
        _check_model(index, encoder, index.file or index.root)
        direction = query_vector(encoder, queries if isinstance(queries, list) else [queries], list(negatives))
    if top < 1:
        raise ConfigError(f"--top {top}: give 1 or more")
    scores = index.features @ direction  # n
    top = min(top, len(scores))
    best = np.argpartition(-scores, top - 1)[:top] if top < len(scores) else np.arange(len(scores))
    best = best[np.argsort(-scores[best], kind="stable")]
    return [Hit(index.root / index.paths[i], float(scores[i]), rank) for rank, i in enumerate(best, 1)]
