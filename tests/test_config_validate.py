"""
Tests for L{a3s_gateway.config.validate}: complete validation with the reference's message
families, entrypoint addresses, IP lists and Rust float formatting.
"""

from __future__ import annotations

import datetime
import os
from typing import Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config import ConfigValidationError, parse_config
from a3s_gateway.config.schema import EntrypointConfig, GatewayConfig
from a3s_gateway.config.validate import (
    check_ip_or_cidr,
    format_float,
    parse_address,
    validate_config,
)

ENTRYPOINT = """
entrypoints "web" {
  address = "127.0.0.1:8080"
}
"""


def service(name: str = "s", url: str = "http://127.0.0.1:9000", body: str = "") -> str:
    """A service block with one server, plus ``body`` inside the service."""
    return (
        f'services "{name}" {{\n'
        "  load_balancer {\n"
        f'    servers = [{{ url = "{url}" }}]\n'
        "  }\n"
        f"{body}"
        "}\n"
    )


def router(
    name: str = "r", service: str = "s", body: str = "", rule: str = "PathPrefix(`/`)"
) -> str:
    """A router block sending ``rule`` to ``service``, plus ``body`` inside it."""
    return f'routers "{name}" {{\n  rule    = "{rule}"\n  service = "{service}"\n{body}}}\n'


def middleware(name: str, kind: str, body: str = "") -> str:
    """A middleware block of type ``kind``, plus ``body`` inside it."""
    return f'middlewares "{name}" {{\n  type = "{kind}"\n{body}}}\n'


BASE = ENTRYPOINT + router() + service()


def write_certificate(directory: str) -> Tuple[str, str]:
    """
    Write a fresh self-signed EC certificate and its PKCS#8 key into ``directory``; return
    their paths.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


class _ValidationTestCase(SynchronousTestCase):
    """Helpers: load a text and pin the exact error."""

    def load(self, text: str) -> GatewayConfig:
        return parse_config(text, "gw.hcl", environ={})

    def assertInvalid(self, text: str, key_path: str, problem: str) -> ConfigValidationError:
        """Loading ``text`` fails with exactly ``key_path`` and ``problem``."""
        with self.assertRaises(ConfigValidationError) as raised:
            self.load(text)
        error = raised.exception
        self.assertEqual((error.key_path, error.problem), (key_path, problem))
        self.assertEqual(str(error), f"Configuration error: gw.hcl: {key_path}: {problem}")
        return error


class RouterValidationTests(_ValidationTestCase):
    """Router references and rule syntax."""

    def test_unknown_service(self) -> None:
        """A router naming a missing service fails with the reference's message."""
        self.assertInvalid(
            ENTRYPOINT + router(service="nope") + service(),
            "routers.r.service",
            "Router 'r' references unknown service 'nope'",
        )

    def test_unknown_middleware(self) -> None:
        """A router naming a missing middleware fails, naming the list position."""
        self.assertInvalid(
            ENTRYPOINT
            + router(body='  middlewares = ["c", "gone"]\n')
            + service()
            + middleware("c", "compress"),
            "routers.r.middlewares[1]",
            "Router 'r' references unknown middleware 'gone'",
        )

    def test_unknown_entrypoint(self) -> None:
        """A router naming a missing entrypoint fails."""
        self.assertInvalid(
            ENTRYPOINT + router(body='  entrypoints = ["web", "websecure"]\n') + service(),
            "routers.r.entrypoints[1]",
            "Router 'r' references unknown entrypoint 'websecure'",
        )

    def test_invalid_rule(self) -> None:
        """A rule the rule language rejects fails validation, not the first request."""
        self.assertInvalid(
            ENTRYPOINT + router(rule="Foo(`x`)") + service(),
            "routers.r.rule",
            "Router 'r': invalid rule 'Foo(`x`)': Unknown matcher: Foo at position 0",
        )

    def test_first_router_error_wins(self) -> None:
        """With several broken routers, the first in file order is reported."""
        self.assertInvalid(
            ENTRYPOINT + router("b", service="x") + router("a", service="y") + service(),
            "routers.b.service",
            "Router 'b' references unknown service 'x'",
        )

    def test_references_before_rules(self) -> None:
        """The reference's validate() checks (references) come before rule syntax."""
        self.assertInvalid(
            ENTRYPOINT + router("a", rule="Foo(`x`)") + router("b", service="x") + service(),
            "routers.b.service",
            "Router 'b' references unknown service 'x'",
        )


