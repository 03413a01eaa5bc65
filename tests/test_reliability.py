"""Reliability and safety: bad images and captions, broken run folders, crafted pickles, interrupted training,
unwritable or full disks, absent devices. Each bad input ends in a warning with a count or one clear error line."""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from miniclip_cli import checkpoint
from miniclip_cli.checkpoint import load_run
from miniclip_cli.config import RunConfig, RuntimeConfig, TrainConfig, tiny_model_config
from miniclip_cli.data.checks import MAX_PIXELS, MIN_SIDE, drop_unusable_images, image_problem
from miniclip_cli.data.images import PairDataset
from miniclip_cli.data.layouts import ImageCaptions
from miniclip_cli.device import autocast_dtype, pick_device
from miniclip_cli.errors import CheckpointError, DataError, DeviceError
from miniclip_cli.run_files import atomic_write
from miniclip_cli.tokenizer import train_tokenizer
from miniclip_cli.train import Callbacks, fit

from .conftest import COLOURS, SHAPES, json_of, make_image, run_cli

# ------------------------------------------------------------------------------------------- bad images


def truncated_jpeg(path: Path) -> Path:
    """A photo-like JPEG cut at two thirds, as an interrupted download leaves it: the header still parses."""
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


# name -> the kind image_problem must report
BAD_IMAGES = {
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "empty.jpg": "not an image",
    "text.jpg": "not an image",
    "pixel.png": "too small",
    "huge.png": "too large",  # 100 MP: above PIL's warning threshold, below its error
    "bomb.png": "too large",  # 225 MP: PIL itself refuses it as a decompression bomb
    "gone.jpg": "missing",
}


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-images")
    truncated_jpeg(folder / "truncated.jpg")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[:-20])
    (folder / "whole.png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    # What a clone without `git lfs pull` holds in place of every image.
    (folder / "text.jpg").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "pixel.png")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # 1-bit: a few kB on disk, 100 MP decoded
    Image.new("1", (15_000, 15_000)).save(folder / "bomb.png")
    return folder


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> Path:
    """Unusual but valid files: every mode load_rgb converts, progressive JPEG, bytes after the JPEG end marker."""
    folder = tmp_path_factory.mktemp("good-images")
    for mode, colour in {"L": 128, "RGBA": (255, 0, 0, 128), "P": 3, "I;16": 40000, "1": 1, "LA": (9, 200)}.items():
        Image.new(mode, (20, 10), colour).save(folder / f"{mode.replace(';', '')}.png")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(folder / "cmyk.tif")
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    photo.save(folder / "progressive.jpg", progressive=True)
    photo.save(folder / "trailer.jpg")
    with open(folder / "trailer.jpg", "ab") as f:
        f.write(b"camera maker data after the end marker")
    photo.save(folder / "photo.webp")
    Image.new("RGB", (MIN_SIDE, 400), (1, 2, 3)).save(folder / "narrow.png")
    return folder


def test_each_kind_of_bad_image_is_named(bad_images):
    for name, kind in BAD_IMAGES.items():
        problem = image_problem(bad_images / name)
        assert problem is not None and problem.startswith(kind), (name, problem)


def test_odd_but_valid_images_pass_the_check(good_images):
    for path in sorted(good_images.iterdir()):
        assert image_problem(path) is None, path


def test_size_limits_are_the_documented_ones():
    assert MAX_PIXELS == 50_000_000 and MIN_SIDE == 8


def test_drop_unusable_images_returns_kept_and_problems(bad_images, good_images):
    good = [ImageCaptions(p, ("a caption",), None) for p in sorted(good_images.iterdir())]
    bad = [ImageCaptions(bad_images / n, ("a caption",), None) for n in BAD_IMAGES]
    kept, problems = drop_unusable_images(good + bad, max_bad_fraction=1.0)
    assert kept == good
    assert [path.name for path, _ in problems] == list(BAD_IMAGES)
    with pytest.raises(DataError, match="cannot be used") as info:
        drop_unusable_images(good + bad)  # over 10% bad: the dataset itself is broken
    assert "text.jpg" in str(info.value) or "truncated.jpg" in str(info.value)
    with pytest.raises(DataError, match="none of the"):
        drop_unusable_images(bad)


