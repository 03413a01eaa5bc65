"""The training loop. It reports through a Callbacks object and never prints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig
from .data.images import PairDataset
from .data.layouts import ImageCaptions
from .device import autocast_dtype
from .evaluate import evaluate_retrieval
from .loss import clip_loss
from .model import MiniCLIP
from .runtime import TorchEncoder
from .tokenizer import Tokenizer


class Callbacks:
    """Hooks the loop calls; the CLI's Rich progress bar overrides them. All default to doing nothing."""

    def on_start(self, total_steps: int, start_step: int, steps_per_epoch: int, info: dict) -> None: ...
    def on_step(self, step: int, epoch: int, loss: float, pairs_per_s: float, lr: float) -> None: ...
    def on_validate(self, epoch: int) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def on_replaced_sample(self, message: str, total: int) -> None:
        """A training image failed to load and another sample took its place; `total` so far in this run."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a resumable checkpoint was saved at `step`."""

    def __init__(self, run: Path, step: int):
        super().__init__(f"interrupted at step {step}")
        self.run, self.step = run, step


@dataclass
class Collate:
    """Stacks images and tokenises a batch's captions, padded to the batch's longest caption; passes on the
    messages of the samples PairDataset had to replace."""

    tokenizer: Tokenizer
    context_length: int

    def __call__(self, batch):
        images, captions, failures = zip(*batch)
        ids, lengths = self.tokenizer.encode(list(captions), self.context_length)
        return torch.stack(images), torch.from_numpy(ids), torch.from_numpy(lengths), [m for f in failures for m in f]


class EpochSampler(torch.utils.data.Sampler):
    """A permutation fixed by (seed, epoch), started `skip` samples in: a resumed run sees exactly the
    batches the interrupted one would have."""

    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        self.order = torch.randperm(size, generator=generator)[skip:].tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def parameter_groups(model: MiniCLIP, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and the patch projection only; norms, biases, embeddings,
    positions, the class token and the temperature are left undecayed, as in CLIP."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        undecayed = p.ndim < 2 or "token_embed" in name or "positions" in name
        (no_decay if undecayed else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pick_workers(config: RunConfig, device: torch.device) -> int:
    if config.train.workers >= 0:
        return config.train.workers
    # On CPU one loader process overlaps JPEG decoding with compute without starving the model of cores.
    return 1 if device.type == "cpu" else 4


def fit(config: RunConfig, tokenizer: Tokenizer, train_items: list[ImageCaptions], val_items: list[ImageCaptions],
        run: Path, device: torch.device, resume: bool = False, save_every: int | None = None,
        callbacks: Callbacks | None = None) -> list[dict]:
    callbacks = callbacks or Callbacks()
    tc = config.train
    torch.manual_seed(tc.seed)
    model = MiniCLIP(config.model).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    dataset = PairDataset(train_items, config.model.image_size, config.data.mean, config.data.std,
                          tc.crop_scale, tc.captions, tc.seed)
    drop_last = len(dataset) >= tc.batch_size
    steps_per_epoch = len(dataset) // tc.batch_size if drop_last else 1
    total_steps = tc.epochs * steps_per_epoch
    warmup = max(1, int(tc.warmup_fraction * total_steps))
    val_items = val_items[: tc.val_images]
    workers = pick_workers(config, device)
    amp_dtype = autocast_dtype(device, tc.precision)
    collate = Collate(tokenizer, config.model.context_length)

    step, history, best = 0, [], -1.0
    losses: list[float] = []  # this epoch's, so far; saved with the resume file so its mean survives a restart
    replaced = 0
    if resume:
        counters = checkpoint.load_resume(run, model, optimizer)
        step, best = counters["step"], counters["best_mean_recall"]
        if step % steps_per_epoch:  # stopped mid-epoch (files from before this was saved have none)
            losses = counters.get("epoch_losses", [])
        # History is written before the resume file, so it may hold a record past the resumable step.
        history = [r for r in checkpoint.read_history(run) if r["step"] <= step]
        model.to(device)
    else:
        checkpoint.save_run_files(run, config, tokenizer)
    stop_at = min(total_steps, tc.max_steps) if tc.max_steps else total_steps

    def save_resume():
        checkpoint.save_resume(run, model, optimizer, {"step": step, "best_mean_recall": best,
                                                       "epoch_losses": losses if step % steps_per_epoch else []})

    try:
        callbacks.on_start(total_steps, step, steps_per_epoch,
                           {"train_pairs": len(dataset), "val_images": len(val_items), "workers": workers,
                            "precision": str(amp_dtype or torch.float32).replace("torch.", ""), "device": str(device)})
        while step < stop_at:
            epoch, skip = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=tc.batch_size, sampler=EpochSampler(len(dataset), tc.seed, epoch, skip * tc.batch_size),
                num_workers=workers, collate_fn=collate, drop_last=drop_last, pin_memory=device.type == "cuda",
                persistent_workers=False)
            model.train()
            tick, replaced_this_epoch = time.perf_counter(), 0
            for images, ids, lengths, failures in loader:
                for message in failures:
                    replaced += 1
                    replaced_this_epoch += 1
                    callbacks.on_replaced_sample(message, replaced)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, tc.lr, warmup)
                images, ids, lengths = (t.to(device, non_blocking=True) for t in (images, ids, lengths))
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    image_features, text_features, scale = model(images, ids, lengths)
                    loss = clip_loss(image_features, text_features, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(loss.item())
                now = time.perf_counter()
                callbacks.on_step(step, epoch, losses[-1], len(images) / max(now - tick, 1e-9),
                                  optimizer.param_groups[0]["lr"])
                tick = now
                if save_every and step % save_every == 0:
                    save_resume()
                if step >= stop_at:
                    break
            finished_epoch = step % steps_per_epoch == 0
            record = {"epoch": epoch + 1 if finished_epoch else round(epoch + (step % steps_per_epoch) / steps_per_epoch, 3),
                      "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                      "lr": optimizer.param_groups[0]["lr"], "temperature": 1.0 / model.scale().item()}
            losses = []
            if replaced_this_epoch:
                record["replaced_samples"] = replaced_this_epoch
            if val_items:
                callbacks.on_validate(epoch + 1)
                model.eval()
                encoder = TorchEncoder(model, tokenizer, config.data.mean, config.data.std, device, tc.precision)
                metrics = evaluate_retrieval(encoder, val_items)
                record.update({f"val_{k}": v for k, v in metrics.items() if k not in ("images", "captions")})
            history.append(record)
            checkpoint.save_weights(run / checkpoint.LAST, model)
            score = record.get("val_mean_recall", 0.0)
            if score > best or not val_items:
                best = score
                checkpoint.save_weights(run / checkpoint.BEST, model)
                callbacks.on_checkpoint(run / checkpoint.BEST)
            checkpoint.write_history(run, history)
            save_resume()
            callbacks.on_epoch_end(record)
    except KeyboardInterrupt:
        save_resume()
        raise TrainingInterrupted(run, step) from None
    return history
