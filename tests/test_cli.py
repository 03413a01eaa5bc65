"""The commands end to end on a tiny model and a tiny generated dataset."""

import json

import torch

from miniclip_cli import checkpoint
from miniclip_cli.checkpoint import load_run
from miniclip_cli.cli.classify import clean_dropped_path
from miniclip_cli.data.pixels import load_rgb
from miniclip_cli.runtime import TorchEncoder

from .conftest import json_of, run_cli


def test_train_writes_a_complete_run(trained_run):
    for name in ("config.json", "tokenizer.json", "best.safetensors", "last.safetensors", "resume.safetensors",
                 "history.jsonl"):
        assert (trained_run / name).is_file(), name
    history = checkpoint.read_history(trained_run)
    assert [r["epoch"] for r in history] == [1, 2]
    assert all("val_mean_recall" in r for r in history)


def test_no_file_in_a_run_is_a_pickle(trained_run):
    from safetensors import safe_open

    # Each file is what its name says: safetensors (header length, then a JSON header) or JSON text.
    for path in trained_run.iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert list(f.keys())
        elif path.is_file() and path.name != ".lock":  # the lock holds the writer's PID while it runs
            for line in path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
                json.loads(line)


def test_save_then_load_gives_identical_embeddings(trained_run, tiny_dataset):
    encoders = []
    for _ in range(2):
        model, config, tokenizer = load_run(trained_run, "last")
        encoders.append(TorchEncoder(model, tokenizer, config.data.mean, config.data.std, precision="fp32"))
    paths = sorted((tiny_dataset / "Images").glob("*.png"))[:4]
    assert (encoders[0].encode_images(paths) == encoders[1].encode_images(paths)).all()
    texts = ["a red circle", "a blue square"]
    assert (encoders[0].encode_texts(texts) == encoders[1].encode_texts(texts)).all()


def test_eval_json_has_retrieval_and_zero_shot_keys(runner, trained_run, tiny_dataset):
    result = run_cli(runner, "eval", trained_run, "--data", tiny_dataset, "--split", "all",
                     "--zero-shot", tiny_dataset / "zero_shot", "--template", "a {} circle", "--json")
    payload = json_of(result)
    for key in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                "text_to_image_R@10", "mean_recall", "match3_top1", "top1", "top5", "mean_per_class_recall"):
        assert 0.0 <= payload[key] <= 100.0, key
    assert payload["images"] == 32 and payload["captions"] == 96
    assert set(payload["per_class"]) == {"red", "green", "blue", "yellow"}


def test_eval_table_output(runner, trained_run, tiny_dataset):
    result = run_cli(runner, "eval", trained_run, "--data", tiny_dataset, "--split", "test")
    assert "image -> text" in result.stdout and "R@10" in result.stdout


def test_classify_json(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "a red circle", "-c", "a blue square", "-c", "a green circle",
                     "--model", trained_run, "--json")
    payload = json_of(result)
    assert payload["image"] == str(image)
    assert [s["caption"] for s in payload["scores"]] == ["a red circle", "a blue square", "a green circle"]
    assert abs(sum(s["probability"] for s in payload["scores"]) - 1.0) < 1e-5


def test_classify_chart_and_table(runner, trained_run, tiny_dataset):
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "a red circle", "-c", "a blue square", "--model", trained_run)
    assert "probability (%)" in result.stdout and "a blue square" in result.stdout


def test_classify_interactive_loop(runner, trained_run, tiny_dataset):
    from miniclip_cli.cli import app

    image = tiny_dataset / "Images" / "blue_square_1.png"
    typed = f"'{image}'\na blue square\na red circle\n\n\n"  # path quoted as a terminal drops it; 2 captions; quit
    result = runner.invoke(app, ["classify", "--model", str(trained_run), "--json"], input=typed)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["image"] == str(image) and len(payload["scores"]) == 2


def test_dropped_paths_are_cleaned():
    assert clean_dropped_path("'/tmp/my photo.jpg' ") == "/tmp/my photo.jpg"
    assert clean_dropped_path("/tmp/my\\ photo.jpg") == "/tmp/my photo.jpg"
    assert clean_dropped_path('"/tmp/a b.png"') == "/tmp/a b.png"
    assert clean_dropped_path("file:///tmp/a%20b.png") == "/tmp/a b.png"


