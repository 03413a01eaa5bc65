"""Fixes around metrics, evaluation, export, bench and the runtime: results that cannot be right are errors,
and every bad input is one clear line."""

from pathlib import Path

import numpy as np
import pytest

from miniclip_cli.data.image_folder import ImageFolder
from miniclip_cli.data.layouts import ImageCaptions
from miniclip_cli.errors import CheckpointError
from miniclip_cli.evaluate import evaluate_retrieval, evaluate_zero_shot
from miniclip_cli.metrics import match3_top1, retrieval_metrics, zero_shot_metrics

from .conftest import json_of, run_cli


def test_collapsed_features_score_chance_not_100():
    # 10 images, 2 captions each, every feature the same: CLIP_benchmark's top-k reports chance, 1 in 10 at R@1.
    owner = np.repeat(np.arange(10), 2)
    m = retrieval_metrics(np.ones((10, 4)), np.ones((20, 4)), owner)
    assert m["text_to_image_R@1"] == pytest.approx(10.0)
    assert m["text_to_image_R@5"] == pytest.approx(50.0)
    assert m["image_to_text_R@1"] == pytest.approx(10.0)
    assert m["mean_recall"] < 50


def _clip_benchmark_recall(scores, positive_pairs, k):
    """CLIP_benchmark's recall_at_k (a hit when any positive is in the top k), ported to NumPy."""
    top = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(positive_pairs, top, axis=1).sum(axis=1) > 0


def test_untied_recall_equals_clip_benchmark():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(200, 16)).astype(np.float32)
    owner = np.repeat(np.arange(40), 5)
    m = retrieval_metrics(images, texts, owner)
    positive = owner[:, None] == np.arange(40)[None, :]  # t i
    scores = texts @ images.T  # t i
    for k in (1, 5, 10):
        assert m[f"text_to_image_R@{k}"] == pytest.approx(100 * _clip_benchmark_recall(scores, positive, k).mean())
        assert m[f"image_to_text_R@{k}"] == pytest.approx(100 * _clip_benchmark_recall(scores.T, positive.T, k).mean())