class ServiceValidationTests(_ValidationTestCase):
    """Service checks: servers, scaling, revisions, rollout, URLs, targets, sub-blocks."""

    def test_no_servers_configured(self) -> None:
        """No servers and no revisions: the reference's validate() message."""
        self.assertInvalid(
            ENTRYPOINT + router() + 'services "s" {\n  load_balancer {\n  }\n}\n',
            "services.s.load_balancer.servers",
            "Service 's' has no servers configured",
        )

    def test_revisions_without_servers(self) -> None:
        """Revisions but no load-balancer servers: the reference's start-time message."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + 'services "s" {\n  load_balancer {\n  }\n'
            + '  revisions = [{ name = "v1", servers = [{ url = "http://127.0.0.1:1" }] }]\n}\n',
            "services.s.load_balancer.servers",
            "Service 's' has no servers",
        )

    def test_min_replicas_above_max(self) -> None:
        """min_replicas above max_replicas fails with both numbers."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(body="  scaling {\n    min_replicas = 5\n    max_replicas = 2\n  }\n"),
            "services.s.scaling",
            "Service 's': min_replicas (5) must be <= max_replicas (2)",
        )

    def test_target_utilization_zero(self) -> None:
        """target_utilization 0 is rejected and printed as Rust prints 0.0: C{0}."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(body="  scaling {\n    target_utilization = 0\n  }\n"),
            "services.s.scaling.target_utilization",
            "Service 's': target_utilization (0) must be in (0.0, 1.0]",
        )

    def test_target_utilization_above_one(self) -> None:
        """target_utilization 1.5 is rejected and printed as C{1.5}."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(body="  scaling {\n    target_utilization = 1.5\n  }\n"),
            "services.s.scaling.target_utilization",
            "Service 's': target_utilization (1.5) must be in (0.0, 1.0]",
        )

    def test_target_utilization_one(self) -> None:
        """target_utilization 1.0 is accepted (the interval is closed at 1)."""
        config = self.load(
            ENTRYPOINT + router() + service(body="  scaling {\n    target_utilization = 1.0\n  }\n")
        )
        scaling = config.services["s"].scaling
        assert scaling is not None
        self.assertEqual(scaling.target_utilization, 1.0)

    def test_revision_percentages(self) -> None:
        """Revision traffic must sum to 100."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(
                body='  revisions = [{ name = "a", traffic_percent = 60 }, '
                '{ name = "b", traffic_percent = 30 }]\n'
            ),
            "services.s.revisions",
            "Service 's': revision traffic percentages sum to 90, must be 100",
        )

    def test_rollout_without_revisions(self) -> None:
        """A rollout needs revisions."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(body='  rollout {\n    from = "a"\n    to = "b"\n  }\n'),
            "services.s.rollout",
            "Service 's': rollout requires at least one revision",
        )

    def test_rollout_unknown_from(self) -> None:
        """The rollout's C{from} must be a revision."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(
                body='  revisions = [{ name = "a" }]\n'
                '  rollout {\n    from = "x"\n    to = "a"\n  }\n'
            ),
            "services.s.rollout.from",
            "Service 's': rollout 'from' revision 'x' not found",
        )

    def test_rollout_unknown_to(self) -> None:
        """The rollout's C{to} must be a revision."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(
                body='  revisions = [{ name = "a" }]\n'
                '  rollout {\n    from = "a"\n    to = "y"\n  }\n'
            ),
            "services.s.rollout.to",
            "Service 's': rollout 'to' revision 'y' not found",
        )

    def test_invalid_scheme(self) -> None:
        """A server URL with an unknown scheme fails, listing the accepted forms."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(url="htp://127.0.0.1:1"),
            "services.s.load_balancer.servers[0].url",
            "Service 's': invalid server URL 'htp://127.0.0.1:1': unsupported scheme 'htp' "
            "(expected http, https, h2c, ws, wss, tcp or a bare host:port)",
        )

    def test_url_without_host(self) -> None:
        """A server URL without a host fails."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(url="http://"),
            "services.s.load_balancer.servers[0].url",
            "Service 's': invalid server URL 'http://': missing or invalid host",
        )

    def test_url_bad_port(self) -> None:
        """A server URL with a port out of range fails."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(url="http://127.0.0.1:70000"),
            "services.s.load_balancer.servers[0].url",
            "Service 's': invalid server URL 'http://127.0.0.1:70000': invalid port",
        )

    def test_bare_address_without_port(self) -> None:
        """A bare server address needs a port."""
        self.assertInvalid(
            ENTRYPOINT + service(url="localhost"),
            "services.s.load_balancer.servers[0].url",
            "Service 's': invalid server URL 'localhost': missing ':<port>'",
        )

    def test_http_router_needs_http_backend(self) -> None:
        """A service behind a router on an HTTP entrypoint must have http(s) servers."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(url="tcp://127.0.0.1:5432"),
            "services.s.load_balancer.servers[0].url",
            "Service 's': server 'tcp://127.0.0.1:5432' is not an http:// or https:// URL, but "
            "router 'r' sends it HTTP requests from entrypoint 'web'",
        )

    def test_http_requirement_covers_revisions(self) -> None:
        """Revision servers of an HTTP service must be http(s) too."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(body='  revisions = [{ name = "a", servers = [{ url = "127.0.0.1:1" }] }]\n'),
            "services.s.revisions[0].servers[0].url",
            "Service 's': server '127.0.0.1:1' is not an http:// or https:// URL, but "
            "router 'r' sends it HTTP requests from entrypoint 'web'",
        )

    def test_http_requirement_covers_failover(self) -> None:
        """The failover service of an HTTP service must have http(s) servers too."""
        self.assertInvalid(
            ENTRYPOINT
            + router()
            + service(body='  failover {\n    service = "b"\n  }\n')
            + service("b", url="tcp://127.0.0.1:1"),
            "services.b.load_balancer.servers[0].url",
            "Service 'b': server 'tcp://127.0.0.1:1' is not an http:// or https:// URL, but "
            "it is the failover of service 's', which serves HTTP",
        )

    def test_tcp_services_accept_tcp_urls(self) -> None:
        """Services routed only from TCP/UDP entrypoints may use tcp:// and bare host:port."""
        config = self.load(
            ENTRYPOINT
            + 'entrypoints "db" {\n  address = ":5432"\n  protocol = "tcp"\n}\n'
            + 'entrypoints "dns" {\n  address = ":5353"\n  protocol = "udp"\n}\n'
            + router("db", service="pg", body='  entrypoints = ["db"]\n')
            + router("dns", service="dns", body='  entrypoints = ["dns"]\n')
            + service("pg", url="tcp://127.0.0.1:5432")
            + service("dns", url="127.0.0.1:53")
        )
        self.assertEqual(config.services["dns"].load_balancer.servers[0].url, "127.0.0.1:53")

    def test_router_without_entrypoints_uses_all(self) -> None:
        """A router without entrypoints serves every entrypoint, HTTP ones included."""
        self.assertInvalid(
            'entrypoints "db" {\n  address = ":5432"\n  protocol = "tcp"\n}\n'
            + ENTRYPOINT
            + router(service="pg")
            + service("pg", url="tcp://127.0.0.1:5432"),
            "services.pg.load_balancer.servers[0].url",
            "Service 'pg': server 'tcp://127.0.0.1:5432' is not an http:// or https:// URL, but "
            "router 'r' sends it HTTP requests from entrypoint 'web'",
        )

    def test_unknown_mirror(self) -> None:
        """The mirror target must exist (stricter than the reference's warning)."""
        self.assertInvalid(
            BASE.replace("  }\n}\n", '  }\n  mirror {\n    service = "shadow"\n  }\n}\n'),
            "services.s.mirror.service",
            "Service 's' mirrors to unknown service 'shadow'",
        )

    def test_unknown_failover(self) -> None:
        """The failover target must exist."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(body='  failover {\n    service = "backup"\n  }\n'),
            "services.s.failover.service",
            "Service 's' fails over to unknown service 'backup'",
        )

    def test_self_mirror(self) -> None:
        """A service cannot mirror to itself."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(body='  mirror {\n    service = "s"\n  }\n'),
            "services.s.mirror.service",
            "Service 's' mirrors to itself",
        )

    def test_self_failover(self) -> None:
        """A service cannot fail over to itself."""
        self.assertInvalid(
            ENTRYPOINT + router() + service(body='  failover {\n    service = "s"\n  }\n'),
            "services.s.failover.service",
            "Service 's' fails over to itself",
        )

    def _load_balancer(self, inner: str) -> str:
        return (
            ENTRYPOINT
            + router()
            + 'services "s" {\n  load_balancer {\n    servers = [{ url = "http://127.0.0.1:1" }]\n'
            + inner
            + "  }\n}\n"
        )

    def test_health_check_path(self) -> None:
        """The health-check path must start with a slash (it is appended to the server URL)."""
        self.assertInvalid(
            self._load_balancer('    health_check {\n      path = "health"\n    }\n'),
            "services.s.load_balancer.health_check.path",
            "Service 's': health_check path 'health' must start with '/'",
        )

    def test_health_check_interval(self) -> None:
        """A zero health-check interval is rejected."""
        self.assertInvalid(
            self._load_balancer(
                '    health_check {\n      path = "/h"\n      interval = "0s"\n    }\n'
            ),
            "services.s.load_balancer.health_check.interval",
            "Service 's': health_check interval must be greater than 0",
        )

    def test_sticky_cookie_name(self) -> None:
        """The sticky cookie name must be a valid cookie name."""
        self.assertInvalid(
            self._load_balancer('    sticky {\n      cookie = "a b"\n    }\n'),
            "services.s.load_balancer.sticky.cookie",
            "Service 's': invalid sticky cookie name 'a b'",
        )

    def test_sticky_ttl(self) -> None:
        """A zero sticky TTL is rejected."""
        self.assertInvalid(
            self._load_balancer('    sticky {\n      cookie = "c"\n      ttl = 0\n    }\n'),
            "services.s.load_balancer.sticky.ttl",
            "Service 's': sticky ttl must be greater than 0",
        )

    def test_passive_health_threshold(self) -> None:
        """An enabled passive health check needs a positive error threshold."""
        self.assertInvalid(
            self._load_balancer("    passive_health {\n      error_threshold = 0\n    }\n"),
            "services.s.load_balancer.passive_health.error_threshold",
            "Service 's': passive_health error_threshold must be greater than 0",
        )

    def test_passive_health_disabled(self) -> None:
        """A disabled passive health check is not held to its thresholds."""
        config = self.load(
            self._load_balancer(
                "    passive_health {\n      enabled = false\n      error_threshold = 0\n    }\n"
            )
        )
        self.assertFalse(config.services["s"].load_balancer.passive_health.enabled)

    def test_passive_health_statuses(self) -> None:
        """error_statuses must be HTTP status codes."""
        self.assertInvalid(
            self._load_balancer("    passive_health {\n      error_statuses = [500, 600]\n    }\n"),
            "services.s.load_balancer.passive_health.error_statuses[1]",
            "Service 's': passive_health: 600 is not an HTTP status code (100-599)",
        )


