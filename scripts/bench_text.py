"""Time the text tower on real captions: a training step's forward and backward over a batch padded to its longest
caption against the same batch in groups of alike length (MiniCLIP.encode_text's groups), and encoding captions
for evaluation in the given order against in order of length (Encoder.encode_texts). Interleaved rounds, so
other load on the machine hits every way alike; prints medians and ratios.

    python scripts/bench_text.py --captions ~/datasets/flickr8k/Flickr8k.token.txt --run artifacts/runs/lit
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from miniclip_cli.config import ModelConfig
from miniclip_cli.model import MiniCLIP
from miniclip_cli.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--captions", required=True, help="a Flickr-style captions file: IMAGE#N<tab>caption")
    parser.add_argument("--run", required=True, help="a run folder, for its tokenizer.json")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    with open(args.captions, encoding="utf-8") as file:
        captions = [line.split("\t", 1)[1].strip() for line in file if "\t" in line]
    tokenizer = Tokenizer.load(Path(args.run) / "tokenizer.json")
    torch.manual_seed(0)
    model = MiniCLIP(ModelConfig(vocab_size=tokenizer.vocab_size))
    rng = np.random.default_rng(0)

    def train_step(groups: int, texts: list[str]) -> None:
        ids, lengths = tokenizer.encode(texts, model.config.context_length)
        model.zero_grad()
        model.encode_text(torch.from_numpy(ids), torch.from_numpy(lengths), groups).sum().backward()

    def eval_encode(sort: bool, texts: list[str]) -> None:
        ids, lengths = tokenizer.encode(texts, model.config.context_length)
        order = np.argsort(lengths, kind="stable") if sort else np.arange(len(texts))
        with torch.no_grad():
            for batch in np.array_split(order, range(256, len(order), 256)):
                width = lengths[batch].max()
                model.encode_text(torch.from_numpy(ids[batch, :width]), torch.from_numpy(lengths[batch]))

    ways = {f"train, {g} group{'s' * (g > 1)}": (train_step, g) for g in (1, 2, 4, 8)}
    ways |= {"eval 5,000, given order": (eval_encode, False), "eval 5,000, by length": (eval_encode, True)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds + 1):  # round 0 warms up
        batch = [captions[i] for i in rng.choice(len(captions), args.batch, replace=False)]
        dev = [captions[i] for i in rng.choice(len(captions), 5000, replace=False)]
        for name, (way, setting) in ways.items():
            model.train(way is train_step)
            start = time.perf_counter()
            way(setting, batch if way is train_step else dev)
            if r:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds")
    for name, median in medians.items():
        base = medians["train, 1 group"] if name.startswith("train") else medians["eval 5,000, given order"]
        print(f"{name:28s} {median * 1000:8.0f} ms   {base / median:5.2f}x")


if __name__ == "__main__":
    main()