def test_nan_features_rank_last():
    owner = np.repeat(np.arange(10), 2)
    m = retrieval_metrics(np.full((10, 4), np.nan), np.ones((20, 4)), owner)
    assert m["text_to_image_R@1"] == pytest.approx(10.0) and m["image_to_text_R@1"] == pytest.approx(10.0)
    # A caption whose own image scores NaN comes after every finite score.
    image_features = np.eye(3, dtype=np.float32)
    image_features[0, 0] = np.nan
    m = retrieval_metrics(image_features, np.eye(3, dtype=np.float32), np.arange(3))
    assert m["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert m["text_to_image_mean_rank"] == pytest.approx((3 + 1 + 1) / 3)


def test_zero_shot_non_finite_logits_rank_last():
    logits = np.array([[np.inf, 0.5], [np.nan, 0.5], [0.2, np.inf]])
    m = zero_shot_metrics(logits, np.array([0, 0, 1]), ["cat", "dog"])
    assert m["top1"] == 0.0 and m["top5"] == 100.0


def test_match3_non_finite_scores_rank_last():
    owner = np.array([0, 0, 1, 1])
    own = owner[None, :] == np.arange(2)[:, None]
    assert match3_top1(np.where(own, 1.0, np.nan), owner) == 100.0  # NaN distractors: the own caption wins
    assert match3_top1(np.where(own, np.inf, 0.0), owner) == 0.0  # an infinite score is no pick


class _FixedEncoder:
    """Gives the features it is handed, whatever the input."""

    def __init__(self, images, texts):
        self.images, self.texts = np.asarray(images, np.float32), np.asarray(texts, np.float32)

    def encode_images(self, paths, progress=None):
        return self.images[: len(paths)]

    def encode_texts(self, texts):
        return self.texts[: len(texts)]


def _items(n):
    return [ImageCaptions(Path(f"/{i}.png"), (f"caption {i}",), None) for i in range(n)]


def _unit_rows(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("images, texts, message", [
    (np.where(np.arange(4)[:, None] == 1, np.nan, _unit_rows(4)), _unit_rows(4, seed=1),
     "non-finite features for 1 of 4 images"),
    (_unit_rows(4), np.full((4, 8), np.inf), "non-finite features for 4 of 4 captions"),
    (np.tile(_unit_rows(1), (4, 1)), _unit_rows(4, seed=1), "same feature for all 4 images"),
    (_unit_rows(4), np.tile(_unit_rows(1), (4, 1)), "same feature for all 4 captions"),
])
def test_retrieval_refuses_broken_features(images, texts, message):
    with pytest.raises(CheckpointError, match=message):
        evaluate_retrieval(_FixedEncoder(images, texts), _items(4))


def test_zero_shot_refuses_broken_features():
    folder = ImageFolder(Path("/zs"), ["cat", "dog"], [Path(f"/zs/{i}.png") for i in range(4)], [0, 0, 1, 1])
    with pytest.raises(CheckpointError, match="non-finite features for 4 of 4 images"):
        evaluate_zero_shot(_FixedEncoder(np.full((4, 8), np.nan), _unit_rows(2)), folder, ["a {}"])
    with pytest.raises(CheckpointError, match="same feature for all 4 images"):
        evaluate_zero_shot(_FixedEncoder(np.tile(_unit_rows(1), (4, 1)), _unit_rows(2)), folder, ["a {}"])


def test_untied_features_still_score_as_before():
    images, texts = _unit_rows(6), _unit_rows(12, seed=3)
    owner = np.repeat(np.arange(6), 2)
    m = evaluate_retrieval(_FixedEncoder(images, texts), [ImageCaptions(Path(f"/{i}.png"), ("a", "b"), None)
                                                          for i in range(6)])
    assert m["mean_recall"] == retrieval_metrics(images, texts, owner)["mean_recall"]


def _trained_copy(trained_run, folder):
    import shutil

    shutil.copytree(trained_run, folder)
    return folder


def test_quantize_refuses_a_model_with_nan_weights(runner, trained_run, tmp_path, monkeypatch):
    import torch

    from miniclip_cli import export

    def nan_weights(run, which):
        model, config, tokenizer = load_run(run, which)
        with torch.no_grad():
            for weights in model.parameters():
                weights.fill_(float("nan"))
        return model, config, tokenizer

    from miniclip_cli.checkpoint import load_run

    run = _trained_copy(trained_run, tmp_path / "run")
    monkeypatch.setattr(export, "load_run", nan_weights)
    result = run_cli(runner, "quantize", run, code=4)
    assert "non-finite features" in result.output and "retrain" in result.output
    assert not (run / "onnx").exists() and not list(run.glob(".onnx*"))


@pytest.mark.parametrize("broken", ["fp32", "int8"])
def test_quantize_parity_checks_fail_on_nan(runner, trained_run, tmp_path, monkeypatch, broken):
    from miniclip_cli import export
    from miniclip_cli.runtime import OnnxEncoder

    class NanOnnx(OnnxEncoder):
        def encode_tokens(self, ids, lengths):
            features = super().encode_tokens(ids, lengths)
            return np.full_like(features, np.nan) if self.files[0].name.split(".")[1] == broken else features

    run = _trained_copy(trained_run, tmp_path / "run")
    monkeypatch.setattr(export, "OnnxEncoder", NanOnnx)
    result = run_cli(runner, "quantize", run, code=4)
    assert "text encoder" in result.output and "nothing was written" in result.output
    assert not (run / "onnx").exists() and not list(run.glob(".onnx*"))


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, trained_run, runner):
    run = _trained_copy(trained_run, tmp_path_factory.mktemp("export") / "run")
    run_cli(runner, "quantize", run)
    return run


def test_bench_table_without_pytorch_marks_its_row(runner, exported_run, monkeypatch):
    from miniclip_cli import bench

    open_row = bench.open_row

    def no_torch(run, row, which):
        if row == "PyTorch fp32":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return open_row(run, row, which)

    monkeypatch.setattr(bench, "open_row", no_torch)
    result = run_cli(runner, "bench", exported_run, "--repeats", 2)
    assert "ONNX int8" in result.stdout
    assert any(line.startswith("PyTorch fp32 cannot run: needs torch") for line in result.stdout.splitlines())


def test_bench_says_why_a_row_cannot_run_on_one_line(runner, trained_run):
    result = run_cli(runner, "bench", trained_run, "--repeats", 2)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ONNX int8 cannot run:")]
    assert len(lines) == 1 and "miniclip quantize" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--repeats", 0], "--repeats must be at least 1"),
    (["--min-metric", "top1=nan"], "finite number"),
    (["--min-metric", "top1=inf"], "finite number"),
])
def test_bench_refuses_impossible_options(runner, trained_run, args, message):
    result = run_cli(runner, "bench", trained_run, *args, code=3)
    assert message in result.output


