"""The training loop. It reports through a Callbacks object and never prints.

What a step optimises is a list of pieces (objectives.py), how batches are made is data/feeding.py, the
optimiser is optim.py: the loop below asks none of them which recipe is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed, features, objectives
from .config import RunConfig
from .data.feeding import Collate, TrainingData, batch_to_device, pick_workers
from .data.layouts import ImageCaptions
from .data.shards import ShardSet
from .device import autocast_dtype
from .errors import ConfigError, DivergedError
from .evaluate import evaluate_retrieval
from .loss import gather_features
from .model import FrozenTower, MiniCLIP
from .optim import MovingAverage, learning_rate, make_optimizer
from .runtime import TorchEncoder
from .tokenizer import Tokenizer


class Callbacks:
    """Hooks the loop calls; the CLI's Rich progress bar overrides them. All default to doing nothing."""

    def on_start(self, total_steps: int, start_step: int, steps_per_epoch: int, info: dict) -> None: ...
    def on_step(self, step: int, epoch: int, loss: float, pairs_per_s: float, lr: float,
                terms: dict | None = None) -> None:
        """`loss` is the sum of `terms`, each objective's weighted loss by name."""

    def on_validate(self, epoch: int) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def on_cache_progress(self, done: int, total: int) -> None:
        """Building the decoded-image cache: `done` of `total` images."""

    def on_replaced_sample(self, message: str, total: int) -> None:
        """A training image failed to load and another sample took its place; `total` so far in this run."""

    def on_notice(self, message: str) -> None:
        """Something the user should know that does not stop training (a damaged image cache rebuilt, say)."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM (`signal`) during training; a resumable checkpoint was saved at `step`."""

    def __init__(self, run: Path, step: int, signal: int = 2):
        super().__init__(f"interrupted at step {step}")
        self.run, self.step, self.signal = run, step, signal


def text_groups(device: torch.device) -> int:
    """How many groups of alike length a training batch's captions are encoded in (MiniCLIP.encode_text): on a CPU
    the text tower's time follows its tokens: 4 groups made a step's forward and backward over 256 Flickr captions
    1.67x faster (scripts/bench_text.py); other devices, unmeasured, encode the batch whole."""
    return 4 if device.type == "cpu" else 1


