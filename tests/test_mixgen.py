"""train.mixgen: MixGen's caption mixing (Hao et al. 2023; train.mixgen) and training with it."""

from __future__ import annotations

import pytest
import torch

from miniclip_cli.config import RunConfig, apply_overrides
from miniclip_cli.errors import ConfigError
from miniclip_cli.train import mixgen

from .conftest import assert_resumes_exactly, json_of, run_cli

START, END, PAD = 1, 2, 0


def batch():
    ids = torch.tensor([[START, 5, 6, END, PAD],
                        [START, 7, END, PAD, PAD],
                        [START, 8, 9, 10, END],
                        [START, 11, END, PAD, PAD]])
    return torch.randn(4, 3, 8, 8), ids, torch.tensor([4, 3, 5, 3])


def test_the_first_pairs_take_in_the_next_ones():
    images, ids, lengths = batch()
    out_images, out_ids, out_lengths = mixgen(images.clone(), ids, lengths, 2, 16, PAD, END)
    # image 0 blends with image 2 and image 1 with image 3, half and half; their captions are joined
    assert torch.allclose(out_images[:2], (images[:2] + images[2:]) / 2)
    assert torch.equal(out_images[2:], images[2:])
    assert out_lengths.tolist() == [7, 4, 5, 3]
    assert out_ids[0, :7].tolist() == [START, 5, 6, 8, 9, 10, END]
    assert out_ids[1, :4].tolist() == [START, 7, 11, END]
    assert (out_ids[1, 4:] == PAD).all()
    assert torch.equal(out_ids[2:, :5], ids[2:])  # the pairs mixed in are also trained on as they are
    assert (out_ids[2:, 5:] == PAD).all()


def test_joined_captions_are_cut_to_the_context_and_still_end():
    images, ids, lengths = batch()
    _, out_ids, out_lengths = mixgen(images, ids, lengths, 2, 5, PAD, END)
    assert out_ids.shape[1] == 5 and out_lengths.tolist() == [5, 4, 5, 3]
    assert out_ids[0].tolist() == [START, 5, 6, 8, END]


def test_second_views_are_mixed_as_their_crops_are():
    # with train.image_ssl the images are b crops then b second views; view i must stay crop i's twin
    images, ids, lengths = batch()
    views = torch.randn(8, 3, 8, 8)
    out, _, _ = mixgen(views.clone(), ids, lengths, 1, 16, PAD, END)
    assert torch.allclose(out[0], (views[0] + views[1]) / 2) and torch.allclose(out[4], (views[4] + views[5]) / 2)
    assert torch.equal(out[1:4], views[1:4]) and torch.equal(out[5:], views[5:])


def test_nothing_to_mix_leaves_the_batch_alone():
    images, ids, lengths = batch()
    out = mixgen(images, ids, lengths, 0, 16, PAD, END)
    assert out[0] is images and out[1] is ids and out[2] is lengths


@pytest.mark.parametrize("settings, message", [
    (["train.mixgen=0.6"], "train.mixgen"),
    (["train.mixgen=-0.1"], "train.mixgen"),
    (["train.mixgen=0.25", "train.positives=2"], "positives"),
    (["train.mixgen=0.25", "train.distill=1"], "distill"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), settings)


def test_off_by_default():
    assert RunConfig().train.mixgen == 0.0


def test_training_with_it_changes_the_run_and_resumes_exactly(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300, "--set", "train.image_ssl=1", "--json"]
    plain = json_of(run_cli(runner, *common, "--out", tmp_path / "plain"))
    mixed = [*common, "--set", "train.mixgen=0.25"]
    straight = json_of(run_cli(runner, *mixed, "--out", tmp_path / "straight"))
    assert straight["last"]["train_loss"] != plain["last"]["train_loss"]
    config = assert_resumes_exactly(runner, mixed, tmp_path / "straight", tmp_path / "stopped")
    assert config.train.mixgen == 0.25
