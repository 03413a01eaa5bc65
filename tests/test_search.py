"""`miniclip index` / `miniclip search` and the index library, on a tiny model and generated images."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import miniclip_cli as mc
from miniclip_cli.errors import DataError

from .conftest import COLOURS, SHAPES, json_of, make_image, run_cli


def photo_folder(root, n=10):
    """n images of coloured shapes, some in a subfolder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = kinds[i % len(kinds)]
        make_image(root / ("sub" if i % 3 == 0 else "") / f"{colour}_{shape}_{i}.png", colour, shape, seed=i)
    return root


@pytest.fixture
def photos(tmp_path):
    return photo_folder(tmp_path / "photos")


def search_json(runner, *args, code=0):
    return json.loads(run_cli(runner, "search", *args, "--json", code=code).stdout.strip().splitlines()[-1])


def test_index_then_search_by_text_and_by_image(runner, trained_run, photos, monkeypatch):
    summary = json_of(run_cli(runner, "index", photos, "--model", trained_run, "--json"))
    assert summary["images"] == 10 and summary["new"] == 10 and summary["unreadable"] == 0
    assert (photos / ".miniclip" / f"index-{trained_run.name}.npz").is_file()

    hits = search_json(runner, "a red circle", "--in", photos, "--top", 3)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"path", "score", "rank"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert all(os.path.isfile(h["path"]) for h in hits)

    # Every indexed image is its own best match; from inside the folder, without --in.
    monkeypatch.chdir(photos)
    for image in [photos / "sub" / "red_circle_0.png", photos / "blue_square_5.png"]:
        hits = search_json(runner, image, "--top", 1)
        assert hits[0]["path"] == str(image) and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)

    table = run_cli(runner, "search", "a green square").stdout
    assert "rank" in table and "green_square" in table
    paths = run_cli(runner, "search", "a green square", "--paths", "-t", 4).stdout.strip().splitlines()
    assert len(paths) == 4 and all(os.path.isfile(p) for p in paths)


def test_incremental_update_counts_and_embeds_only_what_changed(trained_run, photos):
    model = mc.load(trained_run)
    mc.index_folder(photos, model)
    calls = []
    encode = model.encode_pixels
    model.encode_pixels = lambda pixels: calls.append(len(pixels)) or encode(pixels)

    make_image(photos / "new_one.png", "yellow", "circle", seed=50)  # new
    changed = photos / "blue_square_5.png"
    make_image(changed, "red", "circle", seed=51)  # same name, other content
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (photos / "sub" / "red_circle_0.png").unlink()  # removed
    index, stats = mc.index_folder(photos, model)
    assert (stats.new, stats.changed, stats.removed, stats.unchanged) == (1, 1, 1, 8)
    assert sum(calls) == 2 and len(index) == 10
    assert "sub/red_circle_0.png" not in index.paths

    # The changed file's stored feature is its new content's.
    fresh = model.encode_images([changed])[0]
    assert float(mc.load_index(index.file).features[index.paths.index("blue_square_5.png")] @ fresh) > 0.9999

    calls.clear()
    _, stats = mc.index_folder(photos, model)
    assert (stats.new, stats.changed, stats.removed, stats.unchanged) == (0, 0, 0, 10) and not calls


def test_interrupted_index_keeps_the_first_batch_and_resumes(trained_run, photos):
    model = mc.load(trained_run)
    index_file = photos / ".miniclip" / f"index-{trained_run.name}.npz"
    encode, seen = model.encode_pixels, []

    def fail_on_second_batch(pixels):
        if seen:
            # A kill here would leave this on disk: the complete index of the first batch.
            on_disk = mc.load_index(index_file)
            assert len(on_disk) == 4 and on_disk.features.shape[0] == 4
            raise RuntimeError("killed")
        seen.append(len(pixels))
        return encode(pixels)

    model.encode_pixels = fail_on_second_batch
    with pytest.raises(RuntimeError, match="killed"):
        mc.index_folder(photos, model, batch_size=4)
    assert len(mc.load_index(index_file)) == 4

    model.encode_pixels = encode
    index, stats = mc.index_folder(photos, model, batch_size=4)
    assert (stats.new, stats.unchanged, len(index)) == (6, 4, 10)
    assert not list(index_file.parent.glob("*.tmp"))


