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
    """Training throughput of one config two ways on the same real batches, in one process, through the very
    step `miniclip train` runs (train.Trainee with the run's objectives, optim.make_optimizer,
    train.global_batch_backward):

    plain: fp32, eager, every caption padded to the full context;
    fast:  the config's precision (bf16 autocast where it is fast) and captions padded to the batch's
           longest, as `miniclip train` runs; torch.compile when the config asks for it (and then also
           fast_eager, the same without compiling).
    Each way trains its own model from the same seed. After `warmup` untimed steps each, the ways take turns
    step by step, so that load from other processes on the machine hits them alike; step times are the
    medians of the `steps` timed steps of each. Also the data path's own rate (reading the image cache or
    decoding the files, cropping; pairs/s) and the peak resident memory (the fast way's after its warm-up,
    before the others run, and the process's at the end)."""
    import resource

    import torch

    from . import objectives
    from .data.cache import open_cache
    from .data.feeding import Collate, batch_to_device, device_crops, load_batches, pick_workers
    from .data.images import PairDataset
    from .device import autocast_dtype
    from .model import MiniCLIP
    from .optim import make_optimizer
    from .train import Trainee, global_batch_backward, text_groups, transform_views

    tc = config.train
    # As `miniclip train` reads them: from the decoded-image cache (built here if missing, before timing).
    cache = open_cache([item.image for item in items], config.model.image_size)[0] if config.runtime.cache else None
    contrastive, pieces = objectives.build(config)
    for piece in pieces:  # what an objective computes before training, outside the timing
        piece.setup(MiniCLIP(config.model), items, device, pick_workers(config, device), cache=config.runtime.cache)
    dataset = PairDataset(items, config.model.image_size, config.data.mean, config.data.std, tc.crop_scale,
                          tc.captions, tc.seed, cache=cache, device_crops=device_crops(config, device, cache is not None),
                          extra_views=objectives.crop_scales(config, pieces)[1:])
    needed = (steps + warmup) * tc.batch_size
    if len(dataset) < needed:
        raise ConfigError(f"{len(dataset)} training pairs, but {steps + warmup} steps of batch {tc.batch_size} "
                          f"need {needed}; lower --batch-size or --steps, or use more data")
    start = time.perf_counter()
    # raw samples: each way tokenises them itself
    loader = load_batches(dataset, pick_workers(config, device), batch_size=tc.batch_size, collate_fn=list)
    raw = [batch for _, batch in zip(range(steps + warmup), loader)]
    data_seconds = time.perf_counter() - start
    context = config.model.context_length
    collate = Collate(tokenizer, context, tuple(o.prepare for o in pieces))

    def batches(pad_to: str) -> list[tuple]:
        out = []
        for step, batch in enumerate(raw):
            images, ids, lengths, _, prepared = collate(batch)
            if pad_to == "max":
                full = torch.full((len(ids), context), tokenizer.pad_id, dtype=ids.dtype)
                full[:, : ids.shape[1]] = ids
                ids = full
            images, ids, lengths = batch_to_device(images, ids, lengths, device, config)
            images = transform_views(images, len(lengths), pieces, config, torch.Generator().manual_seed(step))
            out.append((images, ids, lengths, [p.to(device) if torch.is_tensor(p) else p for p in prepared]))
        return out

    class Way:
        """One way of training: its own model, optimiser and batches, stepped one step at a time."""

        def __init__(self, pad_to: str, amp, compiled: bool):
            torch.manual_seed(tc.seed)
            model = MiniCLIP(config.model).to(device)
            groups = text_groups(device) if pad_to == "longest" else 1  # plain: every caption at the full context
            self.trainee = Trainee(model, objectives.build(config)[1], groups).to(device).train()
            self.net = torch.compile(self.trainee) if compiled else self.trainee
            self.optimizer = make_optimizer([model, self.trainee.objectives], tc)
            self.batches, self.amp, self.times = batches(pad_to), amp, []
            self.result = {"compiled": compiled, "precision": str(amp or torch.float32).replace("torch.", ""),
                           "text_padding": pad_to}

        def autocast(self):
            return torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

        def step(self, i: int) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            global_batch_backward(self.net, self.trainee, contrastive, [self.batches[i]], 1, self.autocast)
            self.optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - tick)

        def summary(self) -> dict:
            median = statistics.median(self.times[warmup:])
            result = {**self.result, "pairs_per_s": tc.batch_size / median, "step_ms": 1000 * median}
            if self.result["compiled"]:  # the untimed first steps, less what they would have cost at this pace
                result["compile_seconds"] = sum(self.times[:warmup]) - warmup * median
            return result

    fast_amp = autocast_dtype(device, config.runtime.precision)
    ways = {"fast": Way("longest", fast_amp, config.runtime.compile)}
    for i in range(warmup):  # the fast way warms up alone, so the peak memory after it is its own
        ways["fast"].step(i)
    fast_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ways["plain"] = Way("max", None, False)
    if config.runtime.compile:  # what compiling alone gives: the fast way again, eager
        ways["fast_eager"] = Way("longest", fast_amp, False)
    for i in range(warmup):
        for name, way in ways.items():
            if name != "fast":
                way.step(i)
    for i in range(warmup, warmup + steps):
        for way in ways.values():
            way.step(i)
    results = {name: way.summary() for name, way in ways.items()}
    results["fast"]["peak_rss_mb"] = fast_peak
    results["plain"]["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = {}
    if config.runtime.compile:
        extra["compile_speedup"] = results["fast"]["pairs_per_s"] / results["fast_eager"]["pairs_per_s"]
    return {**results, **extra, "batch_size": tc.batch_size, "steps": steps, "device": str(device),
            "speedup": results["fast"]["pairs_per_s"] / results["plain"]["pairs_per_s"],
            "data_pairs_per_s": len(raw) * tc.batch_size / data_seconds, "data_source": "cache" if cache else "files",
            "interleaved": True,
            "mean_caption_tokens": float(torch.cat([collate(b)[2] for b in raw]).float().mean())}
