"""Training with a frozen image tower (model.FrozenTower): its pooled features are computed once for a few fixed
views of every image and kept, so an epoch costs what the text tower and the projection cost.

View 0 of an image is the whole image as evaluation sees it (data/pixels.eval_pixels); views 1.. are random
resized crops at train.crop_scale, seeded by (seed, image). Epoch e trains on view e mod train.tower_views. The
training step is unchanged: FeatureDataset's samples are (b 1280 features, caption, failures, index) where PairDataset's
are (b 3 s s crops, ...), and the tower passes features straight to its projection.

The features are kept in the per-user cache folder beside the decoded images (data/cache.py) as
ROOT/KEY.features.npy, keyed like the image cache by every image's path, size and modification time plus
everything that shapes a view, so a second run on the same data starts training at once.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .data.cache import FEATURES_SUFFIX, cache_key, default_root
from .data.feeding import load_batches
from .data.images import CaptionPairs, sample_seed
from .data.layouts import ImageCaptions
from .data.pixels import eval_pixels, load_rgb
from .data.transforms import training_views
from .run_files import atomic_write
from .runtime import TorchEncoder


@dataclass(frozen=True)
class TowerInput:
    """What the frozen tower sees of each image: `views` views at `size` px normalised by mean/std, view 0 the
    whole image as evaluation sees it, the others random crops at crop_scale seeded by (seed, image); and the
    layer it is read at (tuned > 0: the input of its last `tuned` blocks, else the pooled features)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: int = 1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    tuned: int = 0

    @classmethod
    def of_run(cls, config: RunConfig, views: int) -> TowerInput:
        """The run's own image tower (model.vision=efficientnet_lite0): its image size and normalisation."""
        tc = config.train
        return cls(config.model.image_size, tuple(config.data.mean), tuple(config.data.std), views,
                   tuple(tc.crop_scale), tc.seed, tc.tower_tuned)


class _Views(torch.utils.data.Dataset):
    """Each image's views, v c s s (TowerInput)."""

    def __init__(self, paths: list[Path], seen: TowerInput):
        self.paths, self.seen = paths, seen

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        seen = self.seen
        first = torch.from_numpy(eval_pixels(self.paths[index], seen.size, seen.mean, seen.std))[None]  # 1 c s s
        if seen.views == 1:
            return first
        rngs = [random.Random(sample_seed(seen.seed, index, v)) for v in range(1, seen.views)]
        crops = training_views(load_rgb(self.paths[index]), seen.size, seen.mean, seen.std,
                               (seen.crop_scale,) * len(rngs), rngs)
        return torch.cat([first, crops.reshape(len(rngs), *first.shape[1:])])  # v c s s


def tower_features(backbone: torch.nn.Module, paths: list[Path], seen: TowerInput, device: torch.device,
                   workers: int = 0, progress=None, batch_images: int = 32) -> torch.Tensor:
    """n v 1280: the frozen backbone's pooled features of each image's views, on the CPU; with seen.tuned
    blocks tuned, n v c h w: those blocks' input."""
    loader = load_batches(_Views(paths, seen), workers, batch_size=batch_images)
    out, done = [], 0
    # A channels-last copy: its depthwise convolutions run ~1.4x faster on a CPU (the saved weights stay as they are)
    net = copy.deepcopy(backbone).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for crops in loader:  # b v c s s
            b = len(crops)
            crops = crops.flatten(0, 1).to(device).contiguous(memory_format=torch.channels_last)
            # '(b v) c s s -> (b v) 1280', or the tuned blocks' input '(b v) c h w'; 32 crops at a time, since the
            # activations of more outgrow a CPU's caches (160 px: 101 crops/s at 32, 46 at 128 on 2 AVX2 cores)
            features = torch.cat([net.start(part, seen.tuned) for part in crops.split(32)]).contiguous()
            out.append(features.float().cpu().view(b, seen.views, *features.shape[1:]))  # '(b v) ... -> b v ...'
            done += b
            if progress:
                progress(done, len(paths))
    return torch.cat(out) if out else torch.zeros(0, seen.views, backbone.head.bn.num_features)


