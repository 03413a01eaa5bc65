"""Files under contention and attack: one lock per folder, writes that never follow a planted symbolic link,
and an image cache that survives a full disk, a corrupt file and a second builder."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from miniclip_cli.data import cache as cache_module
from miniclip_cli.data.cache import default_root, open_cache
from miniclip_cli.errors import BusyError, ConfigError, DataError, SaveError
from miniclip_cli.run_files import LOCK, check_writable, lock_folder

from .conftest import COLOURS, json_of, make_image, run_cli

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from miniclip_cli.run_files import lock_folder
with lock_folder(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(folder: Path, command: str = "train") -> subprocess.Popen:
    """Another process holding `folder`'s lock until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "locked"
    return process


# ------------------------------------------------------------------------------------------ folder lock


def test_a_second_lock_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    holder = hold_lock(tmp_path, "quantize")
    try:
        with pytest.raises(BusyError) as info:
            with lock_folder(tmp_path, "train"):
                pass
        message = str(info.value)
        assert str(tmp_path) in message and f"PID {holder.pid}" in message and "miniclip quantize" in message
        assert "another folder" in message
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait()
    with lock_folder(tmp_path, "train"):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())


def test_lock_is_released_on_exit_and_can_be_taken_again(tmp_path):
    with lock_folder(tmp_path, "train"):
        pass
    with lock_folder(tmp_path, "train"):
        pass


def test_a_symlinked_lock_file_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(outside)
    with pytest.raises(SaveError) as info:
        with lock_folder(run, "train"):
            pass
    assert LOCK in str(info.value) and "link" in str(info.value)
    assert outside.read_text() == "precious"


def test_quantize_refuses_a_run_folder_another_command_holds(runner, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    holder = hold_lock(run, "train")
    try:
        result = run_cli(runner, "quantize", run, code=BusyError.exit_code)
    finally:
        holder.stdin.close()
        holder.wait()
    assert f"in use by PID {holder.pid} (miniclip train)" in result.output and "Traceback" not in result.output
    assert not (run / "onnx").exists()


# ------------------------------------------------------------------------------- writes and planted links


def test_check_writable_writes_through_no_planted_link_and_names_an_unusable_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".write-test").symlink_to(outside)
    check_writable(run)
    assert outside.read_text() == "precious" and sorted(p.name for p in run.iterdir()) == [".write-test"]

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="a-file/run: cannot write there .*choose another --out"):
        check_writable(blocker / "run", "choose another --out")


