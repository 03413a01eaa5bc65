"""The exported model is bound to its tokenizer, and export never writes through a planted link."""

from __future__ import annotations

import json
import shutil

from miniclip_cli.tokenizer import Tokenizer, train_tokenizer

from .conftest import run_cli


def test_export_records_its_tokenizer_and_refuses_another_of_the_same_size(runner, trained_run, tiny_dataset,
                                                                            tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / ".onnx-staging").symlink_to(outside)  # where an older version staged its export
    (run / ".onnx-old").symlink_to(outside)
    run_cli(runner, "quantize", run)
    assert not list(outside.iterdir())  # nothing was written through the links
    assert len(json.loads((run / "onnx" / "metadata.json").read_text())["tokenizer_sha256"]) == 64

    size = Tokenizer.load(run / "onnx" / "tokenizer.json").vocab_size
    other = train_tokenizer([f"word{i} other{i % 7} thing{i % 3}" for i in range(400)], size)
    assert other.vocab_size == size
    other.save(run / "onnx" / "tokenizer.json")
    image = tiny_dataset / "Images" / "red_circle_0.png"
    result = run_cli(runner, "classify", image, "-c", "a", "-c", "b", "--model", run, "--backend", "onnx", code=4)
    assert "tokenizer.json" in result.output and "re-export" in result.output
