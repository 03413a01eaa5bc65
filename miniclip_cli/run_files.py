"""The names of the files in a run folder, and the atomic writes every one of them goes through.

No torch here: the CLI and the ONNX runtime use these without loading PyTorch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CONFIG, TOKENIZER, BEST, LAST, RESUME, HISTORY = (
    "config.json", "tokenizer.json", "best.safetensors", "last.safetensors", "resume.safetensors", "history.jsonl")


TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new one.

    On any failure (a full disk included) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of atomic writes that never finished: a SIGKILL or a power cut skips the
    clean-up above. Only names atomic_write makes (.NAME.RANDOM.tmp) are touched."""
    for stale in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
