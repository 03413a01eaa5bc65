"""The names of the files in a run folder, the atomic writes every one of them goes through, and the lock
that keeps two commands out of one folder.

No torch here: the CLI and the ONNX runtime use these without loading PyTorch.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, ConfigError, SaveError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = ".lock"
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


def check_writable(folder: Path, fix: str = "choose another folder") -> None:
    """Create `folder` if needed and prove a file can be made in it, before hours of work depend on it. The
    probe is created exclusively under a fresh name, so a link planted in the folder is never written through."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write there ({exc.strerror}); {fix}") from None


def _lock(fd: int, wait: bool) -> bool:
    """Take the exclusive lock on an open file; False when another process holds it and `wait` is off."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
        except OSError:  # a file system without locks (some network mounts): run unlocked rather than not at all
            return True
    try:
        import msvcrt
    except ImportError:  # neither flock nor msvcrt: run unlocked rather than not at all
        return True
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # LK_LOCK gives up after 10 s; poll instead
            return True
        except OSError:
            if not wait:
                return False
            time.sleep(0.5)


@contextmanager
def lock_folder(folder: Path, command: str, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `folder`'s one lock (FOLDER/.lock) for the `with` block, so two miniclip commands never write one
    folder at once. A held lock raises BusyError naming the holder's PID and command; with `waiting`, it is
    called with the holder ('PID N (miniclip COMMAND)') instead and the lock is waited for.

    An advisory flock: the OS drops it when the holder exits or is killed, so no lock ever goes stale, and the
    file itself stays (removing it would let a waiting process lock a file nobody else sees)."""
    folder = Path(folder)
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a .lock planted as a link to a file elsewhere must not be opened, let alone truncated.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SaveError(f"{path}: is a symbolic link; miniclip writes through no link, remove it") from None
        raise SaveError(f"{path}: cannot create the folder's lock ({exc.strerror}); choose another folder") from None
    locked = False
    try:
        if not _lock(fd, wait=False):
            holder = _holder(fd)
            if waiting is None:
                raise BusyError(f"{folder} is in use by {holder}; wait for it to finish or use another folder")
            waiting(holder)
            _lock(fd, wait=True)
        locked = True
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} miniclip {command}\n".encode())
        yield
    finally:
        if locked:  # a process that locks after this one sees no PID rather than a stale one
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'PID N (miniclip COMMAND)' from the lock file, as its holder wrote it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, _, command = os.read(fd, 200).decode().strip().partition(" ")
    except (OSError, UnicodeDecodeError):  # Windows bars reading a locked byte
        pid = ""
    return f"PID {pid} ({command})" if pid.isdigit() else "another process"


def new_run_folder(name: str) -> Path:
    """artifacts/runs/NAME, or NAME-2, NAME-3, ... when taken: where a run goes without --out."""
    base = Path("artifacts") / "runs" / name
    candidate, n = base, 1
    while (candidate / CONFIG).exists():
        n += 1
        candidate = base.with_name(f"{name}-{n}")
    return candidate


def latest_run_folder(name: str) -> Path:
    """The run of dataset NAME under artifacts/runs whose resume file is newest: what --resume without --out continues."""
    runs = [p for p in (Path("artifacts") / "runs").glob(f"{name}*") if (p / RESUME).is_file()]
    if not runs:
        raise ConfigError(f"--resume: no resumable run for '{name}' under artifacts/runs; pass --out RUN_FOLDER")
    return max(runs, key=lambda p: (p / RESUME).stat().st_mtime)


RUN_FILES = (CONFIG, TOKENIZER, BEST, LAST, RESUME, HISTORY)  # what --overwrite removes


def clear_run(run: Path) -> None:
    """--overwrite: remove the files a run folder holds (and its export), nothing else."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "onnx", ignore_errors=True)
