"""The symmetric contrastive (InfoNCE) loss, as a pure function of features and the logit scale, and the
gathering of features across processes that lets it see the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """image_features, text_features: b d each, row i of both from pair i, unit length.

    Mean of the cross-entropy picking each image's caption among the batch's captions and each caption's
    image among the batch's images."""
    logits = logit_scale * image_features.float() @ text_features.float().T  # b b
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """The sigmoid pairwise loss of SigLIP (Zhai et al. 2023), shapes as in clip_loss.

    Every image-caption pair of the batch is its own binary question, "is this the image's caption?", with
    logit scale x cosine + bias; the sum of their log-sigmoid losses is divided by the number of images, as
    the paper does. Unlike the softmax a pair's loss does not depend on the rest of the batch, which the paper
    found trains better than clip_loss at small batches.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T + logit_bias  # b b
    signs = 2.0 * torch.eye(logits.shape[0], device=logits.device) - 1.0  # +1 for a pair's own, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


# Sharp enough that each caption's teacher distribution sits on its few near-paraphrases: WordLlama's cosine
# between Flickr8k captions of one image averages 0.56, between other captions 0.12 (sd 0.12).
DISTILL_TEMPERATURE = 0.05


def distill_loss(text_features: torch.Tensor, teacher_features: torch.Tensor,
                 temperature: float = DISTILL_TEMPERATURE) -> torch.Tensor:
    """Caption-to-caption similarity distillation (train.distill): n d and n e, each row unit length.

    For every caption, a distribution over the batch's other captions, softmax(cosine / temperature), from
    the student's features and from the teacher's; the loss is the mean over captions of KL(teacher ||
    student). Only similarities are matched, so the teacher's width e need not be the model's d, and the
    student stays free to place the captions anywhere its contrastive loss wants them."""
    n = text_features.shape[0]
    itself = torch.eye(n, dtype=torch.bool, device=text_features.device)

    def log_neighbours(features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        # a large negative rather than -inf: KL's 0 x log 0 on the diagonal stays 0 instead of nan
        return F.log_softmax((features @ features.T / temperature).masked_fill(itself, -1e4), dim=1)

    return F.kl_div(log_neighbours(text_features), log_neighbours(teacher_features.to(text_features.device)),
                    log_target=True, reduction="batchmean")


# SimCLR's and SLIP's value: with unit-length features a view's other view must stand out by ~0.3 of cosine
# from the batch's other images to take most of the softmax.
IMAGE_SSL_TEMPERATURE = 0.1


def image_ssl_loss(first: torch.Tensor, second: torch.Tensor,
                   temperature: float = IMAGE_SSL_TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020) between two views of the same n images (train.image_ssl, as
    SLIP adds it to CLIP's loss): first, second: n d, any length (they are normalised here).

    Each of the 2n views picks its image's other view among the other 2n - 1 by softmax(cosine / temperature);
    the loss is the mean cross-entropy. It asks the image features to say which photo a crop came from, a
    signal from the pixels alone that does not depend on how well the captions fit."""
    views = F.normalize(torch.cat([first, second]).float(), dim=-1)  # (2 n) d
    n = first.shape[0]
    itself = torch.eye(2 * n, dtype=torch.bool, device=views.device)
    logits = (views @ views.T / temperature).masked_fill(itself, float("-inf"))
    other = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(views.device)  # each view's other view
    return F.cross_entropy(logits, other)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's features, in rank order: (world b) d each, so a loss over them sees the global batch.

    all_gather carries no gradient, so this process's own slice is put back from the local tensors, which do
    (open_clip's gather without grad): each process back-propagates through its own samples only, and the sum
    over processes of those partial gradients is the gradient of the global loss. Outside a process group, or
    in a group of one, the features come back unchanged. Every process must pass the same b.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for local in (image_features.float(), text_features.float()):  # fp32: the loss is computed in fp32 anyway
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = local
        gathered.append(torch.cat(parts))  # world x (b d) -> (world b) d
    return gathered[0], gathered[1]
