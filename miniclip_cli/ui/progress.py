"""A Rich progress bar that listens to the training loop's callbacks."""

from __future__ import annotations

from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rich.text import Text

from .console import err, warn

SHOWN_REPLACEMENTS = 5  # the rest are counted in each epoch's line and in history.jsonl


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err)


class TrainProgress:
    """The training loop's callbacks (see train.Callbacks) as a Rich progress bar. Shows epoch, step, loss, pairs/s and ETA; prints one line per finished epoch."""

    def __init__(self):
        self.progress = _progress()
        self.task = self.cache_task = None
        self.steps_per_epoch = 1
        self.smoothed_rate = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_start(self, total_steps, start_step, steps_per_epoch, info):
        self.steps_per_epoch = steps_per_epoch
        if info.get("tower_seconds") is not None:
            kept = "; a run on the same images reads its features from the cache" if info.get("tower_kept") else ""
            err.print(f"computed the pretrained tower's or teacher's features of the images in "
                      f"{info['tower_seconds']:.1f} s{kept}")
        if info.get("cache_seconds") is not None:
            err.print(f"decoded the training images into the cache in {info['cache_seconds']:.1f} s; "
                      "later epochs and runs read them from it")
        if info.get("cache"):
            err.print(f"image cache: {info['cache']} (`miniclip cache` lists it, `miniclip cache --clear` removes it)",
                      soft_wrap=True)
        processes, accum = info.get("processes", 1), info.get("accum_steps", 1)
        # Each process has its own device (cuda:LOCAL_RANK): name the kind.
        where = f"{processes} processes on {info['device'].split(':')[0]}" if processes > 1 else info["device"]
        batch = ""
        if processes > 1 or accum > 1:
            batch = (f", global batch {info['global_batch']} ({processes} process(es) x {accum} micro-batch(es) "
                     f"x {info['batch_size']})")
        err.print(f"training on {where} ({info['precision']}){batch}, {info['train_pairs']} pairs per epoch, "
                  f"{steps_per_epoch} steps per epoch, validating on {info['val_images']} images")
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")

    def on_step(self, step, epoch, loss, pairs_per_s, lr, terms=None):
        # An exponential average: single steps jitter with loader stalls.
        rate = pairs_per_s if self.smoothed_rate is None else 0.9 * self.smoothed_rate + 0.1 * pairs_per_s
        self.smoothed_rate = rate
        parts = f" ({', '.join(f'{name} {value:.3f}' for name, value in terms.items())})" if len(terms or ()) > 1 else ""
        self.progress.update(self.task, completed=step, description=f"epoch {epoch + 1}",
                             status=f"loss {loss:.3f}{parts}  {rate:,.0f} pairs/s")

    def on_validate(self, epoch):
        self.progress.update(self.task, status="validating...")

    def on_epoch_end(self, record):
        recall = record.get("val_mean_recall")
        text = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
        if recall is not None:
            text += (f", val mean recall {recall:.2f} (i->t R@1 {record['val_image_to_text_R@1']:.1f}, "
                     f"t->i R@1 {record['val_text_to_image_R@1']:.1f})")
        if record.get("replaced_samples"):
            text += f", {record['replaced_samples']} unloadable sample(s) replaced"
        self.progress.console.print(text)

    def on_cache_progress(self, done: int, total: int):
        if self.cache_task is None:
            self.cache_task = self.progress.add_task("caching decoded images", total=total, status="")
        self.progress.update(self.cache_task, completed=done)
        if done >= total:  # built: on_start's line says how long it took, and the bar would stay for the whole run
            self.progress.remove_task(self.cache_task)
            self.cache_task = None  # a second cache (a teacher's features, then the decoded images) gets its own bar

    def on_checkpoint(self, path: Path):
        pass

    def on_notice(self, message: str):
        warn(message)

    def on_replaced_sample(self, message: str, total: int):
        if total <= SHOWN_REPLACEMENTS:
            warn(f"{message}; another sample took its place")
        elif total == SHOWN_REPLACEMENTS + 1:
            warn("more training images failed to load; each epoch's line and history.jsonl count them")


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} images/s" if task.speed else "")


class CountProgress:
    """A (done, total) callback for encoding images (evaluation, indexing); `rate` adds images/s."""

    def __init__(self, description: str, rate: bool = False):
        self.progress = _progress()
        if rate:
            self.progress.columns = (*self.progress.columns[:3], _Rate(), *self.progress.columns[3:])
        self.description = description
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, status="")
        self.progress.update(self.task, completed=done)
