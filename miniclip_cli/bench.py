"""Measures inference size, latency and throughput of one run across backends. Draws nothing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, MiniclipError
from .run_files import BEST, LAST
from .runtime import ONNX_DIR, ONNX_FILES, Encoder, OnnxEncoder, open_encoder

ROWS = ("PyTorch fp32", "ONNX fp32", "ONNX int8")
DEMO_CAPTIONS = ("a dog runs on the grass", "two children play in the water", "a man rides a bicycle down a street")


def cpu_info() -> dict:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the name from platform is what there is
        pass
    extensions = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
                                            ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))
                  if flag in flags]
    return {"cpu": name, "extensions": extensions, "threads": os.cpu_count()}


def _timings(fn, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[min(len(times) - 1, (9 * len(times)) // 10)]}


def measure(encoder: Encoder, image: Path, repeats: int = 30, batch: int = 64) -> dict:
    """Latencies from preprocessed pixels and raw caption text, so every backend does the same work:
    image at batch 1, caption at batch 1, the demo's 1 image + 3 captions, and images/s at `batch`."""
    pixels = encoder.pixels([image])
    batch_pixels = np.repeat(pixels, batch, axis=0)
    captions = list(DEMO_CAPTIONS)

    def demo():
        image_features = encoder.encode_pixels(pixels)
        logits = encoder.logit_scale * image_features @ encoder.encode_texts(captions).T
        return np.exp(logits - logits.max()).sum()

    batched = _timings(lambda: encoder.encode_pixels(batch_pixels), max(3, repeats // 6), warmup=1)
    return {
        "image_ms": _timings(lambda: encoder.encode_pixels(pixels), repeats),
        "caption_ms": _timings(lambda: encoder.encode_texts(captions[:1]), repeats),
        "demo_ms": _timings(demo, repeats),
        "images_per_s": batch * 1000.0 / batched["median_ms"],
        "batch": batch,
    }


def _size_mb(run: Path, row: str, which: str) -> float:
    if row == "PyTorch fp32":
        return (run / (BEST if which == "best" and (run / BEST).is_file() else LAST)).stat().st_size / 1e6
    files = ONNX_FILES["fp32" if row == "ONNX fp32" else "int8"]
    return sum((run / ONNX_DIR / f).stat().st_size for f in files) / 1e6


def open_row(run: Path, row: str, which: str) -> Encoder:
    if row == "PyTorch fp32":
        return open_encoder(run, "torch", which, device="cpu", precision="fp32")
    return OnnxEncoder(run / ONNX_DIR, "fp32" if row == "ONNX fp32" else "int8")


def bench_rows(run: Path, image: Path, which: str = "best", repeats: int = 30, accuracy=None) -> list[dict]:
    """One dict per row; a row that cannot run carries `error` (why) instead of numbers.
    `accuracy(encoder) -> dict` adds accuracy metrics when given."""
    rows = []
    for row in ROWS:
        try:
            encoder = open_row(run, row, which)
            result = {"row": row, "size_mb": _size_mb(run, row, which), **measure(encoder, image, repeats)}
            if accuracy is not None:
                result["accuracy"] = accuracy(encoder)
        except ModuleNotFoundError as exc:  # the PyTorch-free install
            result = {"row": row, "error": f"needs {exc.name}, which this install lacks (`pip install .` in "
                                          "miniclip's folder installs it)"}
        except (MiniclipError, ImportError, OSError) as exc:
            result = {"row": row, "error": str(exc)}
        rows.append(result)
    base = next((r for r in rows if r["row"] == "PyTorch fp32" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["speedup_demo"] = base["demo_ms"]["median_ms"] / r["demo_ms"]["median_ms"]
    return rows


def bench_training(items, tokenizer, config, device, steps: int = 5, warmup: int = 2) -> dict:
    """Training throughput of one config two ways, on the same real batches, in one process:

    plain: fp32, eager, every caption padded to the full context (the reference way);
    fast:  the config's precision (bf16 autocast where it is fast) and captions padded to the batch's
           longest, as `miniclip train` runs; torch.compile when the config asks for it.
    Also the data path's own rate (reading the image cache or decoding the files, cropping; pairs/s) and the
    peak resident memory.
    Step times are medians over `steps` timed steps after `warmup` untimed ones, each with a fresh model
    from the same seed."""
    import resource

    import torch

    from .data.cache import open_cache
    from .data.images import PairDataset
    from .device import autocast_dtype
    from .model import MiniCLIP
    from .train import (
        Collate,
        batch_to_device,
        device_crops,
        global_batch_backward,
        parameter_groups,
        pick_workers,
    )

    tc = config.train
    # As `miniclip train` reads them: from the decoded-image cache (built here if missing, before timing).
    cache = open_cache([item.image for item in items], config.model.image_size)[0] if tc.cache else None
    dataset = PairDataset(items, config.model.image_size, config.data.mean, config.data.std, tc.crop_scale,
                          tc.captions, tc.seed, cache=cache, positives=tc.positives,
                          device_crops=device_crops(config, device, cache is not None))
    needed = (steps + warmup) * tc.batch_size
    if len(dataset) < needed:
        raise ConfigError(f"{len(dataset)} training pairs, but {steps + warmup} steps of batch {tc.batch_size} "
                            f"need {needed}; lower --batch-size or --steps, or use more data")
    loader = torch.utils.data.DataLoader(dataset, batch_size=tc.batch_size, shuffle=False,
                                         num_workers=pick_workers(config, device),
                                         collate_fn=list)  # raw samples: each way tokenises them itself
    start = time.perf_counter()
    raw = [batch for _, batch in zip(range(steps + warmup), loader)]
    data_seconds = time.perf_counter() - start
    context = config.model.context_length
    collate = Collate(tokenizer, context)

    def batches(pad_to: str):
        out = []
        for batch in raw:
            images, ids, lengths, _, _ = collate(batch)
            if pad_to == "max":
                full = torch.full((len(ids), context), tokenizer.pad_id, dtype=ids.dtype)
                full[:, : ids.shape[1]] = ids
                ids = full
            out.append(batch_to_device(images, ids, lengths, device, config))
        return out

    def run(pad_to: str, amp, compiled: bool) -> dict:
        torch.manual_seed(tc.seed)
        model = MiniCLIP(config.model).to(device).train()
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(parameter_groups(model, tc.weight_decay), lr=tc.lr)

        def autocast():
            return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

        times = []
        for i, micro_batch in enumerate(batches(pad_to)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            global_batch_backward(net, model, [micro_batch], 1, autocast, tc.positives, tc.loss)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
        median = statistics.median(times[warmup:])
        result = {"pairs_per_s": tc.batch_size / median, "step_ms": 1000 * median, "compiled": compiled,
                  "precision": str(amp or torch.float32).replace("torch.", ""), "text_padding": pad_to}
        if compiled:  # the untimed first steps, less what they would have cost at the timed steps' pace
            result["compile_seconds"] = sum(times[:warmup]) - warmup * median
        return result

    # The fast way first, so the process's peak memory after it is the fast way's own.
    fast = run("longest", autocast_dtype(device, tc.precision), tc.compile)
    fast["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plain = run("max", None, False)
    plain["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = {}
    if tc.compile:  # what compiling alone gives: the fast way again, eager
        extra["fast_eager"] = run("longest", autocast_dtype(device, tc.precision), False)
        extra["compile_speedup"] = fast["pairs_per_s"] / extra["fast_eager"]["pairs_per_s"]
    return {**extra, "batch_size": tc.batch_size, "steps": steps, "device": str(device), "plain": plain, "fast": fast,
            "speedup": fast["pairs_per_s"] / plain["pairs_per_s"],
            "data_pairs_per_s": len(raw) * tc.batch_size / data_seconds, "data_source": "cache" if cache else "files",
            "mean_caption_tokens": float(torch.cat([collate(b)[2] for b in raw]).float().mean())}
