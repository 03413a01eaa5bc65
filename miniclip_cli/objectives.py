"""Training objectives as pieces. The contrastive objective (softmax InfoNCE or SigLIP's sigmoid loss) sees the
global batch; every other objective is local to one micro-batch and returns one loss for it. The training step
adds them up by weight and logs each under its name; it never asks which ones are on.

A new objective is one class here (its weight, any modules, the extra image views it needs, what the loader
prepares for it, and its loss), one line in OBJECTIVES, a weight in config.TrainConfig and its tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, RunConfig
from .data.transforms import distort
from .errors import ConfigError
from .loss import clip_loss, distill_loss, image_ssl_loss, siglip_loss
from .tokenizer import Tokenizer


class Contrastive(nn.Module):
    """CLIP's symmetric softmax loss over the global batch (loss.clip_loss)."""

    name = "contrastive"

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return clip_loss(image, text, scale)


class SigLip(Contrastive):
    """SigLIP's sigmoid loss on every image-caption pair (loss.siglip_loss); the model learns the bias."""

    name = "siglip"

    def forward(self, image, text, scale, bias):
        return siglip_loss(image, text, scale, bias)


class Objective(nn.Module):
    """A loss on one micro-batch, added to the contrastive one times `weight`.

    views:     crop scales of extra views of every image this objective needs (beside the captions' crop)
    setup:     sees the model and the training images once before the first epoch, e.g. to compute what it
               keeps per image
    prepare:   runs in the loader on the batch's captions and its images' indices among the training images
               (None for shards); what it returns reaches `forward` as `prepared`
    transform: changes its views on the training device, e.g. photometric distortions
    forward:   (the micro-batch's outputs, what `prepare` gave) -> its loss
    """

    name = ""
    views: tuple[tuple[float, float], ...] = ()

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight
        self.first_view = 1  # where its views start among a batch's views; set by `build`

    def setup(self, model: nn.Module, items: list, device: torch.device, workers: int, progress=None,
              cache: bool = True) -> None:
        pass

    def prepare(self, captions: list[str], images: list[int | None]):
        return None

    def transform(self, views: torch.Tensor, mean, std, generator: torch.Generator) -> torch.Tensor:
        return views

    def forward(self, outputs: dict[str, torch.Tensor], prepared) -> torch.Tensor:
        raise NotImplementedError


class CaptionDistillation(Objective):
    """Teaches the text tower which captions are alike from a sentence-embedding teacher (teacher.py,
    loss.distill_loss). The teacher embeds each batch's captions in the loader; it is needed in training only."""

    name = "distill"

    def __init__(self, weight: float):
        super().__init__(weight)
        from .teacher import CaptionTeacher

        self.teacher = CaptionTeacher()

    def prepare(self, captions, images):
        return self.teacher(captions)

    def forward(self, outputs, prepared):
        return distill_loss(outputs["text"], prepared)


class TeacherDistillation(Objective):
    """Teaches the image tower from a trained run (--preset distill --teacher RUN, e.g. a --preset lit run): the
    model takes over the teacher's tokenizer, text tower (frozen) and temperature, and its image features learn
    the teacher's image features of the same photos (1 - cosine: both live in the teacher's space, so no
    projection is learnt). The teacher encodes each training image whole, as eval does, once before the first
    epoch; the features cache (features.py) keeps them for the next run. The saved model is self-contained: it
    needs neither the teacher nor any extra. CLIP-KD (Yang et al. 2024) found this feature distillation the
    strongest of its single losses."""

    name = "teacher"

    def __init__(self, weight: float, teacher: str):
        super().__init__(weight)
        self.teacher = teacher
        self.features: torch.Tensor | None = None  # n embed_dim, unit length: the teacher's, one row per image

    def setup(self, model, items, device, workers, progress=None, cache=True):
        from .checkpoint import load_run
        from .data.cache import FEATURES_SUFFIX, cache_key, default_root
        from .data.shards import ShardSet
        from .features import cached_array, weights_digest
        from .runtime import TorchEncoder

        if isinstance(items, ShardSet):
            raise ConfigError("train.teacher keeps the teacher's features of every training image; train on an image "
                              "dataset (a captions file), not on shards")
        teacher, config, tokenizer = load_run(self.teacher)
        with torch.no_grad():
            model.text.load_state_dict(teacher.text.state_dict())
            model.logit_scale.copy_(teacher.logit_scale)
        model.text.requires_grad_(False)
        paths = [item.image for item in items]
        encoder = TorchEncoder(teacher.eval().to(device), tokenizer, config.data.mean, config.data.std, device)

        def compute() -> torch.Tensor:
            return torch.from_numpy(encoder.encode_images(paths, progress=progress))

        if not cache:
            self.features = compute()
            return
        salt = f"/teacher/1/{tuple(config.data.mean)}/{tuple(config.data.std)}/{weights_digest(teacher)}"
        file = default_root() / f"{cache_key(paths, config.model.image_size, salt)}{FEATURES_SUFFIX}"
        self.features = cached_array(file, (len(paths),), compute)

    def prepare(self, captions, images):
        return self.features[images]

    def forward(self, outputs, prepared):
        return (1 - (outputs["image"].float() * prepared).sum(-1)).mean()  # the loop moved `prepared` there


