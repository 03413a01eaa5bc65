"""ONNX export, int8 quantisation, the PyTorch-free runtime and bench, on a tiny model."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from miniclip_cli.runtime import OnnxEncoder, TorchEncoder

from .conftest import json_of, run_cli


def test_quantize_writes_a_complete_checked_model(exported_run):
    folder = exported_run / "onnx"
    for name in ("image.fp32.onnx", "text.fp32.onnx", "image.int8.onnx", "text.int8.onnx", "tokenizer.json",
                 "metadata.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["image_size"] == 32 and meta["context_length"] == 32 and len(meta["mean"]) == 3
    checks = meta["checks"]
    assert checks["fp32_vs_torch"]["image"]["max_abs_diff"] < 1e-4
    assert checks["fp32_vs_torch"]["text"]["max_abs_diff"] < 1e-4
    assert checks["int8_vs_fp32"]["image"]["mean_cosine"] > 0.95
    assert not list(exported_run.glob(".onnx*"))  # no staging left behind


def test_onnx_matches_pytorch_on_new_inputs_and_batch_sizes(exported_run, tiny_dataset):
    from miniclip_cli.checkpoint import load_run

    model, config, tokenizer = load_run(exported_run)
    torch_encoder = TorchEncoder(model, tokenizer, config.data.mean, config.data.std, precision="fp32")
    onnx_encoder = OnnxEncoder(exported_run / "onnx", "fp32")
    paths = sorted((tiny_dataset / "Images").glob("*.png"))[:5]  # a batch size the export never saw
    assert np.abs(torch_encoder.encode_images(paths) - onnx_encoder.encode_images(paths)).max() < 1e-4
    texts = ["a red circle", "a much longer caption about a green square on grey, longer than the others"]
    assert np.abs(torch_encoder.encode_texts(texts) - onnx_encoder.encode_texts(texts)).max() < 1e-4


def test_texts_are_encoded_in_batches_of_alike_length_and_returned_in_order(exported_run):
    from miniclip_cli.checkpoint import load_run

    model, config, tokenizer = load_run(exported_run)
    encoder = TorchEncoder(model, tokenizer, config.data.mean, config.data.std, precision="fp32")
    texts = [" ".join(["a red circle"] * (i % 5 + 1)) for i in range(7)]
    one_by_one = np.concatenate([encoder.encode_texts([t]) for t in texts])
    widths = []
    encode_tokens = encoder.encode_tokens

    def recording(ids, lengths):
        widths.append((ids.shape[1], max(lengths)))
        return encode_tokens(ids, lengths)

    encoder.encode_tokens = recording
    assert np.abs(encoder.encode_texts(texts, batch_size=3) - one_by_one).max() < 1e-5
    assert [w for w, _ in widths] == [l for _, l in widths] and len(widths) == 3  # each batch as wide as its longest
    assert widths == sorted(widths)


def test_quantize_json_reports_accuracy_change(runner, exported_run, tiny_dataset):
    payload = json_of(run_cli(runner, "quantize", exported_run, "--zero-shot", tiny_dataset / "zero_shot", "--json"))
    accuracy = payload["accuracy"]
    assert set(accuracy) == {"fp32", "int8", "int8_minus_fp32"}
    assert accuracy["int8_minus_fp32"]["top1"] == pytest.approx(accuracy["int8"]["top1"] - accuracy["fp32"]["top1"])
    assert payload["size_mb"]["int8"] < payload["size_mb"]["fp32"]


def test_onnx_backend_runs_without_torch(exported_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    script = (
        "import sys, json\n"
        "from miniclip_cli.cli import app\n"
        "try:\n"
        f"    app(['classify', {str(image)!r}, '-c', 'a red circle', '-c', 'a blue square', '--model',"
        f" {str(exported_run)!r}, '--backend', 'onnx', '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    classify = json.loads(lines[0])
    assert [s["caption"] for s in classify["scores"]] == ["a red circle", "a blue square"]
    assert json.loads(lines[-1]) == []


def test_eval_with_onnx_backend(runner, exported_run, tiny_dataset):
    payload = json_of(run_cli(runner, "eval", exported_run, "--data", tiny_dataset, "--split", "all",
                              "--backend", "onnx", "--json"))
    assert payload["backend"] == "onnx" and 0 <= payload["mean_recall"] <= 100


def test_bench_json_schema(runner, exported_run, tiny_dataset):
    payload = json_of(run_cli(runner, "bench", exported_run, "--zero-shot", tiny_dataset / "zero_shot",
                              "--repeats", 3, "--json"))
    assert set(payload["machine"]) == {"cpu", "extensions", "threads"}
    assert [r["row"] for r in payload["rows"]] == ["PyTorch fp32", "ONNX fp32", "ONNX int8"]
    for row in payload["rows"]:
        assert row["size_mb"] > 0 and row["images_per_s"] > 0 and row["speedup_demo"] > 0
        for key in ("image_ms", "caption_ms", "demo_ms"):
            assert set(row[key]) == {"median_ms", "p10_ms", "p90_ms"}
        assert 0 <= row["accuracy"]["top1"] <= 100
    assert payload["rows"][0]["speedup_demo"] == 1.0


def test_bench_min_metric_fails_the_run(runner, exported_run, tiny_dataset):
    result = run_cli(runner, "bench", exported_run, "--zero-shot", tiny_dataset / "zero_shot", "--repeats", 2,
                     "--min-metric", "top1=101", code=7)
    assert "below --min-metric" in result.output


def test_bench_row_without_export_says_why(runner, trained_run):
    payload = json_of(run_cli(runner, "bench", trained_run, "--repeats", 2, "--json"))
    rows = {r["row"]: r for r in payload["rows"]}
    assert "error" not in rows["PyTorch fp32"]
    assert "miniclip quantize" in rows["ONNX int8"]["error"]


def test_bad_onnx_files_are_clear_errors(runner, exported_run, tmp_path, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    broken = tmp_path / "broken"
    shutil.copytree(exported_run, broken)
    (broken / "onnx" / "image.int8.onnx").write_bytes(b"not an onnx file")
    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", broken, "--backend", "onnx", code=4)
    assert "image.int8.onnx" in result.output and "miniclip quantize" in result.output

    mismatched = tmp_path / "mismatched"
    shutil.copytree(exported_run, mismatched)
    meta_path = mismatched / "onnx" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["image_size"] = 64
    meta_path.write_text(json.dumps(meta))
    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", mismatched, "--backend", "onnx", code=4)
    assert "metadata.json says 64 px" in result.output

    missing = tmp_path / "missing"
    shutil.copytree(exported_run, missing)
    shutil.rmtree(missing / "onnx")
    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", missing, "--backend", "onnx", code=4)
    assert "miniclip quantize" in result.output


def test_training_without_pytorch_says_what_to_install(tmp_path):
    # sys.modules[name] = None makes `import name` fail as if the package were not installed.
    script = ("import sys\nsys.modules['torch'] = None\nfrom miniclip_cli.cli import app\n"
              f"app(['train', '--out', {str(tmp_path / 'run')!r}])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 6, result.stderr
    assert "needs torch" in result.stderr and "`pip install .` in miniclip's source folder" in result.stderr
    assert "pip install torch torchvision" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_train_json_schema(runner, tiny_dataset):
    payload = json_of(run_cli(runner, "bench-train", "--data", tiny_dataset, "--preset", "tiny", "--batch-size", 4,
                              "--steps", 2, "--vocab-size", 300, "--device", "cpu", "--json"))
    assert payload["plain"]["text_padding"] == "max" and payload["plain"]["precision"] == "float32"
    assert payload["fast"]["text_padding"] == "longest"
    for way in ("plain", "fast"):
        assert payload[way]["pairs_per_s"] > 0 and payload[way]["step_ms"] > 0
    # JSON rounds to 4 decimals: the ratio of the rounded rates agrees to about 1e-4
    assert payload["speedup"] == pytest.approx(payload["fast"]["pairs_per_s"] / payload["plain"]["pairs_per_s"], abs=1e-3)
    assert payload["data_pairs_per_s"] > 0 and payload["fast"]["peak_rss_mb"] > 0


def test_bench_train_needs_enough_pairs(runner, tiny_dataset):
    result = run_cli(runner, "bench-train", "--data", tiny_dataset, "--preset", "tiny", "--batch-size", 64,
                     "--steps", 5, "--vocab-size", 300, code=3)
    assert "lower --batch-size" in result.output


@pytest.mark.parametrize("settings", [
    # dropout: export must not leave the model in training mode, where it would make the PyTorch reference
    # random and the parity check fail
    ["model.dropout=0.3"],
])
def test_model_variants_export_like_pytorch(runner, tiny_dataset, tmp_path, settings):
    run = tmp_path / "run"
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny", "--epochs", 1, "--batch-size", 8,
            "--workers", 0, "--vocab-size", 300, *overrides)
    run_cli(runner, "quantize", run)
    checks = json.loads((run / "onnx" / "metadata.json").read_text())["checks"]
    assert checks["fp32_vs_torch"]["image"]["max_abs_diff"] < 1e-4
    assert checks["fp32_vs_torch"]["text"]["max_abs_diff"] < 1e-4
