"""The project's exception types.

Every error a user can cause (bad config value, missing dataset, wrong checkpoint) is raised as a
subclass of :class:`KdlabError` with a one-line message that says what to fix. The CLI turns these
into a one-line message and a non-zero exit code, never a traceback (unless ``--debug``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointError", "ConfigError", "DatasetError", "KdlabError", "MethodError", "ModelError",
    "NonFiniteLossError", "PluginError", "RunError", "RunInterrupted",
]


class KdlabError(Exception):
    """Base class of every error kdlab raises on purpose. ``exit_code`` is the CLI's exit status."""

    exit_code: int = 2


class ConfigError(KdlabError):
    """A configuration key is unknown, or a value has the wrong type or is out of range."""


class DatasetError(KdlabError):
    """A dataset is missing, truncated, corrupt, or in the wrong format."""


class CheckpointError(KdlabError):
    """A checkpoint is missing, corrupt, or does not fit the model (architecture or class count)."""


class ModelError(KdlabError):
    """An unknown model name or an impossible model configuration."""


class MethodError(KdlabError):
    """An unknown distillation method or hyperparameters that cannot work with the given models."""


class PluginError(KdlabError):
    """A plugin module (``--plugin`` or the config's ``plugins:``) cannot be found or imported."""


class RunError(KdlabError):
    """A run directory is unusable (holds a different run, cannot be written, ...)."""


class NonFiniteLossError(KdlabError):
    """A loss term became NaN or infinite during training."""

    exit_code = 3


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send).

    Derives from :class:`KeyboardInterrupt`, so every layer treats both signals as Ctrl-C: the
    trainer marks the run "interrupted" (after a step checkpoint when those are enabled), and
    the CLI prints one line and exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by signal ``signum``."""
        return 128 + self.signum
