"""
Tests for L{a3s_gateway.config.load}: reading files, environment expansion, HCL parsing and
normalisation, strict conversion to the schema objects, and C{--listen}.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.config import (
    ConfigError,
    ConfigNotFound,
    ConfigParseError,
    ConfigValidationError,
    apply_listen,
    load_config,
    parse_config,
)
from a3s_gateway.config.schema import (
    AccessLogConfig,
    DashboardConfig,
    EntrypointConfig,
    FileProviderConfig,
    ForwardedHeadersConfig,
    GatewayConfig,
    PassiveHealthConfig,
    RevisionConfig,
    RolloutConfig,
    ServerConfig,
    StickyConfig,
    TimeoutsConfig,
    TracingConfig,
)
from tests.test_config_validate import write_certificate

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "example.hcl"
)

MINIMAL = """
entrypoints "web" {
  address = "127.0.0.1:8080"
}

routers "r" {
  rule    = "PathPrefix(`/`)"
  service = "s"
}

services "s" {
  load_balancer {
    servers = [{ url = "http://127.0.0.1:9000" }]
  }
}
"""


class _LoadTestCase(SynchronousTestCase):
    """Helpers shared by the loader tests."""

    def load(self, text: str, environ: Optional[Mapping[str, str]] = None) -> GatewayConfig:
        return parse_config(text, "gw.hcl", environ=environ or {})

    def assertInvalid(
        self, text: str, key_path: str, problem: str, environ: Optional[Mapping[str, str]] = None
    ) -> None:
        """Loading ``text`` fails validation with exactly ``key_path`` and ``problem``."""
        with self.assertRaises(ConfigValidationError) as raised:
            self.load(text, environ)
        self.assertEqual((raised.exception.key_path, raised.exception.problem), (key_path, problem))

    def assertParseError(
        self,
        text: str,
        problem: str,
        line: Optional[int] = None,
        column: Optional[int] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> ConfigParseError:
        """Loading ``text`` fails to parse with ``problem`` at ``line``:``column``."""
        with self.assertRaises(ConfigParseError) as raised:
            self.load(text, environ)
        error = raised.exception
        self.assertEqual((error.problem, error.line, error.column), (problem, line, column))
        return error

    def string_value(self, value_hcl: str, environ: Optional[Mapping[str, str]] = None) -> object:
        """
        The string a key gets when written as ``<key> = <value_hcl>``: carried by the C{realm}
        key of a C{compress} middleware, which accepts any string.
        """
        config = self.load(
            MINIMAL + f'middlewares "c" {{\n  type = "compress"\n  realm = {value_hcl}\n}}\n',
            environ,
        )
        return config.middlewares["c"].options["realm"]


class ExampleConfigTests(_LoadTestCase):
    """The spec's section 2.4 example, shipped as conf/example.hcl."""

    def example(self) -> GatewayConfig:
        cert, key = write_certificate(self.mktemp())
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        text = text.replace("/etc/gateway/certs/cert.pem", cert)
        text = text.replace("/etc/gateway/certs/key.pem", key)
        return parse_config(text, EXAMPLE, environ={})

    def test_unchanged_file_needs_certificates(self) -> None:
        """Loaded as is, the example fails only on its (absent) TLS files, with the TLS error."""
        with self.assertRaises(ConfigValidationError) as raised:
            load_config(EXAMPLE, environ={})
        self.assertEqual(
            str(raised.exception),
            f"Configuration error: {EXAMPLE}: entrypoints.websecure.tls.cert_file: TLS error: "
            "Failed to open certificate file /etc/gateway/certs/cert.pem: No such file or "
            "directory",
        )

    def test_loads(self) -> None:
        """With real certificate files the whole example loads and validates."""
        config = self.example()
        self.assertEqual(config.source, EXAMPLE)
        self.assertEqual(config.shutdown_timeout_secs, 30)
        self.assertEqual(list(config.entrypoints), ["web", "websecure", "tcp-db", "udp-dns"])
        self.assertEqual(
            list(config.routers), ["llm-api", "health", "models", "admin", "db", "dns"]
        )
        self.assertEqual(
            list(config.services),
            ["llm", "llm-shadow", "llm-backup", "model", "admin", "postgres", "dns"],
        )
        self.assertEqual(len(config.middlewares), 13)

    def test_entrypoints(self) -> None:
        """Entrypoint keys, TLS and TCP/UDP settings come through with their defaults."""
        config = self.example()
        self.assertEqual(
            config.entrypoints["web"], EntrypointConfig(name="web", address="0.0.0.0:8080")
        )
        secure = config.entrypoints["websecure"]
        assert secure.tls is not None
        self.assertEqual((secure.tls.min_version, secure.tls.acme), ("1.2", False))
        db = config.entrypoints["tcp-db"]
        self.assertEqual(
            (db.protocol, db.max_connections, db.tcp_allowed_ips),
            ("tcp", 100, ("10.0.0.0/8", "127.0.0.1")),
        )
        dns = config.entrypoints["udp-dns"]
        self.assertEqual(
            (dns.protocol, dns.udp_session_timeout_secs, dns.udp_max_sessions), ("udp", 30, 10000)
        )

    def test_routers(self) -> None:
        """Router rules, lists and priorities."""
        config = self.example()
        api = config.routers["llm-api"]
        self.assertEqual(api.rule, "Host(`api.example.com`) && PathPrefix(`/v1`)")
        self.assertEqual(api.entrypoints, ("web", "websecure"))
        self.assertEqual(
            api.middlewares,
            ("cors", "auth-jwt", "rate-limit", "circuit-breaker", "security-headers"),
        )
        self.assertEqual(config.routers["health"].priority, -10)
        self.assertEqual(config.routers["health"].entrypoints, ())

    def test_services(self) -> None:
        """Servers, health check, sticky, mirror, failover, scaling, revisions and rollout."""
        config = self.example()
        llm = config.services["llm"]
        balancer = llm.load_balancer
        self.assertEqual(balancer.strategy, "least-connections")
        self.assertEqual(
            balancer.servers,
            (ServerConfig("http://127.0.0.1:8001", 1), ServerConfig("http://127.0.0.1:8002", 1)),
        )
        assert balancer.health_check is not None
        self.assertEqual(
            (
                balancer.health_check.path,
                balancer.health_check.interval,
                balancer.health_check.timeout,
            ),
            ("/health", 10.0, 5.0),
        )
        self.assertEqual(balancer.sticky, StickyConfig(cookie="llm_session"))
        assert llm.mirror is not None and llm.failover is not None and llm.scaling is not None
        self.assertEqual((llm.mirror.service, llm.mirror.percentage), ("llm-shadow", 5))
        self.assertEqual(llm.failover.service, "llm-backup")
        self.assertEqual((llm.scaling.max_replicas, llm.scaling.buffer_enabled), (8, True))
        model = config.services["model"]
        self.assertEqual(
            model.revisions[1],
            RevisionConfig(
                name="v2",
                traffic_percent=10,
                servers=(ServerConfig("http://127.0.0.1:9002", 2),),
                strategy="weighted",
            ),
        )
        self.assertEqual(
            model.rollout,
            RolloutConfig(
                from_="v1",
                to="v2",
                step_percent=10,
                step_interval_secs=60,
                error_rate_threshold=0.05,
                latency_threshold_ms=5000,
            ),
        )
        self.assertEqual(config.services["dns"].load_balancer.servers[0].url, "127.0.0.1:53")

    def test_middlewares(self) -> None:
        """Middleware options keep every key but type, lists as tuples and maps as dicts."""
        config = self.example()
        cors = config.middlewares["cors"]
        self.assertEqual(cors.type, "cors")
        self.assertEqual(
            dict(cors.options),
            {
                "allowed_origins": ("https://app.example.com",),
                "allowed_methods": ("GET", "POST"),
                "allowed_headers": ("Content-Type", "Authorization"),
                "max_age": 3600,
            },
        )
        self.assertEqual(
            dict(config.middlewares["security-headers"].options),
            {
                "request_headers": {"X-Forwarded-Proto": "https"},
                "response_headers": {"X-Frame-Options": "DENY"},
            },
        )
        self.assertEqual(dict(config.middlewares["compress"].options), {})

    def test_providers(self) -> None:
        """All four provider blocks, with their keys."""
        providers = self.example().providers
        self.assertEqual(
            providers.file, FileProviderConfig(watch=True, directory="/etc/gateway/conf.d")
        )
        self.assertEqual(
            providers.discovery,
            {
                "seeds": ({"url": "http://127.0.0.1:8300"},),
                "poll_interval_secs": 30,
                "timeout_secs": 5,
            },
        )
        self.assertEqual(
            providers.docker,
            {"host": "/var/run/docker.sock", "label_prefix": "a3s", "poll_interval_secs": 10},
        )
        self.assertEqual(
            providers.kubernetes,
            {
                "namespace": "default",
                "label_selector": "app=web",
                "watch_interval_secs": 30,
                "ingress_route_crd": False,
            },
        )


