"""Feeding the training loop: this process's share of each epoch's batches (EpochSampler), loader processes,
collation, and moving a micro-batch to the training device, its crops cut there when the loader left them."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import RunConfig
from ..errors import ConfigError
from ..tokenizer import Tokenizer
from .cache import open_cache
from .images import PairDataset, ShardDataset
from .layouts import ImageCaptions
from .shards import ShardSet
from .transforms import DeviceCrops


@dataclass
class Collate:
    """Stacks a batch's images (or, for crops cut on the device, its cached pixels and crop boxes) and tokenises
    its captions, padded to the batch's longest; passes on the messages of the samples PairDataset had to
    replace or ShardDataset had to skip, and what each objective's `prepare` makes of the captions and the
    images' indices (the caption teacher's embeddings, say), None for objectives that prepare nothing."""

    tokenizer: Tokenizer
    context_length: int
    preparers: tuple = ()

    def __call__(self, batch):
        images, captions, failures, which = zip(*batch)
        if isinstance(images[0], tuple):  # cached pixels and crop boxes, cut on the training device
            pixels, boxes = zip(*images)
            images = DeviceCrops(torch.stack(pixels), torch.stack(boxes))
        else:
            images = torch.stack(images)
            if images.ndim == 5:  # b v c s s: each image's views
                images = images.transpose(0, 1).flatten(0, 1)  # 'b v c s s -> (v b) c s s'
        ids, lengths = self.tokenizer.encode(list(captions), self.context_length)
        prepared = [prepare(list(captions), list(which)) for prepare in self.preparers]
        return images, torch.from_numpy(ids), torch.from_numpy(lengths), [m for f in failures for m in f], prepared


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


def load_batches(dataset, workers: int, **options) -> Iterator:
    """Batches of `dataset` from `workers` loader processes (DataLoader `options`), which leave what they inherit
    to this process: a forked process's garbage collector would free what this one had let go but not yet
    collected, and an ONNX Runtime session freed so waits forever for thread-pool threads that exist only here.
    So this process collects before they fork, and each freezes what it inherited."""
    if workers:
        gc.collect()
    return iter(torch.utils.data.DataLoader(dataset, num_workers=workers,
                                            worker_init_fn=_freeze_inherited, **options))


def _freeze_inherited(worker_id: int) -> None:
    gc.freeze()


def pick_workers(config: RunConfig, device: torch.device) -> int:
    if config.runtime.workers >= 0:
        return config.runtime.workers
    # On CPU one loader process overlaps JPEG decoding with compute without starving the model of cores.
    return 1 if device.type == "cpu" else 4


def device_crops(config: RunConfig, device: torch.device, cached: bool) -> bool:
    """Whether crops are cut on the training device (data/images.DeviceCrops): by default wherever that is
    not the CPU, since on a CPU the loader process resizes in parallel with the model's step."""
    augment = config.runtime.augment
    if augment == "device" and not cached:
        raise ConfigError("runtime.augment=device cuts crops from the decoded-image cache; drop --no-cache, or use "
                          "--set runtime.augment=loader (shards always crop in the loader)")
    return cached and (augment == "device" or augment == "auto" and device.type != "cpu")


def batch_to_device(images, ids, lengths, device: torch.device, config: RunConfig) -> tuple:
    """One micro-batch on the training device, its crops cut there when the loader left them (DeviceCrops)."""
    images = images.to(device, non_blocking=True)
    if isinstance(images, DeviceCrops):
        images = images.render(config.model.image_size, config.data.mean, config.data.std)
    return images, ids.to(device, non_blocking=True), lengths.to(device, non_blocking=True)


class TrainingData:
    """This process's micro-batches, epoch by epoch, from a list of images (PairDataset and EpochSampler) or
    from shards (ShardDataset)."""

    def __init__(self, config: RunConfig, train: list[ImageCaptions] | ShardSet, world: distributed.World,
                 collate: Collate, workers: int, device: torch.device, extra_views=(), cache_progress=None,
                 notice=None, dataset=None):
        """`dataset`: ready-made training pairs (features.FeatureDataset) in place of `train`'s images."""
        tc = config.train
        common = (config.model.image_size, config.data.mean, config.data.std, tc.crop_scale, tc.captions, tc.seed)
        self.streamed = isinstance(train, ShardSet)
        self.cache_seconds = None  # how long building the image cache took, when this run built it
        self.cache = None  # where the image cache is and its size, for the user
        if dataset is not None:
            self.dataset = dataset
        elif self.streamed:
            if config.runtime.augment == "device":
                device_crops(config, device, cached=False)  # raises: shards have no image cache
            self.dataset = ShardDataset(train, *common, rank=world.rank, world_size=world.world_size,
                                        batch_size=tc.batch_size, extra_views=extra_views)
        else:
            cache = None
            if config.runtime.cache:
                paths = [item.image for item in train]
                if world.is_main:  # rank 0 builds it; the others wait, then map the same files
                    start = time.perf_counter()
                    cache, built = open_cache(paths, config.model.image_size, progress=cache_progress, notice=notice)
                    self.cache = f"{cache.folder} ({cache.nbytes / 1e6:,.0f} MB)"
                    if built:
                        self.cache_seconds = time.perf_counter() - start
                if world.world_size > 1:
                    distributed.barrier()
                    cache = cache or open_cache(paths, config.model.image_size)[0]
            self.dataset = PairDataset(train, *common, cache=cache, extra_views=extra_views,
                                       device_crops=device_crops(config, device, cache is not None))
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
        return load_batches(self.dataset, self.workers, batch_size=self.batch_size, sampler=sampler,
                            collate_fn=self.collate, pin_memory=self.device.type == "cuda")
