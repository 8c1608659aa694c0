# -*- test-case-name: tests.test_config_errors -*-
"""
The configuration error family, for the loader, the validator and the CLI.

Every error carries the file (``path``), the dotted key path inside it (``key_path``, possibly
empty) and the ``problem`` text; ``str()`` of an error is the display line the CLI prints after
its ``✗ Config file not found:`` / ``✗ Parse error:`` / ``✗ Validation error:`` prefix.
"""

from __future__ import annotations

from typing import Optional


class ConfigError(Exception):
    """Base of every configuration failure; ``str()`` is the display string."""

    def __init__(self, path: str, key_path: str, problem: str) -> None:
        self.path = path
        self.key_path = key_path
        self.problem = problem
        super().__init__(self.display())

    def display(self) -> str:
        """The one-line message shown to the user."""
        return _join("Configuration error: " + self.path, self.key_path, self.problem)

    def __str__(self) -> str:
        return self.display()


class ConfigNotFound(ConfigError):
    """The named configuration file does not exist."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "", "Config file not found")

    def display(self) -> str:
        return f"Config file not found: {self.path}"


class ConfigParseError(ConfigError):
    """
    The file could not be read or is not HCL the gateway accepts.

    ``line`` and ``column`` (1-based) locate the problem when it is known.
    """

    def __init__(
        self,
        path: str,
        problem: str,
        line: Optional[int] = None,
        column: Optional[int] = None,
    ) -> None:
        self.line = line
        self.column = column
        super().__init__(path, "", problem)

    def display(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"Configuration error: Failed to parse HCL config: {where}: {self.problem}"


class ConfigValidationError(ConfigError):
    """A well-formed file whose content is wrong: unknown key, bad type, dangling reference..."""


def _join(prefix: str, key_path: str, problem: str) -> str:
    if key_path:
        return f"{prefix}: {key_path}: {problem}"
    return f"{prefix}: {problem}"