class FileTests(_LoadTestCase):
    """load_config's file handling."""

    def test_missing(self) -> None:
        """A missing file is ConfigNotFound, displayed as the reference does."""
        path = self.mktemp()
        with self.assertRaises(ConfigNotFound) as raised:
            load_config(path)
        self.assertEqual(str(raised.exception), f"Config file not found: {path}")
        self.assertIsInstance(raised.exception, ConfigError)

    def test_source(self) -> None:
        """The config remembers its file, and messages name it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(MINIMAL)
        self.assertEqual(load_config(path, environ={}).source, path)

    def test_directory(self) -> None:
        """A directory is a parse error saying why it cannot be read."""
        path = self.mktemp()
        os.mkdir(path)
        with self.assertRaises(ConfigParseError) as raised:
            load_config(path)
        self.assertEqual(
            str(raised.exception),
            f"Configuration error: Failed to parse HCL config: {path}: cannot read file: Is a "
            "directory",
        )

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is a parse error."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"shutdown_timeout_secs = 1\n# \xff\n")
        with self.assertRaises(ConfigParseError) as raised:
            load_config(path)
        self.assertEqual(raised.exception.problem, "file is not valid UTF-8 (byte offset 28)")

    def test_byte_order_mark(self) -> None:
        """A UTF-8 byte-order mark is ignored."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbfshutdown_timeout_secs = 3\n")
        self.assertEqual(load_config(path, environ={}).shutdown_timeout_secs, 3)

    def test_uses_process_environment(self) -> None:
        """Without an explicit environment, os.environ supplies the variables."""
        self.patch(os, "environ", {"A3S_TEST_TIMEOUT": "12"})
        self.assertEqual(
            parse_config("shutdown_timeout_secs = ${A3S_TEST_TIMEOUT}").shutdown_timeout_secs, 12
        )


