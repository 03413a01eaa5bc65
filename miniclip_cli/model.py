"""The dual encoder: a Vision Transformer and a text Transformer projected into one normalised space.

No loss and no file I/O here; `loss.py` and `checkpoint.py` own those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        # 'b n (three h e) -> three b h n e'
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))  # 'b h n e -> b n (h e)'


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). In training, each branch is
    skipped for a whole sample with chance `drop_path` (stochastic depth, Huang et al. 2016) and scaled by
    1 / (1 - drop_path) where kept, so at inference, which keeps every branch, its expected output is met."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.skip(self.attn(self.ln_1(x), causal))
        return x + self.skip(self.mlp(self.ln_2(x)))

    def skip(self, branch: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.drop_path):
            return branch
        kept = torch.rand(branch.shape[0], 1, 1, device=branch.device) >= self.drop_path  # b 1 1, per sample
        return branch * kept.to(branch.dtype) / (1 - self.drop_path)


def drop_path_rates(rate: float, layers: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last, as DeiT schedules
    it: the first blocks, which every later one builds on, are dropped least."""
    return [rate * i / max(1, layers - 1) for i in range(layers)]


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) 3x3 stride-2 convolutions, each normalised and followed by ReLU, doubling the channels
    up to width / 2, then a 1x1 convolution to width: b 3 s s -> b width (s / p) (s / p), as the patch
    projection does. Xiao et al. 2021 ("Early convolutions help transformers see better") found such a stem
    makes vision transformers train more stably and generalise better from little data; at the default size
    it has fewer parameters than the linear patch projection (130 k against 197 k). GroupNorm with one group
    stands in for their BatchNorm: it does not depend on the batch, so training split over processes or
    micro-batches stays exactly the one-batch computation, and training and inference behave alike."""
    layers, steps, channels = [], patch_size.bit_length() - 1, 3
    for i in range(steps):
        out = max(1, width >> (steps - i))
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, out), nn.ReLU()]
        channels = out
    layers.append(nn.Conv2d(channels, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        grid = c.image_size // c.patch_size
        if c.stem == "conv":
            self.patch_embed = conv_stem(c.vision_width, c.patch_size)
        else:  # a stride-p conv is the linear projection of each non-overlapping p x p patch
            self.patch_embed = nn.Conv2d(3, c.vision_width, kernel_size=c.patch_size, stride=c.patch_size)
        self.class_token = nn.Parameter(torch.randn(c.vision_width) * c.vision_width**-0.5)
        self.positions = nn.Parameter(torch.randn(grid * grid + 1, c.vision_width) * 0.02)
        self.ln_pre = nn.LayerNorm(c.vision_width)
        self.blocks = nn.ModuleList(Block(c.vision_width, c.vision_heads, c.mlp_ratio, c.dropout, rate)
                                    for rate in drop_path_rates(c.drop_path, c.vision_layers))
        self.ln_post = nn.LayerNorm(c.vision_width)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.pool = c.vision_pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # b d h w
        x = x.flatten(2).transpose(1, 2)  # 'b d h w -> b (h w) d'
        cls = self.class_token.expand(x.shape[0], 1, -1)  # b 1 d
        x = torch.cat([cls, x], dim=1) + self.positions  # b (1 + h w) d
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.pool == "mean":  # the patches' mean; the class token alone needs no norm over every token
            return self.proj(self.ln_post(x)[:, 1:].mean(dim=1))
        return self.proj(self.ln_post(x[:, 0]))  # the class token's output: b embed_dim


class TextTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.positions = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.blocks = nn.ModuleList(Block(c.text_width, c.text_heads, c.mlp_ratio, c.dropout, rate)
                                    for rate in drop_path_rates(c.drop_path, c.text_layers))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pool_by = c.text_pool

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every token's output, b n text_width: each sees only the tokens up to it (the causal mask)."""
        n = tokens.shape[1]
        x = self.token_embed(tokens) + self.positions[:n]
        for block in self.blocks:
            x = block(x, causal=True)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: b n (n <= context_length, padded after the end token); lengths: b, tokens up to and
        including the end token. The causal mask means padding never reaches the end token, so a batch
        padded to its longest caption gives the same features as one padded to the full context."""
        return self.pool(self.states(tokens), lengths)

    def pool(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The caption features, b embed_dim, from its tokens' outputs x: b n text_width."""
        n = x.shape[1]
        if self.pool_by == "mean":  # the mean over the caption's own tokens, start and end included
            mask = (torch.arange(n, device=x.device) < lengths[:, None]).to(x.dtype)  # b n
            pooled = (x * mask[..., None]).sum(dim=1) / lengths[:, None].to(x.dtype)
        else:
            pooled = x[torch.arange(x.shape[0], device=x.device), lengths - 1]  # b d: the end token's output
        return self.proj(pooled)


class MiniCLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        # The learnt bias of the sigmoid loss (loss.siglip_loss); the softmax loss has none.
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(torch.tensor(float(config.init_logit_bias)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: b 3 s s, normalised -> b embed_dim, unit length."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: b n, lengths: b -> b embed_dim, unit length."""
        return F.normalize(self.text(tokens, lengths), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as CLIP does so the temperature cannot collapse."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images, tokens, lengths, text_states: bool = False):
        """Image features, caption features and the logit scale; with `text_states` also every caption
        token's output, b n text_width, which train.caption_lm's next-word loss reads."""
        states = self.text.states(tokens)
        features = self.encode_image(images), F.normalize(self.text.pool(states, lengths), dim=-1), self.scale()
        return (*features, states) if text_states else features


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
