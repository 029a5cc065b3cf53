"""The library's exceptions. Each carries the exit code the CLI uses, so one handler serves all commands."""

from __future__ import annotations


class CtexpError(Exception):
    """Base class: a problem the user can fix; the message is one line saying what and how."""

    exit_code: int = 1


class ConfigError(CtexpError):
    """An invalid option, config file or value."""

    exit_code = 2


class StoreError(CtexpError):
    """A missing, corrupt or inconsistent activation store."""

    exit_code = 3


class SourceError(CtexpError):
    """An unreadable or malformed problem source (GSM8K JSONL and the like)."""

    exit_code = 4


class TokenizerError(CtexpError):
    """A tokenizer spec that cannot be loaded, or ids that do not fit the vocabulary."""

    exit_code = 5


class DataError(CtexpError):
    """Aligned data that cannot be trained on (no targets, an empty split)."""

    exit_code = 6


class TrainingDiverged(DataError):
    """Training went non-finite (a NaN or infinite loss): the data or the settings cannot be trained on."""

    exit_code = 11


class DeviceError(CtexpError):
    """A requested device that is not available."""

    exit_code = 7


class RegistryError(CtexpError):
    """The results database cannot be reached, is of another schema, or lacks the asked-for run."""

    exit_code = 8


class TrackingError(CtexpError):
    """The MLflow tracking server or store cannot be reached or refuses a write."""

    exit_code = 9


class ModelError(CtexpError):
    """A model checkpoint or base model directory that cannot be loaded or does not fit together."""

    exit_code = 10


class Interrupted(CtexpError):
    """A run stopped by Ctrl-C (exit 130) or SIGTERM (exit 143), after it was recorded as KILLED."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