class EnvironmentTests(_LoadTestCase):
    """${VAR} and ${VAR:-default} expansion."""

    def test_set(self) -> None:
        """A set variable is substituted inside a string."""
        self.assertEqual(self.string_value('"Bearer ${TOKEN}"', {"TOKEN": "t0k"}), "Bearer t0k")

    def test_default_when_unset(self) -> None:
        """An unset variable with a default takes the default."""
        self.assertEqual(self.string_value('"${TOKEN:-anon}"'), "anon")

    def test_default_when_empty(self) -> None:
        """As in the shell, an empty variable takes the default too."""
        self.assertEqual(self.string_value('"${TOKEN:-anon}"', {"TOKEN": ""}), "anon")

    def test_set_value_beats_default(self) -> None:
        """A non-empty variable wins over the default."""
        self.assertEqual(self.string_value('"${TOKEN:-anon}"', {"TOKEN": "x"}), "x")

    def test_empty_without_default(self) -> None:
        """An empty variable without a default expands to the empty string."""
        self.assertEqual(self.string_value('"[${TOKEN}]"', {"TOKEN": ""}), "[]")

    def test_default_is_literal(self) -> None:
        """A default may hold quotes and spaces; it is taken literally."""
        self.assertEqual(self.string_value('"${TOKEN:-say "hi" \\n}"'), 'say "hi" \\n')

    def test_unset(self) -> None:
        """An unset variable without a default is a validation error naming it and its line."""
        self.assertInvalid(
            MINIMAL + 'middlewares "j" {\n  type  = "jwt"\n  value = "${JWT_SECRET}"\n}\n',
            "",
            "line 18: environment variable 'JWT_SECRET' is not set (write "
            "${JWT_SECRET:-default} to give it a default)",
        )

    def test_injection(self) -> None:
        """A value full of HCL syntax stays one plain string and adds nothing to the config."""
        value = 'x" } evil { a = "'
        config = self.load(
            MINIMAL + 'middlewares "j" {\n  type  = "jwt"\n  value = "${V}"\n}\n', {"V": value}
        )
        self.assertEqual(config.middlewares["j"].options["value"], value)
        self.assertEqual(list(config.middlewares), ["j"])

    def test_injection_of_templates_and_newlines(self) -> None:
        """Backslashes, newlines, ${ and %{ in a value are kept verbatim, never re-expanded."""
        value = "a\\b\nc ${HOME} %{ if x } $${y}"
        self.assertEqual(self.string_value('"${V}"', {"V": value, "HOME": "/root"}), value)

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_any_value_round_trips(self, value: str) -> None:
        """Whatever text a variable holds comes back as exactly that string."""
        self.assertEqual(self.string_value('"${V}"', {"V": value}), value)

    @settings(max_examples=100, deadline=None)
    @given(st.text(), st.text(alphabet='${}%\\"x\n', max_size=12))
    def test_any_value_in_heredoc_round_trips(self, value: str, noise: str) -> None:
        """In a heredoc too, a value (even next to template-like text) is kept verbatim."""
        self.assertEqual(
            self.string_value("<<EOT\n${V}\nEOT\n", {"V": value + noise}), value + noise + "\n"
        )

    def test_escaped_dollar(self) -> None:
        """$${ is a literal ${ and is not expanded, even when the variable is set."""
        self.assertEqual(
            self.string_value('"$${TOKEN} costs $5"', {"TOKEN": "x"}), "${TOKEN} costs $5"
        )

    def test_escaped_dollar_without_brace(self) -> None:
        """$${ needs no closing brace (python-hcl2 alone would refuse this)."""
        self.assertEqual(self.string_value('"costs $${ and %%{"'), "costs ${ and %{")

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_any_quoted_string_round_trips(self, value: str) -> None:
        """Any text written as an HCL quoted string (escapes, $${, %%{) reads back unchanged."""
        body = value.replace("\\", "\\\\").replace('"', '\\"')
        body = body.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        body = body.replace("${", "$${").replace("%{", "%%{")
        self.assertEqual(self.string_value(f'"{body}"'), value)

    def test_escaped_percent(self) -> None:
        """%%{ is a literal %{."""
        self.assertEqual(self.string_value('"100%%{x} 50%"'), "100%{x} 50%")

    def test_adjacent_dollar(self) -> None:
        """A value ending in $ next to literal braces cannot form an interpolation."""
        self.assertEqual(self.string_value('"${A}{x}"', {"A": "$"}), "${x}")
        self.assertEqual(self.string_value('"${A}${B}"', {"A": "$", "B": "{x}"}), "${x}")

    def test_label(self) -> None:
        """Variables work in block labels."""
        config = self.load(MINIMAL.replace('routers "r"', 'routers "${NAME}"'), {"NAME": "api"})
        self.assertEqual(list(config.routers), ["api"])
        self.assertEqual(config.routers["api"].name, "api")

    def test_bare_number(self) -> None:
        """Outside quotes a variable may produce a number."""
        config = self.load("shutdown_timeout_secs = ${T:-45}\n")
        self.assertEqual(config.shutdown_timeout_secs, 45)

    def test_bare_non_literal(self) -> None:
        """Outside quotes anything but a number or boolean is refused (it could be syntax)."""
        self.assertInvalid(
            "shutdown_timeout_secs = ${T}\n",
            "",
            "line 1: environment variable 'T' is used outside a quoted string, so its value must "
            "be a number or true/false (quote it to use it as a string)",
            {"T": "1\n}\nevil {"},
        )

    def test_quoted_number_is_a_string(self) -> None:
        """A quoted expansion is a string, so a number key rejects it with a type error."""
        self.assertInvalid(
            'shutdown_timeout_secs = "${T}"\n',
            "shutdown_timeout_secs",
            'invalid type: string "5", expected u64',
            {"T": "5"},
        )

    def test_comments_not_expanded(self) -> None:
        """Variables in comments are left alone (an unset one is no error)."""
        config = self.load(
            "# uses ${UNSET}\n// and ${UNSET}\n/* and ${UNSET} */\nshutdown_timeout_secs = 2\n"
        )
        self.assertEqual(config.shutdown_timeout_secs, 2)

    def test_heredoc(self) -> None:
        """Heredocs expand variables and keep quotes and backslashes literally."""
        value = self.string_value('<<EOT\nkey ${K} "q" \\n $${x}\nEOT\n', {"K": "v\nw"})
        self.assertEqual(value, 'key v\nw "q" \\n ${x}\n')

    def test_heredoc_flush(self) -> None:
        """<<- removes the common indentation of the content lines."""
        value = self.string_value("<<-EOT\n      a\n        b\n    EOT\n")
        self.assertEqual(value, "a\n  b\n")

    def test_heredoc_keeps_line_numbers(self) -> None:
        """Lines after a heredoc keep their numbers in messages."""
        self.assertInvalid(
            'middlewares "j" {\n  type = "jwt"\n  value = <<EOT\nx\ny\nEOT\n'
            '  issuer = "${ISS}"\n}\n',
            "",
            "line 7: environment variable 'ISS' is not set (write ${ISS:-default} to give it a "
            "default)",
        )

    def test_unterminated_heredoc(self) -> None:
        """A heredoc without its closing marker is a parse error at its start."""
        self.assertParseError(
            "shutdown_timeout_secs = 1\nx = <<EOT\nabc\n",
            "unterminated heredoc '<<EOT': no closing 'EOT' line",
            2,
            5,
        )

    def test_other_interpolation(self) -> None:
        """HCL interpolations other than ${NAME} are not evaluated: parse error."""
        self.assertParseError(
            'x = "${var.a}"\n',
            "unsupported interpolation '${var.a}': only ${NAME} and ${NAME:-default} are "
            "expanded; write '$${' for a literal '${'",
            1,
            6,
        )

    def test_template_directive(self) -> None:
        """Template directives are not supported."""
        self.assertParseError(
            'x = "%{ if a }b%{ endif }"\n',
            "template directives ('%{') are not supported; write '%%{' for a literal '%{'",
            1,
            6,
        )


