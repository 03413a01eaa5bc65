"""Rich tables of results."""

from __future__ import annotations

from rich.table import Table

from ..metrics import RECALL_KS


def retrieval_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("direction")
    for k in RECALL_KS:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("mean rank", justify="right")
    table.add_column("median rank", justify="right")
    for name, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        table.add_row(label, *(f"{metrics[f'{name}_R@{k}']:.2f}" for k in RECALL_KS),
                      f"{metrics[f'{name}_mean_rank']:.1f}", f"{metrics[f'{name}_median_rank']:.0f}")
    table.caption = (f"mean recall {metrics['mean_recall']:.2f}  ·  {metrics['images']} images, "
                     f"{metrics['captions']} captions")
    return table


def zero_shot_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("top-1 recall %", justify="right")
    for name, recall in metrics["per_class"].items():
        table.add_row(name, f"{recall:.1f}")
    return table


def zero_shot_summary(metrics: dict) -> str:
    """One or two lines under the per-class table; too wide for a Rich caption, which wraps to the table."""
    text = (f"top-1 {metrics['top1']:.2f}%  ·  top-5 {metrics['top5']:.2f}%  ·  mean per-class recall "
            f"{metrics['mean_per_class_recall']:.2f}%  ·  {metrics['zero_shot_images']} images, {metrics['classes']} classes")
    if "held_out_top1" in metrics:
        text += (f"\nheld-out classes {metrics['held_out_top1']:.2f}% vs chance {metrics['chance']:.2f}%  ·  "
                 f"classes seen in training {metrics['seen_top1']:.2f}%")
    return text


def probability_table(captions: list[str], probabilities: list[float]) -> Table:
    table = Table()
    table.add_column("caption")
    table.add_column("probability", justify="right")
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    for i, (caption, p) in enumerate(zip(captions, probabilities)):
        style = "bold green" if i == best else None
        table.add_row(caption, f"{100 * p:.1f}%", style=style)
    return table
