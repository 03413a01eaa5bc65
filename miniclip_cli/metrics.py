"""Retrieval and zero-shot metrics: arrays in, flat dicts of percentages out. NumPy only, so the
PyTorch-free ONNX runtime computes them too (torch CPU tensors are accepted as they are)."""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


def _finite(scores) -> np.ndarray:
    """Non-finite scores (NaN, +-inf: a broken model) as -inf, so they rank last instead of first or nowhere."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.where(np.isfinite(scores), scores, -np.inf)


def _ranks(similarity: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """similarity: q c; correct: q c bool. 1-based rank of the best-placed correct candidate per query.

    Candidates are ordered by score, ties in index order, as a stable sort (and CLIP_benchmark's top-k) would:
    ties in the query's favour would give a collapsed model, whose scores all tie, 100% recall."""
    similarity = _finite(similarity)
    best = np.where(correct, similarity, -np.inf).max(axis=1, keepdims=True)  # q 1
    first = np.argmax(correct & (similarity == best), axis=1)[:, None]  # q 1: the first correct one scoring best
    tied_before = (similarity == best) & (np.arange(similarity.shape[1])[None, :] < first)
    return (similarity > best).sum(axis=1) + tied_before.sum(axis=1) + 1


def retrieval_metrics(image_features, text_features, text_image) -> dict[str, float]:
    """image_features: i d; text_features: t d; text_image: t, the image index of each caption.

    Image->text: a hit at k when any of the image's captions is in its top k. Text->image: when the
    caption's own image is in its top k. Recalls in percent; ranks 1-based (median: the lower median).
    """
    image_features = np.asarray(image_features, dtype=np.float32)
    text_features = np.asarray(text_features, dtype=np.float32)
    text_image = np.asarray(text_image)
    similarity = image_features @ text_features.T  # i t
    owner = text_image[None, :] == np.arange(similarity.shape[0])[:, None]  # i t
    out: dict[str, float] = {}
    for name, sim, correct in (("image_to_text", similarity, owner), ("text_to_image", similarity.T, owner.T)):
        ranks = np.sort(_ranks(sim, correct))
        for k in RECALL_KS:
            out[f"{name}_R@{k}"] = float(100.0 * (ranks <= k).mean())
        out[f"{name}_mean_rank"] = float(ranks.mean())
        out[f"{name}_median_rank"] = float(ranks[(len(ranks) - 1) // 2])
    out["mean_recall"] = sum(out[f"{n}_R@{k}"] for n in ("image_to_text", "text_to_image") for k in RECALL_KS) / 6
    out["match3_top1"] = match3_top1(similarity, text_image)
    return out


def match3_top1(similarity: np.ndarray, text_image: np.ndarray, seed: int = 0) -> float | None:
    """The demo's task, in percent: each image against each of its own captions and two captions of other
    images, drawn from `seed`; a hit when its own caption scores strictly highest (a tie is no pick, and a
    non-finite score ranks last).

    similarity: i t; text_image: t, the image index of each caption. None with a single image: no distractors."""
    text_image, similarity = np.asarray(text_image), _finite(similarity)
    if len(np.unique(text_image)) < 2:
        return None
    rng = np.random.default_rng(seed)
    own = similarity[text_image, np.arange(len(text_image))]  # t: each caption with its own image
    hits = np.ones(len(text_image), dtype=bool)
    for _ in range(2):
        # Redraw until every distractor belongs to another image; a few rounds suffice unless one image owns
        # nearly all captions.
        distractor = rng.integers(0, len(text_image), len(text_image))
        while (clash := text_image[distractor] == text_image).any():
            distractor[clash] = rng.integers(0, len(text_image), clash.sum())
        hits &= own > similarity[text_image, distractor]
    return float(100.0 * hits.mean())


def zero_shot_metrics(logits, labels, class_names: list[str]) -> dict:
    """logits: n c; labels: n. top1/top5/mean_per_class_recall in percent, plus a per-class recall dict."""
    logits, labels = _finite(logits), np.asarray(labels)
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # n k
    hits = top == labels[:, None]
    per_class = {name: float(100.0 * hits[labels == c, 0].mean())
                 for c, name in enumerate(class_names) if (labels == c).any()}
    return {
        "top1": float(100.0 * hits[:, 0].mean()),
        "top5": float(100.0 * hits.any(axis=1).mean()),
        "mean_per_class_recall": sum(per_class.values()) / max(len(per_class), 1),
        "per_class": per_class,
    }
