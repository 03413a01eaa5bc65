"""Hostile caption files, shards and tokenizers: each gives a clean result or one typed error, never a hang,
a traceback or a lost file."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from miniclip_cli.data import layouts
from miniclip_cli.data.layouts import load_caption_set
from miniclip_cli.errors import DataError

from .conftest import run_cli
from .test_layouts import make_images, write

REPO = Path(__file__).parents[1]


def captions_of(cs) -> list[tuple[str, tuple[str, ...]]]:
    return [(item.image.name, item.captions) for item in cs.items]


# ---------------------------------------------------------------------------------- quoted multi-line captions


def test_kaggle_quoted_caption_over_several_lines_is_one_caption(tmp_path):
    text = 'image,caption\na.jpg,"A dog\nruns, fast ."\nb.jpg,two\nc.jpg,"three\n\n  lines"\n'
    make_images(tmp_path / "Images", ["a.jpg", "b.jpg", "c.jpg"])
    cs = load_caption_set(write(tmp_path / "captions.txt", text))
    assert captions_of(cs) == [("a.jpg", ("A dog runs, fast .",)), ("b.jpg", ("two",)), ("c.jpg", ("three lines",))]
    assert cs.skipped == 0


def test_kaggle_stray_quote_swallows_no_following_line(tmp_path):
    # Closes on the 6th line: past the few lines a caption may span, so each line is read on its own.
    too_long = 'a.jpg,"one\ntwo\nthree\nfour\nfive\nsix"\nb.jpg,ok\n'
    # Closes on the next line, but that line starts a record of its own.
    next_record = 'c.jpg,"stray\nd.jpg,closes here"\n'
    cs = load_caption_set(write(tmp_path / "captions.txt", "image,caption\n" + too_long + next_record))
    assert captions_of(cs) == [("a.jpg", ("one",)), ("b.jpg", ("ok",)), ("c.jpg", ("stray",)),
                               ("d.jpg", ('closes here"',))]
    assert cs.skipped == 5  # two ... six": lines without a comma, as before
    assert cs.skipped_examples[0] == "line 3: no comma between image and caption"


def test_csv_quoted_caption_over_lines_and_a_stray_quote(tmp_path):
    text = ('image,caption,split\na.jpg,"A dog\nruns",train\nb.jpg,"stray,train\n'
            "c.jpg,three,train\nd.jpg,four,test\n")
    cs = load_caption_set(write(tmp_path / "captions.csv", text))
    assert [(i.image.name, i.captions, i.split) for i in cs.items] == [
        ("a.jpg", ("A dog runs",), "train"), ("b.jpg", ('"stray',), "train"),
        ("c.jpg", ("three",), "train"), ("d.jpg", ("four",), "test")]


def test_tsv_and_jsonl_newlines_in_a_caption_become_spaces(tmp_path):
    cs = load_caption_set(write(tmp_path / "captions.tsv", 'image\tcaption\na.jpg\t"one\ntwo"\n'))
    assert captions_of(cs) == [("a.jpg", ("one two",))]
    cs = load_caption_set(write(tmp_path / "captions.jsonl", json.dumps({"image": "a.jpg", "caption": "x\r\ny"})))
    assert captions_of(cs) == [("a.jpg", ("x y",))]


# ---------------------------------------------------------------------------------- half a surrogate pair


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_lone_surrogate_in_jsonl_captions_trains_the_tokenizer(runner, tmp_path):
    folder = tmp_path / "data"
    make_images(folder / "Images", ["a.jpg", "b.jpg"])
    # As a truncated scrape writes it: the first half of an emoji's surrogate pair, as a JSON escape.
    write(folder / "captions.jsonl", '{"image": "a.jpg", "caption": "a dog \\ud83d running"}\n'
                                     '{"image": "b.jpg", "captions": ["\\ud83d", "a cat"]}\n')
    assert captions_of(load_caption_set(folder)) == [("a.jpg", ("a dog ? running",)), ("b.jpg", ("?", "a cat"))]
    run_cli(runner, "train-tokenizer", "--data", folder, "--out", tmp_path / "tokenizer.json", "--vocab-size", 300)
    assert (tmp_path / "tokenizer.json").is_file()


def test_lone_surrogate_in_shard_captions_trains_the_tokenizer(tmp_path):
    from miniclip_cli.data.shards import open_shards, shard_captions
    from miniclip_cli.tokenizer import train_tokenizer

    write_tar(tmp_path / "shards" / "000000.tar", [("0.jpg", _jpeg()), ("0.json", b'{"captions": ["a dog \\ud83d"]}'),
                                                   ("1.jpg", _jpeg()), ("1.txt", b"a cat")])
    captions = list(shard_captions(open_shards(str(tmp_path / "shards"))))
    assert captions == ["a dog ?", "a cat"]
    assert train_tokenizer(captions, vocab_size=300).vocab_size > 256


def test_tokenizer_trains_on_raw_captions_with_lone_surrogates():
    from miniclip_cli.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a dog \ud83d running", "\udc00", "a cat"] * 3, vocab_size=300)
    ids, lengths = tokenizer.encode(["a dog \ud83d running"], 32)
    assert tokenizer.decode(ids[0][: lengths[0]]) == "a dog ? running"


# -------------------------------------------------------------------------------------------- long captions


def test_long_caption_is_cut_and_counted_in_the_dataset_warning(runner, tmp_path):
    folder = tmp_path / "data"
    make_images(folder / "Images", ["a.jpg", "b.jpg"])
    write(folder / "captions.txt", "image,caption\na.jpg," + "word " * 400 + "\nb.jpg,a cat\n")
    cs = load_caption_set(folder)
    assert cs.cut_captions == 1 and cs.skipped == 0
    assert cs.items[0].captions[0] == ("word " * 200).strip()
    result = run_cli(runner, "train-tokenizer", "--data", folder, "--out", tmp_path / "tok.json", "--vocab-size", 300)
    assert "1 caption(s) over 1,000 characters" in result.output


def test_long_shard_caption_is_cut(tmp_path):
    from miniclip_cli.data.shards import open_shards, shard_captions

    write_tar(tmp_path / "shards" / "000000.tar", [("0.jpg", _jpeg()), ("0.txt", b"x" * 5000)])
    assert list(shard_captions(open_shards(str(tmp_path / "shards")))) == ["x" * 1000]


def test_one_word_caption_of_a_megabyte_does_not_hang_tokenizer_training(tmp_path):
    # Training on the raw word is quadratic in its length (minutes); on the first 1,000 characters, instant.
    code = ("from miniclip_cli.tokenizer import train_tokenizer; "
            "print(train_tokenizer(['x' * 1_000_000, 'a dog'], vocab_size=300).vocab_size)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- shards


def _shard_folder(tmp_path: Path, samples: int = 2) -> Path:
    members = []
    for n in range(samples):
        members += [(f"{n}.jpg", _jpeg()), (f"{n}.json", json.dumps({"captions": [f"caption {n}"]}).encode())]
    return write_tar(tmp_path / "shards" / "000000.tar", members).parent


def _manifest(folder: Path, text: str) -> Path:
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    return folder / "manifest.json"


def test_deeply_nested_shard_caption_is_a_skipped_sample(tmp_path):
    from miniclip_cli.data.shards import open_shards, read_samples

    nested = b'{"captions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    folder = write_tar(tmp_path / "shards" / "000000.tar",
                       [("0.jpg", _jpeg()), ("0.json", nested), ("1.jpg", _jpeg()), ("1.txt", b"a cat")]).parent
    problems = [problem for _, _, _, problem in read_samples(folder / "000000.tar")]
    assert problems[1] is None and "000000.tar:0.json" in problems[0] and "skipped" in problems[0]
    assert open_shards(str(folder)).size("all") == 1


@pytest.mark.parametrize("manifest", [
    '{"shards": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"shards": [{"name": "000000.tar", "samples": 1000000000, "captions": 1000000000}]}',
    '{"shards": [{"name": "000000.tar", "samples": 2, "captions": 1000000000}]}',
    '{"shards": [{"name": "000000.tar", "samples": -1, "captions": 2}]}',
    '{"shards": [{"name": "000000.tar", "samples": 2.5, "captions": 2}]}',
    '{"shards": [{"name": "000000.tar", "samples": "2", "captions": 2}]}',
    '{"shards": [{"name": "000000.tar", "samples": true, "captions": 2}]}',
], ids=["nested", "a billion samples", "a billion captions", "negative", "fraction", "text", "boolean"])
def test_manifest_that_cannot_be_right_is_refused_with_the_fix(tmp_path, manifest):
    from miniclip_cli.data.shards import open_shards

    folder = _shard_folder(tmp_path)
    path = _manifest(folder, manifest)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*miniclip shard.*delete") as refused:
        open_shards(str(folder))
    assert "\n" not in str(refused.value)
    path.unlink()  # counted from the shards themselves
    assert open_shards(str(folder)).size("all") == 2


def test_manifest_that_fits_the_shard_is_used(tmp_path):
    from miniclip_cli.data.shards import open_shards

    folder = _shard_folder(tmp_path)
    _manifest(folder, '{"shards": [{"name": "000000.tar", "samples": 2, "captions": 3}]}')
    assert open_shards(str(folder)).size("all") == 3  # trusted, not recounted


def test_oversized_caption_member_is_skipped_and_named(tmp_path, monkeypatch):
    from miniclip_cli.data import shards

    monkeypatch.setattr(shards, "MAX_CAPTION_BYTES", 100)
    folder = write_tar(tmp_path / "shards" / "000000.tar",
                       [("0.jpg", _jpeg()), ("0.json", json.dumps({"captions": ["x" * 200]}).encode()),
                        ("1.jpg", _jpeg()), ("1.txt", b"a cat")]).parent
    problems = [problem for _, _, _, problem in shards.read_samples(folder / "000000.tar", images=False)]
    assert problems[1] is None and problems[0].startswith("000000.tar:0.json: over ")
    assert shards.open_shards(str(folder)).size("all") == 1


# ---------------------------------------------------------------------------------------------- tokenizer

CAPTIONS = ["a dog runs on the grass", "a cat sits on a mat", "two birds fly"] * 5


@pytest.mark.parametrize("vocab_size", [259, 0, -5, 10**8, 1_000_001])
def test_tokenizer_refuses_vocab_sizes_out_of_bounds(vocab_size):
    from miniclip_cli.errors import ConfigError
    from miniclip_cli.tokenizer import train_tokenizer

    with pytest.raises(ConfigError, match=f"vocab size {vocab_size:,} .*between 260 and 1,000,000"):
        train_tokenizer(CAPTIONS, vocab_size=vocab_size)


def test_saving_a_tokenizer_over_an_old_one_that_fails_leaves_the_old_one(tmp_path, monkeypatch):
    from miniclip_cli.errors import SaveError
    from miniclip_cli.tokenizer import Tokenizer, train_tokenizer

    path = tmp_path / "tokenizer.json"
    old = train_tokenizer(CAPTIONS, vocab_size=280)
    old.save(path)
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        with open(self, "w") as f:
            f.write('{"version": "1.0", "trunc')  # the partial write a full disk leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(SaveError, match=rf"^{re.escape(str(path))}: could not be written \(No space left on device\)"):
        train_tokenizer(CAPTIONS, vocab_size=300).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and Tokenizer.load(path).vocab_size == old.vocab_size
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left


def _crafted(tmp_path: Path, change) -> Path:
    from miniclip_cli.tokenizer import train_tokenizer

    data = json.loads(train_tokenizer(CAPTIONS, vocab_size=300).to_json())
    change(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _gap(data):
    """The last merged token moved to id 9000: the vocabulary keeps its size but has a gap."""
    vocab = data["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] = 9000


def _added(data):
    """An added token that shadows the model's last id with one far past the vocabulary."""
    data["added_tokens"].append({"id": 9000, "content": "zebra", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": True, "special": False})
    data["model"]["vocab"]["zebra"] = 9000


@pytest.mark.parametrize("change", [_gap, _added], ids=["vocabulary with a gap", "added token past the end"])
def test_tokenizer_with_ids_past_its_vocabulary_is_refused(tmp_path, change):
    from miniclip_cli.errors import CheckpointError
    from miniclip_cli.tokenizer import Tokenizer

    path = _crafted(tmp_path, change)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: token ids up to 9000 .*retrain.*restore"):
        Tokenizer.load(path)
    with pytest.raises(CheckpointError, match="token ids up to 9000"):
        Tokenizer.from_json(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------- only regular files, bounded


def test_data_that_is_a_device_is_refused(runner):
    result = run_cli(runner, "train-tokenizer", "--data", "/dev/zero", "--out", "unused.json", code=2)
    assert "/dev/zero: not a regular file" in result.output and "Traceback" not in result.output


def test_caption_file_that_links_to_a_device_is_refused(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"captions\.txt: not a regular file"):
        load_caption_set(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_caption_file_that_is_a_named_pipe_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "captions.csv")
    # Opening a pipe waits for a writer that never comes: run where a hang ends in a timeout, not a stuck suite.
    code = ("from miniclip_cli.data.layouts import load_caption_set; from miniclip_cli.errors import DataError\n"
            "try:\n    load_caption_set('captions.csv')\nexcept DataError as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "captions.csv: not a regular file" in done.stdout, done.stderr[-2000:]


def test_caption_file_over_the_size_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(layouts, "MAX_CAPTION_FILE_BYTES", 100)
    file = write(tmp_path / "captions.txt", "image,caption\n" + "a.jpg,a dog\n" * 20)
    with pytest.raises(DataError, match=r"captions\.txt: 254 bytes, over the 100 a caption file may hold"):
        load_caption_set(file)


@pytest.mark.parametrize("name, text", [
    ("dataset_flickr8k.json", '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("captions_train2017.json", '{"annotations": ' + "[" * 100_000 + "]" * 100_000 + "}"),
], ids=["Karpathy", "COCO"])
def test_deeply_nested_caption_json_is_a_data_error(tmp_path, name, text):
    with pytest.raises(DataError, match=rf"{re.escape(name)}: not valid JSON \(RecursionError\)"):
        load_caption_set(write(tmp_path / name, text))


def test_deeply_nested_jsonl_record_is_a_skipped_line(tmp_path):
    nested = '{"image": "b.jpg", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cs = load_caption_set(write(tmp_path / "captions.jsonl", '{"image": "a.jpg", "caption": "a dog"}\n' + nested))
    assert captions_of(cs) == [("a.jpg", ("a dog",))] and cs.skipped_examples == ["line 2: not valid JSON"]