def test_pil_bomb_guard_is_a_clear_error_in_classify(runner, trained_run, bad_images):
    result = run_cli(runner, "classify", bad_images / "bomb.png", "-c", "a", "-c", "b", "--model", trained_run, code=2)
    assert "bomb.png" in result.output and "megapixels" in result.output and "Traceback" not in result.output


def test_truncated_image_in_classify_is_a_clear_error(runner, trained_run, bad_images):
    result = run_cli(runner, "classify", bad_images / "truncated.jpg", "-c", "a", "-c", "b", "--model", trained_run,
                     code=2)
    assert "truncated.jpg" in result.output and result.output.count("error:") == 1


def test_a_sample_that_fails_mid_epoch_is_replaced_deterministically(tmp_path, tiny_dataset):
    """The up-front check cannot see every fault (a file changed during training, corruption inside the data);
    such a sample is swapped for another picked by (seed, epoch, index), and the failure travels with it."""
    good = [ImageCaptions(p, (p.stem,), None) for p in sorted((tiny_dataset / "Images").glob("*.png"))[:6]]
    broken = ImageCaptions(truncated_jpeg(tmp_path / "broken.jpg"), ("broken",), None)
    dataset = PairDataset(good + [broken], 32, (0.5,) * 3, (0.5,) * 3, (0.5, 1.0), "one", seed=0)
    image, caption, failures, index = dataset[6]
    again = dataset[6]
    assert caption != "broken" and caption == again[1] and torch.equal(image, again[0])
    assert index != 6 and caption == good[index].captions[0]  # the replacement's own index
    assert len(failures) == 1 and "broken.jpg" in failures[0]
    assert dataset[0][2] == ()


def test_training_survives_an_image_that_breaks_mid_run(tmp_path, tiny_dataset):
    items = [ImageCaptions(p, (f"a {p.stem.split('_')[0]} shape",), None)
             for p in sorted((tiny_dataset / "Images").glob("*.png"))[:11]]
    items.append(ImageCaptions(truncated_jpeg(tmp_path / "broken.jpg"), ("broken",), None))
    tokenizer = train_tokenizer([c for i in items for c in i.captions] * 3, 280)
    config = RunConfig(model=tiny_model_config(tokenizer.vocab_size),
                       train=TrainConfig(epochs=2, batch_size=4), runtime=RuntimeConfig(workers=0, precision="fp32"))

    class Record(Callbacks):
        def __init__(self):
            self.replaced = []

        def on_replaced_sample(self, message, total):
            self.replaced.append((message, total))

    callbacks = Record()
    history = fit(config, tokenizer, items, [], tmp_path / "run", torch.device("cpu"), callbacks=callbacks)
    assert [r["step"] for r in history] == [3, 6]
    assert callbacks.replaced and all("broken.jpg" in m for m, _ in callbacks.replaced)
    assert sum(r.get("replaced_samples", 0) for r in history) == callbacks.replaced[-1][1] == 2  # once per epoch


