"""Runs a model over data in batches and hands the features to metrics.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .data.images import ImageDataset, ImageFolder, Preprocess
from .data.layouts import ImageCaptions
from .device import autocast_dtype
from .metrics import retrieval_metrics, zero_shot_metrics
from .model import MiniCLIP
from .tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (done, total)


def _autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def encode_images(model: MiniCLIP, paths: list[Path], preprocess: Preprocess, device: torch.device,
                  batch_size: int = 128, workers: int = 0, precision: str = "auto",
                  progress: Progress | None = None) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ImageDataset(paths, preprocess), batch_size=batch_size, num_workers=workers)
    features, done = [], 0
    for images in loader:
        with _autocast(device, precision):
            features.append(model.encode_image(images.to(device)).float().cpu())
        done += len(images)
        if progress:
            progress(done, len(paths))
    return torch.cat(features) if features else torch.empty(0, model.config.embed_dim)


@torch.no_grad()
def encode_texts(model: MiniCLIP, tokenizer: Tokenizer, texts: list[str], device: torch.device,
                 batch_size: int = 512, precision: str = "auto") -> torch.Tensor:
    features = []
    for start in range(0, len(texts), batch_size):
        ids, lengths = tokenizer.encode(texts[start:start + batch_size], model.config.context_length)
        with _autocast(device, precision):
            out = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
        features.append(out.float().cpu())
    return torch.cat(features) if features else torch.empty(0, model.config.embed_dim)


def evaluate_retrieval(model: MiniCLIP, tokenizer: Tokenizer, items: list[ImageCaptions], preprocess: Preprocess,
                       device: torch.device, workers: int = 0, precision: str = "auto",
                       progress: Progress | None = None) -> dict[str, float]:
    texts = [c for item in items for c in item.captions]
    owner = torch.tensor([i for i, item in enumerate(items) for _ in item.captions])
    image_features = encode_images(model, [item.image for item in items], preprocess, device,
                                   workers=workers, precision=precision, progress=progress)
    text_features = encode_texts(model, tokenizer, texts, device, precision=precision)
    metrics = retrieval_metrics(image_features, text_features, owner)
    metrics.update(images=len(items), captions=len(texts))
    return metrics


def class_text_features(model: MiniCLIP, tokenizer: Tokenizer, class_names: list[str], templates: list[str],
                        device: torch.device, precision: str = "auto") -> torch.Tensor:
    """c d: per class, the normalised mean of its templates' features (CLIP's prompt ensembling)."""
    texts = [t.format(name) for name in class_names for t in templates]
    features = encode_texts(model, tokenizer, texts, device, precision=precision)
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)  # '(c t) d -> c d'
    return torch.nn.functional.normalize(features, dim=-1)


def evaluate_zero_shot(model: MiniCLIP, tokenizer: Tokenizer, folder: ImageFolder, templates: list[str],
                       preprocess: Preprocess, device: torch.device, workers: int = 0, precision: str = "auto",
                       progress: Progress | None = None) -> dict:
    class_features = class_text_features(model, tokenizer, folder.class_names, templates, device, precision)
    image_features = encode_images(model, folder.paths, preprocess, device, workers=workers,
                                   precision=precision, progress=progress)
    metrics = zero_shot_metrics(image_features @ class_features.T, torch.tensor(folder.labels), folder.class_names)
    metrics.update(images=len(folder.paths), classes=len(folder.class_names), templates=templates)
    return metrics


@torch.no_grad()
def caption_probabilities(model: MiniCLIP, tokenizer: Tokenizer, image: torch.Tensor, captions: list[str],
                          device: torch.device) -> list[float]:
    """image: 3 s s (preprocessed). Softmax over the captions of the scaled cosine similarities."""
    image_features = model.encode_image(image.unsqueeze(0).to(device)).float().cpu()
    text_features = encode_texts(model, tokenizer, captions, device, precision="fp32")
    logits = model.scale().float().cpu() * image_features @ text_features.T  # 1 c
    return logits.softmax(dim=-1)[0].tolist()