class ParseTests(_LoadTestCase):
    """HCL syntax as hcl-rs accepts it."""

    def test_semicolons_rejected(self) -> None:
        """The README's one-line blocks with ';' fail to parse, naming the position."""
        error = self.assertParseError(
            'middlewares "rl" { type = "rate-limit"; rate = 60; burst = 10 }\n',
            "';' is not a valid separator: write one attribute per line",
            1,
            39,
        )
        self.assertEqual(
            str(error),
            "Configuration error: Failed to parse HCL config: gw.hcl:1:39: ';' is not a valid "
            "separator: write one attribute per line",
        )

    def test_two_attributes_on_one_line(self) -> None:
        """Two attributes on one line are rejected, as hcl-rs does."""
        self.assertParseError(
            'middlewares "rl" { type = "rate-limit" rate = 60 }\n',
            "'rate' must start on a new line: write one attribute or block per line",
            1,
            40,
        )

    def test_one_line_block(self) -> None:
        """A one-line block with a single attribute is fine."""
        config = self.load(MINIMAL + 'middlewares "c" { type = "compress" }\n')
        self.assertEqual(config.middlewares["c"].type, "compress")

    def test_syntax_error_position(self) -> None:
        """Other syntax errors name file, line and column."""
        error = self.assertParseError("a = 1\nb = = 2\n", "unexpected '='", 2, 5)
        self.assertIn("gw.hcl:2:5:", str(error))

    def test_unexpected_end(self) -> None:
        """A missing closing brace is reported as the end of the file."""
        self.assertParseError(
            'entrypoints "web" {\n  address = ":1"\n', "unexpected end of file", 3, 1
        )

    def test_unterminated_string(self) -> None:
        """A string without its closing quote."""
        self.assertParseError('a = "abc\nb = 1\n', "unterminated string", 1, 5)

    def test_invalid_escape(self) -> None:
        """HCL's escapes only."""
        self.assertParseError(
            'a = "x\\qy"\n',
            "invalid escape sequence '\\q' in string (valid: \\n \\r \\t \\\" \\\\ \\uNNNN "
            "\\UNNNNNNNN)",
            1,
            7,
        )

    def test_unicode_escapes(self) -> None:
        """\\u and \\U escapes decode."""
        self.assertEqual(self.string_value('"\\u00e9\\U0001F600\\t"'), "é\U0001f600\t")

    def test_attribute_and_block(self) -> None:
        """One name written as an attribute and as a block is ambiguous: rejected."""
        self.assertParseError(
            'entrypoints = {}\nentrypoints "web" {\n  address = ":1"\n}\n',
            "'entrypoints' is written both as an attribute and as a block",
            2,
            1,
        )

    def test_comments(self) -> None:
        """#, // and /* */ comments are accepted anywhere between items."""
        config = self.load(
            "# a\n// b\n/* c\n d */\nshutdown_timeout_secs = 4 # trailing\n/* end */\n"
        )
        self.assertEqual(config.shutdown_timeout_secs, 4)

    def test_later_attribute_wins(self) -> None:
        """A later duplicate top-level attribute replaces the earlier one."""
        self.assertEqual(
            self.load(
                "shutdown_timeout_secs = 1\nshutdown_timeout_secs = 2\n"
            ).shutdown_timeout_secs,
            2,
        )

    def test_expression(self) -> None:
        """Expressions other than literals are refused, naming the key."""
        self.assertInvalid(
            "shutdown_timeout_secs = 1 + 2\n",
            "shutdown_timeout_secs",
            "unsupported expression '1 + 2': only literal strings, numbers, booleans, lists and "
            "maps are allowed",
        )

    def test_scientific_notation(self) -> None:
        """Numbers in scientific notation are numbers."""
        config = self.load(MINIMAL.replace("servers", 'strategy = "random"\n    servers') + "")
        self.assertEqual(config.services["s"].load_balancer.strategy, "random")
        text = MINIMAL.replace(
            "  }\n}\n", "  }\n  scaling {\n    target_utilization = 5e-1\n  }\n}\n"
        )
        scaling = self.load(text).services["s"].scaling
        assert scaling is not None
        self.assertEqual(scaling.target_utilization, 0.5)


