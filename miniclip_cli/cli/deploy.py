"""`miniclip quantize` (ONNX export + int8) and `miniclip bench` (size, latency and accuracy side by side)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from ..config import RunConfig, RuntimeConfig, load_run_config
from ..errors import ConfigError, DataError, ThresholdError
from ..evaluate import evaluate_retrieval, evaluate_zero_shot
from ..run_files import lock_folder
from ..runtime import ONNX_DIR, OnnxEncoder, check_run_folder
from ..ui import charts, tables
from ..ui.console import info, out
from . import command
from .common import (
    Checkpoint,
    Device,
    JsonFlag,
    Split,
    Templates,
    ZeroShot,
    open_dataset,
    print_json,
    run_dataset,
    scan_folder,
    split_items,
)

CHECK_IMAGES, CHECK_CAPTIONS = 32, 64


def _check_inputs(run: Path, data: str | None, zero_shot: Path | None, quiet: bool) -> tuple[list[Path], list[str]]:
    """Real images and captions to compare the exported graphs on: from --data or --zero-shot, else the
    run's own dataset."""
    config = load_run_config(run)
    if data is None and zero_shot is not None:
        folder = scan_folder(zero_shot)
        step = max(1, len(folder.paths) // CHECK_IMAGES)
        return folder.paths[::step][:CHECK_IMAGES], [t.format(n) for n in folder.class_names for t in config.data.templates]
    try:
        source = data if data is not None else run_dataset(config)
        caption_set = open_dataset(source, allow_outside=config.data.allow_outside_paths, quiet=quiet)
        items = split_items(caption_set, "val" if caption_set.has_splits else "all")
    except DataError as exc:
        raise DataError(f"cannot read the run's dataset to check the export on ({exc}); pass --data or --zero-shot") from None
    items = items[:CHECK_IMAGES]
    return [item.image for item in items], [c for item in items for c in item.captions][:CHECK_CAPTIONS]


def accuracy_data(data: str | None, split: str, zero_shot: Path | None):
    """What accuracy is measured on, opened and checked once for every backend that is compared."""
    items = split_items(open_dataset(data, quiet=True), split) if data is not None else None
    return items, scan_folder(zero_shot) if zero_shot is not None else None


def accuracy(encoder, items, folder, templates: list[str]) -> dict:
    """Retrieval metrics on the caption set's `items` and/or zero-shot metrics on the image `folder`."""
    metrics = {}
    if items is not None:
        retrieval = evaluate_retrieval(encoder, items)
        metrics.update({k: v for k, v in retrieval.items() if "R@" in k or k == "mean_recall"})
    if folder is not None:
        zs = evaluate_zero_shot(encoder, folder, templates)
        metrics.update(top1=zs["top1"], top5=zs["top5"])
    return metrics


@command("quantize")
def quantize_command(
    run: Path = typer.Argument(..., help="A run folder written by `miniclip train`."),
    data: Optional[str] = typer.Option(None, "--data", help="Caption dataset: check on its images and report int8's retrieval change."),
    split: Split = "test",
    zero_shot: ZeroShot = None,
    templates: Templates = None,
    which: Checkpoint = "best",
    json_out: JsonFlag = False,
):
    """Export a run to ONNX (fp32) and quantise it to int8, checking both against PyTorch.

    Writes RUN/onnx/: image and text encoders in fp32 and int8, tokenizer.json and metadata.json, a
    complete model for `--backend onnx`, which needs no PyTorch. Nothing is replaced if a check fails.

    Examples:

        miniclip quantize artifacts/runs/f30k

        miniclip quantize artifacts/runs/f30k --data ~/datasets/flickr30k --split test
    """
    from ..export import export_run

    check_run_folder(run)
    images, captions = _check_inputs(run, data, zero_shot, json_out)
    if not json_out:
        info(f"exporting {run} and checking on {len(images)} images and {len(captions)} captions ...")
    with lock_folder(run, "quantize"):
        report = export_run(run, images, captions, which)
    if data is not None or zero_shot is not None:
        prompts = list(templates or load_run_config(run).data.templates)
        folder = run / ONNX_DIR
        items, images = accuracy_data(data, split, zero_shot)
        report["accuracy"] = {name: accuracy(OnnxEncoder(folder, name), items, images, prompts)
                              for name in ("fp32", "int8")}
        report["accuracy"]["int8_minus_fp32"] = {k: report["accuracy"]["int8"][k] - v
                                                 for k, v in report["accuracy"]["fp32"].items()}
    if json_out:
        print_json(report)
        return
    out.print(tables.export_table(report))
    if report.get("accuracy"):
        out.print(tables.accuracy_change_table(report["accuracy"]))
    out.print(f"wrote {report['folder']}. Try: miniclip classify IMAGE -c 'a dog' -c 'a cat' --model {run} --backend onnx")


def _parse_floors(specs: list[str]) -> dict[str, float]:
    floors = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            floors[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--min-metric {spec!r}: expected NAME=VALUE, e.g. top1=30 or image_to_text_R@5=20") from None
        if not math.isfinite(floors[name.strip()]):  # every comparison with NaN is false: the floor would pass all
            raise ConfigError(f"--min-metric {spec!r}: the floor must be a finite number, e.g. top1=30")
    return floors


@command("bench")
def bench_command(
    run: Path = typer.Argument(..., help="A run folder (run `miniclip quantize` first for the ONNX rows)."),
    data: Optional[str] = typer.Option(None, "--data", help="Caption dataset: retrieval accuracy per row."),
    split: Split = "test",
    zero_shot: ZeroShot = None,
    templates: Templates = None,
    image: Optional[Path] = typer.Option(None, "--image", help="Image for the latency runs; default: one from --data/--zero-shot/the run's data."),
    repeats: int = typer.Option(30, "--repeats", help="Timed runs per measurement (after warm-up); medians reported."),
    which: Checkpoint = "best",
    min_metric: Optional[List[str]] = typer.Option(None, "--min-metric", help="NAME=VALUE: exit non-zero if any row's metric is below it."),
    json_out: JsonFlag = False,
):
    """Benchmark PyTorch fp32, ONNX fp32 and ONNX int8 side by side: size, latency, throughput, accuracy.

    Latencies are medians over warm runs (with their p10-p90 spread) on preprocessed pixels and raw caption text; the
    demo workload is 1 image + 3 captions. The CPU, its vector extensions and thread count are recorded.

    Examples:

        miniclip bench artifacts/runs/f30k --data ~/datasets/flickr30k --split test

        miniclip bench artifacts/runs/f30k --zero-shot ~/datasets/cifar10/test --min-metric top1=25 --json
    """
    from ..bench import bench_rows, cpu_info

    check_run_folder(run)
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    floors = _parse_floors(min_metric or [])
    if image is None:
        image = _check_inputs(run, data, zero_shot, quiet=True)[0][0]
    prompts = list(templates or load_run_config(run).data.templates)
    measure_accuracy = None
    if data is not None or zero_shot is not None:
        items, folder = accuracy_data(data, split, zero_shot)

        def measure_accuracy(encoder):
            return accuracy(encoder, items, folder, prompts)
    machine = cpu_info()
    if not json_out:
        info(f"benchmarking on {machine['cpu']} ({', '.join(machine['extensions']) or 'no AVX2'}), "
             f"{machine['threads']} threads ...")
    rows = bench_rows(run, image, which, repeats, measure_accuracy)
    failures = [f"{r['row']} {name} {r['accuracy'][name]:.2f} < {floor}" for r in rows if "accuracy" in r
                for name, floor in floors.items() if name in r["accuracy"] and r["accuracy"][name] < floor]
    unknown = [name for name in floors if not any(name in r.get("accuracy", {}) for r in rows)]
    if json_out:
        print_json({"run": str(run), "machine": machine, "rows": rows})
    else:
        for table in tables.bench_tables(rows, machine):
            out.print(table)
        for line in tables.bench_unavailable(rows):
            out.print(line, style="dim", markup=False, soft_wrap=True)
        ok = [r for r in rows if "error" not in r]
        out.print(charts.value_bars([r["row"] for r in ok], [r["size_mb"] for r in ok], "file size (MB)"))
        out.print(charts.value_bars([r["row"] for r in ok], [r["demo_ms"]["median_ms"] for r in ok],
                                    "1 image + 3 captions (ms, median)"))
    if unknown:
        raise ConfigError(f"--min-metric names {unknown}, which no row measured; pass --data or --zero-shot, "
                          "and use keys such as top1, image_to_text_R@5, mean_recall")
    if failures:
        raise ThresholdError("below --min-metric: " + "; ".join(failures))


@command("bench-train")
def bench_train_command(
    data: Optional[str] = typer.Option(None, "--data", help="Dataset whose training images make the batches. Default: the built-in shapes."),
    batch_size: int = typer.Option(128, "--batch-size", help="Pairs per step."),
    steps: int = typer.Option(5, "--steps", help="Timed steps per way (after 2 untimed)."),
    preset: str = typer.Option("default", "--preset", help="Model and recipe: default, shapes or tiny."),
    precision: str = typer.Option("auto", "--precision", help="The fast way's precision: auto, fp32 or bf16."),
    vocab_size: int = typer.Option(10_000, "--vocab-size", help="Vocabulary of the tokenizer trained for the run."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Read images from the decoded-image cache, as train does."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the fast way, as train --compile does."),
    device: Device = "auto",
    json_out: JsonFlag = False,
):
    """Benchmark a training step two ways on the same real batches: plain (fp32, captions padded to the full
    context) and fast (bf16 autocast where it is fast, captions padded to the batch's longest), with the
    ratio, the data path's own pairs/s, and peak memory.

    Examples:

        miniclip bench-train --data ~/datasets/flickr8k --batch-size 128

        miniclip bench-train --batch-size 256 --json
    """
    from ..bench import bench_training
    from ..config import preset_configs
    from ..device import pick_device
    from ..tokenizer import train_tokenizer

    model_config, train_config = preset_configs(preset)
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    items = split_items(open_dataset(data, quiet=json_out), "train")
    tokenizer = train_tokenizer((c for item in items for c in item.captions), vocab_size)
    model_config.vocab_size = tokenizer.vocab_size
    train_config.batch_size = batch_size
    config = RunConfig(model=model_config, train=train_config,
                       runtime=RuntimeConfig(precision=precision, cache=cache, compile=compile_model))
    config.validate()
    torch_device = pick_device(device)
    if not json_out:
        info(f"timing {steps} training steps of batch {batch_size} two ways on {torch_device} ...")
    result = bench_training(items, tokenizer, config, torch_device, steps)
    if json_out:
        print_json(result)
        return
    out.print(tables.train_bench_table(result))
