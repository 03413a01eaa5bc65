"""The training loop. It reports through a Callbacks object and never prints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .config import RunConfig
from .data.cache import open_cache
from .data.images import DeviceCrops, PairDataset, ShardDataset, distort, perturb
from .data.layouts import ImageCaptions
from .data.shards import ShardSet
from .device import autocast_dtype
from .errors import ConfigError, DivergedError
from .evaluate import evaluate_retrieval
from .loss import clip_loss, distill_loss, gather_features, image_ssl_loss, next_word_loss, siglip_loss
from .model import MiniCLIP
from .runtime import TorchEncoder
from .teacher import CaptionTeacher
from .tokenizer import Tokenizer


class Callbacks:
    """Hooks the loop calls; the CLI's Rich progress bar overrides them. All default to doing nothing."""

    def on_start(self, total_steps: int, start_step: int, steps_per_epoch: int, info: dict) -> None: ...
    def on_step(self, step: int, epoch: int, loss: float, pairs_per_s: float, lr: float) -> None: ...
    def on_validate(self, epoch: int) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def on_cache_progress(self, done: int, total: int) -> None:
        """Building the decoded-image cache: `done` of `total` images."""

    def on_replaced_sample(self, message: str, total: int) -> None:
        """A training image failed to load and another sample took its place; `total` so far in this run."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM (`signal`) during training; a resumable checkpoint was saved at `step`."""

    def __init__(self, run: Path, step: int, signal: int = 2):
        super().__init__(f"interrupted at step {step}")
        self.run, self.step, self.signal = run, step, signal


@dataclass
class Collate:
    """Stacks images and tokenises a batch's captions, padded to the batch's longest caption; passes on the
    messages of the samples PairDataset had to replace or ShardDataset had to skip. With a `teacher`
    (train.distill) the last item is its embeddings of the captions, else None."""

    tokenizer: Tokenizer
    context_length: int
    teacher: Callable[[list[str]], torch.Tensor] | None = None

    def __call__(self, batch):
        images, captions, failures = zip(*batch)
        if isinstance(images[0], tuple):  # cached pixels and crop boxes, cut on the training device
            pixels, boxes = zip(*images)
            images = DeviceCrops(torch.stack(pixels), torch.stack(boxes))
        else:
            images = torch.stack(images)
            if images.ndim == 5:  # b v c s s: each image's views (train.image_ssl)
                images = images.transpose(0, 1).flatten(0, 1)  # 'b v c s s -> (v b) c s s'
        # (b k) captions, image by image, when each sample brings k (TrainConfig.positives)
        captions = [c for sample in captions for c in ((sample,) if isinstance(sample, str) else sample)]
        ids, lengths = self.tokenizer.encode(captions, self.context_length)
        taught = self.teacher(captions) if self.teacher else None
        return images, torch.from_numpy(ids), torch.from_numpy(lengths), [m for f in failures for m in f], taught


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a permutation fixed by (seed, epoch), from position `skip` on: a resumed run
    sees exactly the batches the interrupted one would have.

    The first `length` positions are cut into runs of `batch_size` and run c goes to rank c mod world_size, so
    rank r's k-th batch is run k * world_size + r. One optimizer step of W processes x K micro-batches of b
    then covers positions [step W K b, (step + 1) W K b): the samples one process at batch W K b would take.
    `length` (whole global batches) leaves every rank as many batches; `skip` is a multiple of W b.
    """

    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1, length: int | None = None):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(size, generator=generator)[:length][skip:].tolist()
        self.order = [index for position, index in enumerate(order) if position // batch_size % world_size == rank]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def parameter_groups(model: MiniCLIP, weight_decay: float, *others: torch.nn.Module | None) -> list[dict]:
    """Weight decay on weight matrices and the patch projection only; norms, biases, embeddings,
    positions, the class token and the temperature are left undecayed, as in CLIP. `others`: modules trained
    alongside the model (an ImageSSLHead), after its parameters."""
    decay, no_decay = [], []
    for module in filter(None, (model, *others)):
        for name, p in module.named_parameters():
            undecayed = p.ndim < 2 or "token_embed" in name or "positions" in name
            (no_decay if undecayed else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ImageSSLHead(torch.nn.Module):
    """SLIP's projection MLP (Mu et al. 2022) for train.image_ssl: three layers, 4 x width hidden, from the
    image features to the space where loss.image_ssl_loss compares two views. It is used in training only and
    saved only in resume.safetensors, so the model, its export and inference are unchanged. Unlike SLIP it
    reads the image features the contrastive loss sees rather than the tower's output before its projection,
    so the model's forward stays the one every command uses; LayerNorm stands in for SLIP's BatchNorm for the
    reason conv_stem gives."""

    def __init__(self, width: int):
        super().__init__()
        hidden = 4 * width
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.LayerNorm(hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden), torch.nn.LayerNorm(hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pick_workers(config: RunConfig, device: torch.device) -> int:
    if config.train.workers >= 0:
        return config.train.workers
    # On CPU one loader process overlaps JPEG decoding with compute without starving the model of cores.
    return 1 if device.type == "cpu" else 4


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; `factor` times the incoming gradient in the backward pass. Exact: the added
    term is zero in value."""
    return x + (x - x.detach()) * (factor - 1)


