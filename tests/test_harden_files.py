"""Files under contention and attack: one lock per folder, writes that never follow a planted symbolic link,
and an image cache that survives a full disk, a corrupt file and a second builder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miniclip_cli.errors import BusyError, ConfigError, SaveError
from miniclip_cli.run_files import LOCK, check_writable, lock_folder

from .conftest import run_cli

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
