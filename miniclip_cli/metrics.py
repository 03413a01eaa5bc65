"""Retrieval and zero-shot metrics: tensors in, flat dicts of percentages out."""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def _ranks(similarity: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """similarity: q c; correct: q c bool. 1-based rank of the best-placed correct candidate per query."""
    # A correct candidate's rank is 1 + the number of candidates scoring strictly higher than the best
    # correct one; ties are resolved in the query's favour, as argsort-based code does for the first hit.
    best_correct = similarity.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    return (similarity > best_correct).sum(dim=1) + 1


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_image: torch.Tensor) -> dict[str, float]:
    """image_features: i d; text_features: t d; text_image: t, the image index of each caption.

    Image->text: a hit at k when any of the image's captions is in its top k. Text->image: when the
    caption's own image is in its top k. Recalls in percent; ranks 1-based.
    """
    similarity = image_features.float() @ text_features.float().T  # i t
    owner = text_image.view(1, -1) == torch.arange(similarity.shape[0]).view(-1, 1)  # i t
    out: dict[str, float] = {}
    for name, sim, correct in (("image_to_text", similarity, owner), ("text_to_image", similarity.T, owner.T)):
        ranks = _ranks(sim, correct).float()
        for k in RECALL_KS:
            out[f"{name}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.mean().item()
        out[f"{name}_median_rank"] = ranks.median().item()
    out["mean_recall"] = sum(out[f"{n}_R@{k}"] for n in ("image_to_text", "text_to_image") for k in RECALL_KS) / 6
    return out


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """logits: n c; labels: n. top1/top5/mean_per_class_recall in percent, plus a per-class recall dict."""
    n_classes = logits.shape[1]
    top = logits.topk(min(5, n_classes), dim=1).indices  # n k
    hits = top == labels.view(-1, 1)
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = 100.0 * hits[mask, 0].float().mean().item()
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
        "mean_per_class_recall": sum(per_class.values()) / max(len(per_class), 1),
        "per_class": per_class,
    }
