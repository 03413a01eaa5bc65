"""ONNX export of the two encoders, int8 dynamic quantisation, and the parity checks between them.

RUN/onnx/ then holds a complete deployable model: image.{fp32,int8}.onnx, text.{fp32,int8}.onnx,
tokenizer.json and metadata.json (what preprocessing and tokenising need), usable without PyTorch.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_run, tokenizer_sha256
from .errors import CheckpointError
from .model import MiniCLIP
from .run_files import TOKENIZER, atomic_write
from .runtime import METADATA, ONNX_DIR, ONNX_FILES, OnnxEncoder, TorchEncoder, check_features

OPSET = 17
# fp32 ONNX must reproduce PyTorch up to float rounding; int8 only approximately.
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_MEAN_COSINE = 0.95


class _ImageEncoder(torch.nn.Module):
    def __init__(self, model: MiniCLIP):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode_image(images)


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: MiniCLIP):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths):
        return self.model.encode_text(tokens, lengths)


def _export_fp32(model: MiniCLIP, folder: Path) -> None:
    c = model.config
    image_file, text_file = ONNX_FILES["fp32"]
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and about traced shape arithmetic; the
        # parity check below is what tells whether the graph is right.
        warnings.simplefilter("ignore")
        # The wrappers are put in eval mode too: the exporter restores each wrapper's mode afterwards, and a
        # new module is in training mode, which would switch on the model's dropout and stochastic depth.
        torch.onnx.export(_ImageEncoder(model).eval(), (torch.zeros(2, 3, c.image_size, c.image_size),), str(folder / image_file),
                          input_names=["images"], output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        tokens = torch.ones(2, min(8, c.context_length), dtype=torch.long)
        torch.onnx.export(_TextEncoder(model).eval(), (tokens, torch.tensor([tokens.shape[1], 3])), str(folder / text_file),
                          input_names=["tokens", "lengths"], output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"tokens": {0: "batch", 1: "length"}, "lengths": {0: "batch"},
                                        "features": {0: "batch"}})


def _quantise(folder: Path, convolutions: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger for every model
    try:
        # Signed int8 weights ran 1.5-2x faster than unsigned on 2 cores (docs/benchmarks.md); per-channel changed nothing.
        for source, target in zip(ONNX_FILES["fp32"], ONNX_FILES["int8"]):
            # A pretrained CNN tower's convolutions lose too much to dynamic int8 (mean image cosine 0.875 on the
            # Flickr8k lit run): they stay fp32 and only its matrix products are quantised.
            ops = None if convolutions or not source.startswith("image") else ["MatMul", "Gemm"]
            quantize_dynamic(folder / source, folder / target, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    finally:
        root.setLevel(level)


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean())}


def export_run(run: Path, image_paths: list[Path], captions: list[str], which: str = "best") -> dict:
    """Export, quantise and check RUN's model; on success replace RUN/onnx. Returns the checks and sizes.

    `image_paths` and `captions` are the real inputs the exported graphs are checked on."""
    run = Path(run)
    model, config, tokenizer = load_run(run, which)
    model = model.float().eval()
    # A model with broken weights is refused before exporting: the quantiser would fail on it with a bare assert.
    reference = TorchEncoder(model, tokenizer, config.data.mean, config.data.std, torch.device("cpu"), "fp32")
    pixels = reference.pixels(image_paths)
    ids, lengths = tokenizer.encode(captions, config.model.context_length)
    reference_outputs = (check_features(reference.encode_pixels(pixels), "images"),
                         check_features(reference.encode_tokens(ids, lengths), "captions"))
    # Fresh names made exclusively: a fixed one could be a planted link or a leftover of a killed export.
    staging = Path(tempfile.mkdtemp(dir=run, prefix=f".{ONNX_DIR}-staging-"))
    try:
        _export_fp32(model, staging)
        atomic_write(staging / TOKENIZER, lambda tmp: shutil.copyfile(run / TOKENIZER, tmp))
        metadata = {
            "format": "miniclip-onnx/1", "source_checkpoint": which, "opset": OPSET,
            "image_size": config.model.image_size, "mean": list(config.data.mean), "std": list(config.data.std),
            "context_length": config.model.context_length, "vocab_size": config.model.vocab_size,
            "embed_dim": config.model.embed_dim, "logit_scale": float(model.scale().detach()),
            "tokenizer": TOKENIZER, "tokenizer_sha256": tokenizer_sha256(run), "templates": list(config.data.templates),
            "inputs": {"images": "float32 batch x 3 x size x size, normalised with mean/std",
                       "tokens": "int64 batch x length, <start> ... <end> then <pad>",
                       "lengths": "int64 batch, tokens up to and including <end>"},
        }
        atomic_write(staging / METADATA, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2), encoding="utf-8"))
        _quantise(staging, config.model.vision == "vit")

        fp32, int8 = OnnxEncoder(staging, "fp32"), OnnxEncoder(staging, "int8")
        outputs = {"torch": reference_outputs, **{name: (enc.encode_pixels(pixels), enc.encode_tokens(ids, lengths))
                                                  for name, enc in (("fp32", fp32), ("int8", int8))}}
        checks = {
            "fp32_vs_torch": {"image": _compare(outputs["fp32"][0], outputs["torch"][0]),
                              "text": _compare(outputs["fp32"][1], outputs["torch"][1])},
            "int8_vs_fp32": {"image": _compare(outputs["int8"][0], outputs["fp32"][0]),
                             "text": _compare(outputs["int8"][1], outputs["fp32"][1])},
            "images": len(image_paths), "captions": len(captions),
        }
        # Written as `not within`, so that a NaN, which compares false both ways, fails.
        for tower in ("image", "text"):
            diff = checks["fp32_vs_torch"][tower]["max_abs_diff"]
            if not diff <= FP32_MAX_ABS_DIFF:
                raise CheckpointError(f"{staging / ONNX_FILES['fp32'][0 if tower == 'image' else 1]}: the {tower} encoder "
                                      f"differs from PyTorch by {diff:.2e} (tolerance {FP32_MAX_ABS_DIFF}); nothing was "
                                      "written, please report this with --debug")
            cosine = checks["int8_vs_fp32"][tower]["mean_cosine"]
            if not cosine >= INT8_MIN_MEAN_COSINE:
                raise CheckpointError(f"the int8 {tower} encoder keeps only {cosine:.3f} mean cosine to fp32 (needs "
                                      f"{INT8_MIN_MEAN_COSINE}); nothing was written, keep using the fp32 model")
        metadata["checks"] = checks
        atomic_write(staging / METADATA, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2), encoding="utf-8"))
        final = run / ONNX_DIR
        retired = Path(tempfile.mkdtemp(dir=run, prefix=f".{ONNX_DIR}-old-"))  # renamed over while empty
        if final.exists():
            final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = {name: sum((final / f).stat().st_size for f in files) / 1e6 for name, files in ONNX_FILES.items()}
    return {"folder": str(final), "checks": checks, "size_mb": sizes}
