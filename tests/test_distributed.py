"""Scale-out: processes under torch.distributed (Gloo on CPU), gradient accumulation, and tar shards.

The equivalence tests train through the real `fit`, from the same seed and data, and compare the per-step
losses and the saved weights with one process at the whole batch."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from miniclip_cli import distributed
from miniclip_cli.config import RunConfig, RuntimeConfig, TrainConfig, tiny_model_config
from miniclip_cli.data.images import ShardDataset
from miniclip_cli.data.layouts import ImageCaptions, load_caption_set, select_split
from miniclip_cli.data.shards import (
    expand_braces,
    is_shard_spec,
    open_shards,
    write_shards,
)
from miniclip_cli.errors import DataError
from miniclip_cli.loss import clip_loss
from miniclip_cli.tokenizer import Tokenizer, train_tokenizer
from miniclip_cli.data.feeding import EpochSampler
from miniclip_cli.train import Callbacks, fit, global_batch_backward

from .conftest import run_cli

TOLERANCE = 1e-5


class StepLosses(Callbacks):
    def __init__(self):
        self.losses = []

    def on_step(self, step, epoch, loss, pairs_per_s, lr, terms=None):
        self.losses.append(loss)


def _items(tiny_dataset) -> list[ImageCaptions]:
    return select_split(load_caption_set(tiny_dataset), "train")  # 30 images: 3 steps of 8


def _config(tokenizer: Tokenizer, batch_size: int, accum_steps: int = 1) -> RunConfig:
    # The default learning rate: Adam turns float rounding in a near-zero gradient into a step of up to
    # lr x rounding / eps, so a higher one would compare rounding noise rather than the training.
    return RunConfig(model=tiny_model_config(tokenizer.vocab_size),
                     train=TrainConfig(epochs=1, batch_size=batch_size, accum_steps=accum_steps),
                     runtime=RuntimeConfig(workers=0, precision="fp32"))


def _tokenizer(items) -> Tokenizer:
    return train_tokenizer([c for item in items for c in item.captions], 300)


def _max_difference(run_a: Path, run_b: Path, skip_key_bias: bool = False) -> float:
    """The largest difference between the last weights of two runs. skip_key_bias: leave out the attention
    key biases, whose true gradient is exactly zero (softmax ignores a constant added to every key's score),
    so that their Adam steps are rounding noise divided by eps: they hold the largest differences."""
    a, b = load_file(str(run_a / "last.safetensors")), load_file(str(run_b / "last.safetensors"))
    assert a.keys() == b.keys()
    largest = 0.0
    for name in a:
        difference = (a[name] - b[name]).abs()
        if skip_key_bias and name.endswith("attn.qkv.bias"):
            width = difference.shape[0] // 3
            difference = torch.cat([difference[:width], difference[2 * width:]])  # '(three d)': drop the k third
        largest = max(largest, difference.max().item())
    return largest


def _moved(run: Path, config: RunConfig) -> float:
    """How far training moved the weights from their seeded start: the differences must be far below it."""
    torch.manual_seed(config.train.seed)
    from miniclip_cli.model import MiniCLIP

    start = MiniCLIP(config.model).state_dict()
    trained = load_file(str(run / "last.safetensors"))
    return max((trained[k] - start[k]).abs().max().item() for k in start)


def _single(config, tokenizer, items, run) -> list[float]:
    callbacks = StepLosses()
    fit(config, tokenizer, items, [], run, torch.device("cpu"), callbacks=callbacks)
    return callbacks.losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradient_batch(count: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 50, (count, 6), generator=generator)
    return images, ids, torch.full((count,), 6)


def _gradients(world_size: int, rank: int, accum_steps: int, image_ssl: bool = False) -> dict[str, torch.Tensor]:
    """The gradients global_batch_backward leaves after one step on _gradient_batch, split over the processes
    and micro-batches (through DDP when there are several processes). image_ssl: with second views and the
    image self-supervised loss, whose head's gradients are returned too."""
    from torch.nn.parallel import DistributedDataParallel

    from miniclip_cli import objectives
    from miniclip_cli.model import MiniCLIP
    from miniclip_cli.train import Trainee

    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(50))
    pieces = [objectives.ImageSSL(1.0, model.config.embed_dim)] if image_ssl else []
    trainee = Trainee(model, pieces)
    net = DistributedDataParallel(trainee) if world_size > 1 else trainee
    images, ids, lengths = _gradient_batch()
    second = torch.randn(images.shape, generator=torch.Generator().manual_seed(6))
    b = len(images) // (world_size * accum_steps)
    chunks = [slice((j * world_size + rank) * b, (j * world_size + rank + 1) * b) for j in range(accum_steps)]
    autocast = lambda: torch.autocast("cpu", enabled=False)
    micro_batches = [(torch.cat([images[c], second[c]]) if image_ssl else images[c], ids[c], lengths[c],
                      [None] * len(pieces)) for c in chunks]
    global_batch_backward(net, trainee, objectives.Contrastive(), micro_batches, world_size, autocast)
    named = [*model.named_parameters(), *(pieces[0].head.named_parameters(prefix="head") if pieces else ())]
    return {name: p.grad.clone() for name, p in named}