class NormalisationTests(_LoadTestCase):
    """hcl2's output shape normalised to the HCL JSON-spec mapping."""

    def test_attribute_object_equals_blocks(self) -> None:
        """C{entrypoints = { web = {...} }} is the same as a labelled block."""
        from_blocks = self.load(MINIMAL)
        from_attributes = self.load(
            'entrypoints = {\n  web = {\n    address = "127.0.0.1:8080"\n  }\n}\n'
            + MINIMAL.split("\n", 4)[4]
        )
        self.assertEqual(from_blocks, from_attributes)

    def test_duplicate_labels(self) -> None:
        """Two blocks with the same label are an error naming the path."""
        self.assertInvalid(
            MINIMAL + 'entrypoints "web" {\n  address = ":2"\n}\n',
            "entrypoints.web",
            "duplicate block: 'entrypoints \"web\"' is defined more than once",
        )

    def test_quoted_map_keys(self) -> None:
        """Quoted keys of object literals lose their quotes."""
        config = self.load(
            MINIMAL
            + 'middlewares "h" {\n  type = "headers"\n  response_headers = {\n'
            + '    "X-Frame-Options" = "DENY"\n    plain = "v"\n  }\n}\n'
        )
        self.assertEqual(
            config.middlewares["h"].options["response_headers"],
            {"X-Frame-Options": "DENY", "plain": "v"},
        )

    def test_repeated_server_blocks(self) -> None:
        """Repeated C{servers {}} blocks become a list, which is what servers needs."""
        config = self.load(
            MINIMAL.replace(
                'servers = [{ url = "http://127.0.0.1:9000" }]',
                'servers {\n      url = "http://127.0.0.1:1"\n    }\n'
                '    servers {\n      url = "http://127.0.0.1:2"\n      weight = 3\n    }',
            )
        )
        self.assertEqual(
            config.services["s"].load_balancer.servers,
            (ServerConfig("http://127.0.0.1:1"), ServerConfig("http://127.0.0.1:2", 3)),
        )

    def test_single_server_block(self) -> None:
        """A single C{servers {}} block is an object, so it fails as in the reference."""
        self.assertInvalid(
            MINIMAL.replace(
                'servers = [{ url = "http://127.0.0.1:9000" }]',
                'servers {\n      url = "http://127.0.0.1:1"\n    }',
            ),
            "services.s.load_balancer.servers",
            "invalid type: map, expected a sequence",
        )

    def test_repeated_single_block(self) -> None:
        """Two C{tls {}} blocks make a list where one object is expected."""
        self.assertInvalid(
            'entrypoints "web" {\n  address = ":1"\n'
            '  tls {\n    cert_file = "a"\n    key_file = "b"\n  }\n'
            '  tls {\n    cert_file = "a"\n    key_file = "b"\n  }\n}\n',
            "entrypoints.web.tls",
            "invalid type: sequence, expected a map",
        )

    def test_mixed_labels(self) -> None:
        """Labelled and unlabelled blocks of one name cannot be mixed."""
        self.assertInvalid(
            'entrypoints "web" {\n  address = ":1"\n}\nentrypoints {\n}\n',
            "entrypoints",
            "'entrypoints' blocks are written both with and without labels",
        )


