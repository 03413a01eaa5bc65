"""Typed errors. Library code raises these; only the CLI turns them into a line on stderr and an exit code.

Every message names the file (or value) at fault and the fix, in one line.
"""


class MiniclipError(Exception):
    """A user-facing error: bad input, not a bug. `exit_code` is what the CLI exits with."""

    exit_code = 1


class DataError(MiniclipError):
    """A dataset, caption file or image that cannot be used."""

    exit_code = 2


class ConfigError(MiniclipError):
    """An impossible or unknown configuration value."""

    exit_code = 3


class CheckpointError(MiniclipError):
    """A run folder whose config, tokenizer or weights are missing, corrupt or do not match."""

    exit_code = 4


class SaveError(CheckpointError):
    """A file that could not be written (disk full, folder removed, a planted link); its previous version is
    unchanged."""


class BusyError(MiniclipError):
    """A folder another miniclip process holds (run_files.lock_folder); nothing was changed."""

    exit_code = 9


class DeviceError(MiniclipError):
    """A requested device that this machine does not have."""

    exit_code = 5


class ThresholdError(MiniclipError):
    """A measured metric fell below the floor the user set (bench --min-metric)."""

    exit_code = 7


class DivergedError(MiniclipError):
    """Training produced a non-finite loss; the checkpoints from before it are unchanged."""

    exit_code = 8
