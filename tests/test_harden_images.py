"""Every image goes through one opener (data/pixels.py): only the supported formats, only regular files, one pixel
limit checked on the header before decoding, and JPEGs padded with zeros after a cut found as truncated."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from miniclip_cli.data.checks import find_unusable_images, image_problem
from miniclip_cli.data.image_folder import ImageFolder
from miniclip_cli.data.pixels import load_rgb
from miniclip_cli.errors import DataError

from .conftest import make_image, run_cli

CLASSIFY = ("-c", "a cat", "-c", "a dog")


def postscript(path: Path) -> Path:
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n%%EOF\n")
    return path


def photo_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    return path


def zero_padded_jpeg(path: Path) -> Path:
    """What a preallocating downloader leaves when cut off: the first half of a JPEG, then zeros to full size."""
    data = photo_jpeg(path).read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    return path


def huge_gif(path: Path, side: int = 12_000) -> Path:
    """An 8x8 GIF whose header claims side x side pixels: 144 MP, between PIL's warning and its error."""
    Image.new("P", (8, 8)).save(path, format="GIF")
    data = bytearray(path.read_bytes())
    data[6:10] = struct.pack("<HH", side, side)  # logical screen
    descriptor = data.index(b",")
    data[descriptor + 5:descriptor + 9] = struct.pack("<HH", side, side)
    path.write_bytes(bytes(data))
    return path


def without_decoding(monkeypatch) -> list:
    """Makes any pixel decode fail the test, so a refusal is shown to come from the header alone."""
    decoded = []

    def load(self):
        decoded.append(self)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


@pytest.fixture
def ghostscript_calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(subprocess, "check_call", lambda *args, **kwargs: calls.append(args))
    return calls


