"""Hostile caption files, shards and tokenizers: each gives a clean result or one typed error, never a hang,
a traceback or a lost file."""

from __future__ import annotations

import io
import json
import os
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
