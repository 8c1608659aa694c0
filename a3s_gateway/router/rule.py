# -*- test-case-name: tests.test_rule -*-
"""
The routing rule language: a parser from Traefik-style rule text to a tree of matchers.

For the route table (:mod:`a3s_gateway.router.table`), for config validation (which calls
:func:`parse_rule` on every router) and for the proxy, which builds one :class:`RequestFacts`
per request and asks the matchers about it.

Grammar (``!`` binds tighter than ``&&``, which binds tighter than ``||``)::

    rule     := or EOF
    or       := and ( "||" and )*
    and      := unary ( "&&" unary )*
    unary    := "!"* primary
    primary  := "(" or ")" | matcher
    matcher  := NAME "(" [ ARG ( "," ARG )* ] ")"
    ARG      := "`" any text but "`" "`"
              | '"' text where \\" and \\\\ are escapes (other backslashes stay as written) '"'

Whitespace may separate any two tokens. Parsing does all the work that can be done once:
arguments are encoded to bytes, regular expressions compiled, networks parsed, so that
matching a request compares bytes and allocates little.
"""

from __future__ import annotations

import re
import string
from typing import (
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)
from urllib.parse import parse_qs

import attr
from twisted.web.http_headers import Headers

from a3s_gateway.addresses import Address, Network, parse_address, parse_network


@attr.s(auto_attribs=True, slots=True)
class RequestFacts:
    """
    What a rule may look at in one request; built once per request by the proxy (not frozen:
    a frozen attrs class takes twice as long to build, and nothing reassigns its fields).

    The derived views (:meth:`hostname`, :meth:`query_params`, :meth:`client_address`) are
    computed on first use and cached on the instance, so that a table of many routers parses
    the Host header, the query string and the client address at most once per request.
    """

    method: bytes
    host: Optional[bytes]
    path: bytes
    query: bytes
    headers: Headers
    client_ip: str
    _hostname: Optional[bytes] = attr.ib(init=False, default=None, eq=False, repr=False)
    _query_params: Optional[Dict[bytes, List[bytes]]] = attr.ib(
        init=False, default=None, eq=False, repr=False
    )
    _client_address: Optional[Address] = attr.ib(init=False, default=None, eq=False, repr=False)

    def hostname(self) -> Optional[bytes]:
        """
        The Host header without its port and without IPv6 brackets, lower-cased; None when the
        request has no Host.
        """
        hostname = self._hostname
        if hostname is None and self.host is not None:
            hostname = _strip_port(self.host).lower()
            self._hostname = hostname
        return hostname

    def query_params(self) -> Mapping[bytes, List[bytes]]:
        """
        The query string's parameters, percent-decoded with ``+`` as a space and blank values
        kept, as raw bytes (the decoding assumes no charset, so nothing is ever lost).
        """
        params = self._query_params
        if params is None:
            params = _parse_query(self.query)
            self._query_params = params
        return params

    def client_address(self) -> Optional[Address]:
        """
        :attr:`client_ip` parsed; an IPv4-mapped IPv6 address is returned as the IPv4 address it
        stands for. None when the client address is not an IP address.
        """
        address = self._client_address
        if address is None:
            address = parse_address(self.client_ip)
            if address is None:
                return None
            self._client_address = address
        return address


def _strip_port(host: bytes) -> bytes:
    # "[v6]:port" and "[v6]" lose the brackets; "name:port" loses the port; a bare IPv6
    # address (several colons, no brackets) is a host with no port.
    if host.startswith(b"["):
        close = host.find(b"]")
        return host if close == -1 else host[1:close]
    if host.count(b":") == 1:
        return host[: host.index(b":")]
    return host


def _parse_query(query: bytes) -> Dict[bytes, List[bytes]]:
    if not query:
        return {}
    # parse_qs on bytes insists on ASCII; Latin-1 maps every byte to one character and back,
    # so percent-decoding through it is byte-exact whatever the client sent.
    parsed = parse_qs(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return {
        key.encode("latin-1"): [value.encode("latin-1") for value in values]
        for key, values in parsed.items()
    }


class RuleError(ValueError):
    """
    A rule that does not parse. ``position`` is the 0-based offset, in the rule text, of the
    token at fault.
    """

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message, position)
        self.message = message
        self.position = position

    def __str__(self) -> str:
        return f"{self.message} at position {self.position}"


class Matcher(Protocol):
    """A compiled rule, or one part of it."""

    def matches(self, facts: RequestFacts) -> bool:
        """Whether the request described by ``facts`` satisfies this rule."""


