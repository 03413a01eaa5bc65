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
    match3 = "n/a (one image)" if metrics["match3_top1"] is None else f"{metrics['match3_top1']:.1f}%"
    table.caption = (f"mean recall {metrics['mean_recall']:.2f}  ·  3-way caption match "
                     f"{match3}  ·  {metrics['images']} images, "
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


def templates_line(templates: list[str]) -> str:
    return "templates: " + "  ·  ".join(repr(t) for t in templates)


def probability_table(captions: list[str], probabilities: list[float]) -> Table:
    table = Table()
    table.add_column("caption")
    table.add_column("probability", justify="right")
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    for i, (caption, p) in enumerate(zip(captions, probabilities)):
        style = "bold green" if i == best else None
        table.add_row(caption, f"{100 * p:.1f}%", style=style)
    return table


def export_table(report: dict) -> Table:
    table = Table(title="ONNX export checks")
    for column in ("comparison", "encoder", "max |diff|", "min cosine", "mean cosine"):
        table.add_column(column, justify="left" if column in ("comparison", "encoder") else "right")
    for comparison in ("fp32_vs_torch", "int8_vs_fp32"):
        for tower in ("image", "text"):
            c = report["checks"][comparison][tower]
            table.add_row(comparison.replace("_", " "), tower, f"{c['max_abs_diff']:.2e}", f"{c['min_cosine']:.5f}",
                          f"{c['mean_cosine']:.5f}")
    sizes = report["size_mb"]
    table.caption = (f"on {report['checks']['images']} images and {report['checks']['captions']} captions  ·  "
                     f"size fp32 {sizes['fp32']:.2f} MB, int8 {sizes['int8']:.2f} MB")
    return table


def accuracy_change_table(accuracy: dict) -> Table:
    table = Table(title="accuracy: ONNX fp32 vs int8")
    table.add_column("metric")
    for name in ("fp32", "int8", "int8_minus_fp32"):
        table.add_column(name.replace("_", " "), justify="right")
    for key in accuracy["fp32"]:
        table.add_row(key, *(f"{accuracy[n][key]:+.2f}" if n == "int8_minus_fp32" else f"{accuracy[n][key]:.2f}"
                             for n in ("fp32", "int8", "int8_minus_fp32")))
    return table


def _ms(t: dict) -> str:
    """Median, then half the p10-p90 range as the spread."""
    return f"{t['median_ms']:.2f} ±{(t['p90_ms'] - t['p10_ms']) / 2:.2f}"


def bench_tables(rows: list[dict], machine: dict) -> list[Table]:
    """Speed in one table, accuracy (when measured) in a second: together they would not fit 80 columns."""
    speed = Table(title="miniclip bench: median ms ± half the p10-p90 range")
    for column in ("backend", "size MB", "image ms", "caption ms", "1 img + 3 caps ms", "img/s @64", "speed-up"):
        speed.add_column(column, justify="left" if column == "backend" else "right", no_wrap=column == "backend")
    for r in rows:
        if "error" in r:  # why is said under the table (bench_unavailable), where it reads on one line
            speed.add_row(r["row"], *["-"] * 6, style="dim")
            continue
        speedup = f"{r['speedup_demo']:.2f}x" if "speedup_demo" in r else "-"  # no PyTorch row to compare with
        speed.add_row(r["row"], f"{r['size_mb']:.2f}", _ms(r["image_ms"]), _ms(r["caption_ms"]), _ms(r["demo_ms"]),
                      f"{r['images_per_s']:.0f}", speedup)
    speed.caption = f"{machine['cpu']} · {', '.join(machine['extensions']) or 'no AVX2'} · {machine['threads']} threads"
    measured = [r for r in rows if r.get("accuracy")]
    if not measured:
        return [speed]
    keys = list(measured[0]["accuracy"])
    accuracy = Table(title="accuracy (%)")
    accuracy.add_column("metric")
    for r in measured:
        accuracy.add_column(r["row"], justify="right")
    for key in keys:
        accuracy.add_row(key, *(f"{r['accuracy'][key]:.2f}" for r in measured))
    return [speed, accuracy]


def bench_unavailable(rows: list[dict]) -> list[str]:
    """One line per row that could not run, saying why."""
    return [f"{r['row']} cannot run: {r['error']}" for r in rows if "error" in r]


def train_bench_table(result: dict) -> Table:
    table = Table(title=f"training step, batch {result['batch_size']}, median of {result['steps']} ({result['device']})")
    for column in ("way", "precision", "caption padding", "step ms", "pairs/s"):
        table.add_column(column, justify="left" if column in ("way", "precision", "caption padding") else "right")
    for way in ("plain", "fast_eager", "fast"):
        if way not in result:
            continue
        r = result[way]
        padding = "full context" if r["text_padding"] == "max" else "batch's longest"
        compiled = f" + compile ({r['compile_seconds']:.0f} s)" if r["compiled"] else ""
        table.add_row(way.replace("_", ", "), r["precision"] + compiled, padding, f"{r['step_ms']:.0f}", f"{r['pairs_per_s']:.1f}")
    compiled = f"compiled / eager = {result['compile_speedup']:.2f}x  ·  " if "compile_speedup" in result else ""
    table.caption = (f"fast / plain = {result['speedup']:.2f}x  ·  {compiled}data path {result['data_pairs_per_s']:.0f} pairs/s "
                     f"(from {result['data_source']})  ·  "
                     f"mean caption {result['mean_caption_tokens']:.1f} tokens  ·  peak memory {result['fast']['peak_rss_mb']:.0f} MB "
                     f"(fast), {result['plain']['peak_rss_mb_process']:.0f} MB (process)")
    return table