def global_batch_backward(net: torch.nn.Module, model: MiniCLIP, micro_batches: list[tuple], world_size: int,
                          autocast, positives: int = 1, loss: str = "clip", distill: float = 0.0,
                          taught: list[torch.Tensor] | None = None, image_ssl: float = 0.0,
                          head: torch.nn.Module | None = None, caption_lm: float = 0.0) -> float:
    """Forward and backward for one optimizer step over this process's K micro-batches, with every micro-batch
    of every process as negatives; leaves the gradients of one loss over the global batch (W processes x K x b
    pairs) in the parameters' .grad and returns that loss. `net` is `model` or its DistributedDataParallel.
    Each micro-batch holds b images and b x `positives` captions, image by image (see loss.clip_loss); `loss`
    is TrainConfig.loss.

    K = 1: one forward with gradients. K > 1 (open_clip's accum-freq): a pass without gradients caches every
    micro-batch's features; then each micro-batch is encoded again with gradients, put in place of its cached
    copy, and the loss over the whole set is back-propagated. Memory is that of one micro-batch plus the K b x d
    cached features; compute is about 4/3 of plain accumulation (one more forward per micro-batch).

    Why the gradients are exactly those of one process at batch W K b:
      features: each backward reaches the encoders only through the one micro-batch encoded with gradients,
        so summing the K backward passes and the W processes gives the full gradient. DDP averages over the
        processes instead of summing, so each process scales its features' gradient by W first.
      logit scale (and the sigmoid loss's bias): it enters each loss directly and gets its full gradient from every backward, so only the
        last micro-batch keeps its gradient (the last, because DDP synchronises there and needs a gradient
        for every parameter); DDP's average of W equal gradients is that gradient.

    `distill` > 0 adds that weight times loss.distill_loss between each micro-batch's caption features and the
    teacher's embeddings `taught` (one tensor per micro-batch). It is local to a micro-batch: each adds 1/K of
    its own, unscaled, and DDP's average over processes makes the whole the mean over all micro-batches. The
    value returned includes it.

    `image_ssl` > 0: each micro-batch's images are 2b views, every image's training crop and then every
    image's second view, and that weight times loss.image_ssl_loss between the two views' features through
    `head` (an ImageSSLHead, or its DistributedDataParallel) is added, local to a micro-batch as distillation
    is. Only the first views meet the captions.

    `caption_lm` > 0 adds that weight times loss.next_word_loss on each micro-batch's captions, local to it
    in the same way.
    """
    k, extra = len(micro_batches), 0.0
    cached: list[tuple[torch.Tensor, torch.Tensor]] = []
    if k > 1:
        with torch.no_grad(), autocast():
            for images, ids, lengths in micro_batches:
                image_features, text_features, _ = model(images[: len(lengths) // positives], ids, lengths)
                cached.append((image_features.float(), text_features.float()))
    for j, (images, ids, lengths) in enumerate(micro_batches):
        last = j == k - 1
        # DDP all-reduces gradients in every backward unless told not to; once, at the last, is enough.
        sync = contextlib.ExitStack()
        for wrapped in (net, head) if not last else ():
            if isinstance(wrapped, DistributedDataParallel):
                sync.enter_context(wrapped.no_sync())
        with sync:
            with autocast():
                image_features, text_features, scale, *states = net(images, ids, lengths, bool(caption_lm))
                views = head(image_features) if image_ssl else None  # (2 b) e
            image_features = image_features[: len(lengths) // positives]  # the training crops meet the captions
            local_texts = text_features.float()
            bias = model.logit_bias
            if not last:
                scale, bias = scale.detach(), bias if bias is None else bias.detach()
            image_features = scale_gradient(image_features.float(), world_size)
            text_features = scale_gradient(text_features.float(), world_size)
            all_images, all_texts = [c[0] for c in cached] or [None], [c[1] for c in cached] or [None]
            all_images[j], all_texts[j] = image_features, text_features
            # (K b) d each, then (W K b) d. The loss runs in fp32 outside autocast: the logits are cheap, and
            # bf16 would round them.
            features = gather_features(torch.cat(all_images), torch.cat(all_texts))
            value = (siglip_loss(*features, scale, bias, positives) if loss == "siglip"
                     else clip_loss(*features, scale, positives))
            total = value
            if distill:
                taught_loss = distill * distill_loss(local_texts, taught[j]) / k
                total, extra = total + taught_loss, extra + taught_loss.item()
            if image_ssl:
                first, second = views.float().chunk(2)
                views_loss = image_ssl * image_ssl_loss(first, second) / k
                total, extra = total + views_loss, extra + views_loss.item()
            if caption_lm:
                with autocast():
                    words = next_word_loss(states[0], model.text.token_embed.weight, ids, lengths)
                words_loss = caption_lm * words / k
                total, extra = total + words_loss, extra + words_loss.item()
            total.backward()
    return value.item() + extra


def drop_tokens(ids: torch.Tensor, lengths: torch.Tensor, rate: float, generator: torch.Generator,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token dropout (TrainConfig.token_dropout): each token between <start> and <end> is deleted with
    chance `rate` and the rest close up, so the caption "a dog runs on grass" may train as "a dog on grass".
    The text tower then cannot lean on any one word of a caption it has seen before. ids: b n, lengths: b."""
    b, n = ids.shape
    position = torch.arange(n)
    word = (position > 0) & (position < (lengths - 1)[:, None])  # b n: neither <start>, <end> nor padding
    keep = (position < lengths[:, None]) & ~(word & (torch.rand(b, n, generator=generator) < rate))
    rows = torch.arange(b)[:, None].expand(b, n)
    out = torch.full_like(ids, pad_id)
    out[rows[keep], keep.long().cumsum(1)[keep] - 1] = ids[keep]  # each kept token moves to its rank in its row
    return out, keep.sum(1)


def mixgen(images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, m: int, context_length: int,
           pad_id: int, end_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixGen (Hao et al. 2023; TrainConfig.mixgen): pairs 0..m-1 of the batch become new pairs, image i
    blended half and half with image i + m and caption i joined to caption i + m ("<start> a dog runs
    <end>" + "<start> a red car <end>" -> "<start> a dog runs a red car <end>", cut to the context and still
    ending on <end>). Pairs m.. stay as they are. The batch is in random order, so the partners are random.
    images: (v b) c h w, the b crops and with train.image_ssl then their b second views, mixed alike so that
    a view stays its crop's twin; ids: b n; lengths: b."""
    if m == 0:
        return images, ids, lengths
    b, n = ids.shape
    views = images.reshape(-1, b, *images.shape[1:])  # v b c h w
    views[:, :m] = (views[:, :m] + views[:, m : 2 * m]) / 2
    first = lengths[:m] - 1  # m: <start> and the words of caption i
    joined = torch.clamp(first + lengths[m : 2 * m] - 1, max=context_length)  # m: + words and <end> of caption i + m
    width = max(n, int(joined.max()))
    position = torch.arange(width, device=ids.device).expand(m, width)
    head = ids[:m].gather(1, position.clamp(max=n - 1))
    tail = ids[m : 2 * m].gather(1, (position - first[:, None] + 1).clamp(0, n - 1))  # its <start> skipped
    mixed = torch.where(position < first[:, None], head, tail)
    mixed = torch.where(position < joined[:, None], mixed, torch.full_like(mixed, pad_id))
    mixed[torch.arange(m, device=ids.device), joined - 1] = end_id  # a cut caption still ends on <end>
    out = torch.full((b, width), pad_id, dtype=ids.dtype, device=ids.device)
    out[:, :n] = ids
    out[:m] = mixed
    return views.view_as(images), out, torch.cat([joined, lengths[m:]])


class MovingAverage:
    """An exponential moving average of the model's weights, decay d: each step the average moves 1 - d of
    the way to the weights. Early on the decay is min(d, (1 + step) / (10 + step)) (as in TensorFlow's
    ExponentialMovingAverage), so the average is not dominated by the random initial weights."""

    def __init__(self, model: MiniCLIP, decay: float):
        self.decay = decay
        self.model = MiniCLIP(model.config).to(next(model.parameters()).device).eval()
        self.model.load_state_dict(model.state_dict())
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: MiniCLIP, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        mine, theirs = list(self.model.state_dict().values()), list(model.state_dict().values())
        torch._foreach_lerp_(mine, theirs, 1.0 - decay)


def check_world_size(counters: dict, world_size: int, run: Path) -> None:
    """A run resumes with the processes it was trained by: the data each rank sees depends on their number."""
    trained = int(counters.get("world_size", 1))
    if trained != world_size:
        raise ConfigError(f"{run}: was trained by {trained} process(es), this is {world_size}; resume it with "
                          f"{trained} (torchrun --nnodes x --nproc_per_node = {trained}, or miniclip train --nproc "
                          f"{trained}), or start a new run")


def device_crops(config: RunConfig, device: torch.device, cached: bool) -> bool:
    """Whether crops are cut on the training device (data/images.DeviceCrops): by default wherever that is
    not the CPU, since on a CPU the loader process resizes in parallel with the model's step."""
    augment = config.train.augment
    if augment == "device" and not cached:
        raise ConfigError("train.augment=device cuts crops from the decoded-image cache; drop --no-cache, or use "
                          "--set train.augment=loader (shards always crop in the loader)")
    return cached and (augment == "device" or augment == "auto" and device.type != "cpu")


def batch_to_device(images, ids, lengths, device: torch.device, config: RunConfig) -> tuple:
    """One micro-batch on the training device, its crops cut there when the loader left them (DeviceCrops)."""
    images = images.to(device, non_blocking=True)
    if isinstance(images, DeviceCrops):
        images = images.render(config.model.image_size, config.data.mean, config.data.std)
    return images, ids.to(device, non_blocking=True), lengths.to(device, non_blocking=True)


class _TrainingData:
    """This process's micro-batches, epoch by epoch, from a list of images (PairDataset and EpochSampler) or
    from shards (ShardDataset)."""

    def __init__(self, config: RunConfig, train: list[ImageCaptions] | ShardSet, world: distributed.World,
                 collate: Collate, workers: int, device: torch.device, callbacks: Callbacks):
        tc = config.train
        common = (config.model.image_size, config.data.mean, config.data.std, tc.crop_scale, tc.captions, tc.seed)
        views = 2 if tc.image_ssl else 1
        self.streamed = isinstance(train, ShardSet)
        self.cache_seconds = None  # how long building the image cache took, when this run built it
        if self.streamed:
            if tc.augment == "device":
                device_crops(config, device, cached=False)  # raises: shards have no image cache
            self.dataset = ShardDataset(train, *common, rank=world.rank, world_size=world.world_size,
                                        batch_size=tc.batch_size, positives=tc.positives, views=views)
        else:
            cache = None
            if tc.cache:
                paths = [item.image for item in train]
                if world.is_main:  # rank 0 builds it; the others wait, then map the same files
                    start = time.perf_counter()
                    cache, built = open_cache(paths, config.model.image_size, progress=callbacks.on_cache_progress)
                    if built:
                        self.cache_seconds = time.perf_counter() - start
                if world.world_size > 1:
                    distributed.barrier()
                    cache = cache or open_cache(paths, config.model.image_size)[0]
            self.dataset = PairDataset(train, *common, cache=cache, positives=tc.positives,
                                       device_crops=device_crops(config, device, cache is not None), views=views)
        self.world, self.collate, self.workers, self.device = world, collate, workers, device
        self.batch_size, self.accum_steps = tc.batch_size, tc.accum_steps
        self.global_batch = world.world_size * tc.accum_steps * tc.batch_size
        size = len(self.dataset)
        if size >= self.global_batch:
            self.steps_per_epoch, self.length = size // self.global_batch, size // self.global_batch * self.global_batch
        elif world.world_size == 1 and tc.accum_steps == 1 and not self.streamed:
            self.steps_per_epoch, self.length = 1, None  # one short batch: a tiny dataset still trains
        else:
            raise ConfigError(f"{size} training pairs are fewer than one global batch of {self.global_batch} "
                              f"({world.world_size} process(es) x {tc.accum_steps} accumulation step(s) x batch size "
                              f"{tc.batch_size}); lower --batch-size or --accum-steps")

    def batches(self, epoch: int, done_steps: int) -> Iterator:
        """This process's micro-batches of `epoch`, from optimizer step `done_steps` of it on."""
        if self.streamed:
            self.dataset.set_epoch(epoch, skip_batches=done_steps * self.accum_steps)
            sampler = None
        else:
            self.dataset.set_epoch(epoch)
            sampler = EpochSampler(len(self.dataset), self.dataset.seed, epoch, done_steps * self.global_batch,
                                   self.batch_size, self.world.rank, self.world.world_size, self.length)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
            collate_fn=self.collate, pin_memory=self.device.type == "cuda", persistent_workers=False))


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
    head = ImageSSLHead(config.model.embed_dim).to(device) if tc.image_ssl else None
    optimizer = torch.optim.AdamW(parameter_groups(model, tc.weight_decay, head), lr=tc.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    workers = pick_workers(config, device)
    teacher = CaptionTeacher() if tc.distill else None
    data = _TrainingData(config, train_items, world, Collate(tokenizer, config.model.context_length, teacher), workers,
                         device, callbacks)
    steps_per_epoch = data.steps_per_epoch
    total_steps = tc.epochs * steps_per_epoch
    warmup = max(1, int(tc.warmup_fraction * total_steps))
    val_items = val_items[: tc.val_images]
    amp_dtype = autocast_dtype(device, tc.precision)
    stop_at = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    trained_on = {"data": data_fingerprint(train_items), "config": recipe(config)}

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    step, history, best = 0, [], -1.0
    losses: list[float] = []  # since the last epoch record; saved with the resume file so its mean survives a stop
    replaced = 0
    # The moving average of the weights (TrainConfig.ema) is what validation sees and best/last hold.
    average = MovingAverage(model, tc.ema) if tc.ema else None
    if resume and (run / checkpoint.RESUME).is_file():
        counters = checkpoint.load_resume(run, model, optimizer, average.model if average else None, head)
        check_world_size(counters, world.world_size, run)
        check_unchanged(counters, trained_on, run)
        step, best, losses = counters["step"], counters["best_mean_recall"], counters.get("epoch_losses", [])
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
        limit = (f"its limit of {tc.max_steps} steps (--max-steps)" if stop_at < total_steps
                 else f"its {tc.epochs} epochs")
        raise ConfigError(f"{run}: the run has reached {limit}; to train it further, resume with a higher "
                          "--max-steps or --epochs")
    net, head_net = model, head
    if world.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
        head_net = None if head is None else DistributedDataParallel(head, device_ids=device_ids)
    if tc.compile:
        # The forward with gradients only (DDP wrapped first, as PyTorch's DDP notes ask); captions padded to
        # each batch's longest give a few sequence lengths, which dynamic shapes absorb after one recompile.
        net = torch.compile(net)

    def save_resume():
        if world.is_main:
            checkpoint.save_resume(run, model, optimizer, {
                "step": step, "best_mean_recall": best, "epoch_losses": losses, "world_size": world.world_size,
                **trained_on}, average.model if average else None, head)

    def end_epoch(seconds: float, replaced_this_epoch: int) -> None:
        """Validate, then write last/best, the history and the resume file: one step, done again on resume
        if a stop cuts it short, so no epoch is ever missing from the history or from the choice of best."""
        nonlocal best, losses
        epoch, into = divmod(step, steps_per_epoch)
        record = {"epoch": epoch if not into else round(epoch + into / steps_per_epoch, 3),
                  "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                  "lr": optimizer.param_groups[0]["lr"], "temperature": 1.0 / model.scale().item(),
                  "train_seconds": round(seconds, 2)}
        if replaced_this_epoch:
            record["replaced_samples"] = replaced_this_epoch
        if world.is_main:
            kept = average.model if average else model
            if val_items:
                callbacks.on_validate(math.ceil(step / steps_per_epoch))
                kept.eval()
                encoder = TorchEncoder(kept, tokenizer, config.data.mean, config.data.std, device, tc.precision)
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
                            "cache_seconds": data.cache_seconds, "processes": world.world_size, "accum_steps": tc.accum_steps,
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
                micro_batches, taught = [], []
                # seeded by step and rank, so a resumed run drops the words and distorts the views the
                # interrupted one would have
                draws = torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * world.world_size + world.rank)
                for images, ids, lengths, failures, teacher_features in [next(batches) for _ in range(tc.accum_steps)]:
                    for message in failures:
                        replaced += 1
                        replaced_this_epoch += 1
                        callbacks.on_replaced_sample(message, replaced)
                    if tc.token_dropout:
                        ids, lengths = drop_tokens(ids, lengths, tc.token_dropout, draws, tokenizer.pad_id)
                    images, ids, lengths = batch_to_device(images, ids, lengths, device, config)
                    b = len(lengths) // tc.positives  # images; with train.image_ssl then b second views
                    if tc.rotate or tc.blur or tc.grey:
                        images[:b] = perturb(images[:b], config.data.mean, config.data.std, draws, tc.rotate,
                                             tc.blur, tc.grey)
                    if tc.image_ssl:
                        images[b:] = distort(images[b:], config.data.mean, config.data.std, draws)
                    if tc.mixgen:
                        images, ids, lengths = mixgen(images, ids, lengths, int(tc.mixgen * b),
                                                      config.model.context_length, tokenizer.pad_id, tokenizer.end_id)
                    micro_batches.append((images, ids, lengths))
                    taught.append(teacher_features)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, tc.lr, warmup)
                optimizer.zero_grad(set_to_none=True)
                loss = global_batch_backward(net, model, micro_batches, world.world_size, autocast, tc.positives,
                                             tc.loss, tc.distill, taught, tc.image_ssl, head_net, tc.caption_lm)
                if not math.isfinite(loss):
                    # Before optimizer.step: the weights and every checkpoint stay as they were.
                    raise DivergedError(f"{run}: the training loss became {loss} at step {step + 1} (epoch "
                                        f"{epoch + 1}); the run's checkpoints from before it are unchanged. Train "
                                        f"again with a lower learning rate, e.g. --lr {tc.lr / 2:g}")
                losses.append(loss)
                optimizer.step()
                if average:
                    average.update(model, step)
                step += 1
                now = time.perf_counter()
                pairs = world.world_size * sum(len(b[2]) for b in micro_batches) // tc.positives
                callbacks.on_step(step, epoch, losses[-1], pairs / max(now - tick, 1e-9),
                                  optimizer.param_groups[0]["lr"])
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


# Settings that change how a run executes, not what it learns: a resume may change them.
RUNTIME = {"train": {"epochs", "max_steps", "workers", "cache", "compile", "precision", "augment", "val_images"},
           "data": {"zero_shot", "templates"}}


def recipe(config: RunConfig) -> dict:
    """The settings a resumed run must share with the run it continues, as JSON values."""
    raw = json.loads(config.to_json())
    return {section: {k: v for k, v in values.items() if k not in RUNTIME.get(section, ())}
            for section, values in raw.items()}


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
        changed = [f"{section}.{key} {before[section].get(key)!r} -> {now[section].get(key)!r}"
                   for section in now for key in sorted(set(now[section]) | set(before.get(section, {})))
                   if before.get(section, {}).get(key) != now[section].get(key)]
        if changed:
            raise ConfigError(f"{run}/config.json changed since this run started ({'; '.join(changed[:3])}); put "
                              "it back, or start a new run with another --out")
