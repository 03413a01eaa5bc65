"""The training datasets of image-caption pairs: from image files (PairDataset) or streamed from tar shards
(ShardDataset). Each sample carries one crop per view (data/transforms.py) and one caption."""

from __future__ import annotations

import io
import itertools
import random
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import DataError
from .cache import PixelCache
from .layouts import ImageCaptions
from .pixels import load_rgb
from .shards import ShardSet, read_samples
from .transforms import crop_box, training_views

# Stand-ins tried for one failed sample before giving up: ten failures in a row is a broken dataset.
MAX_REPLACEMENTS = 10
# Raw samples (JPEG bytes, ~100 kB for a Flickr photo) held to shuffle within: ~100 MB per loader process.
# `miniclip shard` already shuffles samples across shards and training shuffles the shard order, so the
# buffer only has to break up the order inside a shard from one epoch to the next.
SHUFFLE_BUFFER = 1000


def draw_caption(captions, rng: random.Random) -> str:
    return captions[rng.randrange(len(captions))]


def sample_seed(*parts: int) -> int:
    """A stable seed from integers, the same in every process (unlike hash() of a str)."""
    return zlib.crc32(np.array(parts, dtype=np.int64).tobytes())


def view_generators(seed: int, views: int, *parts: int) -> list[random.Random]:
    """A generator per view of one sample, from the sample's own seed parts: view 0's also draws the caption."""
    return [random.Random(sample_seed(seed, *parts, *((-v,) if v else ()))) for v in range(views)]


class CaptionPairs(torch.utils.data.Dataset):
    """The samples of an epoch over `items`: captions="one", an item per image, its caption drawn anew each
    epoch; "all", an item per (image, caption) pair. Call set_epoch before each epoch's loader is made."""

    def __init__(self, items: list[ImageCaptions], captions: str, seed: int):
        self.items, self.seed, self.epoch = items, seed, 0
        self.pairs = [(i, None) for i in range(len(items))] if captions == "one" else [
            (i, j) for i, item in enumerate(items) for j in range(len(item.captions))
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, index: int, rng: random.Random) -> tuple[int, str]:
        """(image index, caption) of sample `index`; a drawn caption comes from `rng`."""
        image, caption_index = self.pairs[index]
        captions = self.items[image].captions
        return image, draw_caption(captions, rng) if caption_index is None else captions[caption_index]


class PairDataset(CaptionPairs):
    """Training pairs. captions="one": an item per image, its caption drawn anew each epoch; "all": an item per
    (image, caption) pair. Call set_epoch before each epoch's loader is made.

    Each sample is (image c s s, or v c s s with extra views, caption, failures, image index): the crop at
    `crop_scale` that the caption sees, then one crop per entry of `extra_views` (crop scales an objective asked
    for); the index (into `items`) lets an objective look up what it keeps per image.

    The up-front image check (data/checks.py) cannot see everything: a file damaged inside its
    data, or changed while training runs. A sample whose image fails to load is replaced by another, picked
    from (seed, epoch, index) so that runs stay reproducible, and `failures` carries the error messages to
    the training loop, which counts them (loader processes cannot report any other way)."""

    def __init__(self, items: list[ImageCaptions], size: int, mean, std, crop_scale, captions: str, seed: int,
                 cache: PixelCache | None = None, device_crops: bool = False, extra_views=()):
        super().__init__(items, captions, seed)
        self.size, self.mean, self.std = size, mean, std
        if device_crops and cache is None:
            raise ValueError("device crops read the image cache; pass one")
        # Samples carry the cached pixels and a crop box (DeviceCrops) rather than the finished crop.
        self.device_crops = device_crops
        self.crop_scales = (tuple(crop_scale), *map(tuple, extra_views))
        self.cache = cache  # decoded pixels (data/cache.py), in the order of `items`; None decodes every time

    def __getitem__(self, index: int) -> tuple:
        failures: list[str] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                image, caption, which = self._pair(index)
                return image, caption, tuple(failures), which
            except DataError as exc:
                failures.append(str(exc))
                if len(self) == 1:
                    break
                # Any index but this one; random.Random draws the same in every loader process.
                other = random.Random(sample_seed(self.seed, self.epoch, index, attempt + 1)).randrange(len(self) - 1)
                index = other + (other >= index)
        raise DataError(f"{len(failures)} training images in a row could not be loaded (last: {failures[-1]}); "
                        "check the dataset's image files")

    def _pair(self, index: int) -> tuple:
        rngs = view_generators(self.seed, len(self.crop_scales), self.epoch, index)
        image_index, caption = self.caption(index, rngs[0])
        item = self.items[image_index]
        if self.device_crops:
            pixels = self.cache.pixels(image_index)  # h w 3
            h, w, _ = pixels.shape
            # the cache is square: all of it where ten draws missed
            boxes = [crop_box(w, h, scale, rng) or (0, 0, w, h) for scale, rng in zip(self.crop_scales, rngs)]
            return (torch.from_numpy(pixels), torch.tensor(boxes[0] if len(boxes) == 1 else boxes,
                                                            dtype=torch.float32)), caption, image_index
        image = self.cache.image(image_index) if self.cache is not None else load_rgb(item.image)
        return training_views(image, self.size, self.mean, self.std, self.crop_scales, rngs), caption, image_index