def _rank_main(rank: int, world_size: int, port: int, jobs: list, tokenizer_json: str, items: list, out: str) -> None:
    """One process of a Gloo group, set up the way torchrun's environment sets up `miniclip train`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world, device = distributed.setup("cpu")
    try:
        tokenizer = Tokenizer.from_json(tokenizer_json)
        for config, run in jobs:
            callbacks = StepLosses()
            fit(config, tokenizer, items, [], Path(run), device, callbacks=callbacks)
            if world.is_main:
                (Path(run) / "step_losses.json").write_text(json.dumps(callbacks.losses))
        for accum_steps, image_ssl in ((1, False), (2, False), (1, True), (2, True)):
            gradients = _gradients(world_size, rank, accum_steps, image_ssl)
            if world.is_main:
                save_file(gradients, str(Path(out) / f"gradients-{accum_steps}{'-ssl' * image_ssl}.safetensors"))
    finally:
        distributed.teardown()


def test_two_processes_train_like_one_process_at_the_global_batch(tiny_dataset, tmp_path):
    """2 ranks x batch 4, and 2 ranks x 2 micro-batches x batch 2, against 1 process x batch 8: 3 steps."""
    items = _items(tiny_dataset)
    tokenizer = _tokenizer(items)
    reference = _config(tokenizer, 8)
    single = _single(reference, tokenizer, items, tmp_path / "single")
    jobs = [(_config(tokenizer, 4), str(tmp_path / "ddp")),
            (_config(tokenizer, 2, accum_steps=2), str(tmp_path / "ddp-accum"))]
    mp.spawn(_rank_main, args=(2, _free_port(), jobs, tokenizer.to_json(), items, str(tmp_path)), nprocs=2, join=True)

    moved = _moved(tmp_path / "single", reference)
    assert moved > 100 * TOLERANCE  # the comparison means something: 3 steps moved the weights ~1e-3
    for name in ("ddp", "ddp-accum"):
        losses = json.loads((tmp_path / name / "step_losses.json").read_text())
        assert len(losses) == len(single) == 3
        loss_difference = max(abs(a - b) for a, b in zip(losses, single))
        weight_difference = _max_difference(tmp_path / "single", tmp_path / name, skip_key_bias=True)
        print(f"{name}: max |loss diff| {loss_difference:.1e}, max |weight diff| {weight_difference:.1e} "
              f"(without key biases; {_max_difference(tmp_path / 'single', tmp_path / name):.1e} with them), "
              f"weights moved {moved:.1e}")
        assert loss_difference < TOLERANCE, (name, losses, single)
        assert weight_difference < TOLERANCE, name
    # Only rank 0 wrote, and it recorded how many processes trained the run.
    with safe_open(str(tmp_path / "ddp" / "resume.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["counters"])["world_size"] == 2

    # Adam all but ignores a constant factor on a gradient, so the gradients are compared too: DDP averages
    # over processes, and a missing x world_size would halve them.
    expected = _gradients(1, 0, 1)
    for accum_steps in (1, 2):
        gradients = load_file(str(tmp_path / f"gradients-{accum_steps}.safetensors"))
        worst = max(((gradients[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in expected.items())
        print(f"gradients, 2 processes x {accum_steps} micro-batch(es): max difference {worst:.1e} of the largest")
        assert worst < 1e-4, accum_steps
    # The image self-supervised loss is local to a micro-batch: 2 processes x K micro-batches must give the
    # gradients of 1 process x 2K micro-batches of the same images, the model's and the head's alike.
    for accum_steps in (1, 2):
        expected = _gradients(1, 0, 2 * accum_steps, image_ssl=True)
        gradients = load_file(str(tmp_path / f"gradients-{accum_steps}-ssl.safetensors"))
        assert gradients.keys() == expected.keys() and any(n.startswith("head.") for n in expected)
        worst = max(((gradients[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in expected.items())
        print(f"image_ssl gradients, 2 processes x {accum_steps}: max difference {worst:.1e} of the largest")
        assert worst < 1e-4, accum_steps


def test_accumulation_trains_like_the_whole_batch(tiny_dataset, tmp_path):
    """--accum-steps 2 at batch 4 against batch 8: negatives come from both micro-batches."""
    items = _items(tiny_dataset)
    tokenizer = _tokenizer(items)
    single = _single(_config(tokenizer, 8), tokenizer, items, tmp_path / "single")
    accumulated = _single(_config(tokenizer, 4, accum_steps=2), tokenizer, items, tmp_path / "accum")
    loss_difference = max(abs(a - b) for a, b in zip(accumulated, single))
    weight_difference = _max_difference(tmp_path / "single", tmp_path / "accum", skip_key_bias=True)
    print(f"accum: max |loss diff| {loss_difference:.2e}, max |weight diff| {weight_difference:.2e} without key biases")
    assert len(accumulated) == 3 and loss_difference < TOLERANCE and weight_difference < TOLERANCE


def test_accumulated_gradient_equals_the_whole_batch_gradient():
    """The gradients themselves (Adam would hide a constant factor): K=2 micro-batches against one batch."""
    from miniclip_cli.model import MiniCLIP
    from miniclip_cli.objectives import Contrastive
    from miniclip_cli.train import Trainee

    torch.manual_seed(0)
    model = MiniCLIP(tiny_model_config(50))
    trainee = Trainee(model, [])
    images, ids = torch.randn(8, 3, 32, 32), torch.randint(3, 50, (8, 6))
    lengths = torch.full((8,), 6)
    autocast = lambda: torch.autocast("cpu", enabled=False)
    whole = global_batch_backward(trainee, trainee, Contrastive(), [(images, ids, lengths, [])], 1,
                                  autocast)["contrastive"]
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    halves = [(images[:4], ids[:4], lengths[:4], []), (images[4:], ids[4:], lengths[4:], [])]
    accumulated = global_batch_backward(trainee, trainee, Contrastive(), halves, 1, autocast)["contrastive"]
    assert abs(whole - accumulated) < 1e-6
    assert abs(whole - clip_loss(*model(images, ids, lengths)).item()) < 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_epoch_sampler_splits_the_global_batch_across_ranks():
    whole = EpochSampler(30, seed=0, epoch=1, batch_size=8, length=24).order
    ranks = [EpochSampler(30, seed=0, epoch=1, batch_size=4, rank=r, world_size=2, length=24).order for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    for step in range(3):  # one step's 2 x 4 samples are the 8 of one process's step
        assert set(ranks[0][4 * step:4 * step + 4] + ranks[1][4 * step:4 * step + 4]) == set(whole[8 * step:8 * step + 8])
    resumed = EpochSampler(30, seed=0, epoch=1, skip=8, batch_size=4, rank=1, world_size=2, length=24).order
    assert resumed == ranks[1][4:]


# ------------------------------------------------------------------------------------------------- shards


def _coloured_items(folder: Path, count: int) -> list[ImageCaptions]:
    """Solid-colour images, each with two captions naming its colour: a pair read back can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for n in range(count):
        colour = (n * 7 % 256, n * 53 % 256, 255 - n * 11 % 256)
        path = folder / f"{n:03d}.png"
        Image.new("RGB", (24, 20), colour).save(path)
        items.append(ImageCaptions(path, (f"{n} first {colour}", f"{n} second {colour}"), None))
    return items