def _encode(text: str) -> bytes:
    # Rule text may hold lone surrogates (HCL escapes can produce them); they can never match
    # a real request, but encoding them must not fail.
    return text.encode("utf-8", "surrogatepass")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Regex:
    """
    A Python regular expression searched in the UTF-8 text of a request field.

    Decoding costs an allocation per match, so an ASCII pattern is also compiled as a bytes
    pattern and applied to ASCII subjects (nearly all of them) as they are: on ASCII text the
    two agree. Undecodable bytes are kept as surrogate escapes, which no pattern character
    matches but ``.`` and negated classes do.
    """

    text: re.Pattern[str]
    ascii_only: Optional[re.Pattern[bytes]]

    def search(self, subject: bytes) -> bool:
        if self.ascii_only is not None and subject.isascii():
            return self.ascii_only.search(subject) is not None
        return self.text.search(subject.decode("utf-8", "surrogateescape")) is not None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _AllOf:
    matchers: Tuple[Matcher, ...]

    def matches(self, facts: RequestFacts) -> bool:
        for matcher in self.matchers:
            if not matcher.matches(facts):
                return False
        return True


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _AnyOf:
    matchers: Tuple[Matcher, ...]

    def matches(self, facts: RequestFacts) -> bool:
        for matcher in self.matchers:
            if matcher.matches(facts):
                return True
        return False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Not:
    matcher: Matcher

    def matches(self, facts: RequestFacts) -> bool:
        return not self.matcher.matches(facts)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Host:
    """``Host(h)``: the request's host, port ignored, equals ``h`` (lower-cased)."""

    hostname: bytes

    def matches(self, facts: RequestFacts) -> bool:
        return facts.hostname() == self.hostname


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _HostAndPort:
    """
    ``Host(`h:port`)``: a rule written for the reference, which compared the whole Host header;
    matching host and port keeps such rules meaning what their authors meant.
    """

    authority: bytes

    def matches(self, facts: RequestFacts) -> bool:
        host = facts.host
        return host is not None and host.lower() == self.authority


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _HostRegexp:
    regex: _Regex

    def matches(self, facts: RequestFacts) -> bool:
        hostname = facts.hostname()
        return hostname is not None and self.regex.search(hostname)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Path:
    path: bytes

    def matches(self, facts: RequestFacts) -> bool:
        return facts.path == self.path


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _PathPrefix:
    prefix: bytes

    def matches(self, facts: RequestFacts) -> bool:
        return facts.path.startswith(self.prefix)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _PathRegexp:
    regex: _Regex

    def matches(self, facts: RequestFacts) -> bool:
        return self.regex.search(facts.path)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Method:
    method: bytes  # upper-cased

    def matches(self, facts: RequestFacts) -> bool:
        method = facts.method
        return method == self.method or method.upper() == self.method


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Header:
    name: bytes
    value: bytes

    def matches(self, facts: RequestFacts) -> bool:
        values = facts.headers.getRawHeaders(self.name)
        return values is not None and self.value in values


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _HeaderRegexp:
    name: bytes
    regex: _Regex

    def matches(self, facts: RequestFacts) -> bool:
        values = facts.headers.getRawHeaders(self.name)
        if values is None:
            return False
        for value in values:
            if self.regex.search(value):
                return True
        return False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Query:
    key: bytes
    value: bytes

    def matches(self, facts: RequestFacts) -> bool:
        values = facts.query_params().get(self.key)
        return values is not None and self.value in values


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _QueryRegexp:
    key: bytes
    regex: _Regex

    def matches(self, facts: RequestFacts) -> bool:
        values = facts.query_params().get(self.key)
        if values is None:
            return False
        for value in values:
            if self.regex.search(value):
                return True
        return False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _ClientIP:
    network: Network

    def matches(self, facts: RequestFacts) -> bool:
        address = facts.client_address()
        # ipaddress answers False, not an error, when the versions differ.
        return address is not None and address in self.network


# Token kinds.
_NAME = "name"
_STRING = "string"
_LPAREN = "("
_RPAREN = ")"
_COMMA = ","
_AND = "&&"
_OR = "||"
_NOT = "!"
_EOF = "end"
_OTHER = "other"

_WHITESPACE = " \t\r\n\f\v"
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_PUNCTUATION = {"(": _LPAREN, ")": _RPAREN, ",": _COMMA, "!": _NOT}
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_QUOTED_ESCAPE = re.compile(r'\\(["\\])')
# RFC 9110 token characters: anything else is not a header name (and Twisted refuses it).
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters)
# Each group costs a few stack frames to parse and to match; no real rule nests this deep.
_MAX_NESTING = 50


