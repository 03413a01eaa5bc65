"""The dual encoder: a Vision Transformer and a text Transformer projected into one normalised space.

No loss and no file I/O here; `loss.py` and `checkpoint.py` own those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .efficientnet import FEATURES, EfficientNetLite0


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
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        grid = c.image_size // c.patch_size
        # a stride-p conv is the linear projection of each non-overlapping p x p patch
        self.patch_embed = nn.Conv2d(3, c.vision_width, kernel_size=c.patch_size, stride=c.patch_size)
        self.class_token = nn.Parameter(torch.randn(c.vision_width) * c.vision_width**-0.5)
        self.positions = nn.Parameter(torch.randn(grid * grid + 1, c.vision_width) * 0.02)
        self.ln_pre = nn.LayerNorm(c.vision_width)
        self.blocks = nn.ModuleList(Block(c.vision_width, c.vision_heads, c.mlp_ratio, c.dropout)
                                    for _ in range(c.vision_layers))
        self.ln_post = nn.LayerNorm(c.vision_width)
        self.proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # b d h w
        x = x.flatten(2).transpose(1, 2)  # 'b d h w -> b (h w) d'
        cls = self.class_token.expand(x.shape[0], 1, -1)  # b 1 d
        x = torch.cat([cls, x], dim=1) + self.positions  # b (1 + h w) d
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))  # the class token's output: b embed_dim


class FrozenTower(nn.Module):
    """A pretrained backbone, frozen (weights and BatchNorm statistics), and a trained 2-layer MLP to the shared
    space. Takes images (b 3 s s) or what training caches of them (features.py): the backbone's pooled features
    (b 1280), or with its last blocks tuned (tune) those blocks' input (b c h w).

    Built with random backbone weights: training loads the ImageNet ones (efficientnet.load_pretrained), and a
    saved run holds them, so loading a run needs neither the weights package nor any flag."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.backbone = EfficientNetLite0().requires_grad_(False)
        self.proj = nn.Sequential(nn.Linear(FEATURES, c.vision_width), nn.GELU(), nn.Dropout(c.dropout),
                                  nn.Linear(c.vision_width, c.embed_dim, bias=False))
        self.tuned = 0  # the backbone's last blocks that train with the head (TrainConfig.tower_tuned)

    def tune(self, blocks: int) -> None:
        """Train the backbone's last `blocks` blocks and its head too (0: none); BatchNorm statistics stay."""
        self.tuned = blocks
        backbone = self.backbone
        for module in (*backbone.blocks[len(backbone.blocks) - blocks:], backbone.head) if blocks else ():
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenTower:
        super().train(mode)
        self.backbone.eval()  # BatchNorm keeps ImageNet's statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[1] == 3:  # images (no block of the backbone takes 3 channels)
            with torch.no_grad():
                x = self.backbone.start(x, self.tuned)
        if x.ndim == 4:  # the tuned blocks' input -> b 1280; channels-last: 2 tuned blocks train 1.36x faster on a CPU
            x = self.backbone.finish(x.contiguous(memory_format=torch.channels_last), self.tuned)
        return self.proj(x)  # b 1280 -> b embed_dim


class TextTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.positions = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.blocks = nn.ModuleList(Block(c.text_width, c.text_heads, c.mlp_ratio, c.dropout)
                                    for _ in range(c.text_layers))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: b n (n <= context_length, padded after the end token); lengths: b, tokens up to and
        including the end token. The causal mask means padding never reaches the end token, so a batch
        padded to its longest caption gives the same features as one padded to the full context."""
        n = tokens.shape[1]
        x = self.token_embed(tokens) + self.positions[:n]
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), lengths - 1])  # the end token's output


class MiniCLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTransformer(config) if config.vision == "vit" else FrozenTower(config)
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        # The learnt bias of the sigmoid loss (loss.siglip_loss); the softmax loss has none.
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(torch.tensor(float(config.init_logit_bias)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: b 3 s s, normalised (or, for a FrozenTower, its cached b 1280 features) -> b embed_dim, unit
        length."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """tokens: b n, lengths: b -> b embed_dim, unit length. groups > 1: the captions in that many groups of
        alike length, each padded only to its own longest: the same features for less padding (a batch of 256
        Flickr captions is half padding)."""
        if groups == 1 or len(lengths) < 2 * groups:
            return F.normalize(self.text(tokens, lengths), dim=-1)
        order = lengths.argsort()
        parts = [self.text(tokens[group, : int(lengths[group[-1]])], lengths[group])  # group: ascending lengths
                 for group in order.tensor_split(groups)]
        return F.normalize(torch.cat(parts)[order.argsort()], dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as CLIP does so the temperature cannot collapse."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images, tokens, lengths):
        """Image features, caption features and the logit scale."""
        return self.encode_image(images), self.encode_text(tokens, lengths), self.scale()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