def test_cli_warns_when_a_training_image_breaks_mid_run(runner, tmp_path, monkeypatch):
    (tmp_path / "Images").mkdir()
    rows = ["image,caption,split"]
    for n in range(13):
        colour, shape = list(COLOURS)[n % 4], SHAPES[n % 2]
        make_image(tmp_path / "Images" / f"{n}.png", colour, shape, seed=n)
        rows.append(f"{n}.png,a {colour} {shape},{'train' if n < 11 else 'val'}")
    truncated_jpeg(tmp_path / "Images" / "broken.jpg")
    rows.append("broken.jpg,a broken image,train")  # 12 training images: batch 4 never leaves it out
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # Stand-in for damage the up-front check cannot see (the file changed after it ran).
    monkeypatch.setattr("miniclip_cli.cli.common.drop_unusable_images", lambda items: (items, []))
    result = run_cli(runner, "train", "--data", tmp_path / "captions.csv", "--out", tmp_path / "run",
                     "--preset", "tiny", "--epochs", 1, "--batch-size", 4, "--workers", 0, "--vocab-size", 280)
    assert "broken.jpg" in result.stderr and "another sample took its place" in result.stderr
    assert "1 unloadable sample(s) replaced" in " ".join(result.stderr.split())  # the epoch line may wrap
    assert checkpoint.read_history(tmp_path / "run")[-1]["replaced_samples"] == 1


