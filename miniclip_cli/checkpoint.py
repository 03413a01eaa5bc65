"""The one owner of the run-folder format. Nothing here unpickles: weights are safetensors, the rest JSON.

A run folder holds:
  config.json          the RunConfig the model was built from
  tokenizer.json       the caption tokenizer
  best.safetensors     model weights with the best validation mean recall
  last.safetensors     model weights at the end of the latest epoch
  resume.safetensors   model + optimizer tensors and (in its metadata) the loop's counters, for --resume
  history.jsonl        one JSON record per epoch
Every file is written to a temporary name, flushed and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import RunConfig, load_run_config
from .errors import CheckpointError, SaveError
from .model import MiniCLIP
from .run_files import (
    BEST,
    CONFIG,
    HISTORY,
    LAST,
    RESUME,
    TOKENIZER,
    atomic_write,
    remove_stale_temporaries,
)
from .tokenizer import Tokenizer


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _save(path: Path, write) -> None:
    """atomic_write, with a failure (a full disk, the folder removed) as one SaveError naming the file.

    safetensors reports a full disk as SafetensorError, not OSError."""
    try:
        atomic_write(path, write)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:100]
        raise SaveError(f"{path}: could not be written ({reason}); the previous {path.name}, if any, is unchanged; "
                        "free disk space or choose another --out") from None


def tokenizer_sha256(run: Path) -> str:
    """The fingerprint of RUN/tokenizer.json that the weights record: token ids only mean something with the
    tokenizer that numbered them, and another one of the same size would load without complaint."""
    return hashlib.sha256((Path(run) / TOKENIZER).read_bytes()).hexdigest()


def save_weights(path: Path, model: MiniCLIP, tokenizer_hash: str | None = None) -> None:
    meta = {"tokenizer_sha256": tokenizer_hash} if tokenizer_hash else None
    _save(path, lambda tmp: save_file(_contiguous(model.state_dict()), str(tmp), metadata=meta))


def save_config(run: Path, config: RunConfig) -> None:
    _save(run / CONFIG, lambda tmp: tmp.write_text(config.to_json(), encoding="utf-8"))


def save_run_files(run: Path, config: RunConfig, tokenizer: Tokenizer) -> None:
    save_config(run, config)
    _save(run / TOKENIZER, lambda tmp: tmp.write_text(tokenizer.to_json(), encoding="utf-8"))


def save_resume(run: Path, model: MiniCLIP, optimizer: torch.optim.Optimizer, counters: dict,
                average: MiniCLIP | None = None, head: torch.nn.Module | None = None) -> None:
    """Model and optimizer tensors in one file, with the counters and optimizer groups in its metadata,
    so the weights and the counters can never come from two different moments. `average`: the moving
    average of the weights, when training keeps one (TrainConfig.ema); `head`: the training-only head of
    TrainConfig.image_ssl."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for prefix, extra in (("ema", average), ("head", head)):
        if extra is not None:
            tensors.update({f"{prefix}.{k}": v for k, v in extra.state_dict().items()})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"counters": json.dumps(counters), "param_groups": json.dumps(opt["param_groups"])}
    _save(run / RESUME, lambda tmp: save_file(_contiguous(tensors), str(tmp), metadata=meta))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; train the run first (`miniclip train --out {path.parent}`)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:80]}); "
                              "it is corrupt or not a miniclip checkpoint, restore it or retrain") from None


def read_resume_metadata(run: Path) -> tuple[dict, list]:
    """The loop counters and optimizer groups of RUN/resume.safetensors, from its header alone: cheap, so
    `train --resume` can refuse a bad file before it opens the dataset. Nothing is unpickled."""
    path = Path(run) / RESUME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; nothing to resume, start the run anew (`miniclip train --out {run}` "
                              "in an empty folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:80]}); "
                              "it is corrupt or not a miniclip checkpoint, restore it or retrain") from None
    try:
        counters, groups = json.loads(meta["counters"]), json.loads(meta["param_groups"])
        int(counters["step"]), float(counters["best_mean_recall"])
    except (KeyError, TypeError, ValueError):  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: has no training counters; it was not written by `miniclip train`") from None
    return counters, groups


def load_resume(run: Path, model: MiniCLIP, optimizer: torch.optim.Optimizer,
                average: MiniCLIP | None = None, head: torch.nn.Module | None = None) -> dict:
    path = run / RESUME
    remove_stale_temporaries(run)  # a run killed mid-write leaves its temporary file behind
    counters, groups = read_resume_metadata(run)
    tensors = _read_safetensors(path)
    for prefix, target in (("model", model), ("ema", average), ("head", head)):
        if target is not None:
            start = len(prefix) + 1
            _load_model_state(target, {k[start:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}, path)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not match the model ({exc}); start a new run") from None
    return counters


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, config.json says {tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{path}: weights do not match config.json ({detail}); "
                              "the folder mixes files from different runs, retrain or restore them together")
    model.load_state_dict(state)


def load_run_tokenizer(run: Path, config: RunConfig) -> Tokenizer:
    """The run's own tokenizer.json, checked against the vocabulary size config.json was trained with."""
    path = Path(run) / TOKENIZER
    if not path.is_file():
        # A newly trained tokenizer would not do: the weights only mean something with their own token ids.
        raise CheckpointError(f"{path}: missing; the weights need the tokenizer they were trained with: "
                              "restore it from a copy of the run, or retrain")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {tokenizer.vocab_size} tokens, but config.json's model "
                              f"has {config.model.vocab_size}; put back the tokenizer this run was trained with")
    return tokenizer


def load_run(run: str | Path, which: str = "best") -> tuple[MiniCLIP, RunConfig, Tokenizer]:
    """Rebuild a trained model from its run folder: config first, then tokenizer, then weights."""
    run = Path(run).expanduser()
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder; pass the --out folder of `miniclip train`")
    config = load_run_config(run)
    tokenizer = load_run_tokenizer(run, config)
    model = MiniCLIP(config.model)
    weights = run / (BEST if which == "best" else LAST)
    if which == "best" and not weights.is_file() and (run / LAST).is_file():
        weights = run / LAST
    _load_model_state(model, _read_safetensors(weights), weights)
    check_tokenizer(run, weights)
    model.eval()
    return model, config, tokenizer


def check_tokenizer(run: Path, weights: Path) -> None:
    """RUN/tokenizer.json must be the one `weights` were trained with (runs saved before weights recorded it
    are taken as they are)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            recorded = (f.metadata() or {}).get("tokenizer_sha256")
    except (SafetensorError, OSError):
        return  # _read_safetensors has read it already; nothing more to learn here
    if recorded and recorded != tokenizer_sha256(run):
        raise CheckpointError(f"{Path(run) / TOKENIZER}: not the tokenizer {weights.name} was trained with (its "
                              "sha256 differs from the one the weights record); put back the run's own tokenizer.json")


def read_history(run: Path) -> list[dict]:
    path = Path(run) / HISTORY
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None and not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except (ValueError, AttributeError, RecursionError):
            raise CheckpointError(f"{path}: line {number} is damaged; restore the file from a copy of the run, or "
                                  "delete that line and the ones after it, then resume") from None
        if record is not None:
            records.append(record)
    return records


def write_history(run: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    _save(Path(run) / HISTORY, lambda tmp: tmp.write_text(text, encoding="utf-8"))
