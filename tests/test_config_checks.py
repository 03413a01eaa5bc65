"""--set values parsed by each setting's declared type, and config.json checked for types, ranges and size."""

from __future__ import annotations

import json

import pytest

from miniclip_cli.config import RunConfig, apply_overrides, load_run_config
from miniclip_cli.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("item, expected", [
    ("train.lr=abc", "a number"),
    ("model.vision_layers=two", "a whole number"),
    ("train.ema=yes", "a number"),
    ("train.crop_scale=0.5", "two numbers"),
    ("train.lr=nan", "a finite number"),
    ("model.vision_layers=2.5", "a whole number"),
    ("runtime.cache=maybe", "true or false"),
])
def test_set_with_a_value_of_the_wrong_type_is_one_line(item, expected):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(RunConfig(), [item])
    message = str(caught.value)
    key, value = item.split("=")
    assert key in message and repr(value) in message and expected in message and "e.g. --set " + key in message
    assert "\n" not in message


def test_set_values_take_their_types():
    config = apply_overrides(RunConfig(), ["train.lr=1e-3", "model.vision_layers=2", "runtime.cache=false",
                                           "train.crop_scale=[0.3, 1]", "runtime.max_steps=none",
                                           "data.templates=[\"a {}\", \"the {}\"]", "train.captions=all"])
    assert config.train.lr == 1e-3 and config.model.vision_layers == 2 and config.runtime.cache is False
    assert config.train.crop_scale == (0.3, 1.0) and config.runtime.max_steps is None
    assert config.data.templates == ("a {}", "the {}") and config.train.captions == "all"


def _write_config(run, change):
    raw = json.loads(RunConfig().to_json())
    change(raw)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(raw) if isinstance(raw, dict) else raw, encoding="utf-8")


@pytest.mark.parametrize("change, expected", [
    (lambda raw: raw["model"].update(vision_heads=0), "vision_heads"),
    (lambda raw: raw["model"].update(patch_size=0), "patch_size"),
    (lambda raw: raw["model"].update(text_width="wide"), "text_width"),
    (lambda raw: raw["model"].update(init_temperature=0), "init_temperature"),
    (lambda raw: raw["model"].update(max_logit_scale=-1), "max_logit_scale"),
    (lambda raw: raw["data"].update(std=[0.2, 0.0, 0.2]), "std"),
    (lambda raw: raw["data"].update(mean=[0.5, 0.5]), "mean"),
    (lambda raw: raw["model"].update(vision_layers=100_000), "memory"),
    (lambda raw: raw["model"].update(vision_width=1_000_000, text_width=1_000_000), "memory"),
    (lambda raw: raw["train"].update(lr=[1, 2]), "lr"),
    (lambda raw: raw["model"].update(vision_layers=True), "vision_layers"),
])
def test_a_crafted_config_json_is_refused_in_one_line(tmp_path, change, expected):
    run = tmp_path / "run"
    _write_config(run, change)
    with pytest.raises(CheckpointError) as caught:
        load_run_config(run)
    assert expected in str(caught.value) and str(run / "config.json") in str(caught.value)


def test_deeply_nested_config_json_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(CheckpointError, match="config.json"):
        load_run_config(run)
