"""Inference behind one interface, over PyTorch or ONNX Runtime.

This module imports neither torch nor torchvision at load time: the ONNX path runs on onnxruntime,
tokenizers, pillow and numpy alone, for devices without PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .data.pixels import eval_pixels
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (done, total)
BACKENDS = ("torch", "onnx", "onnx-fp32")  # "onnx" is the int8 deployment model
ONNX_DIR, METADATA = "onnx", "metadata.json"
ONNX_FILES = {"fp32": ("image.fp32.onnx", "text.fp32.onnx"), "int8": ("image.int8.onnx", "text.int8.onnx")}


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Encoder:
    """Turns image files and captions into unit-length features in the shared space.

    Subclasses provide encode_pixels (b 3 s s float32 -> b d) and encode_tokens (ids, lengths -> b d)."""

    image_size: int
    mean: tuple
    std: tuple
    context_length: int
    logit_scale: float
    tokenizer: Tokenizer

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
        features = []
        for start in range(0, len(texts), batch_size):
            ids, lengths = self.tokenizer.encode(texts[start:start + batch_size], self.context_length)
            features.append(self.encode_tokens(ids, lengths))
        return np.concatenate(features) if features else np.zeros((0, 0), np.float32)

    def caption_probabilities(self, image: Path, captions: list[str]) -> list[float]:
        """Softmax over the captions of the scaled cosine similarities with the image."""
        return self.pixel_probabilities(self.pixels([image]), captions)

    def pixel_probabilities(self, pixels: np.ndarray, captions: list[str], text_features: np.ndarray | None = None
                            ) -> list[float]:
        """caption_probabilities for one image already decoded to pixels (1 3 s s), e.g. an upload;
        text_features: encode_texts(captions) when the caller kept it from an earlier call."""
        image_features = self.encode_pixels(pixels)
        if text_features is None:
            text_features = self.encode_texts(captions)
        logits = self.logit_scale * image_features @ text_features.T  # 1 c
        logits = logits[0] - logits[0].max()
        probabilities = np.exp(logits) / np.exp(logits).sum()
        return probabilities.astype(float).tolist()


class TorchEncoder(Encoder):
    """A MiniCLIP model in PyTorch (torch is imported only when one is made)."""

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
    # Measured on 2 cores (issue 3): full graph optimisation 1.5x faster than none at batch 1; no spinning
    # 1.7x faster when the image and text sessions share the cores.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=onnx_providers())
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types for bad files
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:100]}); "
                              "re-export with `miniclip quantize`") from None


class OnnxEncoder(Encoder):
    """The exported encoders in `RUN/onnx/`: image.{fp32,int8}.onnx, text.*.onnx, metadata.json, tokenizer.json."""

    def __init__(self, folder: Path, precision: str = "int8", threads: int = 0):
        folder = Path(folder)
        meta_path = folder / METADATA
        if not meta_path.is_file():
            raise CheckpointError(f"{meta_path}: missing; export the run first with `miniclip quantize {folder.parent}`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.image_size, self.context_length = int(meta["image_size"]), int(meta["context_length"])
            self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
            self.logit_scale, self.embed_dim = float(meta["logit_scale"]), int(meta["embed_dim"])
            vocab_size = int(meta["vocab_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{meta_path}: unreadable metadata ({exc}); re-export with `miniclip quantize`") from None
        self.tokenizer = Tokenizer.load(folder / meta.get("tokenizer", "tokenizer.json"))
        if self.tokenizer.vocab_size != vocab_size:
            raise CheckpointError(f"{folder / 'tokenizer.json'}: {self.tokenizer.vocab_size} tokens but metadata says "
                                  f"{vocab_size}; re-export with `miniclip quantize`")
        image_file, text_file = ONNX_FILES[precision]
        self.files = (folder / image_file, folder / text_file)
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; re-export with `miniclip quantize {folder.parent}`")
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


def open_encoder(run: str | Path, backend: str = "torch", which: str = "best", device: str = "auto",
                 precision: str = "fp32") -> Encoder:
    """The encoder for a run folder. backend "torch" loads the safetensors weights; "onnx" (int8) and
    "onnx-fp32" load RUN/onnx/ without importing PyTorch."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not known; use one of: {', '.join(BACKENDS)}")
    if which not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {which!r}")
    if backend != "torch":
        return OnnxEncoder(Path(run).expanduser() / ONNX_DIR, "int8" if backend == "onnx" else "fp32")
    from .checkpoint import load_run
    from .device import pick_device

    model, config, tokenizer = load_run(run, which)
    torch_device = pick_device(device)
    return TorchEncoder(model.to(torch_device), tokenizer, config.data.mean, config.data.std, torch_device, precision)
