"""The symmetric contrastive (InfoNCE) loss, as a pure function of features and the logit scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """image_features, text_features: b d, unit length, row i of each is a matching pair.

    Mean of the cross-entropy picking each image's caption among the batch's captions and each caption's
    image among the batch's images.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T  # b b
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
