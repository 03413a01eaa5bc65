"""Inference behind one interface, over PyTorch or ONNX Runtime.

This module imports neither torch nor torchvision at load time: the ONNX path runs on onnxruntime,
tokenizers, pillow and numpy alone, for devices without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .data.pixels import eval_pixels
from .errors import CheckpointError, ConfigError
from .run_files import CONFIG, TOKENIZER
from .tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (done, total)
BACKENDS = ("auto", "torch", "onnx", "onnx-fp32")  # "onnx" is the int8 deployment model
ONNX_DIR, METADATA = "onnx", "metadata.json"
ONNX_FILES = {"fp32": ("image.fp32.onnx", "text.fp32.onnx"), "int8": ("image.int8.onnx", "text.int8.onnx")}


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


BROKEN_FIX = "its weights are broken: retrain, e.g. with a lower --lr"


def check_features(features: np.ndarray, what: str, distinct: bool = False) -> np.ndarray:
    """`features` (n d, one row per `what`: "images", "captions"), refused when a result from them could not
    be right: any non-finite value, or with `distinct`, every row the same (a collapsed model)."""
    broken = int((~np.isfinite(features)).any(axis=-1).sum())
    if broken:
        raise CheckpointError(f"the model gives non-finite features for {broken} of {len(features)} {what}; {BROKEN_FIX}")
    # Features are unit length, so 1e-6 is float rounding, not a difference the model made.
    if distinct and len(features) > 1 and np.ptp(features, axis=0).max() <= 1e-6:
        raise CheckpointError(f"the model gives the same feature for all {len(features)} {what}: it has collapsed "
                              "and any score would be chance; retrain, e.g. with a lower --lr or more data")
    return features


class Encoder:
    """Turns image files and captions into unit-length features in the shared space.

    Subclasses provide encode_pixels (b 3 s s float32 -> b d) and encode_tokens (ids, lengths -> b d)."""

    image_size: int
    mean: tuple
    std: tuple
    context_length: int
    logit_scale: float
    tokenizer: Tokenizer
    backend: str  # as --backend names it

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode_tokens(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pixels(self, paths: list[Path]) -> np.ndarray:
        # PIL releases the GIL while decoding and resizing, so threads overlap the image work.
        with ThreadPoolExecutor(max_workers=4) as pool:
            return np.stack(list(pool.map(lambda p: eval_pixels(p, self.image_size, self.mean, self.std), paths)))

    def encode_images(self, paths: list[Path], batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        features = []
        for start in range(0, len(paths), batch_size):
            features.append(self.encode_pixels(self.pixels(paths[start:start + batch_size])))
            if progress:
                progress(min(start + batch_size, len(paths)), len(paths))
        return np.concatenate(features) if features else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Batches of alike length, each padded to its own longest: 2.0x faster than batches in the given order
        on 5,000 Flickr captions (scripts/bench_text.py)."""
        if not texts:
            return np.zeros((0, 0), np.float32)
        ids, lengths = self.tokenizer.encode(texts, self.context_length)
        order = np.argsort(lengths, kind="stable")
        features = [self.encode_tokens(ids[batch, : lengths[batch[-1]]], lengths[batch])
                    for batch in np.array_split(order, range(batch_size, len(order), batch_size))]
        return np.concatenate(features)[np.argsort(order)]

    def caption_probabilities(self, image: Path, captions: list[str]) -> list[float]:
        """Softmax over the captions of the scaled cosine similarities with the image."""
        return self.pixel_probabilities(self.pixels([image]), captions)

    def pixel_probabilities(self, pixels: np.ndarray, captions: list[str], text_features: np.ndarray | None = None
                            ) -> list[float]:
        """caption_probabilities for one image already decoded to pixels (1 3 s s), e.g. an upload;
        text_features: encode_texts(captions) when the caller kept it from an earlier call."""
        image_features = check_features(self.encode_pixels(pixels), "images")
        if text_features is None:
            text_features = self.encode_texts(captions)
        logits = self.logit_scale * image_features @ check_features(text_features, "captions").T  # 1 c
        logits = logits[0] - logits[0].max()
        probabilities = np.exp(logits) / np.exp(logits).sum()
        if not np.isfinite(probabilities).all():
            raise CheckpointError(f"the model's logit scale {self.logit_scale} gives non-finite probabilities; {BROKEN_FIX}")
        return probabilities.astype(float).tolist()


