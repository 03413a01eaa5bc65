"""Training options: several captions per image as positives, the convolutional stem, presets and --set
overrides, configs saved before these settings existed, crops cut on the device, torch.compile."""

from __future__ import annotations

import json
import random

import pytest
import torch

from miniclip_cli.checkpoint import load_run
from miniclip_cli.config import (
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    preset_configs,
    tiny_model_config,
)
from miniclip_cli.data.images import PairDataset, draw_captions
from miniclip_cli.data.layouts import load_caption_set
from miniclip_cli.errors import ConfigError
from miniclip_cli.model import MiniCLIP
from miniclip_cli.tokenizer import train_tokenizer
from miniclip_cli.train import Collate, drop_tokens

from .conftest import assert_resumes_exactly, assert_same_weights, json_of, run_cli


def test_draw_captions_distinct_then_repeating():
    captions = ("a", "b", "c")
    assert draw_captions(captions, 1, random.Random(0)) in captions
    three = draw_captions(captions, 3, random.Random(0))
    assert sorted(three) == ["a", "b", "c"]
    five = draw_captions(captions, 5, random.Random(0))
    assert len(five) == 5 and set(five[:3]) == {"a", "b", "c"}


def test_one_positive_draws_as_before():
    # The caption drawn with positives=1 is the single draw of earlier versions: runs stay reproducible.
    captions = tuple("abcde")
    for seed in range(20):
        assert draw_captions(captions, 1, random.Random(seed)) == captions[random.Random(seed).randrange(5)]


def test_collate_puts_an_images_captions_together(tiny_dataset):
    items = load_caption_set(tiny_dataset).items[:4]
    dataset = PairDataset(items, 32, (0.5,) * 3, (0.5,) * 3, (0.5, 1.0), "one", seed=0, positives=2)
    tokenizer = train_tokenizer([c for item in items for c in item.captions], 300)
    samples = [dataset[i] for i in range(4)]
    images, ids, lengths, failures, taught = Collate(tokenizer, 32)(samples)
    assert images.shape == (4, 3, 32, 32) and ids.shape[0] == lengths.shape[0] == 8 and not failures
    assert taught is None  # no teacher unless train.distill
    for i, (_, captions, _) in enumerate(samples):
        assert len(set(captions)) == 2 and set(captions) <= set(items[i].captions)
        for j, caption in enumerate(captions):  # rows 2i and 2i+1 are image i's captions, in order
            want = tokenizer.encode([caption], 32)[0][0]
            assert ids[2 * i + j, : len(want)].tolist() == want.tolist()


def test_conv_stem_keeps_the_token_grid():
    config = ModelConfig(vocab_size=100, stem="conv")
    model = MiniCLIP(config).eval()
    # 4 stride-2 convolutions take 128 px to the 8 x 8 grid a 16 px patch projection gives.
    assert model.visual.patch_embed(torch.randn(1, 3, 128, 128)).shape == (1, 256, 8, 8)
    assert model.visual.positions.shape == (65, 256)
    with pytest.raises(ConfigError, match="power of two"):
        ModelConfig(image_size=120, patch_size=12, stem="conv").validate()


