"""The decoded-image cache: built once, reused, rebuilt when a file changes, same pixels as decoding."""

import os

import numpy as np

from miniclip_cli.data.cache import cache_size, open_cache
from miniclip_cli.data.pixels import load_rgb, resize_centre_crop

from .conftest import make_image


def test_built_once_then_reused_then_rebuilt_on_change(tmp_path):
    paths = []
    for k, colour in enumerate(("red", "green", "blue")):
        paths.append(tmp_path / f"{colour}.png")
        make_image(paths[-1], colour, "circle", size=60, seed=k)
    calls = []
    cache, built = open_cache(paths, 32, root=tmp_path / "cache", progress=lambda done, total: calls.append((done, total)))
    assert built and calls[-1] == (3, 3)
    again, built_again = open_cache(paths, 32, root=tmp_path / "cache")
    assert not built_again and again.folder == cache.folder

    make_image(paths[1], "yellow", "square", size=60, seed=9)
    os.utime(paths[1], ns=(1, 1))  # a different modification time, whatever the clock's resolution
    changed, rebuilt = open_cache(paths, 32, root=tmp_path / "cache")
    assert rebuilt and changed.folder != cache.folder
    assert np.array_equal(np.asarray(changed.image(1)), np.asarray(resize_centre_crop(load_rgb(paths[1]), cache_size(32))))


def test_cached_pixels_equal_direct_decoding(tmp_path):
    path = tmp_path / "wide.png"
    make_image(path, "blue", "square", size=90, seed=3)
    cache, _ = open_cache([path], 64, root=tmp_path / "cache")
    direct = np.asarray(resize_centre_crop(load_rgb(path), cache_size(64)))
    cached = np.asarray(cache.image(0))
    assert cached.shape == (80, 80, 3) and np.array_equal(cached, direct)


def test_undecodable_image_is_marked_not_fatal(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    make_image(good, "red", "circle", seed=1)
    bad.write_bytes(b"not a jpeg")
    cache, _ = open_cache([good, bad], 32, root=tmp_path / "cache")
    assert cache.broken == {1}
    try:
        cache.image(1)
    except Exception as exc:  # the dataset turns this DataError into a replaced sample
        assert "bad.jpg" in str(exc)
    else:
        raise AssertionError("a broken image must raise")


def test_device_crops_match_loader_crops(tiny_dataset, tmp_path):
    # The same sample seeds give the same crop boxes; the device resamples them with roi_align (bilinear,
    # averaged) rather than PIL's bicubic, so pixels agree up to resampling differences at edges.
    import torch

    from miniclip_cli.data.images import PairDataset
    from miniclip_cli.data.layouts import load_caption_set
    from miniclip_cli.tokenizer import train_tokenizer
    from miniclip_cli.data.feeding import Collate

    items = load_caption_set(tiny_dataset).items[:8]
    cache, _ = open_cache([item.image for item in items], 32, root=tmp_path / "cache")
    common = (items, 32, (0.5,) * 3, (0.25,) * 3, (0.3, 1.0), "one", 4)
    loader_side = PairDataset(*common, cache=cache)
    device_side = PairDataset(*common, cache=cache, device_crops=True)
    collate = Collate(train_tokenizer([c for item in items for c in item.captions], 300), 32)
    want, ids, _, _, _ = collate([loader_side[i] for i in range(8)])
    crops, device_ids, _, _, _ = collate([device_side[i] for i in range(8)])
    got = crops.render(32, (0.5,) * 3, (0.25,) * 3)
    assert got.shape == want.shape == (8, 3, 32, 32) and torch.equal(ids, device_ids)
    difference = (got - want).abs()
    assert difference.mean() < 0.05 and difference.median() < 0.02, (difference.mean(), difference.median())
