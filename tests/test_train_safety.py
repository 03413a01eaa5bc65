"""Training stops and resumes without losing or mixing work: a diverging loss, SIGTERM, Ctrl-C during validation,
a kill in the first epoch, a resume whose data or config changed, limits kept on resume, the tokenizer bound to
the weights."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from miniclip_cli import checkpoint, objectives
from miniclip_cli.tokenizer import Tokenizer, train_tokenizer

from .conftest import assert_same_weights, run_cli

ARGS = ["--preset", "tiny", "--epochs", 2, "--batch-size", 8, "--workers", 0, "--vocab-size", 300]


def _train(runner, data, out, *extra, code=0):
    return run_cli(runner, "train", "--data", data, "--out", out, *ARGS, *extra, code=code)


def _resume_counters(run):
    return checkpoint.read_resume_metadata(run)[0]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(runner, tiny_dataset, tmp_path,
                                                                              monkeypatch):
    run = tmp_path / "run"
    real, calls = objectives.clip_loss, {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(objectives, "clip_loss", diverging)
    result = _train(runner, tiny_dataset, run, "--save-every", 1, code=8)
    assert "step 3" in result.output and "--lr" in result.output and "Traceback" not in result.output
    assert _resume_counters(run)["step"] == 2  # the checkpoint of the last finite step, not overwritten
    assert not (run / "best.safetensors").exists()


def test_the_progress_total_and_a_resume_keep_max_steps(runner, tiny_dataset, tmp_path, monkeypatch):
    from miniclip_cli.ui.progress import TrainProgress

    totals = []
    on_start = TrainProgress.on_start

    def record(self, total_steps, *rest):
        totals.append(total_steps)
        on_start(self, total_steps, *rest)

    monkeypatch.setattr(TrainProgress, "on_start", record)
    run = tmp_path / "run"
    _train(runner, tiny_dataset, run, "--max-steps", 3)
    assert totals == [3]
    result = run_cli(runner, "train", "--out", run, "--resume", code=3)  # the run reached the limit it was given
    assert "--max-steps" in result.output
    run_cli(runner, "train", "--out", run, "--resume", "--max-steps", 5)
    assert totals[-1] == 5 and checkpoint.read_history(run)[-1]["step"] == 5


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(runner, tiny_dataset, tmp_path, monkeypatch):
    from miniclip_cli.ui.progress import TrainProgress

    on_step = TrainProgress.on_step

    def terminated_at_step_2(self, step, *rest):
        on_step(self, step, *rest)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainProgress, "on_step", terminated_at_step_2)
    run = tmp_path / "run"
    result = _train(runner, tiny_dataset, run, code=143)
    assert "SIGTERM" in result.output and f"--out {run} --resume" in result.output
    assert _resume_counters(run)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back after training


def test_ctrl_c_during_validation_keeps_the_epoch(runner, tiny_dataset, tmp_path, monkeypatch):
    from miniclip_cli.ui.progress import TrainProgress

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _train(runner, tiny_dataset, straight)

    def ctrl_c(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainProgress, "on_validate", ctrl_c)
    _train(runner, tiny_dataset, stopped, code=130)
    monkeypatch.undo()
    run_cli(runner, "train", "--out", stopped, "--resume")
    a, b = checkpoint.read_history(straight), checkpoint.read_history(stopped)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["val_mean_recall"] == rb["val_mean_recall"] and abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
    assert_same_weights(straight, stopped)


def test_a_kill_in_the_first_epoch_resumes_from_step_0_or_starts_over(runner, tiny_dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(runner, tiny_dataset, straight)
    shutil.copytree(straight, killed)
    for name in ("best.safetensors", "last.safetensors", "resume.safetensors", "history.jsonl"):
        (killed / name).unlink()  # what a kill before the first checkpoint leaves
    result = _train(runner, tiny_dataset, killed, code=3)
    assert "--resume" in result.output and "--overwrite" in result.output
    run_cli(runner, "train", "--out", killed, "--resume")
    assert_same_weights(straight, killed)
    _train(runner, tiny_dataset, killed, "--overwrite")
    assert_same_weights(straight, killed)


def test_resume_refuses_changed_data_changed_config_and_flags_that_would_change_the_run(runner, tiny_dataset,
                                                                                         tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    run = tmp_path / "run"
    _train(runner, data, run, "--max-steps", 2)
    result = run_cli(runner, "train", "--out", run, "--resume", "--lr", 0.1, "--max-steps", 4, code=3)
    assert "--lr" in result.output

    config = json.loads((run / "config.json").read_text())
    config["train"]["batch_size"] = 4
    (run / "config.json").write_text(json.dumps(config))
    result = run_cli(runner, "train", "--out", run, "--resume", "--max-steps", 4, code=3)
    assert "train.batch_size" in result.output
    config["train"]["batch_size"] = 8
    (run / "config.json").write_text(json.dumps(config))

    captions = data / "captions.txt"
    captions.write_text(captions.read_text() + "red_circle_0.png,a new caption\n")
    result = run_cli(runner, "train", "--out", run, "--resume", "--max-steps", 4, code=3)
    assert "data" in result.output and "changed" in result.output


def test_a_different_tokenizer_of_the_same_size_is_refused(runner, trained_run, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    original = Tokenizer.load(run / "tokenizer.json")
    captions = [f"word{i} other{i % 7} thing{i % 3}" for i in range(400)]
    other = train_tokenizer(captions, original.vocab_size)
    assert other.vocab_size == original.vocab_size
    other.save(run / "tokenizer.json")
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", run, code=4)
    assert "tokenizer.json" in result.output and "trained with" in result.output


@pytest.mark.parametrize("value", [-1, 0])
def test_save_every_below_one_is_refused(runner, tiny_dataset, tmp_path, value):
    result = _train(runner, tiny_dataset, tmp_path / "run", "--save-every", value, code=3)
    assert "--save-every" in result.output


def test_a_damaged_history_on_resume_is_one_line(runner, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    _train(runner, tiny_dataset, run, "--max-steps", 2)
    history = run / "history.jsonl"
    history.write_text(history.read_text()[:-7])
    result = run_cli(runner, "train", "--out", run, "--resume", "--max-steps", 4, code=4)
    assert "history.jsonl" in result.output and "Traceback" not in result.output


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(runner, tiny_dataset, tmp_path):
    from miniclip_cli.run_files import lock_folder

    run = tmp_path / "run"
    with lock_folder(run, "train"):  # as a `miniclip train --out run` still running would hold it
        for args in (["--data", tiny_dataset, "--out", run, *ARGS], ["--out", run, "--resume"]):
            result = run_cli(runner, "train", *args, code=9)
            assert f"PID {os.getpid()}" in result.output and "miniclip train" in result.output
    assert not (run / "config.json").exists()
    _train(runner, tiny_dataset, run, "--max-steps", 1)  # released: the folder is free again
