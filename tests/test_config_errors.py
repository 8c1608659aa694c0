"""
Tests for L{a3s_gateway.config.errors}: the display strings the CLI prints and the attributes
callers read.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config.errors import (
    ConfigError,
    ConfigNotFound,
    ConfigParseError,
    ConfigValidationError,
)


class ConfigErrorTests(SynchronousTestCase):
    """The four error classes and their display strings."""

    def test_not_found(self) -> None:
        """ConfigNotFound displays C{Config file not found: <path>} and keeps the path."""
        error = ConfigNotFound("/etc/gw.hcl")
        self.assertEqual(str(error), "Config file not found: /etc/gw.hcl")
        self.assertEqual(error.path, "/etc/gw.hcl")
        self.assertEqual(error.key_path, "")
        self.assertIsInstance(error, ConfigError)

    def test_parse_error_with_position(self) -> None:
        """A parse error names the file, line and column after the reference's prefix."""
        error = ConfigParseError("gw.hcl", "unexpected end of file", 3, 7)
        self.assertEqual(
            str(error),
            "Configuration error: Failed to parse HCL config: gw.hcl:3:7: unexpected end of file",
        )
        self.assertEqual((error.line, error.column), (3, 7))
        self.assertEqual(error.problem, "unexpected end of file")

    def test_parse_error_line_only(self) -> None:
        """Without a column only the line is shown."""
        error = ConfigParseError("gw.hcl", "bad", 3)
        self.assertEqual(
            str(error), "Configuration error: Failed to parse HCL config: gw.hcl:3: bad"
        )

    def test_parse_error_without_position(self) -> None:
        """Without a position only the file is shown."""
        error = ConfigParseError("gw.hcl", "cannot read file: Permission denied")
        self.assertEqual(
            str(error),
            "Configuration error: Failed to parse HCL config: gw.hcl: cannot read file: "
            "Permission denied",
        )

    def test_validation_error(self) -> None:
        """A validation error shows file, key path and problem."""
        error = ConfigValidationError("gw.hcl", "services.api.load_balancer", "unknown key 'x'")
        self.assertEqual(
            str(error), "Configuration error: gw.hcl: services.api.load_balancer: unknown key 'x'"
        )
        self.assertEqual(error.key_path, "services.api.load_balancer")
        self.assertEqual(error.problem, "unknown key 'x'")

    def test_validation_error_without_key_path(self) -> None:
        """An empty key path is left out of the display."""
        error = ConfigValidationError("gw.hcl", "", "line 2: environment variable 'X' is not set")
        self.assertEqual(
            str(error), "Configuration error: gw.hcl: line 2: environment variable 'X' is not set"
        )

    def test_args(self) -> None:
        """The exception's args hold the display string, so tracebacks and repr show it."""
        error = ConfigValidationError("gw.hcl", "a", "b")
        self.assertEqual(error.args, ("Configuration error: gw.hcl: a: b",))
