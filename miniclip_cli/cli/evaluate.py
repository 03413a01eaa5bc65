"""`miniclip eval`: retrieval recall on a caption dataset and zero-shot accuracy on an image folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..config import DataConfig, load_run_config
from ..data import shapes
from ..data.image_folder import ImageFolder
from ..errors import ConfigError, DataError
from ..evaluate import evaluate_retrieval, evaluate_zero_shot
from ..runtime import is_export, open_encoder
from ..ui import tables
from ..ui.console import out
from ..ui.progress import CountProgress
from . import command
from .common import (
    AllowOutside,
    Backend,
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


def held_out_classes(folder: ImageFolder) -> set[str] | None:
    """The classes the folder's held_out.json says were kept out of training (as the built-in data does), or
    None without one. Read before any image is encoded, so that a bad file fails at once."""
    listing = folder.root / "held_out.json"
    if not listing.is_file():
        return None
    try:
        held = json.loads(listing.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's recursion limit
        held = None
    if not isinstance(held, list) or not all(isinstance(name, str) for name in held):
        raise DataError(f'{listing}: must hold a JSON list of class names, e.g. ["red circle", "blue square"]; '
                        "fix it, or remove it to skip the held-out summary")
    return set(held)


def held_out_summary(folder: ImageFolder, held: set[str] | None, metrics: dict) -> dict:
    """The held-out classes' accuracy next to chance and to the classes seen in training."""
    if held is None:
        return {}
    per_class = metrics["per_class"]
    held_scores = [v for k, v in per_class.items() if k in held]
    seen_scores = [v for k, v in per_class.items() if k not in held]
    return {"held_out_classes": sorted(held), "held_out_top1": sum(held_scores) / max(len(held_scores), 1),
            "seen_top1": sum(seen_scores) / max(len(seen_scores), 1), "chance": 100.0 / len(folder.class_names)}


@command("eval")
def eval_command(
    run: Path = typer.Argument(..., help="A run folder written by `miniclip train`, or an exported RUN/onnx folder."),
    data: Optional[str] = typer.Option(None, "--data", help="Caption dataset for retrieval. Default: the run's own dataset."),
    split: Split = "test",
    zero_shot: ZeroShot = None,
    templates: Templates = None,
    which: Checkpoint = "best",
    backend: Backend = "auto",
    device: Device = "auto",
    precision: str = typer.Option("auto", "--precision", help="PyTorch backend: auto, fp32 or bf16."),
    allow_outside_paths: AllowOutside = False,
    json_out: JsonFlag = False,
):
    """Evaluate a trained run: image<->text retrieval recall@1/5/10 and zero-shot classification.

    With neither --data nor --zero-shot it evaluates the run's own dataset (test split) and, when the run
    has one, its zero-shot folder.

    Examples:

        miniclip eval artifacts/runs/f30k --data ~/datasets/flickr30k --split test

        miniclip eval artifacts/runs/f30k --zero-shot ~/datasets/cifar10/test --template "a photo of a {}."
    """
    for template in templates or []:
        if "{}" not in template:
            raise ConfigError(f"--template {template!r} has no {{}} where the class name goes; e.g. 'a photo of a {{}}.'")
    encoder = open_encoder(run, backend, which, device, precision)
    config = None if is_export(run) else load_run_config(run)
    if config is None and data is None and zero_shot is None:
        raise ConfigError(f"{run}: an exported model has no dataset of its own to evaluate on; pass --data DATASET "
                          "or --zero-shot FOLDER")
    if data is None and zero_shot is None:
        data_path, zero_shot_path = run_dataset(config), config.data.zero_shot
        if data_path is None and zero_shot_path is None:
            zero_shot_path = shapes.generate(shapes.default_root()) / "zero_shot"
        do_retrieval = True
    else:
        data_path, zero_shot_path, do_retrieval = data, zero_shot, data is not None
    result: dict = {"run": str(run), "checkpoint": which, "backend": encoder.backend}

    if do_retrieval:
        caption_set = open_dataset(data_path, allow_outside=allow_outside_paths, quiet=json_out)
        items = split_items(caption_set, split)
        with CountProgress(f"encoding {split} images") as progress:
            metrics = evaluate_retrieval(encoder, items, progress=progress)
        result.update(data=str(caption_set.caption_file), split=split, **metrics)
        if not json_out:
            out.print(tables.retrieval_table(metrics, f"retrieval on {caption_set.caption_file.parent.name} ({split})"))

    if zero_shot_path is not None:
        folder = scan_folder(zero_shot_path)
        held = held_out_classes(folder)
        run_templates = config.data.templates if config else encoder.templates
        prompts = list(templates or run_templates or DataConfig.templates)
        with CountProgress("encoding zero-shot images") as progress:
            metrics = evaluate_zero_shot(encoder, folder, prompts, progress=progress)
        metrics.update(held_out_summary(folder, held, metrics))
        metrics["zero_shot_images"] = metrics.pop("images")
        result.update(zero_shot=str(folder.root), **metrics)
        if not json_out:
            out.print(tables.zero_shot_table(metrics, f"zero-shot on {folder.root.name}"))
            out.print(tables.zero_shot_summary(metrics))
            # soft_wrap: Rich would break a template at its spaces; a terminal wraps the line whole
            out.print(tables.templates_line(prompts), soft_wrap=True, markup=False)
    if json_out:
        print_json(result)