def test_resume_continues_where_max_steps_stopped(runner, tiny_dataset, tmp_path):
    common = ["--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
              "--vocab-size", 300]
    straight = tmp_path / "straight"
    run_cli(runner, "train", *common, "--out", straight)
    stopped = tmp_path / "stopped"
    run_cli(runner, "train", *common, "--out", stopped, "--max-steps", 3)
    assert checkpoint.read_history(stopped)[-1]["step"] == 3
    result = run_cli(runner, "train", "--out", stopped, "--resume", code=3)  # it keeps its limit of 3 steps
    assert "--max-steps" in result.output
    run_cli(runner, "train", "--out", stopped, "--resume", "--epochs", 2)  # a new limit: the run's 2 epochs
    a = checkpoint.read_history(straight)[-1]
    b = checkpoint.read_history(stopped)[-1]
    assert a["step"] == b["step"]
    # Same seed, same batches, same crops: the resumed run ends with the same weights.
    wa, _, _ = load_run(straight, "last")
    wb, _, _ = load_run(stopped, "last")
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_existing_run_folder_needs_resume(runner, trained_run, tiny_dataset):
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", trained_run, "--preset", "tiny", code=3)
    assert "--resume" in result.output


def test_train_tokenizer_command(runner, tiny_dataset, tmp_path):
    out = tmp_path / "tok.json"
    payload = json_of(run_cli(runner, "train-tokenizer", "--data", tiny_dataset, "--out", out, "--vocab-size", 300, "--json"))
    assert out.is_file() and payload["vocab_size"] <= 300 and payload["max_tokens"] >= payload["mean_tokens"] > 2


def test_builtin_default_dataset_trains(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = json_of(run_cli(runner, "train", "--preset", "tiny", "--max-steps", 2, "--workers", 0, "--json"))
    run = tmp_path / payload["run"]
    assert run.name == "shapes"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["path"] is None
    result = json_of(run_cli(runner, "eval", run, "--json"))
    # The built-in zero-shot folder lists its held-out colour-shape pairs: reported beside chance.
    assert result["chance"] == round(100 / 24, 4) and len(result["held_out_classes"]) == 4
    assert "image_to_text_R@1" in result


def test_user_errors_are_one_line_with_exit_codes(runner, trained_run, tmp_path):
    cases = [
        (["train", "--data", tmp_path / "nope", "--out", tmp_path / "r"], 2, "nope"),
        (["eval", tmp_path / "missing-run"], 4, "missing-run"),
        (["classify", tmp_path / "x.jpg", "-c", "a", "--model", trained_run], 3, "at least two captions"),
        (["classify", tmp_path / "x.jpg", "-c", "a", "-c", "b", "--model", trained_run], 2, "x.jpg"),
        # A folder is classified image by image; this one holds none.
        (["classify", tmp_path, "-c", "a", "-c", "b", "--model", trained_run], 2, "no image files"),
        (["train", "--device", "cuda", "--out", tmp_path / "r2", "--data", tmp_path], 5, "cuda") if not torch.cuda.is_available() else None,
    ]
    for args, code, needle in filter(None, cases):
        result = run_cli(runner, *args, code=code)
        assert needle in result.output, result.output
        assert "Traceback" not in result.output
        assert result.output.count("error:") == 1


def test_not_an_image_is_a_clear_error(runner, trained_run, tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a jpeg")
    result = run_cli(runner, "classify", fake, "-c", "a", "-c", "b", "--model", trained_run, code=2)
    assert "fake.jpg" in result.output and "re-save" in result.output


def test_odd_image_modes_load_as_rgb(tmp_path):
    from PIL import Image

    modes = {"L": 128, "RGBA": (255, 0, 0, 128), "CMYK": (0, 255, 255, 0), "P": 3, "I;16": 40000, "1": 1}
    for mode, colour in modes.items():
        path = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode in ('CMYK',) else 'png'}"
        Image.new(mode, (20, 10), colour).save(path)
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (20, 10), mode


def test_only_a_teachers_or_towers_pass_is_reported_as_one(runner, tiny_dataset, tmp_path, monkeypatch):
    # a run with neither: a slow optimiser set-up is no pass over the images
    import time

    from miniclip_cli import train

    make_optimizer = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *a: (time.sleep(1.5), make_optimizer(*a))[1])
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "tiny",
                     "--epochs", 1, "--batch-size", 8, "--workers", 0, "--vocab-size", 300)
    assert "features of the images" not in result.output