class _Token(NamedTuple):
    kind: str
    start: int
    end: int
    value: str  # a name, an argument's decoded text, or the token's text


def _regex(arg: _Token, flags: int = 0) -> _Regex:
    source = arg.value
    try:
        text = re.compile(source, flags)
    except re.error as error:
        raise RuleError(f"Invalid regular expression '{source}': {error.msg}", arg.start) from error
    except (OverflowError, RecursionError) as error:
        raise RuleError(f"Invalid regular expression '{source}': {error}", arg.start) from error
    if not source.isascii():
        return _Regex(text, None)
    try:
        return _Regex(text, re.compile(source.encode("ascii"), flags))
    except re.error:
        # Text-only syntax (\u escapes, the (?u) flag): every subject takes the text path.
        return _Regex(text, None)


def _header_name(arg: _Token) -> bytes:
    if not arg.value or not _TOKEN_CHARS.issuperset(arg.value):
        raise RuleError(f"Invalid header name '{arg.value}'", arg.start)
    return arg.value.encode("ascii")


def _is_port(text: str) -> bool:
    return text != "" and all(char in string.digits for char in text)


def _build_host(args: Sequence[_Token]) -> Matcher:
    value = args[0].value.lower()
    if value.startswith("["):
        close = value.find("]")
        if close != -1:
            rest = value[close + 1 :]
            if rest.startswith(":") and _is_port(rest[1:]):
                return _HostAndPort(_encode(value))
            if not rest:
                return _Host(_encode(value[1:close]))
        return _Host(_encode(value))
    head, colon, port = value.rpartition(":")
    if colon and ":" not in head and _is_port(port):
        return _HostAndPort(_encode(value))
    return _Host(_encode(value))


def _build_client_ip(args: Sequence[_Token]) -> Matcher:
    arg = args[0]
    try:
        network = parse_network(arg.value)
    except ValueError:
        raise RuleError(f"Invalid IP or CIDR '{arg.value}'", arg.start) from None
    return _ClientIP(network)


_Builder = Callable[[Sequence[_Token]], Matcher]


def _header(args: Sequence[_Token]) -> Matcher:
    return _Header(_header_name(args[0]), _encode(args[1].value))


def _header_regexp(args: Sequence[_Token]) -> Matcher:
    return _HeaderRegexp(_header_name(args[0]), _regex(args[1]))


_MATCHERS: Dict[str, Tuple[int, _Builder]] = {
    "Host": (1, _build_host),
    "HostRegexp": (1, lambda args: _HostRegexp(_regex(args[0], re.IGNORECASE))),
    "Path": (1, lambda args: _Path(_encode(args[0].value))),
    "PathPrefix": (1, lambda args: _PathPrefix(_encode(args[0].value))),
    "PathRegexp": (1, lambda args: _PathRegexp(_regex(args[0]))),
    "Method": (1, lambda args: _Method(_encode(args[0].value.upper()))),
    "Header": (2, _header),
    "Headers": (2, _header),
    "HeaderRegexp": (2, _header_regexp),
    "HeadersRegexp": (2, _header_regexp),
    "Query": (2, lambda args: _Query(_encode(args[0].value), _encode(args[1].value))),
    "QueryRegexp": (2, lambda args: _QueryRegexp(_encode(args[0].value), _regex(args[1]))),
    "ClientIP": (1, _build_client_ip),
}


def _all_of(matchers: List[Matcher]) -> Matcher:
    if len(matchers) == 1:
        return matchers[0]
    flat: List[Matcher] = []
    for matcher in matchers:
        flat.extend(matcher.matchers if isinstance(matcher, _AllOf) else (matcher,))
    return _AllOf(tuple(flat))


def _any_of(matchers: List[Matcher]) -> Matcher:
    if len(matchers) == 1:
        return matchers[0]
    flat: List[Matcher] = []
    for matcher in matchers:
        flat.extend(matcher.matchers if isinstance(matcher, _AnyOf) else (matcher,))
    return _AnyOf(tuple(flat))