@pytest.fixture
def planted(tmp_path):
    """A run folder whose config.json and tokenizer.json are links to a file outside it, as a shared or
    downloaded folder could hold them."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (run / name).symlink_to(outside)
    return run, outside


def test_saving_a_run_file_replaces_a_planted_link_rather_than_writing_through_it(planted):
    from miniclip_cli.checkpoint import save_config
    from miniclip_cli.config import RunConfig

    run, outside = planted
    save_config(run, RunConfig())
    assert outside.read_text() == "precious"
    assert not (run / "config.json").is_symlink() and "model" in (run / "config.json").read_text()


def test_tokenizer_save_replaces_a_planted_link_rather_than_writing_through_it(planted):
    from miniclip_cli.tokenizer import Tokenizer, train_tokenizer

    run, outside = planted
    tokenizer = train_tokenizer(["a red circle", "a blue square"] * 5, 300)
    tokenizer.save(run / "tokenizer.json")
    assert outside.read_text() == "precious"
    assert not (run / "tokenizer.json").is_symlink()
    assert Tokenizer.load(run / "tokenizer.json").vocab_size == tokenizer.vocab_size


# ------------------------------------------------------------------------------------------ image cache


def images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, colour in enumerate(list(COLOURS)[:n]):
        paths.append(folder / f"{colour}.png")
        make_image(paths[-1], colour, "circle", size=60, seed=k)
    return paths


def test_the_cache_lives_in_the_platforms_per_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MINICLIP_CACHE")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_root() == tmp_path / ".cache" / "miniclip"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "miniclip"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_root() == tmp_path / "Library" / "Caches" / "miniclip"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert default_root() == tmp_path / "local" / "miniclip" / "cache"
    monkeypatch.setenv("MINICLIP_CACHE", str(tmp_path / "mine"))
    assert default_root() == tmp_path / "mine"


def test_cache_command_shows_the_location_size_and_entries_and_clears_them(runner, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MINICLIP_CACHE", str(root))
    cache, _ = open_cache(images(tmp_path / "images"), 32, root=root)
    assert cache.nbytes >= 3 * 40 * 40 * 3
    unrelated = root / "notes"  # MINICLIP_CACHE pointed at a folder that holds other things too
    unrelated.mkdir()
    shown = json_of(run_cli(runner, "cache", "--json"))
    assert shown["folder"] == str(root) and shown["bytes"] >= cache.nbytes
    assert [e["folder"] for e in shown["entries"]] == [str(cache.folder)] and shown["entries"][0]["images"] == 3
    assert str(root) in run_cli(runner, "cache").output

    holder = hold_lock(root, "train")
    try:
        refused = run_cli(runner, "cache", "--clear", code=BusyError.exit_code)
    finally:
        holder.stdin.close()
        holder.wait()
    assert f"PID {holder.pid} (miniclip train)" in refused.output and cache.folder.exists()

    cleared = run_cli(runner, "cache", "--clear")
    assert "removed 1" in cleared.output and not cache.folder.exists() and unrelated.is_dir()
    assert json_of(run_cli(runner, "cache", "--json"))["entries"] == []


def test_a_cache_too_big_for_the_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SaveError) as info:
        open_cache(images(tmp_path / "images"), 32, root=root)
    message = str(info.value)
    assert str(root) in message and "MB" in message and "MINICLIP_CACHE" in message and "--no-cache" in message
    assert [p.name for p in root.iterdir()] == [LOCK]


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="the space is claimed with posix_fallocate")
def test_a_disk_filling_up_during_the_build_is_one_clean_error_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "cache"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SaveError, match="No space left on device"):
        open_cache(images(tmp_path / "images"), 32, root=root)
    assert [p.name for p in root.iterdir()] == [LOCK]


def test_staging_folders_of_a_killed_builder_are_removed(tmp_path):
    root = tmp_path / "cache"
    stale = root / ".building-x1y2"
    stale.mkdir(parents=True)
    (stale / "pixels.npy").write_bytes(b"\0" * 1000)
    open_cache(images(tmp_path / "images"), 32, root=root)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncated pixels", "garbage index"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(damage, tmp_path):
    paths = images(tmp_path / "images")
    root = tmp_path / "cache"
    cache, _ = open_cache(paths, 32, root=root)
    want = cache.pixels(2)
    if damage == "truncated pixels":
        with open(cache.folder / "pixels.npy", "r+b") as f:
            f.truncate(f.seek(0, os.SEEK_END) // 2)
    else:
        (cache.folder / "index.json").write_text("{not json", encoding="utf-8")
    notices = []
    again, built = open_cache(paths, 32, root=root, notice=notices.append)
    assert built and again.folder == cache.folder and np.array_equal(again.pixels(2), want)
    assert len(notices) == 1 and str(cache.folder) in notices[0] and "rebuil" in notices[0]


def test_overwritten_bytes_in_one_cached_image_are_detected_when_it_is_read(tmp_path):
    paths = images(tmp_path / "images")
    cache, _ = open_cache(paths, 32, root=tmp_path / "cache")
    image_bytes = 40 * 40 * 3
    with open(cache.folder / "pixels.npy", "r+b") as f:
        f.seek(-image_bytes - 100, os.SEEK_END)  # inside image 1
        f.write(b"\xff" * 10)
    reopened, built = open_cache(paths, 32, root=tmp_path / "cache")
    assert not built
    reopened.pixels(0), reopened.pixels(2)
    with pytest.raises(DataError, match="miniclip cache --clear") as info:
        reopened.pixels(1)
    assert "pixels.npy" in str(info.value) and "green.png" in str(info.value)


def test_a_second_builder_waits_for_the_first_and_uses_its_cache(tmp_path):
    paths = images(tmp_path / "images")
    root = tmp_path / "cache"
    holder = hold_lock(root, "train")
    notices, result = [], {}
    thread = threading.Thread(target=lambda: result.update(zip(("cache", "built"), open_cache(
        paths, 32, root=root, notice=notices.append))))
    thread.start()
    try:
        for _ in range(100):
            if notices:
                break
            time.sleep(0.05)
        assert notices and f"PID {holder.pid} (miniclip train)" in notices[0] and thread.is_alive()
        # What the holder would have done: build the same cache.
        elsewhere, _ = open_cache(paths, 32, root=tmp_path / "elsewhere")
        shutil.copytree(elsewhere.folder, root / elsewhere.folder.name)
    finally:
        holder.stdin.close()
        holder.wait()
    thread.join(30)
    assert result["built"] is False and result["cache"].folder == root / elsewhere.folder.name


def test_a_lock_under_a_file_is_a_save_error_not_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SaveError, match="a-file/run/.lock: cannot create the folder's lock"):
        with lock_folder(blocker / "run", "train"):
            pass