def _read_back(shard_set, captions: str, world_size: int = 2, workers: int = 2) -> list[tuple[str, tuple]]:
    """(caption, mean colour) of every sample one pass delivers to each rank's loader with `workers` workers."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    pairs = []
    for rank in range(world_size):
        dataset = ShardDataset(shard_set, 16, mean, std, (0.5, 1.0), captions, seed=3, rank=rank,
                               world_size=world_size, passes=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        for image, caption, failures, index in loader:
            assert not failures and index is None
            pairs.append((caption, tuple(np.round(image.mean(dim=(1, 2)).numpy() * 255).astype(int))))
    return pairs


@pytest.mark.parametrize("shard_size", [3, 7], ids=["shard-level split", "sample-level split"])
def test_every_pair_is_read_back_once_across_ranks_and_workers(tmp_path, shard_size):
    items = _coloured_items(tmp_path / "images", 20)  # 7 shards of 3 (>= 4 loaders) or 3 shards of 7 (< 4)
    manifest = write_shards(items, tmp_path / "shards", shard_size)
    assert manifest["samples"] == 20 and manifest["captions"] == 40
    shard_set = open_shards(str(tmp_path / "shards"))
    assert shard_set.size("one") == 20 and shard_set.size("all") == 40
    pairs = _read_back(shard_set, "all")
    written = sorted(c for item in items for c in item.captions)
    assert sorted(caption for caption, _ in pairs) == written  # each of the 40 pairs exactly once
    for caption, colour in pairs:  # and each with its own image (JPEG-encoded: within a few levels)
        expected = tuple(int(v) for v in re.findall(r"\d+", caption.split(" ", 2)[2]))
        assert max(abs(a - b) for a, b in zip(colour, expected)) <= 3, (caption, colour)
    images = [caption.split(" ")[0] for caption, _ in _read_back(shard_set, "one")]
    assert sorted(images, key=int) == [str(n) for n in range(20)]  # "one": each image once, one caption drawn


def test_shard_stream_is_seeded_endless_and_resumable(tmp_path):
    shard_set = open_shards(_shards(tmp_path, 10, 4))
    dataset = ShardDataset(shard_set, 16, (0.5,) * 3, (0.5,) * 3, (0.5, 1.0), "one", seed=1, batch_size=2)

    def captions(count):
        return [caption for _, caption, _, _ in itertools.islice(dataset, count)]

    stream = captions(25)
    assert len(stream) == 25  # past the 10 samples of one pass, the stream goes on
    assert sorted(int(c.split()[0]) for c in stream[:10]) == list(range(10))  # a pass: every image once
    assert captions(25) == stream  # seeded
    dataset.set_epoch(0, skip_batches=3)
    assert captions(10) == stream[6:16]  # a resumed epoch passes over its first 3 batches of 2
    dataset.set_epoch(1)
    assert captions(10) != stream[:10]  # each epoch its own order


def _shards(tmp_path: Path, count: int, shard_size: int) -> str:
    write_shards(_coloured_items(tmp_path / "images", count), tmp_path / "shards", shard_size)
    return str(tmp_path / "shards")


def test_shard_patterns(tmp_path):
    assert expand_braces("s/{000000..000002}.tar") == ["s/000000.tar", "s/000001.tar", "s/000002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    for bad in ("s/{3..1}.tar", "s/{000..002.tar", "s/{x}.tar"):
        with pytest.raises(DataError):
            expand_braces(bad)
    folder = _shards(tmp_path, 5, 2)
    assert is_shard_spec(folder) and is_shard_spec(f"{folder}/{{000000..000001}}.tar")
    assert not is_shard_spec(str(tmp_path / "images")) and not is_shard_spec(None)
    assert [s.samples for s in open_shards(f"{folder}/{{000000..000001}}.tar").shards] == [2, 2]
    (Path(folder) / "manifest.json").unlink()  # counted from the shards themselves
    assert [s.captions for s in open_shards(folder).shards] == [4, 4, 2]
    with pytest.raises(DataError, match="000003.tar: missing"):
        open_shards(f"{folder}/{{000000..000009}}.tar")


def test_shard_command_and_training_on_shards(runner, tiny_dataset, tmp_path):
    shards = tmp_path / "shards"
    result = run_cli(runner, "shard", tiny_dataset, "--out", shards, "--shard-size", 8, "--json")
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["samples"] == 30 and payload["shard_names"] == [f"00000{i}.tar" for i in range(4)]
    again = run_cli(runner, "shard", tiny_dataset, "--out", shards, code=3)
    assert "already holds shards" in again.output and again.output.count("error:") == 1
    missing = run_cli(runner, "shard", tmp_path / "nope", "--out", tmp_path / "s2", code=2)
    assert "nope" in missing.output and "Traceback" not in missing.output

    run = tmp_path / "run"
    common = ["--preset", "tiny", "--batch-size", 4, "--workers", 0, "--vocab-size", 300, "--precision", "fp32"]
    result = run_cli(runner, "train", "--data", f"{shards}/{{000000..000002}}.tar", "--out", run, "--max-steps", 3,
                     "--val-data", tiny_dataset, "--accum-steps", 2, *common)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["layout"] == "shards" and config["data"]["val_path"] == str(tiny_dataset)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and "val_mean_recall" in history[-1]
    run_cli(runner, "eval", run, "--json")  # the run's own evaluation reads its --val-data dataset

    without_val = run_cli(runner, "train", "--data", shards, "--out", tmp_path / "run2", "--max-steps", 1, *common)
    assert "--val-data" in without_val.output


@pytest.fixture
def one_thread():
    """Loader processes beside a 2-thread PyTorch on 2 shared cores make every step crawl; one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shard_training_resumes_mid_epoch_where_it_stopped(tiny_dataset, tmp_path, one_thread):
    """A stream has no indices to start from: a resumed rank passes over the batches it trained on."""
    items = _items(tiny_dataset)
    write_shards(items, tmp_path / "shards", 8)
    shard_set = open_shards(str(tmp_path / "shards"))
    tokenizer = _tokenizer(items)
    config = _config(tokenizer, 4)
    config.runtime.workers = 2  # 7 steps; the 2 loader processes take turns, and the resumed loader starts with the other
    _single(config, tokenizer, shard_set, tmp_path / "straight")
    config.runtime.max_steps = 3
    _single(config, tokenizer, shard_set, tmp_path / "stopped")
    config.runtime.max_steps = None
    fit(config, tokenizer, shard_set, [], tmp_path / "stopped", torch.device("cpu"), resume=True)
    assert _max_difference(tmp_path / "straight", tmp_path / "stopped") < TOLERANCE