def within(seconds: float, fifo: Path, fn):
    """fn(), failing the test rather than hanging it when fn blocks opening `fifo`."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:  # a writer lets the reader's blocked open() return, so the thread ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(seconds)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def fifo(tmp_path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "x.jpg"
    os.mkfifo(path)
    return path


# ------------------------------------------------------------------------------- 1. only supported formats


def test_postscript_named_jpg_is_refused_without_ghostscript(tmp_path, ghostscript_calls):
    path = postscript(tmp_path / "photo.jpg")
    with pytest.raises(DataError, match=r"photo\.jpg: not an image .*not a supported image format"):
        load_rgb(path)
    assert image_problem(path).startswith("not an image") and "not a supported image format" in image_problem(path)
    assert ghostscript_calls == []


def test_postscript_in_classify_is_exit_2_without_ghostscript(runner, trained_run, tmp_path, ghostscript_calls):
    path = postscript(tmp_path / "photo.jpg")
    result = run_cli(runner, "classify", path, *CLASSIFY, "--model", trained_run, code=2)
    assert "photo.jpg" in result.output and "not a supported image format" in result.output
    assert result.output.count("error:") == 1 and ghostscript_calls == []


# ---------------------------------------------------------------------------------- 2. one pixel limit


def test_huge_image_is_refused_from_its_header_without_a_pil_warning(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 MP decoded, 12 kB on disk
    decoded = without_decoding(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=r"huge\.png: too large \(10000x10000 = 100 megapixels, above the "
                                            r"50-megapixel limit\); downscale it"):
            load_rgb(path)
        assert image_problem(path).startswith("too large (10000x10000")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert decoded == []


def test_huge_image_in_classify_is_one_line_and_exit_2(runner, trained_run, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli(runner, "classify", path, *CLASSIFY, "--model", trained_run, code=2)
    assert "huge.png" in result.output and "50-megapixel limit" in result.output
    assert result.output.count("error:") == 1 and "Warning" not in result.output
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ------------------------------------------------------------------------------- 3. only regular files


def test_fifo_is_refused_without_being_opened(fifo):
    with pytest.raises(DataError, match=r"x\.jpg: not a regular file \(a FIFO\)"):
        within(10, fifo, lambda: load_rgb(fifo))
    assert within(10, fifo, lambda: image_problem(fifo)) == "not a regular file (a FIFO)"


def test_fifo_in_a_zero_shot_folder_is_skipped_with_a_reason(fifo, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "zs" / name).mkdir(parents=True)
        make_image(tmp_path / "zs" / name / "0.png", "red", "circle")
    os.replace(fifo, tmp_path / "zs" / "cat" / "x.jpg")
    moved = tmp_path / "zs" / "cat" / "x.jpg"
    problems = within(10, moved, lambda: find_unusable_images(ImageFolder.scan(tmp_path / "zs").paths))
    assert problems == [(moved, "not a regular file (a FIFO)")]


def test_fifo_in_classify_is_exit_2(runner, trained_run, fifo):
    result = within(60, fifo, lambda: run_cli(runner, "classify", fifo, *CLASSIFY, "--model", trained_run, code=2))
    assert "not a regular file" in result.output and result.output.count("error:") == 1


# ------------------------------------------------------------------------- 4. zero-padded truncated JPEG


def test_zero_padded_truncated_jpeg_is_truncated(tmp_path):
    path = zero_padded_jpeg(tmp_path / "cut.jpg")
    assert image_problem(path).startswith("truncated")
    with pytest.raises(DataError, match=r"cut\.jpg: truncated"):
        load_rgb(path)


def test_zeros_after_a_complete_jpeg_are_harmless(tmp_path):
    path = photo_jpeg(tmp_path / "padded.jpg")
    with open(path, "ab") as f:
        f.write(bytes(4096))
    assert image_problem(path) is None and load_rgb(path).size == (160, 120)


def test_a_sound_jpeg_is_checked_from_its_header(tmp_path, monkeypatch):
    path = photo_jpeg(tmp_path / "sound.jpg")
    decoded = without_decoding(monkeypatch)
    assert image_problem(path) is None and decoded == []


# --------------------------------------------------------------------- 5. orientation, modes, GIF frames


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "turned.jpg", exif=exif)
    assert load_rgb(tmp_path / "turned.jpg").size == (10, 20)


def test_gif_gives_its_first_frame_as_rgb(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    image = load_rgb(tmp_path / "anim.gif")
    assert image.mode == "RGB" and image.getpixel((8, 8))[0] > 200


# ------------------------------------------------------------------------- 6. other ways in, each a DataError


def _zero_symlink(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    (tmp_path / "x.jpg").symlink_to("/dev/zero")


def _big_tiff(tmp_path):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "x.jpg", format="TIFF", compression="group4")


ODD_FILES = {  # what each case writes at tmp_path / "x.jpg", and the problem the opener names
    "symlink to /dev/zero": (_zero_symlink, "not a regular file (a device)"),
    "zero bytes": (lambda tmp_path: (tmp_path / "x.jpg").write_bytes(b""), "not an image (empty file)"),
    "a folder": (lambda tmp_path: (tmp_path / "x.jpg").mkdir(), "not an image (a folder)"),
    "GIF of 144 MP": (lambda tmp_path: huge_gif(tmp_path / "x.jpg"), "too large (12000x12000 = 144 megapixels"),
    "TIFF of 100 MP": (_big_tiff, "too large (10000x10000 = 100 megapixels"),
}


@pytest.mark.parametrize("case", ODD_FILES)
def test_odd_files_are_each_a_clear_data_error(case, tmp_path, monkeypatch):
    write, problem = ODD_FILES[case]
    write(tmp_path)
    decoded = without_decoding(monkeypatch)
    with pytest.raises(DataError) as info:
        load_rgb(tmp_path / "x.jpg")
    assert str(info.value).startswith(f"{tmp_path / 'x.jpg'}: {problem}")
    assert image_problem(tmp_path / "x.jpg").startswith(problem) and decoded == []
