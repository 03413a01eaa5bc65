"""Image loading, the train/eval transforms, and the torch datasets built on caption sets and image folders."""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .layouts import ImageCaptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_rgb(path: Path) -> Image.Image:
    """Any mode PIL reads (L, RGBA, CMYK, P, 16-bit) as 8-bit RGB; transparency is composited on white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: PIL's convert would clip at 255 rather than rescale.
                array = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if array.max(initial=0) > 255 else 255.0
                im = Image.fromarray((array * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
            if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA"):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image; give an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc}); re-save it as JPEG or PNG") from None


class Preprocess:
    """PIL image -> normalised 3 x s x s tensor. Evaluation: resize the short side, centre crop.
    Training: a random resized crop (area in `crop_scale`, aspect 3/4-4/3), drawn from the given rng so
    that a sample's crop depends only on (seed, epoch, index), whichever worker loads it."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def to_tensor(self, im: Image.Image) -> torch.Tensor:
        array = np.asarray(im, dtype=np.float32) / 255.0  # h w c
        return (torch.from_numpy(array).permute(2, 0, 1) - self.mean) / self.std  # 'h w c -> c h w'

    def eval(self, im: Image.Image) -> torch.Tensor:
        w, h = im.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return self.to_tensor(im.crop((left, top, left + self.size, top + self.size)))

    def train(self, im: Image.Image, crop_scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
        w, h = im.size
        area = w * h
        for _ in range(10):  # torchvision's RandomResizedCrop sampling, with our own rng
            target = area * rng.uniform(*crop_scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                crop = im.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
                return self.to_tensor(crop)
        return self.eval(im)


def sample_seed(*parts: int) -> int:
    """A stable seed from integers (Python's hash of tuples is stable too, but this documents intent)."""
    return zlib.crc32(np.array(parts, dtype=np.int64).tobytes())


class PairDataset(torch.utils.data.Dataset):
    """Training pairs. captions="one": an item per image, its caption drawn anew each epoch;
    "all": an item per (image, caption) pair. Call set_epoch before each epoch's loader is made."""

    def __init__(self, items: list[ImageCaptions], preprocess: Preprocess, crop_scale, captions: str, seed: int):
        self.items, self.preprocess, self.crop_scale = items, preprocess, tuple(crop_scale)
        self.seed, self.epoch = seed, 0
        self.pairs = [(i, None) for i in range(len(items))] if captions == "one" else [
            (i, j) for i, item in enumerate(items) for j in range(len(item.captions))
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_index, caption_index = self.pairs[index]
        item = self.items[image_index]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        if caption_index is None:
            caption_index = rng.randrange(len(item.captions))
        image = self.preprocess.train(load_rgb(item.image), self.crop_scale, rng)
        return image, item.captions[caption_index]


class ImageDataset(torch.utils.data.Dataset):
    """Images only, evaluation transform, in order."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess.eval(load_rgb(self.paths[index]))


@dataclass
class ImageFolder:
    """A zero-shot set: `<root>/<class>/<image>`; class names from folder names, underscores as spaces."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: list[int]

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; --zero-shot takes a folder of <class>/<image> subfolders")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        paths, labels, names = [], [], []
        for folder in folders:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                labels += [len(names)] * len(images)
                paths += images
                names.append(folder.name.replace("_", " "))
        if len(names) < 2:
            raise DataError(f"{root}: found {len(names)} class folder(s) with images; zero-shot needs at least two "
                            "subfolders such as cat/ and dog/ holding images")
        return cls(root, names, paths, labels)
