"""train.rotate / train.blur / train.grey: the mild changes to the training crop (data/images.perturb) and
training with them."""

from __future__ import annotations

import math

import pytest
import torch

from miniclip_cli.config import RunConfig, apply_overrides
from miniclip_cli.data.images import perturb
from miniclip_cli.errors import ConfigError

from .conftest import assert_resumes_exactly, json_of, run_cli

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def bar_angle(image: torch.Tensor) -> float:
    """Degrees from horizontal of the bright pixels' main axis (second moments), y pointing down."""
    ys, xs = torch.nonzero(image[0] > image[0].amax() / 2, as_tuple=True)
    x, y = xs.float() - xs.float().mean(), ys.float() - ys.float().mean()
    return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def test_nothing_asked_leaves_the_images_alone():
    images = normalised(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(perturb(images, MEAN, STD, torch.Generator().manual_seed(0)), images)


def test_a_batch_with_no_image_drawn_for_blur_or_grey_is_left_alone():
    images = normalised(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    out = perturb(images, MEAN, STD, torch.Generator().manual_seed(0), blur=1e-9, grey=1e-9)
    assert torch.equal(out, images)


def test_rotate_turns_each_image_by_at_most_the_angle_asked():
    pixels = torch.zeros(32, 3, 64, 64)
    pixels[:, :, 31:33, 8:56] = 1.0  # a horizontal bar through the centre
    out = perturb(normalised(pixels), MEAN, STD, torch.Generator().manual_seed(0), rotate=10)
    angles = [bar_angle(image) for image in out]
    assert bar_angle(normalised(pixels)[0]) == pytest.approx(0.0, abs=1e-6)
    assert max(abs(a) for a in angles) < 10.5
    assert min(angles) < -3 and max(angles) > 3  # both ways, spread over the range
    assert torch.equal(out, perturb(normalised(pixels), MEAN, STD, torch.Generator().manual_seed(0), rotate=10))


def test_rotate_keeps_a_round_image_and_fills_no_black_corners():
    grid = torch.arange(64).float() - 31.5
    radius = (grid[:, None] ** 2 + grid[None] ** 2).sqrt()
    round_image = (0.2 + 0.6 * torch.exp(-radius ** 2 / (2 * 12 ** 2))).expand(8, 3, 64, 64)

    def turn(pixels: torch.Tensor) -> torch.Tensor:
        out = perturb(normalised(pixels), MEAN, STD, torch.Generator().manual_seed(1), rotate=20)
        return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)

    # turning about the centre keeps a round image inside its inscribed circle
    assert (turn(round_image) - round_image)[..., radius < 30].abs().amax() < 0.01
    # the corners the turn uncovers are mirrored from the inside: a flat image stays flat, no black corners
    flat = torch.full((8, 3, 64, 64), 0.3)
    assert (turn(flat) - flat).abs().amax() < 1e-5


def test_blur_smooths_the_chosen_images_and_keeps_their_mean():
    images = normalised(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    out = perturb(images, MEAN, STD, torch.Generator().manual_seed(0), blur=0.5)
    changed = (out - images).abs().amax(dim=(1, 2, 3)) > 1e-5
    assert 16 <= changed.sum() <= 48  # half of 64
    def roughness(x: torch.Tensor) -> torch.Tensor:  # per image: mean step between neighbouring pixels
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))

    assert (roughness(out)[changed] < roughness(images)[changed]).all()
    assert torch.allclose(out[changed].mean(dim=(1, 2, 3)), images[changed].mean(dim=(1, 2, 3)), atol=0.02)


def test_grey_takes_the_colour_out_of_the_chosen_images_only():
    images = normalised(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    out = perturb(images, MEAN, STD, torch.Generator().manual_seed(0), grey=0.25)
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    greyed = (pixels[:, 0] - pixels[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert 6 <= greyed.sum() <= 28  # a quarter of 64
    assert torch.equal(out[~greyed], images[~greyed])
    before = images[greyed] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * before).sum(1, keepdim=True)
    assert torch.allclose(pixels[greyed], luma.expand_as(before), atol=1e-5)


@pytest.mark.parametrize("setting", ["train.rotate=-1", "train.rotate=90", "train.blur=1.5", "train.grey=-0.1"])
def test_bad_values_are_refused(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0]):
        apply_overrides(RunConfig(), [setting])


def test_off_by_default():
    train = RunConfig().train
    assert (train.rotate, train.blur, train.grey) == (0.0, 0.0, 0.0)


def test_training_with_them_changes_the_run_and_resumes_exactly(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300, "--json"]
    changes = ["--set", "train.rotate=10", "--set", "train.blur=0.5", "--set", "train.grey=0.2",
               "--set", "train.image_ssl=1"]
    plain = json_of(run_cli(runner, *common, "--out", tmp_path / "plain", "--set", "train.image_ssl=1"))
    straight = json_of(run_cli(runner, *common, *changes, "--out", tmp_path / "straight"))
    assert straight["last"]["train_loss"] != plain["last"]["train_loss"]
    config = assert_resumes_exactly(runner, [*common, *changes], tmp_path / "straight", tmp_path / "stopped")
    assert (config.train.rotate, config.train.blur, config.train.grey) == (10.0, 0.5, 0.2)