class TorchEncoder(Encoder):
    """A MiniCLIP model in PyTorch (torch is imported only when one is made)."""

    backend = "torch"

    def __init__(self, model, tokenizer: Tokenizer, mean, std, device=None, precision: str = "fp32"):
        import torch

        from .device import autocast_dtype

        self.torch, self.model, self.tokenizer = torch, model, tokenizer
        self.device = device or next(model.parameters()).device
        self.image_size, self.mean, self.std = model.config.image_size, tuple(mean), tuple(std)
        self.context_length = model.config.context_length
        self.amp = autocast_dtype(self.device, precision)
        self.logit_scale = float(model.scale().detach())

    def _run(self, fn, *arrays) -> np.ndarray:
        torch = self.torch
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = fn(*(torch.from_numpy(a).to(self.device) for a in arrays))
        return out.float().cpu().numpy()

    def encode_pixels(self, pixels):
        return self._run(self.model.encode_image, pixels)

    def encode_tokens(self, ids, lengths):
        return self._run(self.model.encode_text, ids, lengths)


def onnx_providers() -> list[str]:
    """CUDA, then CoreML, when this onnxruntime build has them; the CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider") if p in available] + ["CPUExecutionProvider"]


def onnx_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Measured on 2 cores: full graph optimisation 1.5x faster than none at batch 1; no spinning
    # 1.7x faster when the image and text sessions share the cores.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=onnx_providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types for bad files
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:100]}); "
                              "re-export with `miniclip quantize`") from None


# Bounds far beyond any model this toolkit trains: past them a crafted metadata.json would make the runtime
# allocate absurd buffers before any check of the graphs could fail.
METADATA_MAX_BYTES = 1_000_000
METADATA_INTS = {"image_size": 4096, "context_length": 4096, "embed_dim": 65536, "vocab_size": 10_000_000}


def _quantize_hint(folder: Path) -> str:
    """How to rebuild an export: from its run when the folder is RUN/onnx, else from the run it was copied from."""
    if folder.name == ONNX_DIR and (folder.parent / CONFIG).is_file():
        return f"`miniclip quantize {folder.parent}`"
    return "`miniclip quantize RUN` on the run folder it was exported from"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metadata_fault(meta) -> str | None:
    """What is wrong with a parsed metadata.json, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, most in METADATA_INTS.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            return f"{key} must be a whole number from 1 to {most}, got {value!r:.40}"
    for key in ("mean", "std"):
        value = meta.get(key)
        if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
            return f"{key} must be 3 finite numbers (one per colour channel), got {value!r:.60}"
    if not all(v > 0 for v in meta["std"]):
        return f"std must be positive (the pixels are divided by it), got {meta['std']}"
    if not _is_number(meta.get("logit_scale")) or meta["logit_scale"] <= 0:
        return f"logit_scale must be a finite positive number, got {meta.get('logit_scale')!r:.40}"
    templates = meta.get("templates", [])
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        return f"templates must be a list of prompts with {{}} for the class name, got {templates!r:.60}"
    name = meta.get("tokenizer", TOKENIZER)
    # A plain file name only: a crafted export must not make the runtime read files outside its folder.
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        return f"tokenizer must be a file name inside the export's folder, such as tokenizer.json, got {name!r:.60}"
    return None