class Trainee(nn.Module):
    """The model and the objectives' own modules (a head, say) in one module, so that DDP and torch.compile
    see one forward: the features of every view and caption, the logit scale and bias, and each objective's
    loss on this micro-batch."""

    def __init__(self, model: MiniCLIP, pieces: list[objectives.Objective], text_groups: int = 1):
        super().__init__()
        self.model, self.objectives = model, nn.ModuleList(pieces)
        self.text_groups = text_groups  # MiniCLIP.encode_text's groups of captions

    def forward(self, images, ids, lengths, prepared: list) -> tuple:
        b = len(lengths)
        views = self.model.encode_image(images)  # (v b) d: the captions' crops, then any objective's views
        outputs = {"image": views[:b], "text": self.model.encode_text(ids, lengths, self.text_groups), "views": views}
        terms = {o.name: o(outputs, extra) for o, extra in zip(self.objectives, prepared)}
        return outputs["image"], outputs["text"], self.model.scale(), self.model.logit_bias, terms


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; `factor` times the incoming gradient in the backward pass. Exact: the added
    term is zero in value."""
    return x + (x - x.detach()) * (factor - 1)


def global_batch_backward(net: nn.Module, trainee: Trainee, contrastive: objectives.Contrastive,
                          micro_batches: list[tuple], world_size: int, autocast) -> dict[str, float]:
    """Forward and backward for one optimizer step over this process's K micro-batches (images, ids, lengths,
    prepared), with every micro-batch of every process as negatives; leaves the gradients of one loss over the
    global batch (W processes x K x b pairs) in the parameters' .grad and returns each objective's weighted
    loss by name. `net` is `trainee` or its DistributedDataParallel.

    K = 1: one forward with gradients. K > 1 (open_clip's accum-freq): a pass without gradients caches every
    micro-batch's features; then each micro-batch is encoded again with gradients, put in place of its cached
    copy, and the loss over the whole set is back-propagated. Memory is that of one micro-batch plus the K b x d
    cached features; compute is about 4/3 of plain accumulation (one more forward per micro-batch).

    Why the gradients are exactly those of one process at batch W K b:
      features: each backward reaches the encoders only through the one micro-batch encoded with gradients,
        so summing the K backward passes and the W processes gives the full gradient. DDP averages over the
        processes instead of summing, so each process scales its features' gradient by W first.
      logit scale (and the sigmoid loss's bias): it enters each loss directly and gets its full gradient from
        every backward, so only the last micro-batch keeps its gradient (the last, because DDP synchronises
        there and needs a gradient for every parameter); DDP's average of W equal gradients is that gradient.
      the other objectives: each is local to its micro-batch; each adds 1/K of its own, unscaled, and DDP's
        average over processes makes the whole the mean over all micro-batches.
    """
    model, k = trainee.model, len(micro_batches)
    cached: list[tuple[torch.Tensor, torch.Tensor]] = []
    if k > 1:
        with torch.no_grad(), autocast():
            for images, ids, lengths, _ in micro_batches:
                cached.append((model.encode_image(images[: len(lengths)]).float(),
                               model.encode_text(ids, lengths, trainee.text_groups).float()))
    totals: dict[str, float] = {}
    for j, (images, ids, lengths, prepared) in enumerate(micro_batches):
        last = j == k - 1
        # DDP all-reduces gradients in every backward unless told not to; once, at the last, is enough.
        with net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext():
            with autocast():
                image_features, text_features, scale, bias, local = net(images, ids, lengths, prepared)
            if not last:
                scale, bias = scale.detach(), bias if bias is None else bias.detach()
            all_images, all_texts = [c[0] for c in cached] or [None], [c[1] for c in cached] or [None]
            all_images[j] = scale_gradient(image_features.float(), world_size)
            all_texts[j] = scale_gradient(text_features.float(), world_size)
            # (K b) d each, then (W K b) d. The loss runs in fp32 outside autocast: the logits are cheap, and
            # bf16 would round them.
            features = gather_features(torch.cat(all_images), torch.cat(all_texts))
            terms = {contrastive.name: contrastive(*features, scale, bias)}
            for objective in trainee.objectives:
                terms[objective.name] = objective.weight * local[objective.name].float() / k
            sum(terms.values()).backward()
        for name, value in terms.items():  # the contrastive loss is the global batch's in every micro-batch
            totals[name] = value.item() if name == contrastive.name else totals.get(name, 0.0) + value.item()
    return totals


def check_world_size(counters: dict, world_size: int, run: Path) -> None:
    """A run resumes with the processes it was trained by: the data each rank sees depends on their number."""
    trained = int(counters.get("world_size", 1))
    if trained != world_size:
        raise ConfigError(f"{run}: was trained by {trained} process(es), this is {world_size}; resume it with "
                          f"{trained} (torchrun --nnodes x --nproc_per_node = {trained}, or miniclip train --nproc "
                          f"{trained}), or start a new run")


def fit(config: RunConfig, tokenizer: Tokenizer, train_items: list[ImageCaptions] | ShardSet,
        val_items: list[ImageCaptions], run: Path, device: torch.device, resume: bool = False,
        save_every: int | None = None, callbacks: Callbacks | None = None) -> list[dict]:
    """Train and save to `run`; returns the per-epoch history. `train_items` is a list of images or a ShardSet.

    `resume` continues the run in `run` where its resume file left it, or from step 0 when it was stopped
    before its first checkpoint. The end of an epoch (validation, then the weights, the history and the resume
    file) is one step: interrupted, it is done again on resume.

    In a process group (torchrun, see distributed.py) every process calls this with the same arguments: each
    trains on its share of the data with the loss over the global batch, and only rank 0 validates, writes
    the run folder and reports through `callbacks` (the others' callbacks are not called)."""
    world = distributed.current()
    callbacks = (callbacks or Callbacks()) if world.is_main else Callbacks()
    tc = config.train
    torch.manual_seed(tc.seed)
    model = MiniCLIP(config.model).to(device)
    if tc.teacher_tokens:
        from .teacher import CaptionTeacher

        CaptionTeacher().start_tokens(model.text.token_embed, tokenizer.texts())
    if isinstance(model.visual, FrozenTower):
        model.visual.tune(tc.tower_tuned)
    contrastive, pieces = objectives.build(config)
    workers = pick_workers(config, device)
    runtime = config.runtime
    val_items = val_items[: runtime.val_images]
    cached, val_cache = None, None  # a frozen tower's features (features.py), computed once per run
    started = time.perf_counter()  # a teacher's or a pretrained tower's pass over the images
    for piece in pieces:
        piece.setup(model, train_items, device, workers, callbacks.on_cache_progress, runtime.cache)
    if isinstance(model.visual, FrozenTower):
        if isinstance(train_items, ShardSet):
            raise ConfigError(f"model.vision={config.model.vision} caches the frozen tower's features of every image; "
                              "train it on an image dataset (a captions file), not on shards")
        cached, val_cache = features.prepare(config, model, train_items, val_items, device, workers,
                                             callbacks.on_cache_progress)
    tower_seconds = time.perf_counter() - started
    trainee = Trainee(model, pieces, text_groups(device)).to(device)
    optimizer = make_optimizer([model, trainee.objectives], tc)
    collate = Collate(tokenizer, config.model.context_length, tuple(o.prepare for o in pieces))
    # Objectives' views after the captions' crop, and the transforms they want on them, in batch order.
    extra_views = objectives.crop_scales(config, pieces)[1:]
    data = TrainingData(config, train_items, world, collate, workers, device, extra_views, callbacks.on_cache_progress,
                        callbacks.on_notice, dataset=cached)
    steps_per_epoch = data.steps_per_epoch
    total_steps = tc.epochs * steps_per_epoch
    warmup = max(1, int(tc.warmup_fraction * total_steps))
    amp_dtype = autocast_dtype(device, runtime.precision)
    stop_at = min(total_steps, runtime.max_steps) if runtime.max_steps else total_steps
    trained_on = {"data": data_fingerprint(train_items), "config": recipe(config)}

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    step, history, best = 0, [], -1.0
    losses: list[dict] = []  # each step's terms since the last epoch record; saved with the resume file
    replaced = 0
    # The moving average of the weights (TrainConfig.ema) is what validation sees and best/last hold.
    average = MovingAverage(model, tc.ema) if tc.ema else None
    if resume and (run / checkpoint.RESUME).is_file():
        counters = checkpoint.load_resume(run, model, optimizer, average.model if average else None,
                                          trainee.objectives)
        check_world_size(counters, world.world_size, run)
        check_unchanged(counters, trained_on, run)
        step, best = counters["step"], counters["best_mean_recall"]
        # resume files from before the losses were kept by name hold the step's total
        losses = [t if isinstance(t, dict) else {"contrastive": t} for t in counters.get("epoch_losses", [])]
        # History is written before the resume file, so it may hold a record past the resumable step.
        history = [r for r in checkpoint.read_history(run) if r["step"] <= step]
        if history and history[-1]["step"] == step:
            losses = []  # stopped between the epoch's record and its resume file: those losses are recorded
        model.to(device)
    elif not resume and world.is_main:
        checkpoint.save_run_files(run, config, tokenizer)
    tokenizer_hash = checkpoint.tokenizer_sha256(run) if world.is_main else None  # only rank 0 writes weights

    def epoch_pending() -> bool:
        """Whether `step` ends an epoch (or the run) whose record is not written yet."""
        ends = step % steps_per_epoch == 0 or step == stop_at
        return step > 0 and ends and (not history or history[-1]["step"] < step)

    if step >= stop_at and not epoch_pending():
        limit = (f"its limit of {runtime.max_steps} steps (--max-steps)" if stop_at < total_steps
                 else f"its {tc.epochs} epochs")
        raise ConfigError(f"{run}: the run has reached {limit}; to train it further, resume with a higher "
                          "--max-steps or --epochs")
    net = trainee
    if world.world_size > 1:
        net = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    if runtime.compile:
        # The forward with gradients only (DDP wrapped first, as PyTorch's DDP notes ask); captions padded to
        # each batch's longest give a few sequence lengths, which dynamic shapes absorb after one recompile.
        net = torch.compile(net)

    def save_resume():
        if world.is_main:
            checkpoint.save_resume(run, model, optimizer, {
                "step": step, "best_mean_recall": best, "epoch_losses": losses, "world_size": world.world_size,
                **trained_on}, average.model if average else None, trainee.objectives)

    def end_epoch(seconds: float, replaced_this_epoch: int) -> None:
        """Validate, then write last/best, the history and the resume file: one step, done again on resume
        if a stop cuts it short, so no epoch is ever missing from the history or from the choice of best."""
        nonlocal best, losses
        epoch, into = divmod(step, steps_per_epoch)
        names = sorted({name for terms in losses for name in terms})
        means = {f"train_{name}": sum(t.get(name, 0.0) for t in losses) / max(len(losses), 1) for name in names}
        record = {"epoch": epoch if not into else round(epoch + into / steps_per_epoch, 3),
                  "step": step, "train_loss": sum(means.values()), **means,
                  "lr": optimizer.param_groups[0]["lr"], "temperature": 1.0 / model.scale().item(),
                  "train_seconds": round(seconds, 2)}
        if replaced_this_epoch:
            record["replaced_samples"] = replaced_this_epoch
        if world.is_main:
            kept = average.model if average else model
            if val_items:
                callbacks.on_validate(math.ceil(step / steps_per_epoch))
                kept.eval()
                encoder = (features.FeatureEncoder(kept, tokenizer, config.data.mean, config.data.std, device,
                                                   runtime.precision, *val_cache) if val_cache
                           else TorchEncoder(kept, tokenizer, config.data.mean, config.data.std, device,
                                             runtime.precision))
                metrics = evaluate_retrieval(encoder, val_items)
                record.update({f"val_{k}": v for k, v in metrics.items() if k not in ("images", "captions")})
            checkpoint.save_weights(run / checkpoint.LAST, kept, tokenizer_hash)
            score = record.get("val_mean_recall", 0.0)
            if score > best or not val_items:
                checkpoint.save_weights(run / checkpoint.BEST, kept, tokenizer_hash)
                best = score  # only once saved: a stop in between redoes this epoch's end and saves it then
                callbacks.on_checkpoint(run / checkpoint.BEST)
            checkpoint.write_history(run, [*history, record])
        history.append(record)
        losses = []
        save_resume()
        if world.is_main:
            callbacks.on_epoch_end(record)
        distributed.barrier()  # the others wait while rank 0 validates and saves

    try:
        callbacks.on_start(stop_at, step, steps_per_epoch,
                           {"train_pairs": len(data.dataset), "val_images": len(val_items), "workers": workers,
                            "precision": str(amp_dtype or torch.float32).replace("torch.", ""), "device": str(device),
                            "cache_seconds": data.cache_seconds, "cache": data.cache,
                            "tower_seconds": tower_seconds if tower_seconds > 1 else None, "tower_kept": runtime.cache,
                            "processes": world.world_size, "accum_steps": tc.accum_steps,
                            "batch_size": tc.batch_size, "global_batch": data.global_batch})
        seconds, replaced_this_epoch = 0.0, 0
        while True:
            if epoch_pending():
                end_epoch(seconds, replaced_this_epoch)
            if step >= stop_at:
                break
            epoch, done = divmod(step, steps_per_epoch)
            batches = data.batches(epoch, done)
            model.train()
            tick, replaced_this_epoch = time.perf_counter(), 0
            epoch_start = tick
            for _ in range(done, steps_per_epoch):
                micro_batches = []
                # seeded by step and rank, so a resumed run transforms the views as the interrupted one would have
                draws = torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * world.world_size + world.rank)
                for images, ids, lengths, failures, prepared in [next(batches) for _ in range(tc.accum_steps)]:
                    for message in failures:
                        replaced += 1
                        replaced_this_epoch += 1
                        callbacks.on_replaced_sample(message, replaced)
                    images, ids, lengths = batch_to_device(images, ids, lengths, device, config)
                    micro_batches.append((transform_views(images, len(lengths), pieces, config, draws), ids, lengths,
                                          [p.to(device) if torch.is_tensor(p) else p for p in prepared]))
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, tc.lr, warmup)
                optimizer.zero_grad(set_to_none=True)
                terms = global_batch_backward(net, trainee, contrastive, micro_batches, world.world_size, autocast)
                loss = sum(terms.values())
                if not math.isfinite(loss):
                    # Before optimizer.step: the weights and every checkpoint stay as they were.
                    raise DivergedError(f"{run}: the training loss became {loss} at step {step + 1} (epoch "
                                        f"{epoch + 1}); the run's checkpoints from before it are unchanged. Train "
                                        f"again with a lower learning rate, e.g. --lr {tc.lr / 2:g}")
                losses.append(terms)
                optimizer.step()
                if average:
                    average.update(model, step)
                step += 1
                now = time.perf_counter()
                pairs = world.world_size * sum(len(b[2]) for b in micro_batches)
                callbacks.on_step(step, epoch, loss, pairs / max(now - tick, 1e-9), optimizer.param_groups[0]["lr"],
                                  terms)
                tick = now
                if save_every and step % save_every == 0:
                    save_resume()
                if step >= stop_at:
                    break
            del batches  # stops this epoch's loader processes (a shard stream never ends by itself)
            seconds = time.perf_counter() - epoch_start
    except KeyboardInterrupt as stop:
        save_resume()
        raise TrainingInterrupted(run, step, getattr(stop, "signal", signal.SIGINT)) from None
    return history


def transform_views(images: torch.Tensor, b: int, pieces: list, config: RunConfig,
                    generator: torch.Generator) -> torch.Tensor:
    """Each objective's transform on its own views of a (v b) c s s batch; the captions' crops stay as cut."""
    for piece in pieces:
        for v in range(piece.first_view, piece.first_view + len(piece.views)):
            images[v * b: (v + 1) * b] = piece.transform(images[v * b: (v + 1) * b], config.data.mean,
                                                          config.data.std, generator)
    return images


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Docker, Slurm and systemd send) during training: stopped as Ctrl-C is."""

    signal = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While training, SIGTERM raises Terminated where the loop is, so it saves a resumable checkpoint as
    Ctrl-C does; the previous handler is put back after. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Beside the runtime section: the settings a resume may change (a new limit) or that evaluation alone reads.
RESUMABLE = {"train": {"epochs"}, "data": {"zero_shot", "templates"}}


def recipe(config: RunConfig) -> dict:
    """The settings a resumed run must share with the run it continues, as JSON values."""
    raw = json.loads(config.to_json())
    return {section: {k: v for k, v in values.items() if k not in RESUMABLE.get(section, ())}
            for section, values in raw.items() if section != "runtime"}


def data_fingerprint(train_items: list[ImageCaptions] | ShardSet) -> dict:
    """What a run trains on, cheaply: every image path with its captions (or every shard with its counts)."""
    digest = hashlib.sha256()
    if isinstance(train_items, ShardSet):
        for shard in train_items.shards:
            digest.update(f"{shard.path}\0{shard.samples}\0{shard.captions}\n".encode("utf-8", "replace"))
        return {"sha256": digest.hexdigest(), "images": train_items.size("one")}
    for item in train_items:
        digest.update("\0".join((str(item.image), *item.captions, "\n")).encode("utf-8", "replace"))
    return {"sha256": digest.hexdigest(), "images": len(train_items)}


def check_unchanged(counters: dict, trained_on: dict, run: Path) -> None:
    """A resume continues the run that was started: refuse one whose data or config.json changed since (the
    step counter would mean other batches). Resume files from before this was recorded are not checked."""
    data = counters.get("data")
    if data and data != trained_on["data"]:
        raise ConfigError(f"{run}: the training data changed since this run started ({data['images']} images "
                          f"then, {trained_on['data']['images']} now, or their files or captions); resume with the "
                          "data it was trained on, or start a new run with another --out")
    before = counters.get("config")
    if before:
        now = trained_on["config"]
        # a setting added since the run started (model.vision, say) was then at its default
        before = {section: {**recipe(RunConfig())[section], **before.get(section, {})} for section in now}
        changed = [f"{section}.{key} {before[section].get(key)!r} -> {now[section].get(key)!r}"
                   for section in now for key in sorted(set(now[section]) | set(before.get(section, {})))
                   if before.get(section, {}).get(key) != now[section].get(key)]
        if changed:
            raise ConfigError(f"{run}/config.json changed since this run started ({'; '.join(changed[:3])}); put "
                              "it back, or start a new run with another --out")
