"""The training side of the data: random resized crops and the torch datasets of image-caption pairs, from
image files (PairDataset) or streamed from tar shards (ShardDataset)."""

from __future__ import annotations

import io
import itertools
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .cache import PixelCache
from .layouts import ImageCaptions
from .pixels import load_rgb, normalise, resize_centre_crop
from .shards import ShardSet, read_samples

# Stand-ins tried for one failed sample before giving up: ten failures in a row is a broken dataset.
MAX_REPLACEMENTS = 10
# Raw samples (JPEG bytes, ~100 kB for a Flickr photo) held to shuffle within: ~100 MB per loader process.
# `miniclip shard` already shuffles samples across shards and training shuffles the shard order, so the
# buffer only has to break up the order inside a shard from one epoch to the next.
SHUFFLE_BUFFER = 1000
# The second view of train.image_ssl: SimCLR crops as small as 8% of the image make the task too hard for
# 128 px photos seen once per epoch; 20% keeps an object in most crops.
SECOND_VIEW_CROP_SCALE = (0.2, 1.0)


def crop_box(width: int, height: int, crop_scale: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int] | None:
    """torchvision's RandomResizedCrop sampling (area in `crop_scale`, aspect 3/4-4/3), drawn from `rng` so
    that a sample's crop depends only on its seed, whichever loader process makes it: (left, top, right,
    bottom), or None when ten draws missed (then the centre crop)."""
    for _ in range(10):
        target = width * height * rng.uniform(*crop_scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= width and 0 < ch <= height:
            left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
            return left, top, left + cw, top + ch
    return None


def random_resized_crop(im: Image.Image, size: int, crop_scale: tuple[float, float], rng: random.Random) -> Image.Image:
    box = crop_box(*im.size, crop_scale, rng)
    return resize_centre_crop(im, size) if box is None else im.resize((size, size), Image.BICUBIC, box=box)


def training_views(im: Image.Image, size: int, mean, std, crop_scale: tuple[float, float], rng: random.Random,
                   second: random.Random | None = None) -> torch.Tensor:
    """The training crop, c s s; with a `second` generator (train.image_ssl) also a second crop of the same
    image, from SECOND_VIEW_CROP_SCALE: v c s s, the first view being the crop made without it."""
    first = normalise(random_resized_crop(im, size, crop_scale, rng), mean, std)
    if second is None:
        return torch.from_numpy(first)
    other = normalise(random_resized_crop(im, size, SECOND_VIEW_CROP_SCALE, second), mean, std)
    return torch.from_numpy(np.stack([first, other]))


def luma(x: torch.Tensor) -> torch.Tensor:
    """b 1 s s: the grey level (ITU-R 601) of b 3 s s images of 0-1 values."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def distort(images: torch.Tensor, mean, std, generator: torch.Generator) -> torch.Tensor:
    """SimCLR's photometric changes for the second view of train.image_ssl, on normalised b 3 s s images on
    any device, drawn from a CPU `generator`: a horizontal flip (half the images), brightness, contrast and
    saturation each scaled by a factor in [0.6, 1.4] (80%), grey (20%). The captions never see this view, so
    it may flip left and right and change colours that they name."""
    b = images.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(images.device)

    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = images * std + mean  # 0-1
    flip, jitter, greyed = (draw(3, b) < torch.tensor([[0.5], [0.8], [0.2]], device=images.device)).view(3, b, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    brightness, contrast, saturation = (0.6 + 0.8 * draw(3, b)).view(3, b, 1, 1, 1)
    y = x * brightness
    level = luma(y).mean(dim=(2, 3), keepdim=True)  # b 1 1 1: each image's mean brightness
    y = (y - level) * contrast + level
    grey = luma(y)
    y = grey + (y - grey) * saturation
    x = torch.where(jitter, y.clamp(0, 1), x)
    x = torch.where(greyed, luma(x).expand_as(x), x)
    return (x - mean) / std


def perturb(images: torch.Tensor, mean, std, generator: torch.Generator, rotate: float = 0.0, blur: float = 0.0,
            grey: float = 0.0) -> torch.Tensor:
    """The mild changes of issue 7's list to the training crop, on normalised b 3 s s images on any device,
    drawn from a CPU `generator`: each image turned about its centre by an angle uniform in [-rotate, rotate]
    degrees (the corners it uncovers mirrored from the inside), blurred with chance `blur` by a Gaussian of
    sigma 0.1-1.5 px, made grey with chance `grey`. No flips and no colour jitter: captions say left and right
    and name colours. Turning and blurring average pixels with weights summing to one, so they work on the
    normalised values directly; only grey needs the 0-1 ones."""
    b, c, s, _ = images.shape

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(images.device, images.dtype)

    x = images
    if rotate:
        angle = torch.deg2rad(rotate * (2 * draw(b) - 1))
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # b 2 3
        grid = F.affine_grid(theta, [b, c, s, s], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if blur:
        sigma, chosen = 0.1 + 1.4 * draw(b), (draw(b) < blur).nonzero()[:, 0]
        if len(chosen):
            x = x.index_copy(0, chosen, gaussian_blur(x[chosen], sigma[chosen]))
    if grey:
        chosen = (draw(b) < grey).nonzero()[:, 0]
        if len(chosen):  # else no copy of the batch
            mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = x.index_copy(0, chosen, (luma(x[chosen] * std + mean) - mean) / std)
    return x


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """n c s s images, each blurred by a Gaussian of its own `sigma` (n, px), edges mirrored; the default
    radius is 3.3 sigma at sigma 1.5."""
    n, c, s, _ = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))  # n k
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n c) k, one per channel
    y = F.pad(images.reshape(1, n * c, s, s), (radius,) * 4, mode="reflect")  # 'n c h w -> 1 (n c) h w'
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along rows
    return F.conv2d(y, kernel[:, None, :, None], groups=n * c).view(n, c, s, s)  # along columns


@dataclass
class DeviceCrops:
    """A batch whose crops are cut on the training device rather than in the loader (TrainConfig.augment):
    the cached uint8 pixels and each image's crop box. A GPU then receives ~75 kB per image and no loader
    process resizes anything, so the loader only indexes the memory-mapped cache."""

    pixels: torch.Tensor  # b h w 3, uint8: the cached images
    boxes: torch.Tensor  # b 4, or b v 4 with v views (train.image_ssl), float32: (left, top, right, bottom)

    def to(self, device, non_blocking: bool = False) -> DeviceCrops:
        return DeviceCrops(self.pixels.to(device, non_blocking=non_blocking),
                           self.boxes.to(device, non_blocking=non_blocking))

    def render(self, size: int, mean, std) -> torch.Tensor:
        """b 3 size size, normalised: each box resampled to size x size with roi_align, which averages
        ceil(box / size) samples per output pixel in each direction (bilinear, antialiased as it shrinks).
        With v boxes per image: (v b) 3 size size, every image's first view, then every image's second."""
        from torchvision.ops import roi_align

        pixels = self.pixels.permute(0, 3, 1, 2).float()  # 'b h w c -> b c h w'
        boxes = self.boxes if self.boxes.ndim == 3 else self.boxes[:, None]  # b v 4
        b, v, _ = boxes.shape
        boxes = boxes.transpose(0, 1).reshape(v * b, 4)  # 'b v four -> (v b) four'
        index = torch.arange(b, device=pixels.device, dtype=pixels.dtype).repeat(v)[:, None]
        crops = roi_align(pixels, torch.cat([index, boxes.to(pixels.dtype)], dim=1), output_size=size,
                          aligned=True)  # (v b) 3 size size, 0-255
        mean = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * 255
        return (crops - mean) / std


def draw_captions(captions, positives: int, rng: random.Random) -> str | tuple[str, ...]:
    """One caption drawn from `captions` when positives is 1; else a tuple of `positives`, distinct while the
    image has enough (then repeats), the positives of a multi-positive loss (loss.clip_loss)."""
    if positives == 1:
        return captions[rng.randrange(len(captions))]
    order = rng.sample(range(len(captions)), min(positives, len(captions)))
    order += [rng.randrange(len(captions)) for _ in range(positives - len(order))]
    return tuple(captions[j] for j in order)


def sample_seed(*parts: int) -> int:
    """A stable seed from integers, the same in every process (unlike hash() of a str)."""
    return zlib.crc32(np.array(parts, dtype=np.int64).tobytes())


class PairDataset(torch.utils.data.Dataset):
    """Training pairs. captions="one": an item per image, its caption (or `positives` captions) drawn anew
    each epoch; "all": an item per (image, caption) pair. Call set_epoch before each epoch's loader is made.

    Each sample is (image c s s, or v c s s with `views` 2, caption or tuple of `positives` captions,
    failures). The up-front image check (data/checks.py) cannot see everything: a file damaged inside its
    data, or changed while training runs. A sample whose image fails to load is replaced by another, picked
    from (seed, epoch, index) so that runs stay reproducible, and `failures` carries the error messages to
    the training loop, which counts them (loader processes cannot report any other way)."""

    def __init__(self, items: list[ImageCaptions], size: int, mean, std, crop_scale, captions: str, seed: int,
                 cache: PixelCache | None = None, positives: int = 1, device_crops: bool = False, views: int = 1):
        self.items, self.size, self.mean, self.std, self.positives = items, size, mean, std, positives
        self.views = views  # 2: a second crop of each image for train.image_ssl
        if device_crops and cache is None:
            raise ValueError("device crops read the image cache; pass one")
        # Samples carry the cached pixels and a crop box (DeviceCrops) rather than the finished crop.
        self.device_crops = device_crops
        self.crop_scale, self.seed, self.epoch = tuple(crop_scale), seed, 0
        self.cache = cache  # decoded pixels (data/cache.py), in the order of `items`; None decodes every time
        self.pairs = [(i, None) for i in range(len(items))] if captions == "one" else [
            (i, j) for i, item in enumerate(items) for j in range(len(item.captions))
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, tuple[str, ...]]:
        failures: list[str] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                image, caption = self._pair(index)
                return image, caption, tuple(failures)
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
        image_index, caption_index = self.pairs[index]
        item = self.items[image_index]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        caption = (draw_captions(item.captions, self.positives, rng) if caption_index is None
                   else item.captions[caption_index])
        second = random.Random(sample_seed(self.seed, self.epoch, index, -1)) if self.views == 2 else None
        if self.device_crops:
            pixels = self.cache.pixels(image_index)  # h w 3
            h, w, _ = pixels.shape
            box = crop_box(w, h, self.crop_scale, rng) or (0, 0, w, h)  # the cache is square: all of it
            if second is not None:
                box = (box, crop_box(w, h, SECOND_VIEW_CROP_SCALE, second) or (0, 0, w, h))
            return (torch.from_numpy(pixels), torch.tensor(box, dtype=torch.float32)), caption
        image = self.cache.image(image_index) if self.cache is not None else load_rgb(item.image)
        return training_views(image, self.size, self.mean, self.std, self.crop_scale, rng, second), caption


class ShardDataset(torch.utils.data.IterableDataset):
    """Training pairs streamed from shards: (image c s s, caption(s), failures), as PairDataset gives them.

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
                 buffer: int = SHUFFLE_BUFFER, positives: int = 1, views: int = 1):
        self.shard_set, self.size, self.mean, self.std, self.positives = shard_set, size, mean, std, positives
        self.views = views  # 2: a second crop of each image for train.image_ssl
        self.crop_scale, self.captions, self.seed = tuple(crop_scale), captions, seed
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
                rng = random.Random(sample_seed(self.seed, self.epoch, number, index, position, caption_index or 0))
                caption = (draw_captions(captions, self.positives, rng) if caption_index is None
                           else captions[caption_index])
                name = f"{self.shard_set.shards[index].path.name}:sample {position}.{image[0]}"
                second = random.Random(sample_seed(self.seed, self.epoch, number, index, position, -1)) \
                    if self.views == 2 else None
                try:
                    views = training_views(load_rgb(io.BytesIO(image[1]), name=name), self.size, self.mean,
                                           self.std, self.crop_scale, rng, second)
                except DataError as exc:
                    failures.append(str(exc))
                    if len(failures) > MAX_REPLACEMENTS:
                        raise DataError(f"{len(failures)} training samples in a row could not be used (last: "
                                        f"{failures[-1]}); check the shards") from None
                    continue
                yield views, caption, tuple(failures)
                failures = []
            if not usable:
                raise DataError(f"{self.shard_set.spec}: loader {consumer} of {consumers} got no usable samples "
                                f"(the {len(self.shard_set.shards)} shard(s) are too few for {consumers} processes "
                                "x loader workers, or hold no image-caption pairs); use fewer --workers or write "
                                "more, smaller shards")
