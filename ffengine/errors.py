"""Exception hierarchy of ffengine.

Every error a user can cause derives from :class:`FFEngineError`; the CLI catches that base
class, prints one line and exits 1. Messages say what failed, what was received, what was
expected and how to fix it.
"""


class FFEngineError(Exception):
    """Base class of every error ffengine raises on purpose."""


class DataError(FFEngineError):
    """A shard, index or image is missing, malformed or inconsistent."""


class ManifestMismatchError(FFEngineError):
    """A run, index or result directory does not match the manifest it is used with."""


class BackendUnavailableError(FFEngineError):
    """A compute backend asked for by name cannot run here."""


class ConfigError(FFEngineError):
    """An option or argument has an invalid value."""