def read_metadata(folder: Path) -> dict:
    """The checked metadata.json of an exported model folder."""
    path = folder / METADATA
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; export the run first with `miniclip quantize {folder.parent}`")
    if path.stat().st_size > METADATA_MAX_BYTES:
        fault = f"{path.stat().st_size} bytes, where an export writes a few thousand"
    else:
        try:
            fault = _metadata_fault(meta := json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the recursion limit
            fault = f"not readable JSON ({str(exc)[:60] or type(exc).__name__})"
    if fault:
        raise CheckpointError(f"{path}: {fault}; re-export with {_quantize_hint(folder)}")
    return meta


class OnnxEncoder(Encoder):
    """The exported encoders in `RUN/onnx/`: image.{fp32,int8}.onnx, text.*.onnx, metadata.json, tokenizer.json."""

    def __init__(self, folder: Path, precision: str = "int8", threads: int = 0):
        folder = Path(folder)
        meta = read_metadata(folder)
        self.backend = "onnx" if precision == "int8" else "onnx-fp32"
        self.templates = tuple(meta.get("templates", ()))  # the run's zero-shot prompts; older exports lack them
        self.image_size, self.context_length, self.embed_dim = meta["image_size"], meta["context_length"], meta["embed_dim"]
        self.mean, self.std, self.logit_scale = tuple(meta["mean"]), tuple(meta["std"]), float(meta["logit_scale"])
        tokenizer_path = folder / meta.get("tokenizer", TOKENIZER)
        self.tokenizer = Tokenizer.load(tokenizer_path)
        recorded = meta.get("tokenizer_sha256")  # exports from before it was recorded are taken as they are
        if recorded and recorded != hashlib.sha256(tokenizer_path.read_bytes()).hexdigest():
            raise CheckpointError(f"{tokenizer_path}: not the tokenizer this model was exported with (its sha256 "
                                  "differs from the one metadata.json records); re-export with `miniclip quantize`")
        if self.tokenizer.vocab_size != meta["vocab_size"]:
            raise CheckpointError(f"{tokenizer_path}: {self.tokenizer.vocab_size} tokens but metadata says "
                                  f"{meta['vocab_size']}; re-export with {_quantize_hint(folder)}")
        image_file, text_file = ONNX_FILES[precision]
        self.files = (folder / image_file, folder / text_file)
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; re-export with {_quantize_hint(folder)}")
        self.image_session, self.text_session = onnx_session(self.files[0], threads), onnx_session(self.files[1], threads)
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The graphs must take what the metadata promises, or every result would be silently wrong."""
        image_input = self.image_session.get_inputs()[0].shape  # ['batch', 3, s, s]
        output = self.image_session.get_outputs()[0].shape
        if list(image_input[1:]) != [3, self.image_size, self.image_size] or output[-1] != self.embed_dim:
            raise CheckpointError(f"{self.files[0]}: takes {image_input} and gives {output}, but metadata.json says "
                                  f"{self.image_size} px and {self.embed_dim}-d features; re-export with `miniclip quantize`")

    def encode_pixels(self, pixels):
        return self.image_session.run(None, {"images": pixels.astype(np.float32)})[0]

    def encode_tokens(self, ids, lengths):
        return self.text_session.run(None, {"tokens": ids, "lengths": lengths})[0]


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is an exported model (RUN/onnx, or a copy of it) rather than a run folder."""
    return (Path(folder).expanduser() / METADATA).is_file()


def check_run_folder(run: str | Path) -> Path:
    run = Path(run).expanduser()
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder; pass the --out folder of `miniclip train`")
    return run


def open_encoder(run: str | Path, backend: str = "auto", which: str = "best", device: str = "auto",
                 precision: str = "fp32") -> Encoder:
    """The encoder for a run folder or an exported one. backend "torch" loads the run's safetensors weights;
    "onnx" (int8) and "onnx-fp32" load RUN/onnx/ without importing PyTorch; "auto" is "onnx" for an exported
    folder (copied to a device on its own), else "torch"."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not known; use one of: {', '.join(BACKENDS)}")
    if which not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {which!r}")
    run = Path(run).expanduser()
    if is_export(run):
        if backend == "torch":
            raise CheckpointError(f"{run}: is an exported ONNX model, without PyTorch weights: those are in the run "
                                  "folder it was exported from; pass that folder, or use --backend onnx")
        return OnnxEncoder(run, "fp32" if backend == "onnx-fp32" else "int8")
    check_run_folder(run)
    if backend in ("onnx", "onnx-fp32"):
        return OnnxEncoder(run / ONNX_DIR, "int8" if backend == "onnx" else "fp32")
    from .checkpoint import load_run
    from .device import pick_device

    model, config, tokenizer = load_run(run, which)
    torch_device = pick_device(device)
    return TorchEncoder(model.to(torch_device), tokenizer, config.data.mean, config.data.std, torch_device, precision)
