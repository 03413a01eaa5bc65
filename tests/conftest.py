"""Shared fixtures: a tiny captioned dataset written to a temporary folder, and a CLI runner."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square")


def make_image(path, colour, shape, size=48, seed=0):
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    r = size // 4
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    image.save(path)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A Kaggle-style captions.txt with 32 images (no split files: the seeded hold-out applies)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "Images").mkdir()
    lines = ["image,caption"]
    n = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(4):
                name = f"{colour}_{shape}_{k}.png"
                make_image(root / "Images" / name, colour, shape, seed=n)
                lines += [f"{name},a {colour} {shape}", f"{name},a picture of a {colour} {shape}, on grey",
                          f"{name},{shape} coloured {colour}"]
                n += 1
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    zero_shot = root / "zero_shot"
    for colour in COLOURS:
        (zero_shot / colour).mkdir(parents=True)
        for k in range(2):
            make_image(zero_shot / colour / f"{k}.png", colour, "circle", seed=100 + k)
    return root


@pytest.fixture(scope="session")
def runner():
    return CliRunner()


def run_cli(runner, *args, code=0):
    from miniclip_cli.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def json_of(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_weights(run_a, run_b, atol=1e-5):
    """The two run folders' last checkpoints hold the same weights, tensor by tensor."""
    import torch

    from miniclip_cli.checkpoint import load_run

    a, _, _ = load_run(run_a, "last")
    b, _, _ = load_run(run_b, "last")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=atol), name


def assert_resumes_exactly(runner, train_args, straight, stopped):
    """`miniclip train` with `train_args`, stopped after 3 steps in `stopped` and resumed, ends with the
    weights of the uninterrupted run in `straight`; returns the resumed run's config."""
    from miniclip_cli.config import load_run_config

    run_cli(runner, *train_args, "--out", stopped, "--max-steps", 3)
    # A resume keeps the run's limit of 3 steps unless given a new one: the run's own epochs here.
    epochs = train_args[train_args.index("--epochs") + 1]
    run_cli(runner, "train", "--out", stopped, "--resume", "--epochs", epochs)
    assert_same_weights(straight, stopped)
    return load_run_config(stopped)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dataset, runner):
    """A tiny model trained for two epochs on the tiny dataset, shared by read-only tests."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli(runner, "train", "--data", tiny_dataset, "--out", run, "--preset", "tiny", "--epochs", 2,
            "--batch-size", 8, "--workers", 0, "--vocab-size", 300)
    return run


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, trained_run, runner):
    """A copy of trained_run exported by `miniclip quantize`, shared by the deploy, search and serve tests."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(trained_run, run)
    run_cli(runner, "quantize", run)
    return run


@pytest.fixture(scope="session", autouse=True)
def _cache_in_a_temporary_folder(tmp_path_factory):
    """Training caches decoded images under $MINICLIP_CACHE; keep the tests' caches out of the checkout."""
    import os

    previous = os.environ.get("MINICLIP_CACHE")
    os.environ["MINICLIP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("MINICLIP_CACHE", None)
    else:
        os.environ["MINICLIP_CACHE"] = previous