class ShardDataset(torch.utils.data.IterableDataset):
    """Training pairs streamed from shards: (image c s s, caption(s), failures, None), as PairDataset gives them.

    The consumers are every (rank, loader worker); with at least as many shards as consumers each reads whole
    shards (shard i goes to consumer i mod consumers), else each reads every shard and keeps the samples whose
    running number is its own modulo consumers. Either way one pass delivers each sample to exactly one consumer.

    A pass shuffles the shard order and then the samples within a buffer, seeded by (seed, epoch, pass, consumer);
    a caption ("one": drawn per sample) and a crop are seeded by (seed, epoch, pass, shard, sample, caption),
    so a run is reproducible whatever the loader does. `passes=None` streams pass after pass without end: the
    training loop takes a fixed number of batches per epoch from every rank, and no rank may run dry before the
    others. A sample that fails to decode is skipped; its message travels with the next one (see PairDataset),
    and more than MAX_REPLACEMENTS in a row stop training.
    """

    def __init__(self, shard_set: ShardSet, size: int, mean, std, crop_scale, captions: str, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1, passes: int | None = None,
                 buffer: int = SHUFFLE_BUFFER, extra_views=()):
        self.shard_set, self.size, self.mean, self.std = shard_set, size, mean, std
        self.crop_scales = (tuple(crop_scale), *map(tuple, extra_views))
        self.captions, self.seed = captions, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.passes, self.buffer = passes, buffer
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Call before each epoch's loader is made. `skip_batches`: this rank's batches already trained on
        this epoch (a resumed run); they are passed over without decoding their images."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        """Samples in one pass over all ranks, for the epoch length (not this consumer's share)."""
        return self.shard_set.size(self.captions)

    def _consumer(self) -> tuple[int, int, int]:
        """(this consumer, consumers, samples to skip): the loader's workers split a rank's share further."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batches from its workers in turn, starting at worker 0, so the rank's batch k came
        # from worker k mod workers. A loader resumed at batch S starts at worker 0 too: worker w takes on the
        # stream of worker (w + S) mod workers, less the batches that one had delivered before S.
        role = (worker + self.skip_batches) % workers
        delivered = (self.skip_batches - role + workers - 1) // workers
        return self.rank * workers + role, self.world_size * workers, delivered * self.batch_size

    def _raw_pass(self, number: int, consumer: int, consumers: int) -> Iterator[tuple]:
        shards = list(enumerate(self.shard_set.shards))
        if len(shards) >= consumers:
            mine = shards[consumer::consumers]
            random.Random(sample_seed(self.seed, self.epoch, number, consumer)).shuffle(mine)
            for index, shard in mine:
                for position, sample in enumerate(read_samples(shard.path)):
                    yield index, position, sample
        else:
            # Every consumer reads the shards in the same order, so the running number means the same to each.
            random.Random(sample_seed(self.seed, self.epoch, number)).shuffle(shards)
            running = 0
            for index, shard in shards:
                for position, sample in enumerate(read_samples(shard.path)):
                    if running % consumers == consumer:
                        yield index, position, sample
                    running += 1

    def _pairs(self, number: int, consumer: int, consumers: int) -> Iterator[tuple]:
        """(shard, sample, caption index or None, image, captions, problem) through the shuffle buffer."""
        rng = random.Random(sample_seed(self.seed, self.epoch, number, consumer, 1))
        buffer: list[tuple] = []
        for index, position, (_, image, captions, problem) in self._raw_pass(number, consumer, consumers):
            if problem is None and self.captions == "all":
                entries = [(index, position, j, image, captions, None) for j in range(len(captions))]
            else:
                entries = [(index, position, None, image, captions, problem)]
            for entry in entries:
                if len(buffer) < self.buffer:
                    buffer.append(entry)
                    continue
                slot = rng.randrange(len(buffer))
                yield buffer[slot]
                buffer[slot] = entry
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        consumer, consumers, skip = self._consumer()
        failures: list[str] = []
        for number in (range(self.passes) if self.passes is not None else itertools.count()):
            usable = 0
            for index, position, caption_index, image, captions, problem in self._pairs(number, consumer, consumers):
                if problem is not None:
                    if not skip:  # reported by the run that trained on these batches already
                        failures.append(problem)
                    continue
                usable += 1
                if skip:  # exact unless an image failed to decode in the batches passed over
                    skip -= 1
                    continue
                rngs = view_generators(self.seed, len(self.crop_scales), self.epoch, number, index, position)
                # "all": each caption of a sample draws its crop from its own generator
                rngs[0] = random.Random(sample_seed(self.seed, self.epoch, number, index, position, caption_index or 0))
                caption = draw_caption(captions, rngs[0]) if caption_index is None else captions[caption_index]
                name = f"{self.shard_set.shards[index].path.name}:sample {position}.{image[0]}"
                try:
                    views = training_views(load_rgb(io.BytesIO(image[1]), name=name), self.size, self.mean,
                                           self.std, self.crop_scales, rngs)
                except DataError as exc:
                    failures.append(str(exc))
                    if len(failures) > MAX_REPLACEMENTS:
                        raise DataError(f"{len(failures)} training samples in a row could not be used (last: "
                                        f"{failures[-1]}); check the shards") from None
                    continue
                yield views, caption, tuple(failures), None  # a shard's sample has no index among the images
                failures = []
            if not usable:
                raise DataError(f"{self.shard_set.spec}: loader {consumer} of {consumers} got no usable samples "
                                f"(the {len(self.shard_set.shards)} shard(s) are too few for {consumers} processes "
                                "x loader workers, or hold no image-caption pairs); use fewer --workers or write "
                                "more, smaller shards")