# -------------------------------------------------------------------------------------- torchrun, end to end


def test_torchrun_trains_and_only_rank_zero_writes(runner, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "miniclip_cli",
               "train", "--data", str(tiny_dataset), "--out", str(run), "--preset", "tiny", "--max-steps", "2",
               "--batch-size", "4", "--workers", "0", "--vocab-size", "300", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("training on 2 processes on cpu") == 1, done.stderr  # rank 1 said nothing
    assert done.stdout.count("saved to") == 1
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.safetensors", "config.json", "history.jsonl",
                                                    "last.safetensors", "resume.safetensors", "tokenizer.json"]
    assert [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()] == [2]
    assert list(tmp_path.iterdir()) == [run]  # nothing written anywhere else (rank 1 named no folder of its own)

    refused = run_cli(runner, "train", "--out", run, "--resume", code=3)
    assert "trained by 2 process(es), this is 1" in refused.output and "--nproc 2" in refused.output


@pytest.mark.slow  # ~25 s on 2 cores: two torchrun launches of two fresh interpreters each
def test_nproc_trains_on_shards_and_resumes_with_as_many_processes(runner, tiny_dataset, tmp_path):
    shards = tmp_path / "shards"
    run_cli(runner, "shard", tiny_dataset, "--out", shards, "--shard-size", 8)
    run = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "miniclip_cli", "train", "--nproc", "2", "--device", "cpu"]
    first = subprocess.run([*train, "--data", str(shards), "--out", str(run), "--preset", "tiny", "--epochs", "2",
                            "--max-steps", "2", "--batch-size", "4", "--workers", "1", "--vocab-size", "300",
                            "--val-data", str(tiny_dataset)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*train, "--out", str(run), "--resume"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 3, 6] and all("val_mean_recall" in r for r in history)


def test_nproc_builds_the_torchrun_command():
    command = distributed.torchrun_command(["--debug", "train", "--nproc", "4", "--data", "d", "--nproc=4"], 4)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "miniclip_cli",
                           "--debug", "train", "--data", "d"]


def test_device_choices_under_torchrun(monkeypatch):
    from miniclip_cli.errors import DeviceError

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    world, device = distributed.setup("cpu")
    assert (world.rank, world.world_size, device.type) == (1, 1, "cpu")
    for requested, needle in (("cuda:1", "CUDA_VISIBLE_DEVICES"), ("mps", "no MPS backend")):
        with pytest.raises(DeviceError, match=needle):
            distributed.setup(requested)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="nproc_per_node=1"):
        distributed.setup("cuda")
