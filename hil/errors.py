"""Exceptions that carry a message meant for the user (printed without a traceback by the CLI)."""


class HilError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(HilError, ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    The message names the source (file or command line), the key and what is allowed.
    """

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class DivergenceError(HilError, FloatingPointError):
    """A simulated state or loss became non-finite."""
