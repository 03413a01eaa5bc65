"""The optimiser set-up every training step shares (`train` and `bench-train`): AdamW with CLIP's decay groups,
the learning-rate schedule, and the moving average of the weights."""

from __future__ import annotations

import copy
import math

import torch

from .config import TrainConfig
from .model import MiniCLIP


def parameter_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and the patch projection only; norms, biases, embeddings, positions,
    the class token and the temperature are left undecayed, as in CLIP."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:  # a frozen tower (model.FrozenTower)
                continue
            undecayed = p.ndim < 2 or "token_embed" in name or "positions" in name
            (no_decay if undecayed else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(modules: list[torch.nn.Module], tc: TrainConfig) -> torch.optim.AdamW:
    """CLIP's AdamW (betas 0.9/0.98, eps 1e-6) over the model and any objective's own modules, in that order
    (the resume file's optimizer state is keyed by it)."""
    return torch.optim.AdamW(parameter_groups(modules, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class MovingAverage:
    """An exponential moving average of the model's weights, decay d: each step the average moves 1 - d of
    the way to the weights. Early on the decay is min(d, (1 + step) / (10 + step)) (as in TensorFlow's
    ExponentialMovingAverage), so the average is not dominated by the random initial weights."""

    def __init__(self, model: MiniCLIP, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()  # a copy keeps how it was set up to train (FrozenTower.tune)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: MiniCLIP, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        mine, theirs = list(self.model.state_dict().values()), list(model.state_dict().values())
        torch._foreach_lerp_(mine, theirs, 1.0 - decay)
