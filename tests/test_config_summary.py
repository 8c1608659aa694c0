"""
Tests for L{a3s_gateway.config.summary.validation_summary}: the success text of
C{a3s-gateway validate}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config import GatewayConfig, parse_config, validation_summary
from a3s_gateway.config.schema import FileProviderConfig, ProvidersConfig
from tests.test_config_load import EXAMPLE
from tests.test_config_validate import write_certificate


class ValidationSummaryTests(SynchronousTestCase):
    """The reference's summary lines, in file order."""

    def test_example(self) -> None:
        """The spec's example config gives every line, in configuration-file order."""
        cert, key = write_certificate(self.mktemp())
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        text = text.replace("/etc/gateway/certs/cert.pem", cert)
        text = text.replace("/etc/gateway/certs/key.pem", key)
        config = parse_config(text, "gateway.hcl", environ={})
        self.assertEqual(
            validation_summary(config, "gateway.hcl"),
            "\n".join(
                [
                    "✓ Config parsed successfully (gateway.hcl)",
                    "✓ Configuration is valid",
                    "",
                    "  Entrypoints: 4",
                    "    - web → 0.0.0.0:8080 (Http)",
                    "    - websecure → 0.0.0.0:8443 (Http)",
                    "    - tcp-db → 0.0.0.0:15432 (Tcp)",
                    "    - udp-dns → 0.0.0.0:5353 (Udp)",
                    "  Routers:     6",
                    "    - llm-api → service:llm rule:Host(`api.example.com`) && PathPrefix(`/v1`)",
                    "    - health → service:llm rule:Path(`/health`)",
                    "    - models → service:model rule:PathPrefix(`/models`) && Method(`POST`) && "
                    "Headers(`X-Env`, `canary`)",
                    "    - admin → service:admin rule:PathPrefix(`/admin`)",
                    "    - db → service:postgres rule:PathPrefix(`/`)",
                    "    - dns → service:dns rule:PathPrefix(`/`)",
                    "  Services:    7",
                    "    - llm (2 backends, strategy: LeastConnections)",
                    "    - llm-shadow (1 backends, strategy: RoundRobin)",
                    "    - llm-backup (1 backends, strategy: RoundRobin)",
                    "    - model (1 backends, strategy: RoundRobin)",
                    "    - admin (2 backends, strategy: Weighted)",
                    "    - postgres (1 backends, strategy: RoundRobin)",
                    "    - dns (1 backends, strategy: RoundRobin)",
                    "  Middlewares:  13",
                    "    - cors",
                    "    - auth-jwt",
                    "    - rate-limit",
                    "    - circuit-breaker",
                    "    - security-headers",
                    "    - strip-models",
                    "    - body-limit",
                    "    - api-key",
                    "    - retry",
                    "    - compress",
                    "    - admin-ip",
                    "    - admin-basic",
                    "    - admin-fwd",
                    "  Provider:    file (hot reload)",
                    "  Provider:    discovery (health-based)",
                    "  Provider:    kubernetes",
                ]
            ),
        )

    def test_empty(self) -> None:
        """An empty configuration: zero counts, no provider lines, no trailing newline."""
        self.assertEqual(
            validation_summary(GatewayConfig(), "empty.hcl"),
            "✓ Config parsed successfully (empty.hcl)\n"
            "✓ Configuration is valid\n"
            "\n"
            "  Entrypoints: 0\n"
            "  Routers:     0\n"
            "  Services:    0\n"
            "  Middlewares:  0",
        )

    def test_random_strategy_and_file_provider(self) -> None:
        """The Random strategy name; the file provider line alone (docker has no line)."""
        config = parse_config(
            'services "s" {\n  load_balancer {\n    strategy = "random"\n'
            '    servers = [{ url = "127.0.0.1:1" }]\n  }\n}\n'
            "providers {\n  file {\n  }\n  docker {\n  }\n}\n",
            environ={},
        )
        self.assertEqual(config.providers.file, FileProviderConfig())
        lines = validation_summary(config, "g.hcl").split("\n")
        self.assertIn("    - s (1 backends, strategy: Random)", lines)
        self.assertEqual(lines[-1], "  Provider:    file (hot reload)")
        self.assertNotIn("docker", "\n".join(lines))

    def test_uses_given_path(self) -> None:
        """The first line shows the path given, not the config's source."""
        config = GatewayConfig(providers=ProvidersConfig(), source="other.hcl")
        self.assertTrue(
            validation_summary(config, "./gw.hcl").startswith(
                "✓ Config parsed successfully (./gw.hcl)\n"
            )
        )
