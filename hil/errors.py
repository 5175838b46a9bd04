"""Exceptions that carry a message meant for the user (printed without a traceback by the CLI)."""

from sims.schema import ConfigError as SchemaConfigError


class HilError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(HilError, SchemaConfigError):
    """A configuration value is missing, of the wrong type or out of range.

    The message names the source (file or command line), the key and what is allowed. The same
    type as the world-file and simulated-chip errors of ``sims`` (:class:`sims.schema.ConfigError`,
    its base), so one ``except`` catches every configuration error.
    """

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        SchemaConfigError.__init__(self, key, message, source)


class DivergenceError(HilError, FloatingPointError):
    """A simulated state or loss became non-finite."""