# What a run taught by a teacher takes over with its text tower (TeacherDistillation): every setting that shapes it.
TEXT_SETTINGS = ("vocab_size", "context_length", "text_width", "text_layers", "text_heads", "mlp_ratio", "embed_dim")


def teacher_text(run: Path, model: ModelConfig) -> tuple[Tokenizer, ModelConfig]:
    """The teacher run's tokenizer, and `model` with the teacher's text-tower settings."""
    from .checkpoint import load_run_config, load_run_tokenizer

    config = load_run_config(run)
    return load_run_tokenizer(run, config), dataclasses.replace(
        model, **{name: getattr(config.model, name) for name in TEXT_SETTINGS})


class ImageSSLHead(nn.Module):
    """SLIP's projection MLP (Mu et al. 2022): three layers, 4 x width hidden, from the image features to the
    space where loss.image_ssl_loss compares two views. LayerNorm stands in for SLIP's BatchNorm so that
    training split over processes or micro-batches stays the one-batch computation."""

    def __init__(self, width: int):
        super().__init__()
        hidden = 4 * width
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


# SimCLR crops as small as 8% of the image make the task too hard for 128 px photos seen once per epoch; 20%
# keeps an object in most crops.
SECOND_VIEW_CROP_SCALE = (0.2, 1.0)


class ImageSSL(Objective):
    """SLIP's image self-supervised loss: the vision tower also encodes a second, more distorted view of every
    image, and a training-only head learns to tell which photo each crop came from (SimCLR's loss). The head is
    saved only in the resume file, so the model, its export and inference are unchanged."""

    name = "image_ssl"
    views = (SECOND_VIEW_CROP_SCALE,)

    def __init__(self, weight: float, embed_dim: int):
        super().__init__(weight)
        self.head = ImageSSLHead(embed_dim)

    def transform(self, views, mean, std, generator):
        return distort(views, mean, std, generator)

    def forward(self, outputs, prepared):
        b = len(outputs["text"])
        crops, second = outputs["views"][:b], outputs["views"][self.first_view * b: (self.first_view + 1) * b]
        return image_ssl_loss(self.head(crops).float(), self.head(second).float())


CONTRASTIVE = {"clip": Contrastive, "siglip": SigLip}
# TrainConfig field (the objective's weight, 0: off) -> how to build it
OBJECTIVES = {
    "distill": lambda weight, config: CaptionDistillation(weight),
    "image_ssl": lambda weight, config: ImageSSL(weight, config.model.embed_dim),
    "image_teacher": lambda weight, config: TeacherDistillation(weight, config.train.teacher),
}


def build(config: RunConfig) -> tuple[Contrastive, list[Objective]]:
    """The run's contrastive objective and its other objectives, each told where its views sit in a batch."""
    objectives = [make(weight, config) for name, make in OBJECTIVES.items() if (weight := getattr(config.train, name))]
    first = 1  # view 0 is the crop the captions see
    for objective in objectives:
        objective.first_view, first = first, first + len(objective.views)
    return CONTRASTIVE[config.train.loss](), objectives


def crop_scales(config: RunConfig, objectives: list[Objective]) -> tuple[tuple[float, float], ...]:
    """Every view a training sample carries: the captions' crop, then each objective's own."""
    return (tuple(config.train.crop_scale), *(scale for o in objectives for scale in o.views))
