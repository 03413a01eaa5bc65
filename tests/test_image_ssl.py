"""train.image_ssl: SLIP's image self-supervised loss between two views, the second view's crops and
distortions, and training with it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from miniclip_cli.config import RunConfig, apply_overrides
from miniclip_cli.data.cache import open_cache
from miniclip_cli.data.feeding import Collate
from miniclip_cli.data.images import PairDataset
from miniclip_cli.data.transforms import distort
from miniclip_cli.data.layouts import load_caption_set
from miniclip_cli.errors import ConfigError
from miniclip_cli.loss import image_ssl_loss
from miniclip_cli.tokenizer import train_tokenizer
from miniclip_cli.objectives import SECOND_VIEW_CROP_SCALE

from .conftest import assert_resumes_exactly, json_of, run_cli

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def test_image_ssl_loss_matches_a_hand_computation():
    first = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised inside: (0.6, 0.8), (0, 1)
    second = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    views = [(0.6, 0.8), (0.0, 1.0), (1.0, 0.0), (math.sqrt(0.5), math.sqrt(0.5))]
    other = [2, 3, 0, 1]
    t = 0.5
    total = 0.0
    for i, v in enumerate(views):
        logits = {j: (v[0] * w[0] + v[1] * w[1]) / t for j, w in enumerate(views) if j != i}
        total += -logits[other[i]] + math.log(sum(math.exp(x) for x in logits.values()))
    assert image_ssl_loss(first, second, t).item() == pytest.approx(total / 4, rel=1e-5)


def test_image_ssl_loss_is_low_when_views_agree_and_images_differ():
    images = torch.eye(8)
    assert image_ssl_loss(images, images).item() < 1e-3
    assert image_ssl_loss(images, images.roll(1, 0)).item() > 5  # each view's partner is another image's


def test_distort_is_seeded_and_keeps_pixels_in_range():
    images = (torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) - torch.tensor(MEAN).view(
        1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = distort(images, MEAN, STD, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out, distort(images, MEAN, STD, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, distort(images, MEAN, STD, torch.Generator().manual_seed(1)))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    grey = (pixels[:, 0] - pixels[:, 1]).abs().amax(dim=(1, 2)) < 1e-5  # per image: no colour left
    assert 2 <= grey.sum() <= 30  # 20% of 64 are turned grey; the random images have colour
    unchanged = (out - images).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert unchanged.sum() < 16  # only images neither flipped, jittered nor greyed: 0.5 x 0.2 x 0.8 = 8%


def test_second_view_leaves_the_training_crop_as_it_was(tiny_dataset, tmp_path):
    items = load_caption_set(tiny_dataset).items[:6]
    cache, _ = open_cache([item.image for item in items], 32, root=tmp_path / "cache")
    common = (items, 32, MEAN, STD, (0.5, 1.0), "one", 3)
    tokenizer = train_tokenizer([c for item in items for c in item.captions], 300)
    collate = Collate(tokenizer, 32)
    for device_crops in (False, True):
        batches = []
        for extra_views in ((), (SECOND_VIEW_CROP_SCALE,)):
            dataset = PairDataset(*common, cache=cache, device_crops=device_crops, extra_views=extra_views)
            images, ids, *_ = collate([dataset[i] for i in range(6)])
            batches.append((images.render(32, MEAN, STD) if device_crops else images, ids))
        (one, one_ids), (two, two_ids) = batches
        assert two.shape == (12, 3, 32, 32)  # (v b): every image's training crop, then every second view
        assert torch.equal(two[:6], one) and torch.equal(two_ids, one_ids)  # same crops, same captions
        assert not torch.equal(two[6:], one)


def test_image_ssl_weight_is_checked():
    with pytest.raises(ConfigError, match="train.image_ssl"):
        apply_overrides(RunConfig(), ["train.image_ssl=-1"])
    assert RunConfig().train.image_ssl == 0.0  # off by default


def test_train_with_image_ssl_resumes_exactly_and_saves_the_model_alone(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300, "--json"]
    plain = json_of(run_cli(runner, *common, "--out", tmp_path / "plain"))
    ssl = ["--set", "train.image_ssl=1"]
    straight = json_of(run_cli(runner, *common, *ssl, "--out", tmp_path / "straight"))
    # same seed and data: the loss reported is the contrastive one plus the (positive) image loss, each by name
    assert straight["last"]["train_loss"] > plain["last"]["train_loss"] + 0.1
    last = straight["last"]
    assert last["train_image_ssl"] > 0.1 and last["train_loss"] == pytest.approx(last["train_contrastive"] +
                                                                                 last["train_image_ssl"])
    assert "train_image_ssl" not in plain["last"]
    config = assert_resumes_exactly(runner, [*common, *ssl], tmp_path / "straight", tmp_path / "stopped")
    assert config.train.image_ssl == 1.0
    # the head trains alongside, is kept for --resume, and stays out of the model's weights
    resume = load_file(str(tmp_path / "straight" / "resume.safetensors"))
    assert any(k.startswith("head.") for k in resume)
    assert not any("head" in k for k in load_file(str(tmp_path / "straight" / "last.safetensors")))


def test_image_ssl_with_accumulation(runner, tiny_dataset, tmp_path):
    # b images, b second views and b captions per micro-batch, two micro-batches per step.
    result = json_of(run_cli(runner, "train", "--data", tiny_dataset, "--preset", "tiny", "--max-steps", 2,
                             "--batch-size", 4, "--accum-steps", 2, "--workers", 0, "--vocab-size", 300, "--json",
                             "--set", "train.image_ssl=1", "--out", tmp_path / "run"))
    assert result["steps"] == 2 and math.isfinite(result["last"]["train_loss"])