def test_presets_and_overrides():
    model, train = preset_configs("reference")
    assert (model.stem, model.init_temperature, train.positives, train.epochs) == ("linear", 0.07, 1, 30)
    config = apply_overrides(RunConfig(model=tiny_model_config(), train=TrainConfig()),
                             ["train.positives=3", "model.stem=conv", "train.crop_scale=[0.3, 1.0]"])
    assert (config.train.positives, config.model.stem, config.train.crop_scale) == (3, "conv", (0.3, 1.0))
    for bad, message in (("train.nope=1", "unknown train setting"), ("positives=3", "SECTION.KEY=VALUE"),
                         ("model.stem=round", "stem must be"), ("train.positives=0", "at least 1")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(RunConfig(), [bad])
    with pytest.raises(ConfigError, match="--captions one"):
        apply_overrides(RunConfig(), ["train.positives=2", "train.captions=all"])
    with pytest.raises(ConfigError, match="reference"):
        preset_configs("huge")


def test_config_saved_before_stem_and_positives_loads_as_trained():
    raw = json.loads(RunConfig().to_json())
    del raw["model"]["stem"], raw["train"]["positives"]
    config = RunConfig.from_dict(raw)
    assert config.model.stem == "linear" and config.train.positives == 1


def test_train_with_conv_stem_and_positives(runner, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    payload = json_of(run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny",
                              "--epochs", 2, "--batch-size", 8, "--workers", 0, "--vocab-size", 300,
                              "--set", "model.stem=conv", "--set", "train.positives=3", "--json"))
    assert payload["steps"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["stem"] == "conv" and config["train"]["positives"] == 3
    model, _, _ = load_run(run, "best")
    assert model.config.stem == "conv"
    result = json_of(run_cli(runner, "eval", run, "--split", "all", "--json"))
    assert 0.0 <= result["match3_top1"] <= 100.0


def test_bad_set_is_one_line_exit_3(runner, tiny_dataset, tmp_path):
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "tiny",
                     "--set", "train.positivs=3", code=3)
    assert "unknown train setting" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_with_crops_cut_on_the_device(runner, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICLIP_CACHE", str(tmp_path / "cache"))
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 1, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300]
    payload = json_of(run_cli(runner, *common, "--out", tmp_path / "run", "--set", "train.augment=device", "--json"))
    assert payload["steps"] > 0 and payload["last"]["train_loss"] > 0
    result = run_cli(runner, *common, "--out", tmp_path / "run2", "--no-cache", "--set", "train.augment=device", code=3)
    assert "drop --no-cache" in result.output


def test_drop_tokens_deletes_words_only_and_closes_up():
    pad = 0
    ids = torch.tensor([[1, 5, 6, 7, 8, 2, pad], [1, 9, 2, pad, pad, pad, pad]])  # <start>=1 ... <end>=2
    lengths = torch.tensor([6, 3])
    same, same_lengths = drop_tokens(ids, lengths, 0.0, torch.Generator().manual_seed(0), pad)
    assert torch.equal(same, ids) and torch.equal(same_lengths, lengths)
    for seed in range(20):
        out, out_lengths = drop_tokens(ids, lengths, 0.5, torch.Generator().manual_seed(seed), pad)
        for row in range(2):
            n = int(out_lengths[row])
            kept = out[row, :n].tolist()
            assert kept[0] == 1 and kept[-1] == 2 and (out[row, n:] == pad).all()
            words = ids[row, 1 : int(lengths[row]) - 1].tolist()
            it = iter(words)  # the kept words are a subsequence of the caption's, in order
            assert all(word in it for word in kept[1:-1])
    everything, shortest = drop_tokens(ids, lengths, 0.999, torch.Generator().manual_seed(0), pad)
    assert shortest.tolist() == [2, 2] and everything[:, :2].tolist() == [[1, 2], [1, 2]]


def test_sigmoid_loss_needs_its_bias():
    with pytest.raises(ConfigError, match="init_logit_bias=-10"):
        apply_overrides(RunConfig(), ["train.loss=siglip"])
    with pytest.raises(ConfigError, match="token_dropout"):
        apply_overrides(RunConfig(), ["train.token_dropout=1.5"])
    config = apply_overrides(RunConfig(), ["train.loss=siglip", "model.init_logit_bias=-10"])
    assert MiniCLIP(config.model).logit_bias.item() == -10.0
    assert MiniCLIP(RunConfig().model).logit_bias is None  # the softmax loss's models keep their old weights


def test_train_with_sigmoid_loss_and_token_dropout(runner, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    payload = json_of(run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny",
                              "--epochs", 2, "--batch-size", 8, "--workers", 0, "--vocab-size", 300,
                              "--set", "train.loss=siglip", "--set", "model.init_logit_bias=-10",
                              "--set", "train.token_dropout=0.2", "--json"))
    assert payload["steps"] > 0 and payload["last"]["train_loss"] > 0
    model, _, _ = load_run(run, "last")
    assert model.logit_bias is not None and model.logit_bias.item() != -10.0  # the bias was trained
    result = json_of(run_cli(runner, "eval", run, "--split", "all", "--json"))
    assert 0.0 <= result["match3_top1"] <= 100.0


@pytest.mark.slow
def test_compiled_training_matches_eager(runner, tiny_dataset, tmp_path):
    # torch.compile takes a minute or more on a CPU, hence slow; it must not change what is learnt.
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--max-steps", 3, "--batch-size", 8,
              "--workers", 0, "--vocab-size", 300, "--precision", "fp32", "--json"]
    eager = json_of(run_cli(runner, *common, "--out", tmp_path / "eager"))
    compiled = json_of(run_cli(runner, *common, "--out", tmp_path / "compiled", "--compile"))
    assert compiled["last"]["train_loss"] == pytest.approx(eager["last"]["train_loss"], rel=1e-4)
    assert_same_weights(tmp_path / "eager", tmp_path / "compiled", atol=1e-4)


def test_moving_average_follows_the_weights():
    from miniclip_cli.train import MovingAverage

    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(50))
    average = MovingAverage(model, decay=0.9)
    start = average.model.logit_scale.item()
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    average.update(model, step=1000)  # past the warm-up: the decay itself
    assert average.model.logit_scale.item() == pytest.approx(start + 0.1, abs=1e-5)
    average.update(model, step=0)  # warm-up: decay (1 + 0) / (10 + 0) = 0.1
    assert average.model.logit_scale.item() == pytest.approx(start + 0.1 + 0.9 * 0.9, abs=1e-5)


def test_moving_average_is_saved_and_resumes_exactly(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300, "--set", "train.ema=0.9"]
    run_cli(runner, *common, "--out", tmp_path / "straight")
    assert_resumes_exactly(runner, common, tmp_path / "straight", tmp_path / "stopped")
    # last.safetensors holds the average, not the weights the optimizer left
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "straight" / "resume.safetensors"))
    a, _, _ = load_run(tmp_path / "straight", "last")
    assert not torch.equal(raw["model.visual.proj.weight"], a.state_dict()["visual.proj.weight"])
    assert torch.equal(raw["ema.visual.proj.weight"], a.state_dict()["visual.proj.weight"])


def test_captions_all_trains_one_caption_per_step(runner, tiny_dataset, tmp_path):
    common = ["train", "--data", tiny_dataset, "--preset", "tiny", "--max-steps", 1, "--batch-size", 8,
              "--workers", 0, "--vocab-size", 300]
    # --captions all makes every pair a sample of its own: one caption per image per step.
    run_cli(runner, *common, "--out", tmp_path / "all", "--captions", "all")
    assert json.loads((tmp_path / "all" / "config.json").read_text())["train"]["positives"] == 1
