"""Measure `miniclip index` and `miniclip search`: indexing throughput per backend (with the share spent decoding,
and with PIL's JPEG draft mode as an alternative decoder), search latency over synthetic 100k and 1M indexes,
and the index's size on disk. Prints numbers; draws nothing.

    python scripts/bench_search.py --model RUN --small ../shared/data/flickr8k/Images --large ../shared/data/photos

RUN must have been exported with `miniclip quantize RUN` for the onnx backend.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image, ImageOps

import miniclip_cli as mc
from miniclip_cli import index as index_module
from miniclip_cli.data.pixels import eval_pixels, normalise, resize_centre_crop


def draft_eval_pixels(path, size, mean, std):
    """eval_pixels with JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below `size` a side
    (a sketch of the change to data/pixels.load_rgb that this measures; RGB JPEGs only)."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    return normalise(resize_centre_crop(rgb, size), mean, std)


def sample_folder(source: Path, count: int, into: Path) -> Path:
    """`count` images from `source` copied (cycling when it holds fewer) into a fresh folder."""
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    into.mkdir(parents=True)
    for i in range(count):
        shutil.copyfile(images[i % len(images)], into / f"{i:06d}{images[i % len(images)].suffix}")
    return into


def time_index(folder: Path, encoder, pixels_fn) -> float:
    """Seconds for a fresh index of `folder` (the index file removed first)."""
    shutil.rmtree(folder / ".miniclip", ignore_errors=True)
    with mock.patch.object(index_module, "eval_pixels", pixels_fn):
        start = time.perf_counter()
        index, _ = mc.index_folder(folder, encoder)
        seconds = time.perf_counter() - start
    assert len(index) == len(list(p for p in folder.iterdir() if p.is_file()))
    return seconds


def time_decode(folder: Path, size, mean, std, pixels_fn) -> float:
    """Seconds to decode and preprocess every image with the same 4-thread pool the index uses."""
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda p: pixels_fn(p, size, mean, std), paths))
    return time.perf_counter() - start


def bench_indexing(args, encoders: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"160 px (Flickr8k)": sample_folder(args.small, args.small_count, Path(tmp) / "small"),
                   "full size (~500x375)": sample_folder(args.large, args.large_count, Path(tmp) / "large")}
        print(f"\nindexing throughput, images/s (decode included; a fresh index each time; "
              f"{args.small_count} and {args.large_count} images)")
        print(f"{'images':<22}{'decoder':<8}" + "".join(f"{b:>12}" for b in encoders) + f"{'decode share':>16}")
        for name, folder in folders.items():
            for decoder, fn in (("full", eval_pixels), ("draft", draft_eval_pixels)):
                rates, shares = [], []
                for backend, encoder in encoders.items():
                    seconds = time_index(folder, encoder, fn)
                    decode = time_decode(folder, encoder.image_size, encoder.mean, encoder.std, fn)
                    rates.append(args_count(folder) / seconds)
                    shares.append(f"{100 * decode / seconds:.0f}%")
                print(f"{name:<22}{decoder:<8}" + "".join(f"{r:>12.1f}" for r in rates) + f"{' / '.join(shares):>16}")
        # What draft mode changes: pixels and features of the full-size photos.
        encoder = encoders[list(encoders)[-1]]
        paths = sorted(p for p in folders["full size (~500x375)"].iterdir() if p.is_file())[:24]
        full = np.stack([eval_pixels(p, encoder.image_size, encoder.mean, encoder.std) for p in paths])
        draft = np.stack([draft_eval_pixels(p, encoder.image_size, encoder.mean, encoder.std) for p in paths])
        cos = (mc.index.normalise_rows(encoder.encode_pixels(full)) * mc.index.normalise_rows(encoder.encode_pixels(draft))).sum(1)
        std = np.asarray(encoder.std, np.float32)[:, None, None]
        print(f"draft vs full decode on {len(paths)} full-size photos: mean |pixel diff| "
              f"{np.abs((full - draft) * std).mean() * 255:.2f}/255, feature cosine min {cos.min():.4f} mean {cos.mean():.4f}")


def args_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file())


def bench_search(encoder, sizes: list[int], dim: int) -> None:
    rng = np.random.default_rng(0)
    query = mc.index.query_vector(encoder, ["a dog running on the beach"])
    start = time.perf_counter()
    for _ in range(20):
        mc.index.query_vector(encoder, ["a dog running on the beach"])
    text_ms = (time.perf_counter() - start) / 20 * 1000
    print(f"\nsearch latency, one text query (encoding the caption: {text_ms:.1f} ms, not included below)")
    for n in sizes:
        features = rng.standard_normal((n, dim), dtype=np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        paths = [f"{2000 + i // 50_000}/{i // 500 % 100:02d}-holiday/IMG_{i:07d}.jpg" for i in range(n)]
        index = mc.Index(Path("/photos"), {"run": "bench", "backend": "onnx", "fingerprint": "0"}, paths,
                         np.full(n, 123_456, np.int64), np.arange(n, dtype=np.int64) * 10**9, features)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "index-bench.npz"
            start = time.perf_counter()
            index.save(file)
            save_s = time.perf_counter() - start
            size_mb = file.stat().st_size / 1e6
            start = time.perf_counter()
            loaded = mc.load_index(file)
            load_s = time.perf_counter() - start
        times = []
        for _ in range(15):
            start = time.perf_counter()
            mc.search(loaded, None, [], top=10, direction=query)
            times.append(time.perf_counter() - start)
        print(f"{n:>9,} x {dim}: search {statistics.median(times) * 1000:7.1f} ms median ({min(times) * 1000:.1f} best)"
              f"  ·  file {size_mb:6.1f} MB  ·  save {save_s:.2f} s  ·  load {load_s:.2f} s  ·  "
              f"in memory {loaded.features.nbytes / 1e6:.0f} MB float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A trained run folder, exported with quantize.")
    parser.add_argument("--small", type=Path, default=Path("../shared/data/flickr8k/Images"))
    parser.add_argument("--large", type=Path, default=Path("../shared/data/photos"))
    parser.add_argument("--small-count", type=int, default=512)
    parser.add_argument("--large-count", type=int, default=192)
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--sizes", default="100000,1000000", help="Synthetic index sizes for the search latency.")
    args = parser.parse_args()
    encoders = {b: mc.load(args.model, b) for b in args.backends.split(",")}
    bench_indexing(args, encoders)
    encoder = encoders[list(encoders)[-1]]
    bench_search(encoder, [int(s) for s in args.sizes.split(",")], encoder.encode_texts(["x"]).shape[1])


if __name__ == "__main__":
    main()
