"""Augmentation: random resized crops (in the loader with PIL, or on the training device from the image cache)
and the photometric distortions of the image self-supervised loss's second view."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .pixels import normalise, resize_centre_crop


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


def training_views(im: Image.Image, size: int, mean, std, crop_scales: tuple[tuple[float, float], ...],
                   rngs: list[random.Random]) -> torch.Tensor:
    """One normalised crop per entry of `crop_scales`, each drawn from its own generator: c s s for one view
    (the captions' crop), v c s s for several (objectives' extra views, objectives.Objective.views)."""
    views = [normalise(random_resized_crop(im, size, scale, rng), mean, std) for scale, rng in zip(crop_scales, rngs)]
    return torch.from_numpy(views[0] if len(views) == 1 else np.stack(views))


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