# ------------------------------------------------------------------------------- a messy dataset via the CLI


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory, bad_images) -> Path:
    """40 good images, 3 bad ones (7%, under the 10% that would mean a broken download), an empty caption,
    captions longer than the tiny model's 32-token context."""
    root = tmp_path_factory.mktemp("messy")
    (root / "Images").mkdir()
    lines = ["image,caption"]
    for n in range(40):
        colour, shape = list(COLOURS)[n % 4], SHAPES[n // 4 % 2]
        make_image(root / "Images" / f"{n}.png", colour, shape, seed=n)
        lines += [f"{n}.png,a {colour} {shape}", f"{n}.png,{shape} coloured {colour}"]
    lines.append("3.png,")  # an empty caption
    lines += [f"{n}.png," + " ".join(["a very long caption about a shape"] * 12) for n in range(5)]
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        shutil.copy(bad_images / name, root / "Images" / name)
        lines.append(f"{name},a broken image")
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_eval_skips_bad_images_with_a_counted_warning(runner, trained_run, messy_dataset):
    result = run_cli(runner, "eval", trained_run, "--data", messy_dataset, "--split", "all", "--json")
    assert json_of(result)["images"] == 40
    assert "3 of 43 images" in result.stderr and "2 not an image, 1 truncated" in result.stderr
    assert "empty caption" in result.stderr


def test_train_warns_about_bad_images_empty_and_long_captions(runner, messy_dataset, tmp_path):
    result = run_cli(runner, "train", "--data", messy_dataset, "--out", tmp_path / "run", "--preset", "tiny",
                     "--max-steps", 1, "--batch-size", 8, "--workers", 0, "--vocab-size", 300)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    text = "\n".join(warnings)
    assert "1 empty caption" in text
    assert "cannot be used" in text and "truncated" in text
    # The long captions are each image's last: the count covers every training caption, not only the first.
    assert re.search(r"\d+ of \d+ training captions are longer than the model's 32-token context", text), text


def test_non_utf8_caption_file_is_a_clear_error(runner, tmp_path):
    (tmp_path / "captions.csv").write_bytes("image,caption\na.jpg,un caf\xe9\n".encode("latin-1"))
    result = run_cli(runner, "train", "--data", tmp_path / "captions.csv", "--out", tmp_path / "run", code=2)
    assert "not UTF-8" in result.output and "iconv" in result.output and result.output.count("error:") == 1


def test_zero_shot_folder_skips_bad_images(runner, trained_run, tiny_dataset, bad_images, tmp_path):
    folder = tmp_path / "zs"
    shutil.copytree(tiny_dataset / "zero_shot", folder)
    shutil.copy(bad_images / "empty.jpg", folder / "red" / "empty.jpg")
    result = run_cli(runner, "eval", trained_run, "--zero-shot", folder, "--json")
    assert json_of(result)["zero_shot_images"] == 8 and "empty.jpg" in result.stderr


# ------------------------------------------------------------------------------------ broken run folders


def _retrained_tokenizer(run: Path) -> None:
    train_tokenizer(["a completely different set of captions"] * 5, 270).save(run / "tokenizer.json")


def _other_architecture(run: Path) -> None:
    config = RunConfig.load(run / "config.json")
    config.model.text_width, config.model.text_heads = 64, 4
    from miniclip_cli.model import MiniCLIP

    checkpoint.save_weights(run / "best.safetensors", MiniCLIP(config.model))


def _edit_config(change):
    def edit(run: Path) -> None:
        raw = json.loads((run / "config.json").read_text())
        change(raw)
        (run / "config.json").write_text(json.dumps(raw))
    return edit


def _truncate(name: str):
    def cut(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    return cut


BROKEN_RUNS = {
    "missing tokenizer": (lambda run: (run / "tokenizer.json").unlink(), ["tokenizer.json", "missing", "restore"]),
    "other tokenizer": (_retrained_tokenizer, ["tokenizer.json", "vocabulary", "put back"]),
    "missing config": (lambda run: (run / "config.json").unlink(), ["config.json", "missing"]),
    "config not json": (lambda run: (run / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
    "unknown config key": (_edit_config(lambda raw: raw["model"].update(colour="blue")),
                           ["config.json", "unknown model setting", "colour"]),
    "impossible config value": (_edit_config(lambda raw: raw["model"].update(patch_size=7)),
                                ["config.json", "not a multiple of patch_size"]),
    "other architecture": (_other_architecture, ["best.safetensors", "do not match config.json"]),
    "truncated weights": (_truncate("best.safetensors"), ["best.safetensors", "not a readable safetensors", "retrain"]),
    "no weights": (lambda run: [(run / n).unlink() for n in ("best.safetensors", "last.safetensors")],
                   ["best.safetensors", "missing"]),
}


@pytest.mark.parametrize("case", list(BROKEN_RUNS))
def test_broken_run_folder_is_one_clear_checkpoint_error(case, runner, trained_run, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage, needles = BROKEN_RUNS[case]
    damage(run)
    image = tiny_dataset / "Images" / "red_circle_0.png"
    for args in (["classify", image, "-c", "a", "-c", "b", "--model", run], ["eval", run, "--json"]):
        result = run_cli(runner, *args, code=4)
        assert result.output.count("error:") == 1 and "Traceback" not in result.output
        for needle in needles:
            assert needle in result.output, (case, needle, result.output)


def test_resume_from_a_run_with_a_broken_config_is_a_checkpoint_error(runner, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _edit_config(lambda raw: raw["train"].update(epochs=0))(run)
    result = run_cli(runner, "train", "--out", run, "--resume", code=4)
    assert "config.json" in result.output and "epochs" in result.output


# --------------------------------------------------------------------------------------- crafted pickles


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_weights_are_refused_without_unpickling(writer, runner, trained_run, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    for name in ("best.safetensors", "last.safetensors", "resume.safetensors"):
        if writer == "pickle":
            (run / name).write_bytes(pickle.dumps(_Payload(marker)))
        else:  # the usual shape of a malicious .pth: a zip archive holding data.pkl
            torch.save({"state_dict": _Payload(marker)}, run / name)
    image = tiny_dataset / "Images" / "red_circle_0.png"
    for args in (["eval", run, "--json"], ["eval", run, "--checkpoint", "last", "--json"],
                 ["classify", image, "-c", "a", "-c", "b", "--model", run],
                 ["classify", image, "-c", "a", "-c", "b", "--model", run, "--checkpoint", "last"],
                 ["train", "--out", run, "--resume"]):
        result = run_cli(runner, *args, code=4)
        assert "not a readable safetensors file" in result.output, result.output
        assert not marker.exists(), f"{args[0]} unpickled the payload"


# --------------------------------------------------------------------------------- interrupted training


def _resume_step(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["counters"])["step"]
    except Exception:  # not there yet, or being replaced
        return -1


def _train_args(data: Path, out: Path) -> list[str]:
    # Batch 4: 7 steps per epoch, 21 in all, so the kill at step 2 leaves most of the run to resume.
    return ["train", "--data", str(data), "--preset", "tiny", "--batch-size", "4", "--workers", "0", "--epochs", "3",
            "--vocab-size", "300", "--out", str(out)]


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler; give the child the default so Ctrl-C tests hold however the test run itself was started.
    return subprocess.Popen([sys.executable, "-m", "miniclip_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow  # 11-23 s on 2 shared cores: an fsync'd checkpoint every step, and a fresh interpreter
def test_sigkill_then_resume_matches_an_uninterrupted_run(runner, tiny_dataset, tmp_path):
    killed = tmp_path / "killed"
    process = _spawn([*_train_args(tiny_dataset, killed), "--save-every", "1"], tmp_path)
    deadline = time.monotonic() + 120
    while _resume_step(killed / "resume.safetensors") < 2:
        assert process.poll() is None, f"training ended before the kill:\n{process.communicate()[1]}"
        assert time.monotonic() < deadline, "no resumable checkpoint at step 2 within 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    stopped_at = _resume_step(killed / "resume.safetensors")
    assert 2 <= stopped_at < 21, stopped_at

    run_cli(runner, "train", "--out", killed, "--resume")
    straight = tmp_path / "straight"
    run_cli(runner, *_train_args(tiny_dataset, straight))

    # Data order, caption draws and crops depend only on (seed, epoch, index), and the interrupted epoch's
    # losses ride in the resume file: the histories and the weights agree to float rounding.
    a, b = checkpoint.read_history(straight), checkpoint.read_history(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [7, 14, 21]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5, (ra, rb)
    wa, wb = load_run(straight, "last")[0].state_dict(), load_run(killed, "last")[0].state_dict()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    assert not list(killed.glob(".*.tmp")), "a temporary file from the killed write was left behind"


def test_interrupt_mid_epoch_then_resume_matches_an_uninterrupted_run(runner, tiny_dataset, tmp_path, monkeypatch):
    """The in-process twin of the SIGKILL test above, fast enough for every run: Ctrl-C at step 2 of 3 in the
    first epoch, then --resume; the interrupted epoch's mean loss must count the steps from before the stop."""
    from miniclip_cli.ui.progress import TrainProgress

    # A high learning rate moves the loss between steps, so a mean over part of the epoch would show.
    args = ["train", "--data", tiny_dataset, "--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0,
            "--vocab-size", 300, "--lr", 0.01]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(runner, *args, "--out", straight)
    on_step = TrainProgress.on_step

    def ctrl_c_at_step_2(self, step, *rest):
        on_step(self, step, *rest)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainProgress, "on_step", ctrl_c_at_step_2)
    result = run_cli(runner, *args, "--out", stopped, code=130)
    assert "--resume" in result.output and _resume_step(stopped / "resume.safetensors") == 2
    monkeypatch.undo()
    run_cli(runner, "train", "--out", stopped, "--resume")
    a, b = checkpoint.read_history(straight), checkpoint.read_history(stopped)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5, (ra, rb)
    wa, wb = load_run(straight, "last")[0].state_dict(), load_run(stopped, "last")[0].state_dict()
    assert all(torch.allclose(wa[name], wb[name], atol=1e-5) for name in wa)


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = _train_args(tiny_dataset, run)
    args[args.index("--epochs") + 1] = "200"  # long enough that Ctrl-C always lands mid-training
    process = _spawn(args, tmp_path)
    for line in process.stderr:
        if line.startswith("training on"):
            break
    else:
        pytest.fail(f"training never started: {process.communicate()}")
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "checkpoint saved" in stderr and f"--out {run} --resume" in stderr and "Traceback" not in stderr
    assert _resume_step(run / "resume.safetensors") >= 0


def test_ctrl_c_outside_training_is_one_line_and_130(runner, trained_run, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("miniclip_cli.cli.evaluate.open_encoder", interrupted)
    result = run_cli(runner, "eval", trained_run, code=130)
    assert "interrupted" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------ disks and devices


def test_out_under_a_file_is_refused_before_training(runner, tiny_dataset, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    result = run_cli(runner, "train", "--data", tiny_dataset, "--out", blocker / "run", "--preset", "tiny", code=3)
    assert "somefile/run" in result.output and "cannot write there" in result.output and "--out" in result.output
    assert "training on" not in result.output and "tokenizer:" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the file-as-folder case covers root")
def test_read_only_out_folder_is_refused(runner, tiny_dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli(runner, "train", "--data", tiny_dataset, "--out", locked / "run", "--preset", "tiny", code=3)
        assert "cannot write there" in result.output
    finally:
        locked.chmod(0o700)


def _disk_full_after(nbytes: int):
    def write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.safetensors"
    target.write_bytes(b"the previous checkpoint")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half a new chec")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_failed_save_is_a_checkpoint_error_naming_the_file(tmp_path, monkeypatch):
    from miniclip_cli.model import MiniCLIP

    target = tmp_path / "best.safetensors"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(checkpoint, "save_file", _disk_full_after(100))
    with pytest.raises(CheckpointError, match="free disk space") as info:
        checkpoint.save_weights(target, MiniCLIP(tiny_model_config(100)))
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"the previous checkpoint" and len(list(tmp_path.iterdir())) == 1


def test_disk_full_during_training_is_one_line_and_keeps_the_checkpoints(runner, trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", _disk_full_after(1000))
    result = run_cli(runner, "train", "--out", run, "--resume", "--epochs", 3, code=4)
    assert result.output.count("error:") == 1 and "free disk space" in result.output
    assert "last.safetensors" in result.output and "--resume" in result.output
    for name in ("best.safetensors", "last.safetensors", "resume.safetensors"):
        assert (run / name).read_bytes() == before[name], name
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_absent_devices_are_device_errors(device, runner, trained_run, tiny_dataset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device auto or cpu"):
        pick_device(device)
    image = tiny_dataset / "Images" / "red_circle_0.png"
    for args in (["classify", image, "-c", "a", "-c", "b", "--model", trained_run, "--device", device],
                 ["eval", trained_run, "--device", device]):
        result = run_cli(runner, *args, code=5)
        assert device.split(":")[0] in result.output and result.output.count("error:") == 1


def test_cuda_index_beyond_the_visible_gpus_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="cuda:3.*1 GPU"):
        pick_device("cuda:3")


@pytest.mark.parametrize("bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                 (False, False, None)])
def test_auto_precision_takes_bf16_only_on_cpus_that_compute_it_natively(bf16, amx, expected, monkeypatch):
    # AVX-512 without its BF16 extension (Intel Cascade Lake) ran a training step 2.4x slower under bf16
    # autocast than in fp32; with it (AMD Zen 4) 1.6x faster
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert autocast_dtype(torch.device("cpu"), "auto") == expected
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16  # asked for: always
    assert autocast_dtype(torch.device("cpu"), "fp32") is None


class _Collecting(torch.utils.data.Dataset):
    """Runs the garbage collector in the loader process, as any allocation there may."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        gc.collect()
        return torch.zeros(1)


def test_loader_processes_never_finalise_what_this_process_let_go(tmp_path):
    # An ONNX Runtime session freed in a forked loader process waits forever in its destructor for thread-pool
    # threads that exist only here (bench-train after quantize in one process hung so). `Let go` stands for it.
    from miniclip_cli.data.feeding import load_batches

    parent = os.getpid()

    class LetGo:
        def __init__(self):
            self.cycle = self  # only the garbage collector frees it

        def __del__(self):
            if os.getpid() != parent:
                (tmp_path / f"finalised-in-{os.getpid()}").touch()

    gc.disable()
    try:
        LetGo()
        batches = list(load_batches(_Collecting(), workers=1, batch_size=1))
    finally:
        gc.enable()
    assert len(batches) == 2 and not list(tmp_path.iterdir())
