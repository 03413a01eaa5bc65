"""`miniclip shard`: a dataset as WebDataset-style tar shards, for training that streams its data."""

from __future__ import annotations

from pathlib import Path

import typer

from ..data.shards import check_shard_output, write_shards
from ..ui.console import out
from ..ui.progress import CountProgress
from . import command
from .common import AllowOutside, JsonFlag, open_dataset, print_json, split_items


@command("shard")
def shard_command(
    data: str = typer.Argument(..., help="Caption file or dataset folder (see README 'Data layouts')."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the shards (000000.tar, ...) and manifest.json; empty or new."),
    shard_size: int = typer.Option(5000, "--shard-size", help="Images per shard; a few hundred MB per shard streams well."),
    split: str = typer.Option("train", "--split", help="train (keeps val and test out, for --val-data and eval), all, val or test."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split of a dataset without one (as `train --seed` does) and the shuffle across shards."),
    allow_outside_paths: AllowOutside = False,
    json_out: JsonFlag = False,
):
    """Write a dataset's images and captions as tar shards that `miniclip train --data` streams.

    Each image becomes `<key>.jpg` (the file itself if it is a JPEG, else re-encoded at quality 95) beside
    `<key>.json` holding its captions; samples are shuffled across shards, and manifest.json counts them.
    Images that cannot be used are skipped with a warning, as in training.

    Examples:

        miniclip shard ~/datasets/flickr30k --out shards/ --shard-size 5000

        miniclip train --data 'shards/{000000..000005}.tar' --val-data ~/datasets/flickr30k
    """
    check_shard_output(out_dir, shard_size)
    caption_set = open_dataset(data, allow_outside=allow_outside_paths, quiet=json_out)
    items = split_items(caption_set, split, seed)
    source = {"source": str(caption_set.caption_file), "layout": caption_set.layout, "split": split}
    with CountProgress("writing shards") as progress:
        manifest = write_shards(items, out_dir, shard_size, seed, source, progress=progress)
    shards = manifest["shards"]
    pattern = str(out_dir / f"{{{shards[0]['name'][:-4]}..{shards[-1]['name'][:-4]}}}.tar")
    if json_out:
        print_json({"out": str(out_dir), "pattern": pattern, **{k: v for k, v in manifest.items() if k != "shards"},
                    "shard_names": [s["name"] for s in shards]})
        return
    out.print(f"wrote {len(shards)} shard(s) to {out_dir}: {manifest['samples']} images, {manifest['captions']} captions. "
              f"Next: miniclip train --data {out_dir}  (or a subset: --data '{pattern}')", soft_wrap=True)