class SchemaTests(_LoadTestCase):
    """Strict conversion: unknown keys, serde-style type errors, defaults, new keys."""

    def test_unknown_key_suggestion(self) -> None:
        """A typo gets the key path and the closest known key."""
        self.assertInvalid(
            MINIMAL.replace("load_balancer {", 'load_balancer {\n    stratgy = "random"'),
            "services.s.load_balancer",
            "unknown key 'stratgy' (did you mean 'strategy'?)",
        )

    def test_unknown_key_without_suggestion(self) -> None:
        """Nothing close: no suggestion."""
        self.assertInvalid(MINIMAL + "zzz = 1\n", "", "unknown key 'zzz'")

    def test_unknown_block(self) -> None:
        """Unknown blocks are unknown keys too."""
        self.assertInvalid(
            MINIMAL.replace("load_balancer {", "load_balancer {\n    helth_check {\n    }"),
            "services.s.load_balancer",
            "unknown key 'helth_check' (did you mean 'health_check'?)",
        )

    def test_unknown_middleware_key(self) -> None:
        """Middleware keys are checked against the union of every type's keys."""
        self.assertInvalid(
            MINIMAL + 'middlewares "m" {\n  type = "rate-limit"\n  rate = 1\n  brust = 2\n}\n',
            "middlewares.m",
            "unknown key 'brust' (did you mean 'burst'?)",
        )

    def test_string_for_integer(self) -> None:
        """serde's type error for a string where a u32 belongs."""
        self.assertInvalid(
            'entrypoints "t" {\n  address = ":1"\n  protocol = "tcp"\n  max_connections = "x"\n}\n',
            "entrypoints.t.max_connections",
            'invalid type: string "x", expected u32',
        )

    def test_other_type_errors(self) -> None:
        """Booleans, floats, lists, maps and null are described as serde describes them."""
        cases = (
            ("shutdown_timeout_secs = true", "invalid type: boolean `true`, expected u64"),
            ("shutdown_timeout_secs = 1.5", "invalid type: floating point `1.5`, expected u64"),
            ("shutdown_timeout_secs = [1]", "invalid type: sequence, expected u64"),
            ("shutdown_timeout_secs = {}", "invalid type: map, expected u64"),
            ("shutdown_timeout_secs = null", "invalid type: null, expected u64"),
        )
        for text, problem in cases:
            self.assertInvalid(text + "\n", "shutdown_timeout_secs", problem)
        self.assertInvalid(
            MINIMAL.replace('rule    = "PathPrefix(`/`)"', "rule = 5"),
            "routers.r.rule",
            "invalid type: integer `5`, expected a string",
        )
        self.assertInvalid(
            MINIMAL + 'providers {\n  file {\n    watch = "yes"\n  }\n}\n',
            "providers.file.watch",
            'invalid type: string "yes", expected a boolean',
        )

    def test_negative_unsigned(self) -> None:
        """A negative number for an unsigned key is refused."""
        self.assertInvalid(
            MINIMAL.replace(
                'url = "http://127.0.0.1:9000"', 'url = "http://127.0.0.1:9000", weight = -1'
            ),
            "services.s.load_balancer.servers[0].weight",
            "invalid value: integer `-1`, expected u32",
        )

    def test_i32_range(self) -> None:
        """Priorities are i32: negative allowed, beyond 2^31 not."""
        text = MINIMAL.replace('service = "s"', 'service = "s"\n  priority = -2147483648')
        self.assertEqual(self.load(text).routers["r"].priority, -(2**31))
        self.assertInvalid(
            MINIMAL.replace('service = "s"', 'service = "s"\n  priority = 2147483648'),
            "routers.r.priority",
            "invalid value: integer `2147483648`, expected i32",
        )

    def test_mirror_percentage_u8(self) -> None:
        """mirror.percentage is u8: 255 is kept (the sampler clamps), 256 is refused."""
        text = (
            MINIMAL
            + 'services "m" {\n  load_balancer {\n'
            + '    servers = [{ url = "http://127.0.0.1:1" }]\n  }\n}\n'
        )
        mirrored = text.replace(
            "  }\n}\n", '  }\n  mirror {\n    service = "m"\n    percentage = 255\n  }\n}\n', 1
        )
        mirror = self.load(mirrored).services["s"].mirror
        assert mirror is not None
        self.assertEqual(mirror.percentage, 255)
        self.assertInvalid(
            mirrored.replace("255", "256"),
            "services.s.mirror.percentage",
            "invalid value: integer `256`, expected u8",
        )

    def test_missing_field(self) -> None:
        """A missing required key: serde's message at the block's path."""
        self.assertInvalid('entrypoints "web" {\n}\n', "entrypoints.web", "missing field `address`")
        self.assertInvalid(
            MINIMAL + 'middlewares "m" {\n  rate = 1\n}\n', "middlewares.m", "missing field `type`"
        )

    def test_unknown_variant(self) -> None:
        """Enumerations list their variants."""
        self.assertInvalid(
            'entrypoints "web" {\n  address = ":1"\n  protocol = "HTTP"\n}\n',
            "entrypoints.web.protocol",
            "unknown variant `HTTP`, expected one of `http`, `tcp`, `udp`",
        )
        self.assertInvalid(
            MINIMAL.replace("load_balancer {", 'load_balancer {\n    strategy = "round_robin"'),
            "services.s.load_balancer.strategy",
            "unknown variant `round_robin`, expected one of `round-robin`, `weighted`, "
            "`least-connections`, `random`",
        )

    def test_labelled_section_not_a_map(self) -> None:
        """A section entry that is not a block is a type error."""
        self.assertInvalid(
            "routers = { r = 1 }\n", "routers.r", "invalid type: integer `1`, expected a map"
        )

    def test_null_optional(self) -> None:
        """null leaves an optional key unset."""
        config = self.load(
            MINIMAL.replace(
                'address = "127.0.0.1:8080"', 'address = "127.0.0.1:8080"\n  max_connections = null'
            )
        )
        self.assertIsNone(config.entrypoints["web"].max_connections)

    def test_defaults(self) -> None:
        """Omitted keys take the reference's (and DECISIONS') defaults."""
        config = self.load(MINIMAL)
        self.assertEqual(config.shutdown_timeout_secs, 30)
        web = config.entrypoints["web"]
        self.assertEqual(
            (web.protocol, web.tls, web.max_request_body_bytes, web.forwarded_headers),
            ("http", None, 33554432, ForwardedHeadersConfig()),
        )
        service = config.services["s"]
        self.assertEqual(service.load_balancer.strategy, "round-robin")
        self.assertEqual(service.load_balancer.passive_health, PassiveHealthConfig())
        self.assertEqual(service.timeouts, TimeoutsConfig(5.0, 300.0, 300.0, 0.0))
        self.assertEqual(config.routers["r"].priority, 0)
        self.assertIsNone(config.access_log)
        self.assertIsNone(config.tracing)
        self.assertIsNone(config.dashboard)

    def test_timeouts(self) -> None:
        """timeouts takes durations as strings or bare numbers of seconds."""
        config = self.load(
            MINIMAL.replace(
                "  }\n}\n",
                '  }\n  timeouts {\n    connect = "250ms"\n    response_header = "2m"\n'
                "    idle = 7\n    total = 1.5\n  }\n}\n",
            )
        )
        self.assertEqual(config.services["s"].timeouts, TimeoutsConfig(0.25, 120.0, 7.0, 1.5))

    def test_bad_duration(self) -> None:
        """A bad duration is an error naming its key (no silent 10 s)."""
        self.assertInvalid(
            MINIMAL.replace("  }\n}\n", '  }\n  timeouts {\n    connect = "1h"\n  }\n}\n'),
            "services.s.timeouts.connect",
            "invalid duration '1h': expected <n>ms, <n>s, <n>m or a bare <n> (seconds)",
        )
        self.assertInvalid(
            MINIMAL.replace("  }\n}\n", "  }\n  timeouts {\n    connect = -1\n  }\n}\n"),
            "services.s.timeouts.connect",
            "invalid duration -1: must not be negative",
        )

    def test_load_balancer_new_keys(self) -> None:
        """passive_health, sticky ttl/max_sessions and health-check durations."""
        config = self.load(
            MINIMAL.replace(
                "load_balancer {",
                "load_balancer {\n"
                "    passive_health {\n      enabled = false\n      error_threshold = 2\n"
                '      window = "10s"\n      recovery_time = "1m"\n      error_statuses = [502]\n'
                "    }\n"
                '    sticky {\n      cookie = "sid"\n      ttl = "60s"\n'
                "      max_sessions = 10\n    }\n"
                '    health_check {\n      path = "/h"\n      interval = "500ms"\n'
                "      timeout = 2\n"
                "      unhealthy_threshold = 2\n      healthy_threshold = 3\n    }",
            )
        )
        balancer = config.services["s"].load_balancer
        self.assertEqual(balancer.passive_health, PassiveHealthConfig(False, 2, 10.0, 60.0, (502,)))
        self.assertEqual(balancer.sticky, StickyConfig("sid", 60.0, 10))
        check = balancer.health_check
        assert check is not None
        self.assertEqual(
            (
                check.path,
                check.interval,
                check.timeout,
                check.unhealthy_threshold,
                check.healthy_threshold,
            ),
            ("/h", 0.5, 2.0, 2, 3),
        )

    def test_entrypoint_new_keys(self) -> None:
        """forwarded_headers and max_request_body_bytes."""
        config = self.load(
            MINIMAL.replace(
                'address = "127.0.0.1:8080"',
                'address = "127.0.0.1:8080"\n  max_request_body_bytes = 1024\n'
                '  forwarded_headers {\n    trusted_ips = ["10.0.0.0/8"]\n  }',
            )
        )
        web = config.entrypoints["web"]
        self.assertEqual(web.max_request_body_bytes, 1024)
        self.assertEqual(web.forwarded_headers, ForwardedHeadersConfig(("10.0.0.0/8",)))

    def test_middleware_options(self) -> None:
        """Every key but type is kept, typed; null values are dropped; unused keys stay."""
        config = self.load(
            MINIMAL
            + 'middlewares "j" {\n  type = "jwt"\n  value = "s"\n  algorithms = ["HS256"]\n'
            + '  audience = ["a", "b"]\n  issuer = "i"\n  header = null\n  max_age = 5\n}\n'
        )
        self.assertEqual(
            dict(config.middlewares["j"].options),
            {
                "value": "s",
                "algorithms": ("HS256",),
                "audience": ("a", "b"),
                "issuer": "i",
                "max_age": 5,
            },
        )

    def test_middleware_option_types(self) -> None:
        """Middleware keys are type-checked even when the type does not use them."""
        self.assertInvalid(
            MINIMAL + 'middlewares "c" {\n  type = "compress"\n  rate = "fast"\n}\n',
            "middlewares.c.rate",
            'invalid type: string "fast", expected u64',
        )
        self.assertInvalid(
            MINIMAL
            + 'middlewares "h" {\n  type = "headers"\n  request_headers = {\n    a = 1\n  }\n}\n',
            "middlewares.h.request_headers.a",
            "invalid type: integer `1`, expected a string",
        )

    def test_observability_blocks(self) -> None:
        """access_log, tracing and dashboard (DECISIONS' observability settings)."""
        config = self.load(
            MINIMAL
            + 'access_log {\n  path = "-"\n}\n'
            + 'tracing {\n  propagation = "b3"\n  sample_rate = 0.25\n'
            + '  otlp_endpoint = "http://127.0.0.1:4318"\n}\n'
            + 'dashboard {\n  entrypoint = "web"\n}\n'
        )
        self.assertEqual(config.access_log, AccessLogConfig("-"))
        self.assertEqual(
            config.tracing, TracingConfig("b3", 0.25, "a3s-gateway", "http://127.0.0.1:4318")
        )
        self.assertEqual(config.dashboard, DashboardConfig("web"))
        self.assertInvalid(
            MINIMAL + 'tracing {\n  propagation = "zipkin"\n}\n',
            "tracing.propagation",
            "unknown variant `zipkin`, expected one of `w3c`, `b3`",
        )

    def test_discovery_requires_seeds(self) -> None:
        """providers.discovery needs seeds."""
        self.assertInvalid(
            MINIMAL + "providers {\n  discovery {\n  }\n}\n",
            "providers.discovery",
            "missing field `seeds`",
        )


