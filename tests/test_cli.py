"""
Tests for L{a3s_gateway.cli}: ``validate``, ``--version`` and the reference's messages.
"""

from __future__ import annotations

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway import __version__
from a3s_gateway.cli import main

VALID = """
entrypoints "web" {
  address = "127.0.0.1:8080"
}
routers "api" {
  rule    = "PathPrefix(`/api`)"
  service = "api"
}
services "api" {
  load_balancer {
    strategy = "weighted"
    servers = [{ url = "http://127.0.0.1:9001", weight = 2 }]
  }
}
"""


class CliTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_validate_success(self) -> None:
        """
        A valid file prints the reference's two check lines and the summary, and exits 0.
        """
        path = self.write(VALID)
        self.assertEqual(main(["validate", "--config", path]), 0)
        out = self.out.getvalue()
        self.assertTrue(
            out.startswith(f"✓ Config parsed successfully ({path})\n✓ Configuration is valid\n")
        )
        self.assertIn("  - web → 127.0.0.1:8080 (Http)", out)
        self.assertIn("  - api (1 backends, strategy: Weighted)", out)
        self.assertEqual(self.err.getvalue(), "")

    def test_global_config_before_validate(self) -> None:
        """
        ``a3s-gateway --config X validate`` validates X (the reference ignores it: a bug).
        """
        path = self.write(VALID)
        self.assertEqual(main(["--config", path, "validate"]), 0)
        self.assertIn(f"({path})", self.out.getvalue())

    def test_validate_missing(self) -> None:
        """
        A missing file prints ``✗ Config file not found: <path>`` on stderr and exits 1.
        """
        self.assertEqual(main(["validate", "--config", "missing.hcl"]), 1)
        self.assertEqual(self.err.getvalue(), "✗ Config file not found: missing.hcl\n")

    def test_validate_parse_error(self) -> None:
        """
        A syntax error prints ``✗ Parse error: ...`` naming the file and exits 1.
        """
        path = self.write('entrypoints "web" {\n  address = \n')
        self.assertEqual(main(["validate", "--config", path]), 1)
        self.assertTrue(self.err.getvalue().startswith("✗ Parse error: Configuration error: "))
        self.assertIn(path, self.err.getvalue())

    def test_validate_semantic_error(self) -> None:
        """
        A validation failure prints ``✗ Validation error: ...`` with the key path and exits 1.
        """
        path = self.write(VALID.replace('strategy = "weighted"', 'stratgy = "weighted"'))
        self.assertEqual(main(["validate", "--config", path]), 1)
        err = self.err.getvalue()
        self.assertTrue(err.startswith("✗ Validation error: Configuration error: "))
        self.assertIn("services.api.load_balancer", err)
        self.assertIn("did you mean 'strategy'?", err)

    def test_version(self) -> None:
        """
        ``--version`` prints ``a3s-gateway <version>`` and exits 0.
        """
        e = self.assertRaises(SystemExit, main, ["--version"])
        self.assertEqual(e.code, 0)
        self.assertEqual(self.out.getvalue(), f"a3s-gateway {__version__}\n")

    def test_run_with_missing_config(self) -> None:
        """
        Running with a missing ``--config`` prints the error and exits 1; nothing starts.
        """
        self.assertEqual(main(["--config", "missing.hcl"]), 1)
        self.assertEqual(self.err.getvalue(), "Error: Config file not found: missing.hcl\n")

    def test_bad_option(self) -> None:
        """
        An unknown option is a usage error with exit status 2.
        """
        self.assertEqual(main(["--nope"]), 2)
        self.assertIn("Error:", self.err.getvalue())

    def test_workers_out_of_range(self) -> None:
        """
        ``--workers 0`` overrides the file and is refused like a bad ``workers`` key: exit 1,
        nothing starts.
        """
        self.assertEqual(main(["--config", self.write(VALID), "--workers", "0"]), 1)
        self.assertIn("workers: workers (0) must be between 1 and 64", self.err.getvalue())

    def test_workers_not_a_number(self) -> None:
        """
        ``--workers`` takes an integer; anything else is a usage error with exit status 2.
        """
        self.assertEqual(main(["--workers", "many"]), 2)
        self.assertIn("Error:", self.err.getvalue())
