# -*- test-case-name: tests.test_config_validate -*-
"""
Complete validation of a converted configuration, for the loader, ``apply_listen`` and the
gateway: everything that could fail at start fails here, with the reference's message families
(DECISIONS: "Validation is complete"). Also :func:`parse_address`, which the entrypoint code
uses to listen, and :func:`format_float`, Rust's float display used in messages.

The first error wins, in a fixed order: the reference's ``validate()`` checks (router references,
then services), then rule syntax, service details, entrypoints, middlewares, and the
observability and provider blocks; each group in file order.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from decimal import Decimal
from typing import Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple, cast
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from OpenSSL import SSL, crypto

from a3s_gateway.config.errors import ConfigValidationError
from a3s_gateway.config.schema import (
    EntrypointConfig,
    GatewayConfig,
    MiddlewareConfig,
    ServerConfig,
    ServiceConfig,
    TlsConfig,
)
from a3s_gateway.router.rule import RequestFacts, RuleError, parse_rule

# The most worker processes a gateway runs (``workers``).
MAX_WORKERS = 64

__all__ = ["check_ip_or_cidr", "format_float", "parse_address", "validate_config"]


def format_float(value: float) -> str:
    """``value`` as Rust's ``{}`` prints an f64: ``0``, ``1.5``, ``0.7``, never an exponent."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


_PORT = re.compile(r"[0-9]+\Z")
_IPV4_LIKE = re.compile(r"[0-9.]+\Z")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def parse_address(address: str) -> Tuple[str, int]:
    """
    Split an entrypoint address into ``(host, port)``.

    Accepted: ``ip:port``, ``[v6]:port`` (the host is returned without brackets),
    ``host:port`` and ``:port`` (host ``""``: every interface). The port is 0-65535.

    @raise ValueError: with the problem, for anything else.
    """
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError("missing ']' after the IPv6 address")
        host, rest = address[1:close], address[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError("missing ':<port>' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address '{host}'") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon:
            raise ValueError("missing ':<port>'")
        if ":" in host:
            raise ValueError("an IPv6 address must be written in brackets, e.g. [::1]:8080")
        if host:
            _check_host(host)
    if not port_text:
        raise ValueError("missing port number")
    if not _PORT.match(port_text):
        raise ValueError(f"invalid port '{port_text}'")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return host, port


def _check_host(host: str) -> None:
    if _IPV4_LIKE.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address '{host}'") from None
        return
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid host name '{host}'")


def check_ip_or_cidr(entry: str) -> None:
    """
    An IP address or CIDR network (v4 or v6), in the reference's message family.

    @raise ValueError: ``Invalid CIDR '<x>': ...`` or ``Invalid IP address '<x>': ...``.
    """
    if "/" in entry:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"Invalid CIDR '{entry}': invalid IP address syntax") from None
        return
    try:
        ipaddress.ip_address(entry)
    except ValueError:
        raise ValueError(f"Invalid IP address '{entry}': invalid IP address syntax") from None


def validate_config(config: GatewayConfig) -> None:
    """
    Check everything about ``config`` that could fail when the gateway starts.

    @raise ConfigValidationError: the first problem, naming ``config.source`` and the key path.
    """
    _Validator(config).run()


# RFC 9110 token characters: header and cookie names.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_SERVER_SCHEMES = ("http", "https", "h2c", "ws", "wss", "tcp")
_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL
)
_PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.*?-----END \1-----", re.DOTALL
)