def test_version(runner, monkeypatch):
    from importlib import metadata

    from miniclip_cli import __version__

    assert run_cli(runner, "--version").stdout.strip() == f"miniclip {metadata.version('miniclip')}"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert run_cli(runner, "--version").stdout.strip() == f"miniclip {__version__}"


def test_json_floats_are_rounded(capsys):
    from miniclip_cli.cli.common import print_json

    print_json({"top1": 69.39999999999999, "checks": {"max_abs_diff": [3.14159e-7, 0.0]}, "images": 32, "ok": True})
    assert capsys.readouterr().out.strip() == ('{"top1": 69.4, "checks": {"max_abs_diff": [3.142e-07, 0.0]}, '
                                              '"images": 32, "ok": true}')


def test_eval_json_has_at_most_four_decimals(runner, trained_run, tiny_dataset):
    import re

    result = run_cli(runner, "eval", trained_run, "--data", tiny_dataset, "--split", "all", "--json")
    assert not re.search(r"\d\.\d{5,}", result.stdout.strip().splitlines()[-1])
    assert 0 <= json_of(result)["mean_recall"] <= 100


def test_nan_in_a_json_result_is_an_error_naming_it(runner, trained_run, tiny_dataset, monkeypatch):
    from miniclip_cli.cli.common import print_json
    from miniclip_cli.runtime import Encoder

    with pytest.raises(CheckpointError, match=r"scores\[1\].probability is nan"):
        print_json({"scores": [{"probability": 0.5}, {"probability": float("nan")}]})
    monkeypatch.setattr(Encoder, "caption_probabilities", lambda self, image, captions: [float("nan")] * len(captions))
    result = run_cli(runner, "classify", tiny_dataset / "Images" / "red_circle_0.png", "-c", "a", "-c", "b",
                     "--model", trained_run, "--json", code=4)
    assert "scores[0].probability is nan" in result.output and "{" not in result.stdout


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0 in the logits, on purpose
def test_classify_refuses_non_finite_probabilities(trained_run, tiny_dataset):
    from miniclip_cli.runtime import open_encoder

    encoder = open_encoder(trained_run, "torch", device="cpu")
    encoder.logit_scale = float("inf")
    with pytest.raises(CheckpointError, match="non-finite probabilities"):
        encoder.caption_probabilities(tiny_dataset / "Images" / "red_circle_0.png", ["a red circle", "a blue square"])


def test_zero_shot_templates_are_never_split_across_lines(runner, trained_run, tiny_dataset):
    templates = ["a photo of a {}, a small shape on a grey background.", "a rendering of the colour {} [drawn]"]
    result = run_cli(runner, "eval", trained_run, "--zero-shot", tiny_dataset / "zero_shot",
                     *(arg for t in templates for arg in ("--template", t)))
    lines = result.stdout.splitlines()
    assert "zero-shot on zero_shot" in [line.strip() for line in lines]  # the title, on one line
    for template in templates:
        assert any(repr(template) in line for line in lines), template


@pytest.mark.parametrize("listing", ['not json', '[["red"]]', '{"red": 1}', "[" * 100_000 + "]" * 100_000,
                                     b"\xff\xfe"])
def test_eval_refuses_a_bad_held_out_listing(runner, trained_run, tiny_dataset, tmp_path, listing):
    import shutil

    folder = tmp_path / "zero_shot"
    shutil.copytree(tiny_dataset / "zero_shot", folder)
    path = folder / "held_out.json"
    path.write_bytes(listing) if isinstance(listing, bytes) else path.write_text(listing)
    result = run_cli(runner, "eval", trained_run, "--zero-shot", folder, code=2)
    assert "held_out.json: must hold a JSON list of class names" in result.output


BAD_METADATA = {
    "a string for a number": {"image_size": "32"},
    "zero pixels": {"image_size": 0},
    "absurd pixels": {"image_size": 100_000},
    "absurd context": {"context_length": 5000},
    "negative embed_dim": {"embed_dim": -1},
    "a bool for a number": {"vocab_size": True},
    "zero std": {"std": [0.5, 0.0, 0.5]},
    "negative std": {"std": [0.5, -0.2, 0.5]},
    "two means": {"mean": [0.5, 0.5]},
    "a NaN mean": {"mean": [0.5, float("nan"), 0.5]},
    "a string mean": {"mean": "0.5"},
    "infinite logit scale": {"logit_scale": float("inf")},
    "negative logit scale": {"logit_scale": -3.0},
    "a string logit scale": {"logit_scale": "10"},
    "tokenizer outside the folder": {"tokenizer": "../tokenizer.json"},
    "tokenizer at an absolute path": {"tokenizer": "/etc/passwd"},
    "tokenizer in a subfolder": {"tokenizer": "sub/tokenizer.json"},
}