class _Parser:
    """
    A recursive-descent parser over a lazy tokenizer: a token is scanned only when the parser
    looks at it, so the error reported is always the leftmost one.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._position = 0
        self._next: Optional[_Token] = None
        self._depth = 0

    def parse(self) -> Matcher:
        if not self._text.strip(_WHITESPACE):
            raise RuleError("Empty rule", 0)
        matcher = self._or()
        token = self._peek()
        if token.kind != _EOF:
            raise self._unexpected(token)
        return matcher

    def _peek(self) -> _Token:
        if self._next is None:
            self._next = self._scan(self._position)
        return self._next

    def _advance(self) -> _Token:
        token = self._peek()
        self._position = token.end
        self._next = None
        return token

    def _scan(self, position: int) -> _Token:
        text = self._text
        end = len(text)
        while position < end and text[position] in _WHITESPACE:
            position += 1
        if position == end:
            return _Token(_EOF, end, end, "")
        char = text[position]
        if char == "`":
            close = text.find("`", position + 1)
            if close == -1:
                raise RuleError("Unterminated backtick argument", position)
            return _Token(_STRING, position, close + 1, text[position + 1 : close])
        if char == '"':
            quoted = _QUOTED.match(text, position)
            if quoted is None:
                raise RuleError("Unterminated quoted argument", position)
            value = _QUOTED_ESCAPE.sub(r"\1", quoted.group(1))
            return _Token(_STRING, position, quoted.end(), value)
        if char in "&|" and text.startswith(char * 2, position):
            return _Token(char * 2, position, position + 2, char * 2)
        kind = _PUNCTUATION.get(char)
        if kind is not None:
            return _Token(kind, position, position + 1, char)
        if char in _NAME_CHARS:
            stop = position + 1
            while stop < end and text[stop] in _NAME_CHARS:
                stop += 1
            return _Token(_NAME, position, stop, text[position:stop])
        return _Token(_OTHER, position, position + 1, char)

    def _unexpected(self, token: _Token) -> RuleError:
        if token.kind == _EOF:
            return RuleError("Unexpected end of rule", token.start)
        return RuleError(f"Unexpected token '{self._text[token.start : token.end]}'", token.start)

    def _or(self) -> Matcher:
        operands = [self._and()]
        while self._peek().kind == _OR:
            self._advance()
            operands.append(self._and())
        return _any_of(operands)

    def _and(self) -> Matcher:
        operands = [self._unary()]
        while self._peek().kind == _AND:
            self._advance()
            operands.append(self._unary())
        return _all_of(operands)

    def _unary(self) -> Matcher:
        # A run of "!" folds to its parity here rather than nesting one frame per "!".
        negated = False
        while self._peek().kind == _NOT:
            self._advance()
            negated = not negated
        matcher = self._primary()
        return _Not(matcher) if negated else matcher

    def _primary(self) -> Matcher:
        token = self._peek()
        if token.kind == _NAME:
            return self._matcher()
        if token.kind != _LPAREN:
            raise self._unexpected(token)
        if self._depth == _MAX_NESTING:
            raise RuleError("Rule nested too deeply", token.start)
        self._advance()
        self._depth += 1
        inner = self._or()
        close = self._peek()
        if close.kind == _EOF:
            raise RuleError("Unclosed '('", token.start)
        if close.kind != _RPAREN:
            raise self._unexpected(close)
        self._advance()
        self._depth -= 1
        return inner

    def _syntax(self, expected: str, name: _Token, token: _Token) -> RuleError:
        part = self._text[name.start : token.end].rstrip(_WHITESPACE)
        return RuleError(f"Invalid matcher syntax, expected '{expected}': {part}", token.start)

    def _matcher(self) -> Matcher:
        name = self._advance()
        known = _MATCHERS.get(name.value)
        if known is None:
            raise RuleError(f"Unknown matcher: {name.value}", name.start)
        if self._peek().kind != _LPAREN:
            raise self._syntax("(", name, self._peek())
        self._advance()
        args: List[_Token] = []
        if self._peek().kind == _RPAREN:
            self._advance()
        else:
            while True:
                token = self._peek()
                if token.kind == _EOF:
                    raise self._syntax(")", name, token)
                if token.kind != _STRING:
                    char = self._text[token.start]
                    raise RuleError(f"Expected backtick or '\"', got '{char}'", token.start)
                args.append(self._advance())
                token = self._advance()
                if token.kind == _RPAREN:
                    break
                if token.kind != _COMMA:
                    raise self._syntax(")", name, token)
        arity, build = known
        if len(args) != arity:
            plural = "" if arity == 1 else "s"
            raise RuleError(
                f"{name.value}() expects {arity} argument{plural}, got {len(args)}", name.start
            )
        return build(args)


def parse_rule(text: str) -> Matcher:
    """
    Compile a rule; raise :class:`RuleError` (and nothing else) when it is not valid.
    """
    return _Parser(text).parse()