def _http_url_problem(url: str) -> Optional[str]:
    """Why ``url`` is not a usable ``http://`` or ``https://`` URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or "://" not in url:
        return "expected an http:// or https:// URL"
    if not parts.hostname or any(ch.isspace() for ch in url):
        return "missing or invalid host"
    try:
        port = parts.port
    except ValueError:
        return "invalid port"
    return "invalid port" if port == 0 else None


def _server_scheme(url: str) -> str:
    """
    The scheme of a backend URL (``""`` for a bare ``host:port``).

    @raise ValueError: with the problem.
    """
    if "://" not in url:
        host, _ = parse_address(url)
        if not host:
            raise ValueError("missing host")
        return ""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _SERVER_SCHEMES:
        raise ValueError(
            f"unsupported scheme '{scheme}' (expected http, https, h2c, ws, wss, tcp or a bare "
            "host:port)"
        )
    parts = urlsplit(url)
    if not parts.hostname or any(ch.isspace() for ch in url):
        raise ValueError("missing or invalid host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("invalid port") from None
    if port == 0:
        raise ValueError("invalid port")
    return scheme


def _strings(middleware: MiddlewareConfig, key: str, default: Sequence[str] = ()) -> Sequence[str]:
    """A list-of-strings option (the loader has checked its type)."""
    return cast(Sequence[str], middleware.options.get(key, default))


def _openssl_detail(error: Exception) -> str:
    """pyOpenSSL errors carry a list of (library, function, reason) tuples."""
    reasons = error.args[0] if error.args and isinstance(error.args[0], list) else None
    if reasons:
        return "; ".join(str(reason[-1]) for reason in reasons)
    return str(error) or type(error).__name__


class _Validator:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config

    def fail(self, key_path: str, problem: str) -> NoReturn:
        raise ConfigValidationError(self.config.source, key_path, problem)

    def run(self) -> None:
        self._router_references()
        for service in self.config.services.values():
            self._service_basics(service)
        self._router_rules()
        http_reasons = self._http_services()
        for service in self.config.services.values():
            self._service(service, http_reasons.get(service.name))
        self._entrypoints()
        self._workers()
        for middleware in self.config.middlewares.values():
            self._middleware(middleware)
        self._observability()
        self._providers()

    # -- routers ---------------------------------------------------------------------------

    def _router_references(self) -> None:
        config = self.config
        for router in config.routers.values():
            path = f"routers.{router.name}"
            if router.service not in config.services:
                self.fail(
                    f"{path}.service",
                    f"Router '{router.name}' references unknown service '{router.service}'",
                )
            for i, name in enumerate(router.middlewares):
                if name not in config.middlewares:
                    self.fail(
                        f"{path}.middlewares[{i}]",
                        f"Router '{router.name}' references unknown middleware '{name}'",
                    )
            for i, name in enumerate(router.entrypoints):
                if name not in config.entrypoints:
                    self.fail(
                        f"{path}.entrypoints[{i}]",
                        f"Router '{router.name}' references unknown entrypoint '{name}'",
                    )

    def _router_rules(self) -> None:
        for router in self.config.routers.values():
            try:
                parse_rule(router.rule)
            except RuleError as e:
                self.fail(
                    f"routers.{router.name}.rule",
                    f"Router '{router.name}': invalid rule '{router.rule}': {e}",
                )

    # -- services --------------------------------------------------------------------------

    def _service_basics(self, service: ServiceConfig) -> None:
        """The reference's ``validate()`` checks for one service, in its order."""
        name, path = service.name, f"services.{service.name}"
        if not service.load_balancer.servers and not service.revisions:
            self.fail(
                f"{path}.load_balancer.servers", f"Service '{name}' has no servers configured"
            )
        scaling = service.scaling
        if scaling is not None:
            if scaling.min_replicas > scaling.max_replicas:
                self.fail(
                    f"{path}.scaling",
                    f"Service '{name}': min_replicas ({scaling.min_replicas}) must be <= "
                    f"max_replicas ({scaling.max_replicas})",
                )
            if not 0.0 < scaling.target_utilization <= 1.0:
                self.fail(
                    f"{path}.scaling.target_utilization",
                    f"Service '{name}': target_utilization "
                    f"({format_float(scaling.target_utilization)}) must be in (0.0, 1.0]",
                )
        if service.revisions:
            total = sum(revision.traffic_percent for revision in service.revisions)
            if total != 100:
                self.fail(
                    f"{path}.revisions",
                    f"Service '{name}': revision traffic percentages sum to {total}, must be 100",
                )
        rollout = service.rollout
        if rollout is not None:
            if not service.revisions:
                self.fail(
                    f"{path}.rollout", f"Service '{name}': rollout requires at least one revision"
                )
            names = {revision.name for revision in service.revisions}
            if rollout.from_ not in names:
                self.fail(
                    f"{path}.rollout.from",
                    f"Service '{name}': rollout 'from' revision '{rollout.from_}' not found",
                )
            if rollout.to not in names:
                self.fail(
                    f"{path}.rollout.to",
                    f"Service '{name}': rollout 'to' revision '{rollout.to}' not found",
                )

    def _http_services(self) -> Dict[str, str]:
        """
        The services that answer HTTP requests, each with the reason why: used by a router on an
        HTTP entrypoint (no ``entrypoints`` means every entrypoint), or the mirror or failover of
        such a service.
        """
        config = self.config
        http = [name for name, ep in config.entrypoints.items() if ep.protocol == "http"]
        reasons: Dict[str, str] = {}
        for router in config.routers.values():
            listed = router.entrypoints or tuple(config.entrypoints)
            on_http = [name for name in listed if name in http]
            if on_http and router.service in config.services and router.service not in reasons:
                reasons[router.service] = (
                    f"router '{router.name}' sends it HTTP requests from entrypoint '{on_http[0]}'"
                )
        queue = list(reasons)
        while queue:
            name = queue.pop(0)
            service = config.services[name]
            for kind, target in (
                ("mirror", service.mirror.service if service.mirror else None),
                ("failover", service.failover.service if service.failover else None),
            ):
                if target is not None and target in config.services and target not in reasons:
                    reasons[target] = f"it is the {kind} of service '{name}', which serves HTTP"
                    queue.append(target)
        return reasons

    def _servers(self, service: ServiceConfig) -> Iterator[Tuple[str, ServerConfig]]:
        path = f"services.{service.name}"
        for i, server in enumerate(service.load_balancer.servers):
            yield f"{path}.load_balancer.servers[{i}]", server
        for r, revision in enumerate(service.revisions):
            for i, server in enumerate(revision.servers):
                yield f"{path}.revisions[{r}].servers[{i}]", server

    def _service(self, service: ServiceConfig, http_reason: Optional[str]) -> None:
        name, path = service.name, f"services.{service.name}"
        balancer = service.load_balancer
        if not balancer.servers:
            self.fail(f"{path}.load_balancer.servers", f"Service '{name}' has no servers")
        for server_path, server in self._servers(service):
            try:
                scheme = _server_scheme(server.url)
            except ValueError as e:
                self.fail(
                    f"{server_path}.url",
                    f"Service '{name}': invalid server URL '{server.url}': {e}",
                )
            if http_reason is not None and scheme not in ("http", "https"):
                self.fail(
                    f"{server_path}.url",
                    f"Service '{name}': server '{server.url}' is not an http:// or https:// URL, "
                    f"but {http_reason}",
                )
        check = balancer.health_check
        if check is not None:
            where = f"{path}.load_balancer.health_check"
            if not check.path.startswith("/"):
                self.fail(
                    f"{where}.path",
                    f"Service '{name}': health_check path '{check.path}' must start with '/'",
                )
            self._positive(f"{where}.interval", name, "health_check interval", check.interval)
            self._positive(f"{where}.timeout", name, "health_check timeout", check.timeout)
        sticky = balancer.sticky
        if sticky is not None:
            where = f"{path}.load_balancer.sticky"
            if not _TOKEN.match(sticky.cookie):
                self.fail(
                    f"{where}.cookie",
                    f"Service '{name}': invalid sticky cookie name '{sticky.cookie}'",
                )
            self._positive(f"{where}.ttl", name, "sticky ttl", sticky.ttl)
            self._positive(
                f"{where}.max_sessions", name, "sticky max_sessions", sticky.max_sessions
            )
        passive = balancer.passive_health
        where = f"{path}.load_balancer.passive_health"
        if passive.enabled:
            self._positive(
                f"{where}.error_threshold",
                name,
                "passive_health error_threshold",
                passive.error_threshold,
            )
            self._positive(f"{where}.window", name, "passive_health window", passive.window)
        for i, status in enumerate(passive.error_statuses):
            self._status(
                f"{where}.error_statuses[{i}]", f"Service '{name}': passive_health", status
            )
        for kind, target in (
            ("mirror", service.mirror.service if service.mirror else None),
            ("failover", service.failover.service if service.failover else None),
        ):
            if target is None:
                continue
            verb = "mirrors to" if kind == "mirror" else "fails over to"
            if target == name:
                self.fail(f"{path}.{kind}.service", f"Service '{name}' {verb} itself")
            if target not in self.config.services:
                self.fail(
                    f"{path}.{kind}.service", f"Service '{name}' {verb} unknown service '{target}'"
                )

    def _positive(self, key_path: str, service: str, what: str, value: float) -> None:
        if value <= 0:
            self.fail(key_path, f"Service '{service}': {what} must be greater than 0")

    def _status(self, key_path: str, owner: str, status: int) -> None:
        if not 100 <= status <= 599:
            self.fail(key_path, f"{owner}: {status} is not an HTTP status code (100-599)")

    # -- entrypoints -----------------------------------------------------------------------

    def _entrypoints(self) -> None:
        bound: Dict[Tuple[str, str, int], str] = {}
        for entrypoint in self.config.entrypoints.values():
            self._entrypoint(entrypoint, bound)

    def _entrypoint(
        self, entrypoint: EntrypointConfig, bound: Dict[Tuple[str, str, int], str]
    ) -> None:
        name, path = entrypoint.name, f"entrypoints.{entrypoint.name}"
        try:
            host, port = parse_address(entrypoint.address)
        except ValueError as e:
            self.fail(
                f"{path}.address",
                f"Invalid address '{entrypoint.address}' for entrypoint '{name}': {e}",
            )
        transport = "udp" if entrypoint.protocol == "udp" else "tcp"
        other = bound.setdefault((transport, host, port), name)
        if other != name and port != 0:
            self.fail(
                f"{path}.address",
                f"Entrypoint '{name}' has the same address as entrypoint '{other}' "
                f"({entrypoint.address})",
            )
        if entrypoint.tls is not None:
            if entrypoint.protocol != "http":
                self.fail(
                    f"{path}.tls", f"Entrypoint '{name}': tls is only supported on http entrypoints"
                )
            self._tls(entrypoint.tls, f"{path}.tls")
        self._ip_list(f"{path}.tcp_allowed_ips", entrypoint.tcp_allowed_ips)
        self._ip_list(
            f"{path}.forwarded_headers.trusted_ips", entrypoint.forwarded_headers.trusted_ips
        )
        if entrypoint.protocol == "udp":
            self._udp_route(name, f"{path}.address")
        if entrypoint.max_request_body_bytes <= 0:
            self.fail(
                f"{path}.max_request_body_bytes",
                f"Entrypoint '{name}': max_request_body_bytes must be greater than 0",
            )

    def _udp_route(self, name: str, key_path: str) -> None:
        """
        A UDP entrypoint picks its one upstream at start from the router matching the synthetic
        ``UDP`` request, so a config where none matches could only fail at start.
        """
        # Imported here: the route table imports the config schema, so a module-level import
        # would be circular.
        from twisted.web.http_headers import Headers

        from a3s_gateway.router.table import RouteTable

        facts = RequestFacts(
            method=b"UDP", host=None, path=b"/", query=b"", headers=Headers(), client_ip=""
        )
        route = RouteTable.from_config(self.config.routers).match(name, facts)
        service = self.config.services.get(route.service) if route is not None else None
        if service is None or not service.load_balancer.servers:
            self.fail(
                key_path,
                f"UDP entrypoint '{name}' has no matching router/service with a healthy backend",
            )

    def _ip_list(self, key_path: str, entries: Sequence[str]) -> None:
        for i, entry in enumerate(entries):
            try:
                check_ip_or_cidr(entry)
            except ValueError as e:
                self.fail(f"{key_path}[{i}]", str(e))

    def _tls(self, tls: TlsConfig, path: str) -> None:
        """The reference's start-time TLS errors, plus a key that does not fit the certificate."""
        if tls.min_version not in ("1.2", "1.3"):
            self.fail(
                f"{path}.min_version",
                f"TLS error: unsupported min_version '{tls.min_version}' (expected \"1.2\" or "
                '"1.3")',
            )
        data = self._read(f"{path}.cert_file", tls.cert_file, "certificate file")
        blocks = _PEM_CERTIFICATE.findall(data)
        if not blocks:
            self.fail(f"{path}.cert_file", "TLS error: No certificates found in certificate file")
        certificates: List[crypto.X509] = []
        for block in blocks:
            try:
                certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, block))
            except crypto.Error as e:
                self.fail(
                    f"{path}.cert_file",
                    f"TLS error: Failed to parse certificate: {_openssl_detail(e)}",
                )
        data = self._read(f"{path}.key_file", tls.key_file, "key file")
        match = _PEM_PRIVATE_KEY.search(data)
        if match is None:
            self.fail(f"{path}.key_file", "TLS error: No private key found in key file")
        try:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, match.group(0))
        except crypto.Error as e:
            self.fail(
                f"{path}.key_file", f"TLS error: Failed to parse private key: {_openssl_detail(e)}"
            )
        context = SSL.Context(SSL.TLS_METHOD)
        try:
            context.use_certificate(certificates[0])
            context.use_privatekey(key)
            context.check_privatekey()
        except SSL.Error as e:
            self.fail(
                f"{path}.key_file",
                f"TLS error: TLS configuration error: the private key does not match the "
                f"certificate ({_openssl_detail(e)})",
            )

    def _read(self, key_path: str, file_name: str, what: str) -> bytes:
        try:
            with open(file_name, "rb") as f:
                return f.read()
        except OSError as e:
            self.fail(key_path, f"TLS error: Failed to open {what} {file_name}: {e.strerror or e}")

    # -- middlewares -----------------------------------------------------------------------

    def _middleware(self, middleware: MiddlewareConfig) -> None:
        check = _MIDDLEWARE_CHECKS.get(middleware.type)
        path = f"middlewares.{middleware.name}"
        if check is None:
            self.fail(f"{path}.type", f"Unknown middleware type: '{middleware.type}'")
        check(self, middleware, path)

    def _tokens(self, key_path: str, owner: str, what: str, names: Sequence[str]) -> None:
        for i, value in enumerate(names):
            if not _TOKEN.match(value):
                self.fail(f"{key_path}[{i}]", f"{owner}: invalid {what} '{value}'")

    def _header_option(self, middleware: MiddlewareConfig, path: str, owner: str) -> None:
        header = middleware.options.get("header")
        if isinstance(header, str) and not _TOKEN.match(header):
            self.fail(f"{path}.header", f"{owner}: invalid header name '{header}'")

    def _api_key(self, middleware: MiddlewareConfig, path: str) -> None:
        keys = _strings(middleware, "keys")
        if not keys:
            self.fail(f"{path}.keys", "api-key middleware requires at least one key")
        if "" in keys:
            self.fail(f"{path}.keys", "api-key middleware keys cannot be empty")
        self._header_option(middleware, path, "api-key middleware")

    def _basic_auth(self, middleware: MiddlewareConfig, path: str) -> None:
        for key in ("username", "password"):
            if key not in middleware.options:
                self.fail(f"{path}.{key}", f"basic-auth middleware requires '{key}'")
        password = middleware.options["password"]
        if isinstance(password, str):
            # Imported here: the middleware package imports this config package.
            from a3s_gateway.middleware.basic_auth import parse_password

            try:
                parse_password(password)
            except ValueError as e:
                self.fail(f"{path}.password", str(e))
        realm = middleware.options.get("realm")
        if isinstance(realm, str) and any(ch == '"' or ord(ch) < 0x20 for ch in realm):
            self.fail(
                f"{path}.realm",
                "basic-auth middleware realm cannot contain '\"' or control characters",
            )

    def _jwt(self, middleware: MiddlewareConfig, path: str) -> None:
        options = middleware.options
        algorithms = _strings(middleware, "algorithms", ("HS256",))
        if not algorithms:
            self.fail(f"{path}.algorithms", "JWT middleware requires at least one algorithm")
        for i, algorithm in enumerate(algorithms):
            if algorithm not in _HMAC_ALGORITHMS + _PUBLIC_KEY_ALGORITHMS:
                supported = ", ".join(_HMAC_ALGORITHMS + _PUBLIC_KEY_ALGORITHMS)
                self.fail(
                    f"{path}.algorithms[{i}]",
                    f"JWT middleware: unsupported algorithm '{algorithm}' (supported: {supported})",
                )
        hmac = [a for a in algorithms if a in _HMAC_ALGORITHMS]
        public = [a for a in algorithms if a in _PUBLIC_KEY_ALGORITHMS]
        if hmac and public:
            # One key for both families invites algorithm-confusion attacks.
            self.fail(
                f"{path}.algorithms",
                "JWT middleware cannot mix HMAC (HS*) and public-key algorithms",
            )
        if hmac:
            if "value" not in options:
                self.fail(f"{path}.value", "JWT middleware requires 'value' field as HMAC secret")
            if options["value"] == "":
                self.fail(f"{path}.value", "JWT secret cannot be empty")
            try:
                HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(str(options["value"]))
            except InvalidKeyError as e:
                self.fail(f"{path}.value", f"JWT middleware: unusable HMAC secret: {e}")
        else:
            key_file = options.get("public_key_file")
            jwks_url = options.get("jwks_url")
            if key_file is None and jwks_url is None:
                self.fail(
                    f"{path}.public_key_file",
                    f"JWT middleware requires 'public_key_file' or 'jwks_url' for {public[0]}",
                )
            if isinstance(key_file, str):
                self._jwt_public_key(f"{path}.public_key_file", key_file, public)
            if isinstance(jwks_url, str):
                problem = _http_url_problem(jwks_url)
                if problem is not None:
                    self.fail(
                        f"{path}.jwks_url",
                        f"JWT middleware: invalid jwks_url '{jwks_url}': {problem}",
                    )
        self._header_option(middleware, path, "JWT middleware")

    def _jwt_public_key(self, key_path: str, file_name: str, algorithms: Sequence[str]) -> None:
        try:
            with open(file_name, "rb") as f:
                data = f.read()
        except OSError as e:
            self.fail(
                key_path,
                f"JWT middleware: cannot read public_key_file {file_name}: {e.strerror or e}",
            )
        try:
            key = load_pem_public_key(data)
        except ValueError:
            try:
                key = x509.load_pem_x509_certificate(data).public_key()
            except ValueError:
                self.fail(
                    key_path,
                    f"JWT middleware: public_key_file {file_name} holds no PEM public key or "
                    "certificate",
                )
        families = {
            "RS": (rsa.RSAPublicKey,),
            "PS": (rsa.RSAPublicKey,),
            "ES": (ec.EllipticCurvePublicKey,),
            "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
        }
        for algorithm in algorithms:
            if not isinstance(key, families[algorithm[:2]]):
                self.fail(
                    key_path,
                    f"JWT middleware: the key in {file_name} cannot verify {algorithm} tokens",
                )

    def _forward_auth(self, middleware: MiddlewareConfig, path: str) -> None:
        url = middleware.options.get("forward_auth_url")
        if url is None:
            self.fail(
                f"{path}.forward_auth_url",
                "forward-auth middleware requires 'forward_auth_url' field",
            )
        if url == "":
            self.fail(f"{path}.forward_auth_url", "forward_auth_url cannot be empty")
        problem = _http_url_problem(str(url))
        if problem is not None:
            self.fail(
                f"{path}.forward_auth_url",
                f"forward-auth middleware: invalid forward_auth_url '{url}': {problem}",
            )
        self._tokens(
            f"{path}.forward_auth_response_headers",
            "forward-auth middleware",
            "header name",
            _strings(middleware, "forward_auth_response_headers"),
        )

    def _rate_key(self, middleware: MiddlewareConfig, path: str) -> None:
        key = middleware.options.get("key")
        if key is None or key in ("client-ip", "global"):
            return
        if isinstance(key, str) and key.startswith("header:") and _TOKEN.match(key[7:]):
            return
        self.fail(
            f"{path}.key",
            f"{middleware.type} middleware: invalid key '{key}' (expected 'client-ip', 'global' "
            "or 'header:<Name>')",
        )

    def _rate_limit(self, middleware: MiddlewareConfig, path: str) -> None:
        if "rate" not in middleware.options:
            self.fail(f"{path}.rate", "rate-limit middleware requires 'rate'")
        self._rate_key(middleware, path)

    def _rate_limit_redis(self, middleware: MiddlewareConfig, path: str) -> None:
        options = middleware.options
        if "redis_url" not in options:
            self.fail(f"{path}.redis_url", "rate-limit-redis middleware requires 'redis_url' field")
        if "rate" not in options:
            self.fail(f"{path}.rate", "rate-limit-redis middleware requires 'rate' field")
        url = str(options["redis_url"])
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            self.fail(
                f"{path}.redis_url",
                f"rate-limit-redis middleware: invalid redis_url '{url}' (expected redis://, "
                "rediss:// or unix://)",
            )
        self._rate_key(middleware, path)
        mode = options.get("on_redis_error")
        if mode is not None and mode not in ("allow", "deny"):
            self.fail(
                f"{path}.on_redis_error",
                f"rate-limit-redis middleware: invalid on_redis_error '{mode}' (expected 'allow' "
                "or 'deny')",
            )

    def _cors(self, middleware: MiddlewareConfig, path: str) -> None:
        options = middleware.options
        owner = "cors middleware"
        self._tokens(
            f"{path}.allowed_methods", owner, "method", _strings(middleware, "allowed_methods")
        )
        for key in ("allowed_headers", "expose_headers"):
            self._tokens(f"{path}.{key}", owner, "header name", _strings(middleware, key))
        origins = _strings(middleware, "allowed_origins", ("*",))
        if options.get("allow_credentials") is True and "*" in origins:
            # Reflecting any origin with credentials would let every site act as the user.
            self.fail(
                f"{path}.allow_credentials",
                "cors middleware: allow_credentials = true cannot be combined with "
                'allowed_origins "*"',
            )

    def _headers(self, middleware: MiddlewareConfig, path: str) -> None:
        owner = "headers middleware"
        for key in ("request_headers", "response_headers"):
            headers = cast(Mapping[str, str], middleware.options.get(key, {}))
            for header, value in headers.items():
                if not _TOKEN.match(header):
                    self.fail(f"{path}.{key}", f"{owner}: invalid header name '{header}'")
                if any(ch in "\r\n\x00" for ch in value):
                    self.fail(
                        f"{path}.{key}.{header}",
                        f"{owner}: header value cannot contain CR, LF or NUL",
                    )
        for key in ("remove_request_headers", "remove_response_headers"):
            self._tokens(f"{path}.{key}", owner, "header name", _strings(middleware, key))

    def _strip_prefix(self, middleware: MiddlewareConfig, path: str) -> None:
        for i, prefix in enumerate(_strings(middleware, "prefixes")):
            if not prefix.startswith("/"):
                self.fail(
                    f"{path}.prefixes[{i}]",
                    f"strip-prefix middleware: prefix '{prefix}' must start with '/'",
                )

    def _body_limit(self, middleware: MiddlewareConfig, path: str) -> None:
        if "max_body_bytes" not in middleware.options:
            self.fail(
                f"{path}.max_body_bytes", "body-limit middleware requires 'max_body_bytes' field"
            )
        if middleware.options["max_body_bytes"] == 0:
            self.fail(f"{path}.max_body_bytes", "max_body_bytes must be greater than 0")

    def _retry(self, middleware: MiddlewareConfig, path: str) -> None:
        if middleware.options.get("max_retries", 3) == 0:
            self.fail(f"{path}.max_retries", "Retry middleware requires max_retries > 0")
        statuses = cast(Sequence[int], middleware.options.get("retry_on_statuses", ()))
        for i, status in enumerate(statuses):
            self._status(f"{path}.retry_on_statuses[{i}]", "retry middleware", status)

    def _ip_allow(self, middleware: MiddlewareConfig, path: str) -> None:
        entries = _strings(middleware, "allowed_ips")
        if not entries:
            self.fail(
                f"{path}.allowed_ips",
                "IP allow list middleware requires at least one allowed_ips entry",
            )
        self._ip_list(f"{path}.allowed_ips", entries)

    def _no_settings(self, middleware: MiddlewareConfig, path: str) -> None:
        """``compress``: every value its typed keys allow works."""

    def _circuit_breaker(self, middleware: MiddlewareConfig, path: str) -> None:
        # A threshold of 0 would open on no failure or close on no success.
        for key in ("failure_threshold", "success_threshold"):
            if middleware.options.get(key) == 0:
                self.fail(f"{path}.{key}", f"circuit-breaker middleware requires {key} > 0")

    def _workers(self) -> None:
        """
        ``workers``: 1 to 64 processes. Several workers share each TCP port with
        ``SO_REUSEPORT``, so every entrypoint needs a fixed port, and UDP entrypoints are
        refused: their sessions (the client's upstream socket) live in one process.
        """
        config = self.config
        if not 1 <= config.workers <= MAX_WORKERS:
            self.fail("workers", f"workers ({config.workers}) must be between 1 and {MAX_WORKERS}")
        if config.workers == 1:
            return
        for name, entrypoint in config.entrypoints.items():
            if entrypoint.protocol == "udp":
                self.fail(
                    f"entrypoints.{name}.protocol",
                    f"Entrypoint '{name}': udp entrypoints need workers = 1",
                )
            if parse_address(entrypoint.address)[1] == 0:
                self.fail(
                    f"entrypoints.{name}.address",
                    f"Entrypoint '{name}': workers > 1 needs a fixed port, not 0",
                )

    # -- the rest --------------------------------------------------------------------------

    def _observability(self) -> None:
        config = self.config
        if config.access_log is not None and config.access_log.path != "-":
            directory = os.path.dirname(config.access_log.path) or "."
            if not os.path.isdir(directory):
                self.fail("access_log.path", f"access_log: directory '{directory}' does not exist")
        tracing = config.tracing
        if tracing is not None:
            if not 0.0 <= tracing.sample_rate <= 1.0:
                self.fail(
                    "tracing.sample_rate",
                    f"tracing: sample_rate ({format_float(tracing.sample_rate)}) must be in "
                    "[0.0, 1.0]",
                )
            if tracing.otlp_endpoint is not None:
                problem = _http_url_problem(tracing.otlp_endpoint)
                if problem is not None:
                    self.fail(
                        "tracing.otlp_endpoint",
                        f"tracing: invalid otlp_endpoint '{tracing.otlp_endpoint}': {problem}",
                    )
        dashboard = config.dashboard
        if dashboard is not None:
            entrypoint = config.entrypoints.get(dashboard.entrypoint)
            if entrypoint is None:
                self.fail(
                    "dashboard.entrypoint",
                    f"Dashboard references unknown entrypoint '{dashboard.entrypoint}'",
                )
            if entrypoint.protocol != "http":
                self.fail(
                    "dashboard.entrypoint",
                    f"Dashboard entrypoint '{dashboard.entrypoint}' is not an http entrypoint",
                )
            for i, name in enumerate(dashboard.middlewares):
                if name not in config.middlewares:
                    self.fail(
                        f"dashboard.middlewares[{i}]",
                        f"Dashboard references unknown middleware '{name}'",
                    )

    def _providers(self) -> None:
        discovery = self.config.providers.discovery
        if discovery is None:
            return
        seeds = cast(Sequence[Mapping[str, str]], discovery["seeds"])
        for i, seed in enumerate(seeds):
            problem = _http_url_problem(seed["url"])
            if problem is not None:
                self.fail(
                    f"providers.discovery.seeds[{i}].url",
                    f"Discovery seed '{seed['url']}': {problem}",
                )


_MIDDLEWARE_CHECKS = {
    "api-key": _Validator._api_key,
    "basic-auth": _Validator._basic_auth,
    "jwt": _Validator._jwt,
    "forward-auth": _Validator._forward_auth,
    "rate-limit": _Validator._rate_limit,
    "rate-limit-redis": _Validator._rate_limit_redis,
    "cors": _Validator._cors,
    "headers": _Validator._headers,
    "strip-prefix": _Validator._strip_prefix,
    "body-limit": _Validator._body_limit,
    "retry": _Validator._retry,
    "circuit-breaker": _Validator._circuit_breaker,
    "ip-allow": _Validator._ip_allow,
    "compress": _Validator._no_settings,
}
