"""Caption-file layouts: each layout parses, folders are searched, bad content is a DataError and nothing else."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from miniclip_cli.data.layouts import (
    CaptionSet,
    ImageCaptions,
    drop_missing_images,
    load_caption_set,
    select_split,
)
from miniclip_cli.errors import ConfigError, DataError

REAL_FLICKR8K = Path(__file__).parents[2] / "shared" / "data" / "flickr8k"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_images(folder: Path, names, real: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if real:
            Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / name)
        else:
            (folder / name).write_bytes(b"")


def token_text(names, per_image=5) -> str:
    return "".join(f"{n}#{i}\tcaption {i} of {n}\n" for n in names for i in range(per_image))


NAMES = ["a.jpg", "b.jpg", "c.jpg"]


# ------------------------------------------------------------------------------------------- each layout


def test_flickr_token_groups_captions_and_finds_images(tmp_path):
    make_images(tmp_path / "Images", NAMES)
    file = write(tmp_path / "Flickr8k.token.txt", token_text(NAMES))
    cs = load_caption_set(file)
    assert cs.layout == "Flickr token file"
    assert cs.caption_file == file
    assert cs.image_root == tmp_path / "Images"
    assert [i.image for i in cs.items] == [tmp_path / "Images" / n for n in NAMES]
    assert all(len(i.captions) == 5 for i in cs.items)
    assert cs.items[0].captions[0] == "caption 0 of a.jpg"
    assert cs.skipped == 0 and not cs.has_splits
    assert all(i.split is None for i in cs.items)


def test_flickr30k_token_name_and_sniffed_token_content(tmp_path):
    write(tmp_path / "results_20130124.token", token_text(["1.jpg"]))
    assert load_caption_set(tmp_path).layout == "Flickr token file"
    other = write(tmp_path / "sub" / "whatever.txt", token_text(["1.jpg"], 2))
    cs = load_caption_set(other)
    assert cs.layout == "Flickr token file" and cs.items[0].captions == ("caption 0 of 1.jpg", "caption 1 of 1.jpg")


def test_token_malformed_lines_skipped_with_examples(tmp_path):
    text = "a.jpg#0\tfine\nno tab here\na.jpg#1\t   \n\nb.jpg#0\tok\njunk\njunk again\n"
    cs = load_caption_set(write(tmp_path / "x.token", text))
    assert [len(i.captions) for i in cs.items] == [1, 1]
    assert cs.skipped == 4 and cs.empty_captions == 1
    assert cs.skipped_examples == [
        "line 2: no tab between image and caption",
        "line 3: empty caption",
        "line 6: no tab between image and caption",
    ]


def test_kaggle_captions_txt_commas_and_quotes(tmp_path):
    text = (
        "image,caption\n"
        "a.jpg,A dog , running fast .\n"
        'a.jpg,"A dog shakes its head , a red ball next to it ."\n'
        'a.jpg,"He said ""hi"", then left"\n'
        'b.jpg,The "big" dog, jumping\n'
        'b.jpg,"Hello" said the man, waving\n'
        "c.jpg,\n"
        "no comma at all\n"
    )
    make_images(tmp_path / "Images", NAMES)
    cs = load_caption_set(write(tmp_path / "captions.txt", text))
    assert cs.layout == "Kaggle captions.txt"
    assert cs.items[0].captions == (
        "A dog , running fast .",
        "A dog shakes its head , a red ball next to it .",
        'He said "hi", then left',
    )
    assert cs.items[1].captions == ('The "big" dog, jumping', '"Hello" said the man, waving')
    assert len(cs.items) == 2
    assert cs.skipped == 2 and cs.empty_captions == 1
    assert cs.skipped_examples == ["line 7: empty caption", "line 8: no comma between image and caption"]


def test_flickr30k_results_csv_nested_kaggle_folder(tmp_path):
    outer = tmp_path / "flickr30k_images"
    make_images(outer / "flickr30k_images", ["1000092795.jpg", "2199200615.jpg"])
    text = (
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 3| A dog | with a pipe in the caption .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"
    )
    write(outer / "results.csv", text)
    cs = load_caption_set(tmp_path)  # found one folder down
    assert cs.layout == "Flickr30k results.csv"
    assert cs.image_root == outer / "flickr30k_images"
    assert [len(i.captions) for i in cs.items] == [2, 1]
    assert cs.items[1].captions == ("A dog | with a pipe in the caption .",)
    assert cs.skipped == 1 and cs.skipped_examples[0].startswith("line 5: ")


def karpathy(entries, dataset="flickr30k"):
    return json.dumps({"images": entries, "dataset": dataset})


def test_karpathy_splits_restval_and_filepath(tmp_path):
    entries = [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": f"a {i}"} for i in range(5)]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "b"}, {"tokens": ["b", "two"]}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "c"}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "d"}, {"raw": "  "}]},
        {"split": "test", "sentences": [{"raw": "no filename"}]},
    ]
    make_images(tmp_path / "Images", ["a.jpg"])
    cs = load_caption_set(write(tmp_path / "dataset_flickr8k.json", karpathy(entries)))
    assert cs.layout == "Karpathy JSON" and cs.has_splits
    assert [i.split for i in cs.items] == ["train", "train", "val", "test"]
    assert len(cs.items[0].captions) == 5
    assert cs.items[1].captions == ("b", "b two")
    assert cs.image_root == tmp_path / "Images"
    assert cs.skipped == 2  # the blank sentence and the entry without a filename
    assert [i.image.name for i in select_split(cs, "train")] == ["a.jpg", "b.jpg"]
    assert [i.image.name for i in select_split(cs, "dev")] == ["c.jpg"]


def test_karpathy_coco_filepath(tmp_path):
    entries = [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "restval", "sentences": [{"raw": "x"}]},
        {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "split": "train", "sentences": [{"raw": "y"}]},
    ]
    make_images(tmp_path / "val2014", ["COCO_val2014_1.jpg"])
    cs = load_caption_set(write(tmp_path / "dataset_coco.json", karpathy(entries, "coco")))
    assert cs.image_root == tmp_path
    assert cs.items[0].image == tmp_path / "val2014" / "COCO_val2014_1.jpg"
    assert cs.items[0].split == "train"


def test_coco_captions_json_images_beside_annotations_folder(tmp_path):
    data = {
        "images": [
            {"id": 7, "file_name": "000007.jpg"},
            {"id": 3, "file_name": "000003.jpg"},
            {"id": 9, "file_name": "x.jpg"},  # no captions: left out
        ],
        "annotations": [
            {"image_id": 3, "caption": "three a"},
            {"image_id": 7, "caption": "seven"},
            {"image_id": 3, "caption": "three b"},
            {"image_id": 42, "caption": "unknown image"},
            {"image_id": 7},
        ],
    }
    make_images(tmp_path / "train2017", ["000003.jpg"])
    write(tmp_path / "annotations" / "captions_train2017.json", json.dumps(data))
    cs = load_caption_set(tmp_path / "annotations")
    assert cs.layout == "COCO captions JSON" and not cs.has_splits
    assert cs.image_root == tmp_path / "train2017"
    assert [(i.image.name, i.captions) for i in cs.items] == [
        ("000007.jpg", ("seven",)),
        ("000003.jpg", ("three a", "three b")),
    ]
    assert cs.skipped == 2


@pytest.mark.parametrize(
    "header",
    [
        "image,caption,split",
        "filepath,text,split",
        "file_name,comment,split",
        "split,sentence,path",
        "Image_Path , Title , Split",
    ],
)
def test_csv_header_variants(tmp_path, header):
    cols = [c.strip().lower() for c in header.split(",")]
    rows = [
        {"img": "a.jpg", "cap": "first, with a comma", "split": "train"},
        {"img": "b.jpg", "cap": "b one", "split": "dev"},
        {"img": "a.jpg", "cap": "second", "split": "train"},
        {"img": "c.jpg", "cap": "c one", "split": "test"},
    ]

    def cell(row, col):
        if col == "split":
            value = row["split"]
        else:
            value = row["img"] if col in ("image", "filepath", "file_name", "path", "image_path") else row["cap"]
        return f'"{value}"' if "," in value else value

    text = header + "\n" + "".join(",".join(cell(r, c) for c in cols) + "\n" for r in rows)
    cs = load_caption_set(write(tmp_path / "captions.csv", text))
    assert cs.layout == "CSV" and cs.has_splits
    assert [(i.image.name, i.captions, i.split) for i in cs.items] == [
        ("a.jpg", ("first, with a comma", "second"), "train"),
        ("b.jpg", ("b one",), "val"),
        ("c.jpg", ("c one",), "test"),
    ]


def test_csv_unquoted_comma_in_last_column_and_short_rows(tmp_path):
    text = "image,caption\na.jpg,one, two\nb.jpg\n"
    cs = load_caption_set(write(tmp_path / "my.csv", text))
    assert cs.items[0].captions == ("one, two",)
    assert cs.skipped == 1 and "line 3" in cs.skipped_examples[0]
    text = "caption,image\none, two,a.jpg\n"
    cs = load_caption_set(write(tmp_path / "other.csv", text))
    assert cs.items[0].captions == ("one",) and cs.items[0].image.name == "two"


def test_csv_without_header_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"data\.csv: .*names no image column"):
        load_caption_set(write(tmp_path / "data.csv", "a.jpg,caption\n"))


def test_tsv_with_header_and_bare_two_columns(tmp_path):
    text = "filename\tcaption\tsplit\na.jpg\tone\tvalid\na.jpg\ttwo\tvalid\n"
    cs = load_caption_set(write(tmp_path / "captions.tsv", text))
    assert cs.layout == "TSV" and cs.items[0].captions == ("one", "two") and cs.items[0].split == "val"
    cs = load_caption_set(write(tmp_path / "bare.tsv", "a.jpg\tone\nb.jpg\ttwo\tmore\nc.jpg\n"))
    assert [(i.image.name, i.captions) for i in cs.items] == [("a.jpg", ("one",)), ("b.jpg", ("two\tmore",))]
    assert cs.skipped == 1 and not cs.has_splits


def test_jsonl_key_variants_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"image": "a.jpg", "caption": "one", "split": "train"}),
        json.dumps({"file_name": "a.jpg", "text": "two"}),
        json.dumps({"img": "b.jpg", "captions": ["b1", "b2"], "split": "test"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"url": "http://x", "caption": "no image"}),
        "",
    ]
    cs = load_caption_set(write(tmp_path / "captions.jsonl", "\n".join(lines)))
    assert cs.layout == "JSONL" and cs.has_splits
    assert [(i.image.name, i.captions, i.split) for i in cs.items] == [
        ("a.jpg", ("one", "two"), "train"),
        ("b.jpg", ("b1", "b2"), "test"),
    ]
    assert cs.skipped == 3
    assert cs.skipped_examples[0] == "line 4: not valid JSON"


def test_utf8_bom_and_crlf(tmp_path):
    file = tmp_path / "captions.txt"
    file.write_bytes("\ufeffimage,caption\r\na.jpg,café\r\n".encode("utf-8"))
    cs = load_caption_set(file)
    assert cs.layout == "Kaggle captions.txt" and cs.items[0].captions == ("café",)


# ------------------------------------------------------------------------------------------------ splits


def test_flickr8k_split_files(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    write(tmp_path / "captions.txt", "image,caption\n" + "".join(f"{n},cap {n}\n" for n in names))
    write(tmp_path / "Flickr_8k.trainImages.txt", "0.jpg\n1.jpg\n2.jpg\n")
    write(tmp_path / "Flickr_8k.devImages.txt", "3.jpg\n")
    write(tmp_path / "Flickr_8k.testImages.txt", "4.jpg\n")
    cs = load_caption_set(tmp_path)
    assert cs.has_splits
    assert [i.split for i in cs.items] == ["train", "train", "train", "val", "test", None]
    assert [i.image.name for i in select_split(cs, "val")] == ["3.jpg"]
    assert len(select_split(cs, "train")) == 3
    assert len(select_split(cs, "all")) == 6


def test_missing_split_in_split_files_says_which_exist(tmp_path):
    write(tmp_path / "captions.txt", "image,caption\na.jpg,x\nb.jpg,y\n")
    write(tmp_path / "Flickr_8k.trainImages.txt", "a.jpg\n")
    write(tmp_path / "Flickr_8k.devImages.txt", "b.jpg\n")
    cs = load_caption_set(tmp_path)
    expected = r"captions\.txt: has no images in split 'test'; use --split all or one of: train, val$"
    with pytest.raises(DataError, match=expected):
        select_split(cs, "test")


def test_holdout_is_deterministic_disjoint_and_order_independent(tmp_path):
    names = [f"{i:03d}.jpg" for i in range(100)]
    cs = load_caption_set(write(tmp_path / "x.token", token_text(names, 1)))
    parts = {s: select_split(cs, s, seed=3) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [90, 5, 5]
    sets = {s: {i.image for i in parts[s]} for s in parts}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == {i.image for i in cs.items}
    assert select_split(cs, "test", seed=3) == parts["test"]
    assert {i.image for i in select_split(cs, "test", seed=4)} != sets["test"]
    # The same images listed in another order split the same way.
    shuffled = load_caption_set(write(tmp_path / "y" / "x.token", token_text(reversed(names), 1)))
    assert {i.image.name for i in select_split(shuffled, "test", seed=3)} == {i.image.name for i in parts["test"]}


def test_holdout_small_sets(tmp_path):
    cs = load_caption_set(write(tmp_path / "x.token", token_text(NAMES, 1)))
    assert [len(select_split(cs, s)) for s in ("train", "val", "test")] == [1, 1, 1]
    two = load_caption_set(write(tmp_path / "two" / "x.token", token_text(NAMES[:2], 1)))
    assert len(select_split(two, "train")) == 2
    with pytest.raises(DataError, match="has no images in split 'test'"):
        select_split(two, "test")


def test_select_split_rejects_unknown_split_and_bad_holdout(tmp_path):
    cs = load_caption_set(write(tmp_path / "x.token", token_text(NAMES, 1)))
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        select_split(cs, "holdout")
    with pytest.raises(ConfigError):
        select_split(cs, "train", holdout=0.6)


# ------------------------------------------------------------------------------------ folder detection


def test_folder_priority_and_lemma_token_last(tmp_path):
    write(tmp_path / "captions.txt", "image,caption\na.jpg,kaggle\n")
    write(tmp_path / "Flickr8k.lemma.token.txt", "a.jpg#0\tlemma\n")
    write(tmp_path / "Flickr8k.token.txt", "a.jpg#0\ttoken\n")
    assert load_caption_set(tmp_path).items[0].captions == ("token",)
    entries = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "k"}]}]
    write(tmp_path / "dataset_flickr8k.json", karpathy(entries))
    assert load_caption_set(tmp_path).layout == "Karpathy JSON"


def test_folder_with_single_other_table(tmp_path):
    write(tmp_path / "Flickr_8k.trainImages.txt", "a.jpg\n")  # not a caption file
    write(tmp_path / "pairs.jsonl", json.dumps({"path": "a.jpg", "caption": "x"}) + "\n")
    assert load_caption_set(tmp_path).layout == "JSONL"
    write(tmp_path / "more.csv", "image,caption\na.jpg,y\n")
    with pytest.raises(DataError, match="several possible caption files"):
        load_caption_set(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "Images").mkdir()
    write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DataError, match=r"no caption file found; expected one of: .*captions\.txt.*Data layouts"):
        load_caption_set(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_caption_set(tmp_path / "nope")


def test_file_yielding_nothing_names_layout_and_first_problem(tmp_path):
    with pytest.raises(DataError, match=r"x\.token: no usable captions in this Flickr token file .*line 1: no tab"):
        load_caption_set(write(tmp_path / "x.token", "just words\nmore words\n"))
    with pytest.raises(DataError, match="holds only a header"):
        load_caption_set(write(tmp_path / "captions.txt", "image,caption\n"))
    with pytest.raises(DataError, match="is empty"):
        load_caption_set(write(tmp_path / "e.txt", ""))


def test_bad_json_and_wrong_json_shape(tmp_path):
    with pytest.raises(DataError, match=r"dataset_x\.json: line 1: not valid JSON"):
        load_caption_set(write(tmp_path / "dataset_x.json", "{"))
    with pytest.raises(DataError, match="not a Karpathy JSON"):
        load_caption_set(write(tmp_path / "captions_val.json", "[1, 2]"))


def test_non_utf8_file_says_how_to_convert(tmp_path):
    file = tmp_path / "captions.txt"
    file.write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"captions\.txt: is not UTF-8 .*iconv -f latin1 -t utf-8"):
        load_caption_set(file)


# ---------------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "Images/../../x.jpg"])
def test_paths_outside_the_dataset_are_refused(tmp_path, bad):
    file = write(tmp_path / "data" / "captions.txt", f"image,caption\na.jpg,fine\n{bad},evil\n")
    expected = r"captions\.txt: line 3: image path .* points outside the dataset folder; pass --allow-outside-paths"
    with pytest.raises(DataError, match=expected):
        load_caption_set(file)
    cs = load_caption_set(file, allow_outside=True)
    assert len(cs.items) == 2
    if bad.startswith("/"):
        assert cs.items[1].image == Path(bad)
    else:
        assert not cs.items[1].image.is_relative_to(tmp_path / "data")


def test_subfolder_paths_inside_the_dataset_are_fine(tmp_path):
    make_images(tmp_path / "Images" / "sub", ["a.jpg"])
    text = "image,caption\nsub/a.jpg,x\n./sub/a.jpg,y\nsub/../sub/a.jpg,z\n"
    cs = load_caption_set(write(tmp_path / "captions.txt", text))
    assert len(cs.items) == 1 and cs.items[0].captions == ("x", "y", "z")
    assert cs.items[0].image == tmp_path / "Images" / "sub" / "a.jpg"


# ------------------------------------------------------------------------------------ drop_missing_images


def items_for(root: Path, names) -> list[ImageCaptions]:
    return [ImageCaptions(root / n, ("c",), None) for n in names]


def test_drop_missing_images_thresholds(tmp_path):
    names = [f"{i}.png" for i in range(20)]
    make_images(tmp_path, names[:19], real=True)
    kept, n_missing, examples = drop_missing_images(items_for(tmp_path, names))
    assert len(kept) == 19 and n_missing == 1 and examples == [str(tmp_path / "19.png")]

    make_images(tmp_path / "few", names[:15], real=True)
    with pytest.raises(DataError, match=r"5 of 20 images \(25\.0%\) .* more than the 10% allowed"):
        drop_missing_images(items_for(tmp_path / "few", names))
    kept, n_missing, examples = drop_missing_images(items_for(tmp_path / "few", names), max_missing_fraction=0.3)
    assert len(kept) == 15 and n_missing == 5 and len(examples) == 3

    with pytest.raises(DataError, match=r"none of the 20 images .* put the images in Images/"):
        drop_missing_images(items_for(tmp_path / "empty", names))

    assert drop_missing_images(items_for(tmp_path, names[:3])) == (items_for(tmp_path, names[:3]), 0, [])
    assert drop_missing_images([]) == ([], 0, [])


def test_root_falls_back_to_existing_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    cs = load_caption_set(write(tmp_path / "x.token", token_text(["gone.jpg"], 1)))
    assert cs.image_root == tmp_path / "images"


# ------------------------------------------------------------------------------------------------ fuzzing

FUZZ_NAMES = [
    "Flickr8k.token.txt",
    "captions.txt",
    "results.csv",
    "dataset_flickr8k.json",
    "captions_train2017.json",
    "captions.csv",
    "captions.tsv",
    "captions.jsonl",
    "other.txt",
]

# Text close to the real layouts finds more paths through the parsers than uniformly random text.
fuzz_text = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.sampled_from(
            ["image,caption", "image_name| comment_number| comment", "a.jpg#0\t", "a.jpg", ",", "|", "\t", "\n",
             '"', "{", "}", "[", "]", ":", '"images"', '"annotations"', '"sentences"', '"raw"', '"caption"',
             '"image_id"', '"file_name"', '"id"', '"filename"', '"split"', "1", "..", "/", "\x00", "\r\n", " ",
             "\ufeff", "\u2028", "é"]
        ).map(str) | st.text(max_size=5),
        max_size=40,
    ).map("".join),
)


@pytest.mark.parametrize("name", FUZZ_NAMES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=fuzz_text, raw=st.binary(max_size=60), use_raw=st.booleans())
def test_fuzz_any_content_gives_caption_set_or_data_error(tmp_path, name, text, raw, use_raw):
    file = tmp_path / name
    file.write_bytes(raw if use_raw else text.encode("utf-8", "surrogatepass"))
    for allow in (False, True):
        try:
            cs = load_caption_set(file, allow_outside=allow)
        except DataError as exc:
            assert "\n" not in str(exc)
            continue
        assert isinstance(cs, CaptionSet) and cs.items
        assert all(item.captions and all(c.strip() == c and c for c in item.captions) for item in cs.items)
        for split in ("train", "val", "test", "all"):
            try:
                select_split(cs, split)
            except DataError:
                pass
        try:
            drop_missing_images(cs.items)
        except DataError:
            pass


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize("caption_file", ["captions.txt", "Flickr8k.token.txt"])
def test_real_flickr8k(caption_file):
    path = REAL_FLICKR8K / caption_file
    if not path.is_file():
        pytest.skip(f"{path} not present")
    cs = load_caption_set(path)
    assert cs.image_root == REAL_FLICKR8K / "Images"
    assert len(cs.items) == 7000 and cs.skipped == 0
    assert Counter(len(i.captions) for i in cs.items) == {5: 7000}
    assert Counter(i.split for i in cs.items) == {"train": 6000, "val": 1000}
    assert len(select_split(cs, "train")) == 6000 and len(select_split(cs, "val")) == 1000
