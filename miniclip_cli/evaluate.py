"""Runs an encoder (PyTorch or ONNX) over data and hands the features to metrics.py. No torch import."""

from __future__ import annotations

import numpy as np

from .data.image_folder import ImageFolder
from .data.layouts import ImageCaptions
from .metrics import retrieval_metrics, zero_shot_metrics
from .runtime import Encoder, Progress, check_features, normalise_rows


def evaluate_retrieval(encoder: Encoder, items: list[ImageCaptions], progress: Progress | None = None) -> dict:
    texts = [c for item in items for c in item.captions]
    owner = np.array([i for i, item in enumerate(items) for _ in item.captions])
    image_features = check_features(encoder.encode_images([item.image for item in items], progress=progress),
                                    "images", distinct=True)
    text_features = check_features(encoder.encode_texts(texts), "captions", distinct=True)
    metrics = retrieval_metrics(image_features, text_features, owner)
    metrics.update(images=len(items), captions=len(texts))
    return metrics


def class_text_features(encoder: Encoder, class_names: list[str], templates: list[str]) -> np.ndarray:
    """c d: per class, the normalised mean of its templates' features (CLIP's prompt ensembling)."""
    features = check_features(encoder.encode_texts([t.format(name) for name in class_names for t in templates]),
                              "class prompts")
    features = features.reshape(len(class_names), len(templates), -1).mean(axis=1)  # '(c t) d -> c d'
    return normalise_rows(features)


def evaluate_zero_shot(encoder: Encoder, folder: ImageFolder, templates: list[str],
                       progress: Progress | None = None) -> dict:
    class_features = check_features(class_text_features(encoder, folder.class_names, templates), "classes", distinct=True)
    image_features = check_features(encoder.encode_images(folder.paths, progress=progress), "images", distinct=True)
    metrics = zero_shot_metrics(image_features @ class_features.T, np.array(folder.labels), folder.class_names)
    metrics.update(images=len(folder.paths), classes=len(folder.class_names), templates=templates)
    return metrics
