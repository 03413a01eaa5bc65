"""Training options: presets and --set overrides, configs saved before these settings existed or with settings
since removed, crops cut on the device, the sigmoid loss, the moving average, torch.compile."""

from __future__ import annotations

import json
import random

import pytest
import torch

from miniclip_cli.checkpoint import load_run
from miniclip_cli.config import (
    RunConfig,
    TrainConfig,
    apply_overrides,
    preset_configs,
    tiny_model_config,
)
from miniclip_cli.data.images import draw_caption
from miniclip_cli.errors import ConfigError
from miniclip_cli.model import MiniCLIP

from .conftest import assert_resumes_exactly, assert_same_weights, json_of, run_cli


def test_one_caption_draws_as_before():
    # The caption drawn is the single draw of earlier versions: runs stay reproducible.
    captions = tuple("abcde")
    for seed in range(20):
        assert draw_caption(captions, random.Random(seed)) == captions[random.Random(seed).randrange(5)]


def test_presets_and_overrides():
    model, train = preset_configs("shapes")
    assert (model.init_temperature, train.epochs, train.crop_scale) == (0.03, 10, (0.8, 1.0))
    config = apply_overrides(RunConfig(model=tiny_model_config(), train=TrainConfig()),
                             ["train.ema=0.99", "model.dropout=0.1", "train.crop_scale=[0.3, 1.0]"])
    assert (config.train.ema, config.model.dropout, config.train.crop_scale) == (0.99, 0.1, (0.3, 1.0))
    for bad, message in (("train.nope=1", "unknown train setting"), ("ema=3", "SECTION.KEY=VALUE"),
                         ("train.loss=round", "clip or siglip"), ("train.epochs=0", "at least 1")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(RunConfig(), [bad])
    with pytest.raises(ConfigError, match="shapes"):
        preset_configs("huge")


def test_config_saved_with_removed_training_settings_loads_without_them():
    raw = json.loads(RunConfig().to_json())
    raw["train"].update(positives=5, mixgen=0.25, token_dropout=0.0)
    raw["model"].update(stem="linear", drop_path=0.1, text_pool="token")
    config = RunConfig.from_dict(raw)
    assert config.removed == ["model.drop_path=0.1", "train.positives=5", "train.mixgen=0.25"]
    assert config == RunConfig()


@pytest.mark.parametrize("setting", [("stem", "conv"), ("vision_pool", "mean"), ("text_pool", "mean")])
def test_config_with_a_removed_architecture_setting_names_the_commit_that_has_it(setting):
    raw = json.loads(RunConfig().to_json())
    raw["model"][setting[0]] = setting[1]
    with pytest.raises(ConfigError, match=f"model.{setting[0]}={setting[1]} was removed.*git checkout ddcbfdf"):
        RunConfig.from_dict(raw)


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


def test_sigmoid_loss_needs_its_bias():
    with pytest.raises(ConfigError, match="init_logit_bias=-10"):
        apply_overrides(RunConfig(), ["train.loss=siglip"])
    config = apply_overrides(RunConfig(), ["train.loss=siglip", "model.init_logit_bias=-10"])
    assert MiniCLIP(config.model).logit_bias.item() == -10.0
    assert MiniCLIP(RunConfig().model).logit_bias is None  # the softmax loss's models keep their old weights


def test_train_with_sigmoid_loss(runner, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    payload = json_of(run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny",
                              "--epochs", 2, "--batch-size", 8, "--workers", 0, "--vocab-size", 300,
                              "--set", "train.loss=siglip", "--set", "model.init_logit_bias=-10", "--json"))
    # the history names the contrastive term by its objective, and it is the whole loss
    assert payload["steps"] > 0 and payload["last"]["train_loss"] == payload["last"]["train_siglip"] > 0
    model, _, _ = load_run(run, "last")
    assert model.logit_bias is not None and model.logit_bias.item() != -10.0  # the bias was trained


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
    from miniclip_cli.optim import MovingAverage

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
    # --captions all makes every pair a sample of its own: three captions per image make an epoch about three
    # times as many steps (whole batches only), so one step is about a third of the epoch it is with one.
    one = json_of(run_cli(runner, *common, "--out", tmp_path / "one", "--json"))["last"]["epoch"]
    every = json_of(run_cli(runner, *common, "--out", tmp_path / "all", "--captions", "all", "--json"))["last"]["epoch"]
    assert one / 4 < every < one / 2