class ApplyListenTests(_LoadTestCase):
    """--listen ADDR."""

    def test_replaces_web(self) -> None:
        """An existing web entrypoint becomes plain HTTP on the new address, in place."""
        config = self.load(
            'entrypoints "web" {\n  address = ":1"\n  protocol = "tcp"\n}\n'
            'entrypoints "other" {\n  address = ":2"\n}\n'
        )
        updated = apply_listen(config, "[::1]:8080")
        self.assertEqual(list(updated.entrypoints), ["web", "other"])
        self.assertEqual(
            updated.entrypoints["web"], EntrypointConfig(name="web", address="[::1]:8080")
        )
        self.assertEqual(config.entrypoints["web"].protocol, "tcp")

    def test_creates_web(self) -> None:
        """Without a web entrypoint one is added."""
        updated = apply_listen(self.load('entrypoints "a" {\n  address = ":1"\n}\n'), ":9")
        self.assertEqual(list(updated.entrypoints), ["a", "web"])
        self.assertEqual(updated.entrypoints["web"].address, ":9")

    def test_bad_address(self) -> None:
        """A bad address is a validation error in the reference's family."""
        with self.assertRaises(ConfigValidationError) as raised:
            apply_listen(self.load(MINIMAL), "localhost")
        self.assertEqual(
            str(raised.exception),
            "Configuration error: gw.hcl: entrypoints.web.address: Invalid address 'localhost' "
            "for entrypoint 'web': missing ':<port>'",
        )

    def test_revalidates(self) -> None:
        """The result is validated: a TCP backend behind a router on web is now refused."""
        config = self.load(
            'entrypoints "web" {\n  address = ":1"\n  protocol = "tcp"\n}\n'
            + 'routers "r" {\n  rule = "PathPrefix(`/`)"\n  service = "s"\n}\n'
            + 'services "s" {\n  load_balancer {\n'
            + '    servers = [{ url = "tcp://127.0.0.1:1" }]\n  }\n}\n'
        )
        with self.assertRaises(ConfigValidationError) as raised:
            apply_listen(config, ":8080")
        self.assertEqual(raised.exception.key_path, "services.s.load_balancer.servers[0].url")


class WorkersKeyTests(_LoadTestCase):
    """The top-level ``workers`` key: how many processes serve the configuration."""

    def test_default(self) -> None:
        """Without the key one process serves."""
        self.assertEqual(self.load(MINIMAL).workers, 1)

    def test_set(self) -> None:
        """An integer is taken as it is, also through an environment variable."""
        self.assertEqual(self.load(MINIMAL + "workers = 4\n").workers, 4)
        self.assertEqual(self.load(MINIMAL + "workers = ${N}\n", {"N": "2"}).workers, 2)

    def test_type_errors(self) -> None:
        """Anything but a non-negative integer is refused in serde's words, like the u64 keys."""
        cases = (
            ("workers = true", "invalid type: boolean `true`, expected usize"),
            ("workers = 1.5", "invalid type: floating point `1.5`, expected usize"),
            ('workers = "2"', 'invalid type: string "2", expected usize'),
            ("workers = -1", "invalid value: integer `-1`, expected usize"),
        )
        for text, problem in cases:
            self.assertInvalid(MINIMAL + text + "\n", "workers", problem)
