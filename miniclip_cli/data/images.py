"""The training side of the data: random resized crops and the torch dataset of image-caption pairs."""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .layouts import ImageCaptions
from .pixels import load_rgb, normalise, resize_centre_crop

# Stand-ins tried for one failed sample before giving up: ten failures in a row is a broken dataset.
MAX_REPLACEMENTS = 10


def random_resized_crop(im: Image.Image, size: int, crop_scale: tuple[float, float], rng: random.Random) -> Image.Image:
    """torchvision's RandomResizedCrop sampling (area in `crop_scale`, aspect 3/4-4/3), drawn from `rng`
    so that a sample's crop depends only on its seed, whichever loader process makes it."""
    w, h = im.size
    for _ in range(10):
        target = w * h * rng.uniform(*crop_scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return im.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return resize_centre_crop(im, size)


def sample_seed(*parts: int) -> int:
    """A stable seed from integers, the same in every process (unlike hash() of a str)."""
    return zlib.crc32(np.array(parts, dtype=np.int64).tobytes())


class PairDataset(torch.utils.data.Dataset):
    """Training pairs. captions="one": an item per image, its caption drawn anew each epoch;
    "all": an item per (image, caption) pair. Call set_epoch before each epoch's loader is made.

    Each sample is (image c s s, caption, failures). The up-front image check (data/checks.py) cannot see
    everything: a file damaged inside its data, or changed while training runs. A sample whose image fails
    to load is replaced by another, picked from (seed, epoch, index) so that runs stay reproducible, and
    `failures` carries the error messages to the training loop, which counts them (loader processes cannot
    report any other way)."""

    def __init__(self, items: list[ImageCaptions], size: int, mean, std, crop_scale, captions: str, seed: int):
        self.items, self.size, self.mean, self.std = items, size, mean, std
        self.crop_scale, self.seed, self.epoch = tuple(crop_scale), seed, 0
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

    def _pair(self, index: int) -> tuple[torch.Tensor, str]:
        image_index, caption_index = self.pairs[index]
        item = self.items[image_index]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        if caption_index is None:
            caption_index = rng.randrange(len(item.captions))
        crop = random_resized_crop(load_rgb(item.image), self.size, self.crop_scale, rng)
        return torch.from_numpy(normalise(crop, self.mean, self.std)), item.captions[caption_index]