class EntrypointValidationTests(_ValidationTestCase):
    """Entrypoint addresses, TLS, IP lists and limits."""

    def entrypoint(self, body: str, name: str = "web") -> str:
        return f'entrypoints "{name}" {{\n{body}}}\n' + router() + service()

    def test_bad_address(self) -> None:
        """An address without a port fails with the reference's message family."""
        self.assertInvalid(
            self.entrypoint('  address = "127.0.0.1"\n'),
            "entrypoints.web.address",
            "Invalid address '127.0.0.1' for entrypoint 'web': missing ':<port>'",
        )

    def test_hostname_address(self) -> None:
        """Host names are accepted (the reference only takes IP literals)."""
        config = self.load(self.entrypoint('  address = "localhost:8080"\n'))
        self.assertEqual(config.entrypoints["web"].address, "localhost:8080")

    def test_same_address_twice(self) -> None:
        """Two entrypoints on the same address and transport would fail to bind."""
        self.assertInvalid(
            ENTRYPOINT
            + 'entrypoints "other" {\n  address = "127.0.0.1:8080"\n  protocol = "tcp"\n}\n'
            + router()
            + service(),
            "entrypoints.other.address",
            "Entrypoint 'other' has the same address as entrypoint 'web' (127.0.0.1:8080)",
        )

    def test_tcp_and_udp_share_a_port(self) -> None:
        """A TCP and a UDP entrypoint may share a port."""
        config = self.load(
            ENTRYPOINT
            + 'entrypoints "u" {\n  address = "127.0.0.1:8080"\n  protocol = "udp"\n}\n'
            + router()
            + service()
        )
        self.assertEqual(config.entrypoints["u"].protocol, "udp")

    def test_tls_on_tcp(self) -> None:
        """TLS is only available on HTTP entrypoints."""
        self.assertInvalid(
            self.entrypoint(
                '  address = ":1"\n  protocol = "tcp"\n'
                '  tls {\n    cert_file = "c"\n    key_file = "k"\n  }\n'
            ),
            "entrypoints.web.tls",
            "Entrypoint 'web': tls is only supported on http entrypoints",
        )

    def tls(self, cert_file: str, key_file: str, extra: str = "") -> str:
        return self.entrypoint(
            '  address = ":8443"\n'
            f'  tls {{\n    cert_file = "{cert_file}"\n    key_file = "{key_file}"\n{extra}  }}\n'
        )

    def test_tls_valid(self) -> None:
        """Readable, matching certificate and key files pass."""
        cert, key = write_certificate(self.mktemp())
        config = self.load(self.tls(cert, key, '    min_version = "1.3"\n'))
        tls = config.entrypoints["web"].tls
        assert tls is not None
        self.assertEqual((tls.cert_file, tls.key_file, tls.min_version), (cert, key, "1.3"))

    def test_tls_missing_certificate(self) -> None:
        """A missing certificate file: C{TLS error: Failed to open certificate file ...}."""
        missing = os.path.abspath(self.mktemp())
        self.assertInvalid(
            self.tls(missing, "k"),
            "entrypoints.web.tls.cert_file",
            f"TLS error: Failed to open certificate file {missing}: No such file or directory",
        )

    def test_tls_no_certificate(self) -> None:
        """A file without a CERTIFICATE block: C{No certificates found in certificate file}."""
        _cert, key = write_certificate(self.mktemp())
        self.assertInvalid(
            self.tls(key, key),
            "entrypoints.web.tls.cert_file",
            "TLS error: No certificates found in certificate file",
        )

    def test_tls_bad_certificate(self) -> None:
        """A CERTIFICATE block that does not parse: C{Failed to parse certificate: ...}."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        error = self.assertRaises(ConfigValidationError, self.load, self.tls(path, path))
        self.assertEqual(error.key_path, "entrypoints.web.tls.cert_file")
        self.assertTrue(
            error.problem.startswith("TLS error: Failed to parse certificate: "), error.problem
        )

    def test_tls_missing_key(self) -> None:
        """A missing key file: C{TLS error: Failed to open key file ...}."""
        cert, _key = write_certificate(self.mktemp())
        missing = os.path.abspath(self.mktemp())
        self.assertInvalid(
            self.tls(cert, missing),
            "entrypoints.web.tls.key_file",
            f"TLS error: Failed to open key file {missing}: No such file or directory",
        )

    def test_tls_no_key(self) -> None:
        """A key file without a private key: C{No private key found in key file}."""
        cert, _key = write_certificate(self.mktemp())
        self.assertInvalid(
            self.tls(cert, cert),
            "entrypoints.web.tls.key_file",
            "TLS error: No private key found in key file",
        )

    def test_tls_bad_key(self) -> None:
        """A PRIVATE KEY block that does not parse: C{Failed to parse private key: ...}."""
        cert, _key = write_certificate(self.mktemp())
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        error = self.assertRaises(ConfigValidationError, self.load, self.tls(cert, path))
        self.assertEqual(error.key_path, "entrypoints.web.tls.key_file")
        self.assertTrue(
            error.problem.startswith("TLS error: Failed to parse private key: "), error.problem
        )

    def test_tls_mismatched_key(self) -> None:
        """A key belonging to another certificate is a TLS configuration error."""
        cert, _ = write_certificate(self.mktemp())
        _, other_key = write_certificate(self.mktemp())
        error = self.assertRaises(ConfigValidationError, self.load, self.tls(cert, other_key))
        self.assertEqual(error.key_path, "entrypoints.web.tls.key_file")
        self.assertTrue(
            error.problem.startswith(
                "TLS error: TLS configuration error: the private key does not match the certificate"
            ),
            error.problem,
        )

    def test_tls_min_version(self) -> None:
        """min_version must be "1.2" or "1.3" (the reference silently reads nonsense as 1.2)."""
        cert, key = write_certificate(self.mktemp())
        self.assertInvalid(
            self.tls(cert, key, '    min_version = "1.1"\n'),
            "entrypoints.web.tls.min_version",
            'TLS error: unsupported min_version \'1.1\' (expected "1.2" or "1.3")',
        )

    def test_tcp_allowed_ips_cidr(self) -> None:
        """A bad CIDR in tcp_allowed_ips uses the reference's message."""
        self.assertInvalid(
            self.entrypoint(
                '  address = ":1"\n  protocol = "tcp"\n'
                '  tcp_allowed_ips = ["10.0.0.0/8", "10.0.0.0/33"]\n'
            ),
            "entrypoints.web.tcp_allowed_ips[1]",
            "Invalid CIDR '10.0.0.0/33': invalid IP address syntax",
        )

    def test_tcp_allowed_ips_address(self) -> None:
        """A bad IP in tcp_allowed_ips uses the reference's message."""
        self.assertInvalid(
            self.entrypoint(
                '  address = ":1"\n  protocol = "tcp"\n  tcp_allowed_ips = ["10.0.0.256"]\n'
            ),
            "entrypoints.web.tcp_allowed_ips[0]",
            "Invalid IP address '10.0.0.256': invalid IP address syntax",
        )

    def test_trusted_ips(self) -> None:
        """forwarded_headers.trusted_ips takes IPs and CIDRs, v4 and v6, and rejects others."""
        config = self.load(
            self.entrypoint(
                '  address = ":1"\n  forwarded_headers {\n'
                '    trusted_ips = ["10.0.0.0/8", "::1", "fd00::/8", "192.168.1.1"]\n  }\n'
            )
        )
        self.assertEqual(
            config.entrypoints["web"].forwarded_headers.trusted_ips,
            ("10.0.0.0/8", "::1", "fd00::/8", "192.168.1.1"),
        )
        self.assertInvalid(
            self.entrypoint(
                '  address = ":1"\n  forwarded_headers {\n    trusted_ips = ["proxy"]\n  }\n'
            ),
            "entrypoints.web.forwarded_headers.trusted_ips[0]",
            "Invalid IP address 'proxy': invalid IP address syntax",
        )

    def test_max_request_body_bytes(self) -> None:
        """max_request_body_bytes must be greater than 0."""
        self.assertInvalid(
            self.entrypoint('  address = ":1"\n  max_request_body_bytes = 0\n'),
            "entrypoints.web.max_request_body_bytes",
            "Entrypoint 'web': max_request_body_bytes must be greater than 0",
        )