@pytest.fixture(scope="module")
def exported_folder(exported_run):
    return exported_run / "onnx"


@pytest.mark.parametrize("change", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_crafted_metadata_is_refused(exported_folder, tmp_path, change):
    import json
    import shutil

    from miniclip_cli.runtime import OnnxEncoder

    folder = shutil.copytree(exported_folder, tmp_path / "onnx")
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError, match=r"metadata\.json: .*; re-export with `miniclip quantize"):
        OnnxEncoder(folder)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "not json", "[1, 2, 3]", " " * 2_000_000])
def test_unreadable_metadata_is_refused(exported_folder, tmp_path, text):
    import shutil

    from miniclip_cli.runtime import OnnxEncoder

    folder = shutil.copytree(exported_folder, tmp_path / "onnx")
    (folder / "metadata.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"metadata\.json: .*; re-export with `miniclip quantize"):
        OnnxEncoder(folder)


def test_crafted_metadata_is_one_line_in_the_cli(runner, exported_run, tmp_path, tiny_dataset):
    import json
    import shutil

    run = shutil.copytree(exported_run, tmp_path / "run")
    meta = json.loads((run / "onnx" / "metadata.json").read_text())
    (run / "onnx" / "metadata.json").write_text(json.dumps({**meta, "std": [0, 0, 0]}))
    result = run_cli(runner, "classify", tiny_dataset / "Images" / "red_circle_0.png", "-c", "a", "-c", "b",
                     "--model", run, "--backend", "onnx", code=4)
    assert f"miniclip quantize {run}" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["eval", "{run}"], ["eval", "{run}", "--backend", "onnx"], ["quantize", "{run}"], ["bench", "{run}"],
    ["classify", "{image}", "-c", "a", "-c", "b", "--model", "{run}"],
    ["classify", "{image}", "-c", "a", "-c", "b", "--model", "{run}", "--backend", "onnx"],
])
def test_a_missing_run_folder_reads_the_same_everywhere(runner, tmp_path, tiny_dataset, args):
    run, image = tmp_path / "no-such-run", tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, *(a.format(run=run, image=image) for a in args), code=4)
    assert f"{run}: no such run folder; pass the --out folder of `miniclip train`" in result.output


def test_a_copied_onnx_folder_is_a_model_on_its_own(runner, exported_run, tiny_dataset, tmp_path):
    import shutil

    model = shutil.copytree(exported_run / "onnx", tmp_path / "edge-model")
    image = tiny_dataset / "Images" / "red_circle_0.png"
    scores = json_of(run_cli(runner, "classify", image, "-c", "a red circle", "-c", "a blue square", "--model", model,
                             "--json"))["scores"]
    assert sum(s["probability"] for s in scores) == pytest.approx(1.0, abs=1e-3)
    payload = json_of(run_cli(runner, "eval", model, "--zero-shot", tiny_dataset / "zero_shot", "--json"))
    assert payload["backend"] == "onnx" and 0 <= payload["top1"] <= 100
    assert payload["templates"] == ["a photo of a {}."]  # the run's own, carried in metadata.json
    payload = json_of(run_cli(runner, "eval", model, "--data", tiny_dataset, "--split", "all", "--backend", "onnx-fp32",
                              "--json"))
    assert payload["backend"] == "onnx-fp32" and 0 <= payload["mean_recall"] <= 100

    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", model, "--backend", "torch", code=4)
    assert "run folder it was exported from" in result.output
    result = run_cli(runner, "eval", model, code=3)
    assert "pass --data DATASET or --zero-shot FOLDER" in result.output


def test_match3_with_one_image_is_none_not_nan(capsys):
    from rich.console import Console

    from miniclip_cli.cli.common import print_json
    from miniclip_cli.ui.tables import retrieval_table

    m = retrieval_metrics(np.eye(2, dtype=np.float32)[:1], np.eye(2, dtype=np.float32), np.array([0, 0]))
    assert m["match3_top1"] is None
    print_json(m)  # valid JSON: null, where NaN would be refused
    assert '"match3_top1": null' in capsys.readouterr().out
    console = Console(width=100, record=True)
    console.print(retrieval_table({**m, "images": 1, "captions": 2}, "one image"))
    assert "3-way caption match n/a" in console.export_text()
