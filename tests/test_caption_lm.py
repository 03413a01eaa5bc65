"""train.caption_lm: a next-word loss on the captions through the text tower's own token embedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from miniclip_cli.config import RunConfig, apply_overrides, tiny_model_config
from miniclip_cli.errors import ConfigError
from miniclip_cli.loss import next_word_loss
from miniclip_cli.model import MiniCLIP

from .conftest import json_of, run_cli


def test_next_word_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    states, embedding = torch.randn(2, 5, 4, generator=g), torch.randn(7, 4, generator=g)
    tokens = torch.tensor([[1, 3, 4, 2, 0], [1, 5, 6, 6, 2]])  # <start>=1 ... <end>=2, then padding 0
    lengths = torch.tensor([4, 5])
    guesses = []  # (state, next token): every position before the end token
    for row, length in enumerate(lengths.tolist()):
        guesses += [(states[row, i], tokens[row, i + 1]) for i in range(length - 1)]
    expected = sum(-F.log_softmax(embedding @ state, dim=0)[target] for state, target in guesses) / len(guesses)
    assert len(guesses) == 7
    assert next_word_loss(states, embedding, tokens, lengths).item() == pytest.approx(expected.item(), rel=1e-5)


def test_next_word_loss_ignores_padding_and_the_states_are_the_models():
    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(vocab_size=50)).eval()
    tokens = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 10, 11, 12, 2]])
    lengths = torch.tensor([4, 6])
    images = torch.randn(2, 3, 32, 32)
    image, text, scale, states = model(images, tokens, lengths, text_states=True)
    plain = model(images, tokens, lengths)
    assert torch.allclose(image, plain[0]) and torch.allclose(text, plain[1]) and torch.equal(scale, plain[2])
    assert states.shape == (2, 6, model.config.text_width)
    embedding = model.text.token_embed.weight
    loss = next_word_loss(states, embedding, tokens, lengths)
    longer = torch.cat([tokens, torch.zeros(2, 3, dtype=tokens.dtype)], dim=1)  # padded to 9, not 6
    assert next_word_loss(model.text.states(longer), embedding, longer, lengths).item() == pytest.approx(
        loss.item(), rel=1e-5)
    # each caption alone: neither depends on its batch-mate, and the batch's loss is their mean per guess
    alone = next_word_loss(model.text.states(tokens[:1, :4]), embedding, tokens[:1, :4], lengths[:1])
    assert math.isfinite(alone.item()) and alone.item() > 0
    other = next_word_loss(model.text.states(tokens[1:]), embedding, tokens[1:], lengths[1:])
    assert loss.item() == pytest.approx((3 * alone.item() + 5 * other.item()) / 8, rel=1e-5)


def test_caption_lm_weight_is_checked():
    with pytest.raises(ConfigError, match="train.caption_lm"):
        apply_overrides(RunConfig(), ["train.caption_lm=-0.5"])
    assert RunConfig().train.caption_lm == 0.0  # off by default


def test_train_with_caption_lm_adds_its_loss_and_keeps_the_model_files(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300, "--json"]
    plain = json_of(run_cli(runner, *common, "--out", tmp_path / "plain"))
    words = json_of(run_cli(runner, *common, "--set", "train.caption_lm=1", "--accum-steps", 2,
                            "--out", tmp_path / "words"))
    # the reported loss includes the next-word loss: about log(vocab) early on, far above the difference
    # accumulation makes to the contrastive loss
    assert words["last"]["train_loss"] > plain["last"]["train_loss"] + 1
    assert math.isfinite(words["last"]["train_loss"])
    for name in ("last.safetensors", "resume.safetensors"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "words" / name))
        assert a.keys() == b.keys(), name  # no output layer: the token embedding is reused