class MiddlewareValidationTests(_ValidationTestCase):
    """Every declared middleware is checked by type, used by a router or not."""

    def assertMiddleware(self, kind: str, body: str, key_path: str, problem: str) -> None:
        self.assertInvalid(BASE + middleware("m", kind, body), key_path, problem)

    def accepts(self, kind: str, body: str) -> None:
        config = self.load(BASE + middleware("m", kind, body))
        self.assertEqual(config.middlewares["m"].type, kind)

    def test_unknown_type(self) -> None:
        """An unknown type fails with the reference's construction message."""
        self.assertMiddleware("nope", "", "middlewares.m.type", "Unknown middleware type: 'nope'")

    def test_unused_middleware_is_validated(self) -> None:
        """A middleware no router uses is still validated."""
        self.assertMiddleware(
            "api-key", "", "middlewares.m.keys", "api-key middleware requires at least one key"
        )

    def test_api_key(self) -> None:
        """api-key needs a non-empty list of non-empty keys and a valid header name."""
        self.assertMiddleware(
            "api-key",
            "  keys = []\n",
            "middlewares.m.keys",
            "api-key middleware requires at least one key",
        )
        self.assertMiddleware(
            "api-key",
            '  keys = ["a", ""]\n',
            "middlewares.m.keys",
            "api-key middleware keys cannot be empty",
        )
        self.assertMiddleware(
            "api-key",
            '  keys = ["a"]\n  header = "X Key"\n',
            "middlewares.m.header",
            "api-key middleware: invalid header name 'X Key'",
        )
        self.accepts("api-key", '  keys = ["a"]\n')

    def test_basic_auth(self) -> None:
        """basic-auth needs username then password."""
        self.assertMiddleware(
            "basic-auth", "", "middlewares.m.username", "basic-auth middleware requires 'username'"
        )
        self.assertMiddleware(
            "basic-auth",
            '  username = "u"\n',
            "middlewares.m.password",
            "basic-auth middleware requires 'password'",
        )
        self.accepts("basic-auth", '  username = "u"\n  password = "p"\n  realm = "Admin"\n')

    def test_jwt_hmac(self) -> None:
        """HS256 (the default) needs a non-empty 'value' secret."""
        self.assertMiddleware(
            "jwt", "", "middlewares.m.value", "JWT middleware requires 'value' field as HMAC secret"
        )
        self.assertMiddleware(
            "jwt", '  value = ""\n', "middlewares.m.value", "JWT secret cannot be empty"
        )
        self.accepts("jwt", '  value = "s"\n  algorithms = ["HS256", "HS512"]\n')

    def test_jwt_algorithms(self) -> None:
        """Unknown algorithms, an empty list and mixed families are rejected."""
        self.assertMiddleware(
            "jwt",
            '  value = "s"\n  algorithms = ["none"]\n',
            "middlewares.m.algorithms[0]",
            "JWT middleware: unsupported algorithm 'none' (supported: HS256, HS384, HS512, "
            "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA)",
        )
        self.assertMiddleware(
            "jwt",
            '  value = "s"\n  algorithms = []\n',
            "middlewares.m.algorithms",
            "JWT middleware requires at least one algorithm",
        )
        self.assertMiddleware(
            "jwt",
            '  value = "s"\n  algorithms = ["HS256", "RS256"]\n',
            "middlewares.m.algorithms",
            "JWT middleware cannot mix HMAC (HS*) and public-key algorithms",
        )

    def test_jwt_public_key_required(self) -> None:
        """A public-key algorithm needs public_key_file or jwks_url instead of 'value'."""
        self.assertMiddleware(
            "jwt",
            '  algorithms = ["RS256"]\n',
            "middlewares.m.public_key_file",
            "JWT middleware requires 'public_key_file' or 'jwks_url' for RS256",
        )
        self.accepts("jwt", '  algorithms = ["RS256"]\n  jwks_url = "https://idp.example/jwks"\n')

    def test_jwt_jwks_url(self) -> None:
        """jwks_url must be an http(s) URL."""
        self.assertMiddleware(
            "jwt",
            '  algorithms = ["ES256"]\n  jwks_url = "ftp://idp/jwks"\n',
            "middlewares.m.jwks_url",
            "JWT middleware: invalid jwks_url 'ftp://idp/jwks': expected an http:// or "
            "https:// URL",
        )

    def public_key(self) -> str:
        """Write an EC P-256 public key in PEM; return its path."""
        path = os.path.abspath(self.mktemp())
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        with open(path, "wb") as f:
            f.write(
                key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return path

    def test_jwt_public_key_file(self) -> None:
        """A readable public key of the right family passes; a certificate works too."""
        self.accepts(
            "jwt", f'  algorithms = ["ES256"]\n  public_key_file = "{self.public_key()}"\n'
        )
        cert, _ = write_certificate(self.mktemp())
        self.accepts("jwt", f'  algorithms = ["ES256"]\n  public_key_file = "{cert}"\n')

    def test_jwt_public_key_family(self) -> None:
        """An EC key cannot verify RS256 tokens."""
        path = self.public_key()
        self.assertMiddleware(
            "jwt",
            f'  algorithms = ["RS256"]\n  public_key_file = "{path}"\n',
            "middlewares.m.public_key_file",
            f"JWT middleware: the key in {path} cannot verify RS256 tokens",
        )

    def test_jwt_public_key_unreadable(self) -> None:
        """A missing or non-PEM public key file is reported."""
        missing = os.path.abspath(self.mktemp())
        self.assertMiddleware(
            "jwt",
            f'  algorithms = ["ES256"]\n  public_key_file = "{missing}"\n',
            "middlewares.m.public_key_file",
            f"JWT middleware: cannot read public_key_file {missing}: No such file or directory",
        )
        junk = os.path.abspath(self.mktemp())
        with open(junk, "w") as f:
            f.write("not a key\n")
        self.assertMiddleware(
            "jwt",
            f'  algorithms = ["ES256"]\n  public_key_file = "{junk}"\n',
            "middlewares.m.public_key_file",
            f"JWT middleware: public_key_file {junk} holds no PEM public key or certificate",
        )

    def test_forward_auth(self) -> None:
        """forward-auth needs a non-empty http(s) forward_auth_url."""
        self.assertMiddleware(
            "forward-auth",
            "",
            "middlewares.m.forward_auth_url",
            "forward-auth middleware requires 'forward_auth_url' field",
        )
        self.assertMiddleware(
            "forward-auth",
            '  forward_auth_url = ""\n',
            "middlewares.m.forward_auth_url",
            "forward_auth_url cannot be empty",
        )
        self.assertMiddleware(
            "forward-auth",
            '  forward_auth_url = "auth:9090"\n',
            "middlewares.m.forward_auth_url",
            "forward-auth middleware: invalid forward_auth_url 'auth:9090': expected an http:// "
            "or https:// URL",
        )
        self.accepts("forward-auth", '  forward_auth_url = "http://127.0.0.1:9090/verify"\n')

    def test_rate_limit(self) -> None:
        """rate-limit needs 'rate'; 'key' is client-ip, global or header:<Name>."""
        self.assertMiddleware(
            "rate-limit", "", "middlewares.m.rate", "rate-limit middleware requires 'rate'"
        )
        self.assertMiddleware(
            "rate-limit",
            '  rate = 1\n  key = "ip"\n',
            "middlewares.m.key",
            "rate-limit middleware: invalid key 'ip' (expected 'client-ip', 'global' or "
            "'header:<Name>')",
        )
        self.assertMiddleware(
            "rate-limit",
            '  rate = 1\n  key = "header:"\n',
            "middlewares.m.key",
            "rate-limit middleware: invalid key 'header:' (expected 'client-ip', 'global' or "
            "'header:<Name>')",
        )
        for key in ("client-ip", "global", "header:X-Api-Key"):
            self.accepts("rate-limit", f'  rate = 1\n  key = "{key}"\n')

    def test_rate_limit_redis(self) -> None:
        """rate-limit-redis needs redis_url then rate; on_redis_error is allow or deny."""
        self.assertMiddleware(
            "rate-limit-redis",
            "  rate = 1\n",
            "middlewares.m.redis_url",
            "rate-limit-redis middleware requires 'redis_url' field",
        )
        self.assertMiddleware(
            "rate-limit-redis",
            '  redis_url = "redis://127.0.0.1:6379"\n',
            "middlewares.m.rate",
            "rate-limit-redis middleware requires 'rate' field",
        )
        self.assertMiddleware(
            "rate-limit-redis",
            '  redis_url = "redis://127.0.0.1:6379"\n  rate = 1\n  on_redis_error = "open"\n',
            "middlewares.m.on_redis_error",
            "rate-limit-redis middleware: invalid on_redis_error 'open' (expected 'allow' or "
            "'deny')",
        )
        self.assertMiddleware(
            "rate-limit-redis",
            '  redis_url = "http://127.0.0.1:6379"\n  rate = 1\n',
            "middlewares.m.redis_url",
            "rate-limit-redis middleware: invalid redis_url 'http://127.0.0.1:6379' (expected "
            "redis://, rediss:// or unix://)",
        )
        self.accepts(
            "rate-limit-redis",
            '  redis_url = "redis://127.0.0.1:6379/0"\n  rate = 1\n  on_redis_error = "deny"\n'
            '  key = "global"\n',
        )

    def test_cors(self) -> None:
        """cors rejects credentials with a wildcard origin, and bad method names."""
        self.assertMiddleware(
            "cors",
            "  allow_credentials = true\n",
            "middlewares.m.allow_credentials",
            'cors middleware: allow_credentials = true cannot be combined with allowed_origins "*"',
        )
        self.assertMiddleware(
            "cors",
            '  allowed_methods = ["GET", "PO ST"]\n',
            "middlewares.m.allowed_methods[1]",
            "cors middleware: invalid method 'PO ST'",
        )
        self.accepts(
            "cors",
            '  allowed_origins = ["https://a.example"]\n  allow_credentials = true\n'
            '  expose_headers = ["X-Id"]\n',
        )

    def test_headers(self) -> None:
        """headers rejects names and values that cannot be sent."""
        self.assertMiddleware(
            "headers",
            '  request_headers = {\n    "Bad Name" = "v"\n  }\n',
            "middlewares.m.request_headers",
            "headers middleware: invalid header name 'Bad Name'",
        )
        self.assertMiddleware(
            "headers",
            '  response_headers = {\n    "X-A" = "a\\r\\nSet-Cookie: x"\n  }\n',
            "middlewares.m.response_headers.X-A",
            "headers middleware: header value cannot contain CR, LF or NUL",
        )
        self.assertMiddleware(
            "headers",
            '  remove_response_headers = ["Server", ""]\n',
            "middlewares.m.remove_response_headers[1]",
            "headers middleware: invalid header name ''",
        )

    def test_strip_prefix(self) -> None:
        """Prefixes must start with a slash (request paths always do)."""
        self.assertMiddleware(
            "strip-prefix",
            '  prefixes = ["/ok", "api"]\n',
            "middlewares.m.prefixes[1]",
            "strip-prefix middleware: prefix 'api' must start with '/'",
        )

    def test_body_limit(self) -> None:
        """body-limit needs a positive max_body_bytes."""
        self.assertMiddleware(
            "body-limit",
            "",
            "middlewares.m.max_body_bytes",
            "body-limit middleware requires 'max_body_bytes' field",
        )
        self.assertMiddleware(
            "body-limit",
            "  max_body_bytes = 0\n",
            "middlewares.m.max_body_bytes",
            "max_body_bytes must be greater than 0",
        )

    def test_retry(self) -> None:
        """retry needs max_retries > 0 and real status codes."""
        self.assertMiddleware(
            "retry",
            "  max_retries = 0\n",
            "middlewares.m.max_retries",
            "Retry middleware requires max_retries > 0",
        )
        self.assertMiddleware(
            "retry",
            "  retry_on_statuses = [503, 99]\n",
            "middlewares.m.retry_on_statuses[1]",
            "retry middleware: 99 is not an HTTP status code (100-599)",
        )
        self.accepts("retry", "")

    def test_ip_allow(self) -> None:
        """ip-allow needs entries, each an IP or CIDR, with the reference's messages."""
        self.assertMiddleware(
            "ip-allow",
            "",
            "middlewares.m.allowed_ips",
            "IP allow list middleware requires at least one allowed_ips entry",
        )
        self.assertMiddleware(
            "ip-allow",
            '  allowed_ips = ["10.0.0.0/x"]\n',
            "middlewares.m.allowed_ips[0]",
            "Invalid CIDR '10.0.0.0/x': invalid IP address syntax",
        )
        self.assertMiddleware(
            "ip-allow",
            '  allowed_ips = ["::1", "localhost"]\n',
            "middlewares.m.allowed_ips[1]",
            "Invalid IP address 'localhost': invalid IP address syntax",
        )

    def test_no_settings_types(self) -> None:
        """compress and circuit-breaker need nothing; unused keys are accepted."""
        self.accepts("compress", "  min_bytes = 10\n")
        self.accepts("circuit-breaker", "  failure_threshold = 2\n  keys = []\n")


class ObservabilityValidationTests(_ValidationTestCase):
    """The dashboard, tracing, access_log and provider references."""

    def test_dashboard_unknown_entrypoint(self) -> None:
        """The dashboard's entrypoint must exist."""
        self.assertInvalid(
            BASE + 'dashboard {\n  entrypoint = "admin"\n}\n',
            "dashboard.entrypoint",
            "Dashboard references unknown entrypoint 'admin'",
        )

    def test_dashboard_needs_http(self) -> None:
        """The dashboard's entrypoint must speak HTTP."""
        self.assertInvalid(
            BASE
            + 'entrypoints "t" {\n  address = ":9"\n  protocol = "tcp"\n}\n'
            + 'dashboard {\n  entrypoint = "t"\n}\n',
            "dashboard.entrypoint",
            "Dashboard entrypoint 't' is not an http entrypoint",
        )

    def test_dashboard_unknown_middleware(self) -> None:
        """The dashboard's middlewares must exist."""
        self.assertInvalid(
            BASE + 'dashboard {\n  entrypoint = "web"\n  middlewares = ["auth"]\n}\n',
            "dashboard.middlewares[0]",
            "Dashboard references unknown middleware 'auth'",
        )

    def test_tracing_sample_rate(self) -> None:
        """sample_rate is a probability."""
        self.assertInvalid(
            BASE + "tracing {\n  sample_rate = 1.5\n}\n",
            "tracing.sample_rate",
            "tracing: sample_rate (1.5) must be in [0.0, 1.0]",
        )

    def test_tracing_endpoint(self) -> None:
        """otlp_endpoint must be an http(s) URL."""
        self.assertInvalid(
            BASE + 'tracing {\n  otlp_endpoint = "collector:4318"\n}\n',
            "tracing.otlp_endpoint",
            "tracing: invalid otlp_endpoint 'collector:4318': expected an http:// or https:// URL",
        )

    def test_access_log_directory(self) -> None:
        """The access log's directory must exist."""
        directory = os.path.abspath(self.mktemp())
        self.assertInvalid(
            BASE + f'access_log {{\n  path = "{directory}/access.log"\n}}\n',
            "access_log.path",
            f"access_log: directory '{directory}' does not exist",
        )

    def test_discovery_seed(self) -> None:
        """Discovery seeds must be http(s) URLs."""
        self.assertInvalid(
            BASE + 'providers {\n  discovery {\n    seeds = [{ url = "10.0.0.1:80" }]\n  }\n}\n',
            "providers.discovery.seeds[0].url",
            "Discovery seed '10.0.0.1:80': expected an http:// or https:// URL",
        )


class ValidateConfigTests(SynchronousTestCase):
    """validate_config on objects built in code."""

    def test_default_config(self) -> None:
        """An empty configuration is valid."""
        validate_config(GatewayConfig())

    def test_source_named(self) -> None:
        """Errors name the configuration's source."""
        config = GatewayConfig(
            entrypoints={"web": EntrypointConfig(name="web", address="nope")}, source="x.hcl"
        )
        error = self.assertRaises(ConfigValidationError, validate_config, config)
        self.assertEqual(
            str(error),
            "Configuration error: x.hcl: entrypoints.web.address: Invalid address 'nope' for "
            "entrypoint 'web': missing ':<port>'",
        )


class ParseAddressTests(SynchronousTestCase):
    """Entrypoint address syntax."""

    def test_ipv4(self) -> None:
        """C{ip:port}."""
        self.assertEqual(parse_address("0.0.0.0:80"), ("0.0.0.0", 80))

    def test_ipv6(self) -> None:
        """C{[v6]:port}, the host returned without brackets."""
        self.assertEqual(parse_address("[::1]:8080"), ("::1", 8080))
        self.assertEqual(parse_address("[::]:0"), ("::", 0))

    def test_hostname(self) -> None:
        """C{host:port}."""
        self.assertEqual(parse_address("localhost:8080"), ("localhost", 8080))
        self.assertEqual(parse_address("gw-1.example.com:443"), ("gw-1.example.com", 443))

    def test_all_interfaces(self) -> None:
        """C{:port} means every interface (host "")."""
        self.assertEqual(parse_address(":65535"), ("", 65535))

    def assertProblem(self, address: str, problem: str) -> None:
        with self.assertRaises(ValueError) as raised:
            parse_address(address)
        self.assertEqual(str(raised.exception), problem)

    def test_errors(self) -> None:
        """Each malformed address says what is wrong."""
        self.assertProblem("127.0.0.1", "missing ':<port>'")
        self.assertProblem("127.0.0.1:", "missing port number")
        self.assertProblem("127.0.0.1:http", "invalid port 'http'")
        self.assertProblem("127.0.0.1:-1", "invalid port '-1'")
        self.assertProblem("127.0.0.1:65536", "port 65536 is out of range (0-65535)")
        self.assertProblem("::1:80", "an IPv6 address must be written in brackets, e.g. [::1]:8080")
        self.assertProblem("[::1:80", "missing ']' after the IPv6 address")
        self.assertProblem("[::1]80", "missing ':<port>' after the IPv6 address")
        self.assertProblem("[1.2.3.4]:80", "invalid IPv6 address '1.2.3.4'")
        self.assertProblem("999.0.0.1:80", "invalid IPv4 address '999.0.0.1'")
        self.assertProblem("bad host:80", "invalid host name 'bad host'")
        self.assertProblem("-x:80", "invalid host name '-x'")


class CheckIpOrCidrTests(SynchronousTestCase):
    """IP and CIDR entries."""

    def test_valid(self) -> None:
        """v4 and v6 addresses and networks are accepted, host bits allowed."""
        for entry in ("127.0.0.1", "::1", "10.0.0.0/8", "10.1.2.3/8", "fd00::/8"):
            check_ip_or_cidr(entry)

    def test_invalid(self) -> None:
        """The reference's two messages."""
        for entry, message in (
            ("10.0.0.0/33", "Invalid CIDR '10.0.0.0/33': invalid IP address syntax"),
            ("x/8", "Invalid CIDR 'x/8': invalid IP address syntax"),
            ("1.2.3", "Invalid IP address '1.2.3': invalid IP address syntax"),
            ("", "Invalid IP address '': invalid IP address syntax"),
        ):
            with self.assertRaises(ValueError) as raised:
                check_ip_or_cidr(entry)
            self.assertEqual(str(raised.exception), message)


class FormatFloatTests(SynchronousTestCase):
    """Rust's f64 display."""

    def test_values(self) -> None:
        """Whole numbers without a fraction, no exponents, shortest round-trip digits."""
        cases: Tuple[Tuple[float, str], ...] = (
            (0.0, "0"),
            (1.0, "1"),
            (1.5, "1.5"),
            (0.7, "0.7"),
            (0.05, "0.05"),
            (-2.0, "-2"),
            (1e20, "100000000000000000000"),
            (1e-7, "0.0000001"),
            (float("inf"), "inf"),
            (float("nan"), "NaN"),
        )
        for value, text in cases:
            self.assertEqual(format_float(value), text)


class MiddlewareSecretTests(SynchronousTestCase):
    def _middleware(self, body: str) -> str:
        return (
            'entrypoints "web" {\n  address = "127.0.0.1:8080"\n}\n'
            'middlewares "m" {\n' + body + "\n}\n"
        )

    def test_malformed_bcrypt_password(self) -> None:
        """
        A basic-auth password that looks like a bcrypt hash but is not one fails validation
        instead of failing the router at start.
        """
        text = self._middleware(
            '  type = "basic-auth"\n  username = "u"\n  password = "$2b$12$short"'
        )
        e = self.assertRaises(ConfigValidationError, parse_config, text, "g.hcl")
        self.assertIn("middlewares.m.password", str(e))
        self.assertIn("not a valid bcrypt hash", str(e))

    def test_asymmetric_key_as_hmac_secret(self) -> None:
        """
        A PEM public key given as a JWT HMAC ``value`` is refused by validation.
        """
        pem = "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----"
        text = self._middleware(f'  type = "jwt"\n  value = "{pem}"')
        e = self.assertRaises(ConfigValidationError, parse_config, text, "g.hcl")
        self.assertIn("middlewares.m.value", str(e))
        self.assertIn("unusable HMAC secret", str(e))


class CircuitBreakerSettingsTests(SynchronousTestCase):
    def test_zero_threshold(self) -> None:
        """
        A circuit breaker threshold of 0 is refused with its key path.
        """
        text = (
            'entrypoints "web" {\n  address = "127.0.0.1:8080"\n}\n'
            'middlewares "cb" {\n  type = "circuit-breaker"\n  failure_threshold = 0\n}\n'
        )
        e = self.assertRaises(ConfigValidationError, parse_config, text, "g.hcl")
        self.assertIn("middlewares.cb.failure_threshold", str(e))
        self.assertIn("requires failure_threshold > 0", str(e))


class WorkersValidationTests(_ValidationTestCase):
    """``workers``: 1 to 64, and what several processes sharing the ports cannot do."""

    def test_range(self) -> None:
        """0 and more than 64 are refused; 1 and 64 are accepted."""
        for count in (0, 65):
            self.assertInvalid(
                BASE + f"workers = {count}\n",
                "workers",
                f"workers ({count}) must be between 1 and 64",
            )
        for count in (1, 64):
            self.assertEqual(self.load(BASE + f"workers = {count}\n").workers, count)

    def test_udp_entrypoint(self) -> None:
        """UDP sessions live in one process: a UDP entrypoint needs workers = 1."""
        udp = 'entrypoints "dns" {\n  address = ":5353"\n  protocol = "udp"\n}\n'
        self.assertEqual(self.load(BASE + udp).workers, 1)
        self.assertInvalid(
            BASE + udp + "workers = 2\n",
            "entrypoints.dns.protocol",
            "Entrypoint 'dns': udp entrypoints need workers = 1",
        )

    def test_port_zero(self) -> None:
        """Port 0 would give each worker its own port: several workers need a fixed one."""
        text = BASE.replace("127.0.0.1:8080", "127.0.0.1:0")
        self.assertEqual(self.load(text).workers, 1)
        self.assertInvalid(
            text + "workers = 2\n",
            "entrypoints.web.address",
            "Entrypoint 'web': workers > 1 needs a fixed port, not 0",
        )

    def test_tcp_entrypoint(self) -> None:
        """TCP entrypoints (and HTTP ones) share their port among workers."""
        tcp = 'entrypoints "t" {\n  address = ":5432"\n  protocol = "tcp"\n}\n'
        self.assertEqual(self.load(BASE + tcp + "workers = 3\n").workers, 3)