def weights_digest(module: torch.nn.Module) -> str:
    """sha1 of a module's weights themselves (~20 ms for Lite0's 4.7 M), for keys of what they computed."""
    weights = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        weights.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return weights.hexdigest()


def feature_key(backbone: torch.nn.Module, paths: list[Path], seen: TowerInput) -> str:
    shaping = (seen.views, seen.tuned, tuple(seen.crop_scale), seen.seed, tuple(seen.mean), tuple(seen.std))
    return cache_key(paths, seen.size, f"/features/1/{shaping}/{weights_digest(backbone)}")


def cached_tower_features(backbone: torch.nn.Module, paths: list[Path], seen: TowerInput, device: torch.device,
                          workers: int = 0, progress=None, root: Path | None = None) -> torch.Tensor:
    """tower_features, read from the feature cache when it holds them, else computed and kept there."""
    file = Path(root or default_root()) / f"{feature_key(backbone, paths, seen)}{FEATURES_SUFFIX}"
    return cached_array(file, (len(paths), seen.views),
                        lambda: tower_features(backbone, paths, seen, device, workers, progress))


def cached_array(file: Path, shape: tuple[int, ...], compute) -> torch.Tensor:
    """The float32 array kept in `file` when its leading dimensions are `shape` and every value is finite, else
    compute() kept there. A damaged or cut-short file is computed again; a cache that cannot be written only
    costs the next run the same pass."""
    try:
        kept = np.load(file, allow_pickle=False)
        # The file's key names what it holds; a file cut short fails to load or has too few rows.
        if kept.shape[:len(shape)] == tuple(shape) and kept.dtype == np.float32 and np.isfinite(kept).all():
            return torch.from_numpy(kept)
    except (OSError, ValueError):
        pass
    computed = compute()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, computed.numpy(), allow_pickle=False)

    try:
        atomic_write(file, write)
    except OSError:
        pass
    return computed


class FeatureDataset(CaptionPairs):
    """Training pairs of cached features (see the module docstring), drawn as PairDataset draws its pairs."""

    def __init__(self, items: list[ImageCaptions], features: torch.Tensor, captions: str, seed: int):
        super().__init__(items, captions, seed)
        self.features = features  # n v 1280

    def __getitem__(self, index: int) -> tuple:
        image, caption = self.caption(index, random.Random(sample_seed(self.seed, self.epoch, index)))
        return self.features[image, self.epoch % self.features.shape[1]], caption, (), image


class FeatureEncoder(TorchEncoder):
    """TorchEncoder for validation during training: the images it was given features for (view 0) go straight to
    the projection; any other image goes through the whole tower."""

    def __init__(self, model, tokenizer, mean, std, device, precision, paths: list[Path], features: torch.Tensor):
        super().__init__(model, tokenizer, mean, std, device, precision)
        self.known = {str(p): i for i, p in enumerate(paths)}
        self.features = features[:, 0].numpy()  # n 1280

    def encode_images(self, paths, batch_size: int = 64, progress=None):
        if not all(str(p) in self.known for p in paths):
            return super().encode_images(paths, batch_size, progress)
        return self._run(self.model.encode_image, self.features[[self.known[str(p)] for p in paths]])


def prepare(config: RunConfig, model, train: list[ImageCaptions], val: list[ImageCaptions], device: torch.device,
            workers: int, progress=None) -> tuple[FeatureDataset, tuple[list[Path], torch.Tensor]]:
    """Load the ImageNet weights into `model`'s frozen tower and cache its features: the training dataset, and
    the validation images with their view-0 features (for FeatureEncoder)."""
    from .efficientnet import load_pretrained

    tower = model.visual.backbone
    tower.load_state_dict(load_pretrained().state_dict())
    tc = config.train
    paths = [item.image for item in train]
    compute = cached_tower_features if config.runtime.cache else tower_features
    features = compute(tower, paths, TowerInput.of_run(config, tc.tower_views), device, workers, progress)
    val_paths = [item.image for item in val]
    val_features = compute(tower, val_paths, TowerInput.of_run(config, 1), device, workers)
    return FeatureDataset(train, features, tc.captions, tc.seed), (val_paths, val_features)