def test_unreadable_images_are_skipped_counted_and_remembered(runner, trained_run, photos):
    (photos / "notes.jpg").write_text("not a picture")
    good = photos / "sub" / "red_circle_0.png"
    (photos / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    result = run_cli(runner, "index", photos, "--model", trained_run, "--json")
    summary = json_of(result)
    assert summary["images"] == 10 and summary["unreadable"] == 2
    assert "notes.jpg" in result.stderr and "skipped" in result.stderr
    # Unchanged broken files are not decoded again, but still counted.
    summary = json_of(run_cli(runner, "index", photos, "--model", trained_run, "--json"))
    assert (summary["unchanged"], summary["unreadable"], summary["new"]) == (10, 2, 0)


def test_a_folder_without_images_is_a_clear_error(runner, trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    result = run_cli(runner, "index", tmp_path / "empty", "--model", trained_run, code=2)
    assert "no images found" in result.stderr and "Traceback" not in result.output


def test_search_without_an_index_names_the_command(runner, tmp_path):
    result = run_cli(runner, "search", "a dog", "--in", tmp_path, code=2)
    assert "miniclip index" in result.stderr


def test_symlinks_out_of_the_folder_are_not_followed(trained_run, photos, tmp_path):
    outside = photo_folder(tmp_path / "outside", n=3)
    os.symlink(outside, photos / "linked_folder")
    os.symlink(outside / "sub" / "red_circle_0.png", photos / "linked_file.png")
    os.symlink(photos / "blue_square_5.png", photos / "inside_link.png")  # stays inside: indexed
    index, _ = mc.index_folder(photos, mc.load(trained_run))
    assert len(index) == 11 and "inside_link.png" in index.paths
    assert not any(p.startswith("linked") for p in index.paths)


def test_an_index_refuses_another_model(runner, trained_run, photos, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    weights = load_file(other / "best.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "best.safetensors")
    run_cli(runner, "index", photos, "--model", trained_run)
    result = run_cli(runner, "search", "a red circle", "--in", photos, "--index",
                     photos / ".miniclip" / f"index-{trained_run.name}.npz", "--model", other, code=3)
    assert str(trained_run) in result.stderr and str(other) in result.stderr
    # A copy of the same weights elsewhere is the same model.
    same = tmp_path / "same"
    shutil.copytree(trained_run, same)
    assert search_json(runner, "a red circle", "--in", photos, "--index",
                       photos / ".miniclip" / f"index-{trained_run.name}.npz", "--model", same)


def test_search_scores_are_the_similarities_classify_uses(runner, trained_run, photos):
    run_cli(runner, "index", photos, "--model", trained_run)
    image = photos / "blue_square_5.png"
    captions = ["a blue square", "a red circle"]
    scores = {}
    for caption in captions:
        hits = search_json(runner, caption, "--in", photos, "--top", 10)
        scores[caption] = next(h["score"] for h in hits if h["path"] == str(image))
    encoder = mc.load(trained_run)
    cosines = (encoder.encode_images([image]) @ encoder.encode_texts(captions).T)[0]
    # Stored as 16-bit numbers, shown to 4 decimals: the same 4 decimals (within rounding) as float32.
    for caption, cosine in zip(captions, cosines):
        assert abs(scores[caption] - cosine) <= 0.5e-4 + 1e-5
    index = mc.load_index(photos / ".miniclip" / f"index-{trained_run.name}.npz")
    exact = [next(h.score for h in mc.search(index, encoder, c, top=10) if h.path == image) for c in captions]
    assert np.allclose(exact, cosines, atol=2e-5)
    # classify's probabilities are a softmax of logit_scale x these cosines.
    payload = json_of(run_cli(runner, "classify", image, *sum((["-c", c] for c in captions), []), "--model",
                              trained_run, "--json"))
    p = [s["probability"] for s in payload["scores"]]
    assert math.log(p[0] / p[1]) / encoder.logit_scale == pytest.approx(exact[0] - exact[1], abs=1e-4)


def test_several_queries_and_a_negative(trained_run, photos):
    encoder = mc.load(trained_run)
    index, _ = mc.index_folder(photos, encoder)
    plain = mc.search(index, encoder, ["a red circle"], top=10)
    mixed = mc.search(index, encoder, ["a red circle", photos / "blue_square_5.png"], negatives=["a green square"], top=10)
    direction = mc.query_vector(encoder, ["a red circle", photos / "blue_square_5.png"], ["a green square"])
    text, image = encoder.encode_texts(["a red circle", "a green square"]), encoder.encode_images([photos / "blue_square_5.png"])
    expected = (text[0] + image[0]) / 2 - text[1]
    assert np.allclose(direction, expected / np.linalg.norm(expected), atol=1e-6)
    assert [h.score for h in mixed] != [h.score for h in plain]


def test_onnx_index_and_search_without_torch(exported_run, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    script = (
        "import sys, json\n"
        "sys.modules['torch'] = None\n"
        "from miniclip_cli.cli import app\n"
        f"for args in (['index', {str(photos)!r}, '--model', {str(exported_run)!r}, '--backend', 'onnx', '--json'],\n"
        f"             ['search', 'a red circle', '--in', {str(photos)!r}, '--json', '--top', '3']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m])))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[0])["images"] == 10
    hits = json.loads(lines[1])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert json.loads(lines[-1]) == []


def test_importing_the_package_root_is_cheap():
    script = "import sys, miniclip_cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'onnxruntime', 'PIL'}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_damaged_index_file_is_a_clear_error(tmp_path):
    bad = tmp_path / ".miniclip" / "index-x.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a readable miniclip index"):
        mc.load_index(bad)


def test_previews_as_half_blocks_and_as_kitty_images(tmp_path, monkeypatch):
    import io

    from PIL import Image
    from rich.console import Console

    from miniclip_cli.ui import preview

    image = Image.new("RGB", (4, 4), (255, 0, 0))  # the preview's own size: no resampling to blur the colours
    image.paste((0, 0, 255), (0, 2, 4, 4))
    text = preview.half_blocks(image, cells=4)
    assert text.plain == "▀▀▀▀\n▀▀▀▀\n"
    assert {str(span.style) for span in text.spans} == {"rgb(255,0,0) on rgb(255,0,0)", "rgb(0,0,255) on rgb(0,0,255)"}

    image.save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_text("not an image")
    for env, marker in (({"TERM": "xterm-256color"}, "▀"), ({"KITTY_WINDOW_ID": "1"}, "\x1b_Ga=T,f=100")):
        monkeypatch.delenv("KITTY_WINDOW_ID", raising=False)
        monkeypatch.delenv("TERM_PROGRAM", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=80)
        preview.show(console, [("1. a.png", tmp_path / "a.png"), ("2. b.jpg", tmp_path / "b.jpg")])
        shown = console.file.getvalue()
        assert marker in shown and "1. a.png" in shown and "no preview" in shown


def test_updating_an_index_with_another_backend_is_refused(exported_run, photos):
    from miniclip_cli.errors import ConfigError

    mc.index_folder(photos, mc.load(exported_run, "torch"))
    with pytest.raises(ConfigError, match="holds torch features, not onnx"):
        mc.index_folder(photos, mc.load(exported_run, "onnx"))
    index, stats = mc.index_folder(photos, mc.load(exported_run, "onnx"), rebuild=True)
    assert stats.new == 10 and index.model["backend"] == "onnx"


def test_float32_storage_keeps_the_features_bit_for_bit(runner, trained_run, photos):
    summary = json_of(run_cli(runner, "index", photos, "--model", trained_run, "--float32", "--json"))
    index = mc.load_index(summary["index"])
    assert index.storage == "float32"
    encoder = mc.load(trained_run)
    computed, _ = mc.index_folder(photos, encoder, rebuild=True, storage="float32")
    assert np.array_equal(mc.load_index(summary["index"]).features, computed.features)
    row = index.paths.index("blue_square_5.png")
    assert np.allclose(index.features[row], encoder.encode_images([photos / "blue_square_5.png"])[0], atol=1e-6)
    # An update keeps the storage; asking for the other one needs --rebuild.
    _, stats = mc.index_folder(photos, encoder)
    assert mc.load_index(summary["index"]).storage == "float32" and stats.unchanged == 10
    result = run_cli(runner, "index", photos, "--model", trained_run, code=0)
    assert "10 unchanged" in result.stderr
    int16 = mc.index_folder(photos, encoder, storage="int16", rebuild=True)[0]
    assert int16.storage == "int16" and np.abs(mc.load_index(int16.file).features - index.features).max() < 2e-5


def test_an_index_that_cannot_be_written_is_a_clear_error(runner, trained_run, photos, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_cli(runner, "index", photos, "--model", trained_run, "--index", tmp_path / "a_file" / "index.npz", code=2)
    assert "cannot write the index" in result.stderr and "--index PATH" in result.stderr
