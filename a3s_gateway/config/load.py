# -*- test-case-name: tests.test_config_load -*-
"""
Reading ``gateway.hcl``: environment expansion, HCL parsing, normalisation to the HCL JSON-spec
mapping, strict schema conversion into :mod:`a3s_gateway.config.schema` objects, then the
complete validation of :mod:`a3s_gateway.config.validate`.

For the CLI, the twistd plugin and the gateway (``load_config``, ``parse_config``,
``apply_listen``); everything else here is private to the loader.

The pipeline, and why each step exists:

1. ``${VAR}`` / ``${VAR:-default}`` expansion runs on the text (DECISIONS: it is not HCL syntax),
   by a small scanner that knows comments, quoted strings and heredocs. Every quoted string and
   heredoc is decoded (HCL escapes, ``$${`` and ``%%{``, variables) and re-emitted as a
   canonical quoted string with no template sequence left, so an expanded value can never
   inject syntax and no interpolation reaches the HCL parser. Heredocs become quoted strings
   followed by the same number of newlines, so line numbers stay exact.
2. python-hcl2 parses the result; its raw tree is checked for what hcl-rs rejects and hcl2
   accepts (two attributes on one line, a name both attribute and block).
3. hcl2's output (blocks wrapped in lists, ``__is_block__`` markers, strings still quoted) is
   normalised: labelled blocks become maps, a single unlabelled block an object, repeated ones a
   list; quoted strings are decoded; unquoted "strings" are expressions and are rejected.
4. The plain data is converted key by key, in file order, with serde-style messages
   (``invalid type: ...``, ``missing field ...``, ``unknown variant ...``) and strict unknown keys.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import attr
import hcl2
from hcl2.utils import SerializationOptions
from lark import Token, Tree
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)

from a3s_gateway.config.durations import parse_duration
from a3s_gateway.config.errors import ConfigNotFound, ConfigParseError, ConfigValidationError
from a3s_gateway.config.schema import (
    AccessLogConfig,
    DashboardConfig,
    EntrypointConfig,
    FailoverConfig,
    FileProviderConfig,
    ForwardedHeadersConfig,
    GatewayConfig,
    HealthCheckConfig,
    LoadBalancerConfig,
    MiddlewareConfig,
    MirrorConfig,
    PassiveHealthConfig,
    ProvidersConfig,
    RevisionConfig,
    RolloutConfig,
    RouterConfig,
    ScalingConfig,
    ServerConfig,
    ServiceConfig,
    StickyConfig,
    TimeoutsConfig,
    TlsConfig,
    TracingConfig,
)
from a3s_gateway.config.validate import format_float, parse_address, validate_config

__all__ = ["apply_listen", "load_config", "parse_config"]


def load_config(path: str, environ: Optional[Mapping[str, str]] = None) -> GatewayConfig:
    """
    Read, expand, parse, convert and completely validate the configuration file at ``path``.

    ``environ`` (default ``os.environ``) supplies ``${VAR}`` values.

    @raise ConfigNotFound: no file at ``path``.
    @raise ConfigParseError: unreadable file or invalid HCL.
    @raise ConfigValidationError: anything wrong with the content.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigNotFound(path) from None
    except OSError as e:
        raise ConfigParseError(path, f"cannot read file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigParseError(path, f"file is not valid UTF-8 (byte offset {e.start})") from None
    return parse_config(text, source=path, environ=environ)


def parse_config(
    text: str, source: str = "<string>", environ: Optional[Mapping[str, str]] = None
) -> GatewayConfig:
    """
    Like :func:`load_config`, from ``text``; ``source`` names it in messages.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    expanded = _Expander(text, source, env).run()
    raw = _parse_hcl(expanded, source)
    try:
        config = _build_gateway(_normalise_body(raw, ""), source)
    except _SchemaError as e:
        raise ConfigValidationError(source, e.key_path, e.problem) from None
    validate_config(config)
    return config


def apply_listen(config: GatewayConfig, address: str) -> GatewayConfig:
    """
    ``--listen ADDR``: replace (or append) the entrypoint ``web`` with a plain HTTP entrypoint on
    ``address`` and nothing else, as the reference does; the result is validated again.

    @raise ConfigValidationError: the address is not valid, or the new entrypoint breaks a rule
        (for example a router on ``web`` whose service has no HTTP backend).
    """
    try:
        parse_address(address)
    except ValueError as e:
        raise ConfigValidationError(
            config.source,
            "entrypoints.web.address",
            f"Invalid address '{address}' for entrypoint 'web': {e}",
        ) from None
    entrypoints = dict(config.entrypoints)
    entrypoints["web"] = EntrypointConfig(name="web", address=address)
    updated = attr.evolve(config, entrypoints=entrypoints)
    validate_config(updated)
    return updated


# ---------------------------------------------------------------------------------------------
# 1. Environment expansion on the text
# ---------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}")
# Where something other than plain code may start: a comment, string, heredoc or variable.
_SPECIAL = re.compile(r'[#/"<$]')
_HEREDOC = re.compile(r"<<(-?)([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\r?\n")
# What an expansion outside quotes may produce: one number or boolean token, nothing else.
_BARE_LITERAL = re.compile(r"(?:-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false)\Z")
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_UNICODE_ESCAPES = {"u": 4, "U": 8}
_HEX = frozenset("0123456789abcdefABCDEF")


def _encode_string(value: str) -> str:
    """
    ``value`` as the body of an HCL quoted string meaning exactly ``value``: escapes for
    backslash, quote and control characters, and ``\\u007b`` for a brace after ``$`` or ``%``, so
    that no template sequence is left. (``$${`` would do in HCL, but python-hcl2 only lexes it
    when a closing brace follows.)
    """
    out: List[str] = []
    previous = ""
    for ch in value:
        if ch == "{" and previous in ("$", "%"):
            out.append("\\u007b")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
        previous = ch
    return "".join(out)


# The escapes _encode_string produces, which are all hcl2 can hand back in a quoted string.
_ENCODED_ESCAPE = re.compile(r'\\(?:([nrt"\\])|u([0-9a-fA-F]{4}))')


def _decode_string(raw: str) -> str:
    """The value of a quoted string as _encode_string wrote it (quotes included)."""
    return _ENCODED_ESCAPE.sub(_decode_escape, raw[1:-1])


def _decode_escape(match: re.Match[str]) -> str:
    simple = match.group(1)
    return _SIMPLE_ESCAPES[simple] if simple else chr(int(match.group(2), 16))


class _Expander:
    """
    One pass over the file text: comments are copied, strings and heredocs are decoded (with
    ``${VAR}`` expanded) and re-emitted canonically, ``${VAR}`` outside strings must expand to a
    number or boolean. Newlines are never added or removed, so lark's line numbers stay true.
    """

    def __init__(self, text: str, source: str, environ: Mapping[str, str]) -> None:
        self.text = text
        self.source = source
        self.environ = environ
        self.pos = 0
        self.line = 1
        self.out: List[str] = []

    def run(self) -> str:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "#" or text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self._copy_to(len(text) if end < 0 else end)
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                self._copy_to(len(text) if end < 0 else end + 2)
            elif ch == '"':
                self._string()
            elif ch == "<" and (heredoc := _HEREDOC.match(text, self.pos)) is not None:
                self._heredoc(heredoc)
            elif text.startswith("${", self.pos):
                self._bare_variable()
            else:
                special = _SPECIAL.search(text, self.pos + 1)
                self._copy_to(len(text) if special is None else special.start())
        return "".join(self.out)

    def _copy_to(self, end: int) -> None:
        chunk = self.text[self.pos : end]
        self.line += chunk.count("\n")
        self.out.append(chunk)
        self.pos = end

    def _syntax(self, problem: str, column: Optional[int] = None) -> ConfigParseError:
        return ConfigParseError(self.source, problem, self.line, column)

    def _column(self, pos: int) -> int:
        return pos - self.text.rfind("\n", 0, pos)

    def _string(self) -> None:
        """A quoted string starting at ``self.pos``: decode, expand, re-encode."""
        text = self.text
        start = self.pos
        i = start + 1
        value: List[str] = []
        while True:
            if i >= len(text) or text[i] == "\n":
                raise self._syntax("unterminated string", self._column(start))
            ch = text[i]
            if ch == '"':
                i += 1
                break
            if ch == "\\":
                decoded, i = self._escape(i)
                value.append(decoded)
            elif ch in "$%":
                decoded, i = self._template(text, i, self._column(i))
                value.append(decoded)
            else:
                value.append(ch)
                i += 1
        self.out.append('"' + _encode_string("".join(value)) + '"')
        self.pos = i

    def _escape(self, i: int) -> Tuple[str, int]:
        """The escape sequence at ``text[i]`` (a backslash): its character and the next index."""
        text = self.text
        kind = text[i + 1 : i + 2]
        if kind in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[kind], i + 2
        width = _UNICODE_ESCAPES.get(kind)
        if width is not None:
            digits = text[i + 2 : i + 2 + width]
            if len(digits) == width and all(d in _HEX for d in digits):
                code = int(digits, 16)
                if code <= 0x10FFFF and not 0xD800 <= code < 0xE000:
                    return chr(code), i + 2 + width
        raise self._syntax(
            f"invalid escape sequence '\\{kind}' in string (valid: \\n \\r \\t \\\" \\\\ "
            "\\uNNNN \\UNNNNNNNN)",
            self._column(i),
        )

    def _template(self, text: str, i: int, column: Optional[int]) -> Tuple[str, int]:
        """
        ``$`` or ``%`` at ``text[i]`` inside a string or heredoc: an escaped opener, a variable,
        an unsupported template sequence, or a plain character. ``column`` places ``text[i]``
        in the file for messages (None in heredocs, whose lines were dedented).
        """
        if text.startswith("$${", i):
            return "${", i + 3
        if text.startswith("%%{", i):
            return "%{", i + 3
        if text.startswith("${", i):
            match = _VAR.match(text, i)
            if match is None:
                raise self._syntax(
                    f"unsupported interpolation '{_snippet(text, i)}': only ${{NAME}} and "
                    "${NAME:-default} are expanded; write '$${' for a literal '${'",
                    column,
                )
            return self._lookup(match), match.end()
        if text.startswith("%{", i):
            raise self._syntax(
                "template directives ('%{') are not supported; write '%%{' for a literal '%{'",
                column,
            )
        return text[i], i + 1

    def _lookup(self, match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = self.environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ConfigValidationError(
                self.source,
                "",
                f"line {self.line}: environment variable '{name}' is not set "
                f"(write ${{{name}:-default}} to give it a default)",
            )
        return value

    def _bare_variable(self) -> None:
        """``${VAR}`` outside quotes (``rate = ${RATE}``): only a number or boolean may result."""
        match = _VAR.match(self.text, self.pos)
        if match is None:
            raise self._syntax(
                f"unsupported interpolation '{_snippet(self.text, self.pos)}': only ${{NAME}} and "
                "${NAME:-default} are expanded",
                self._column(self.pos),
            )
        value = self._lookup(match)
        if not _BARE_LITERAL.match(value):
            raise ConfigValidationError(
                self.source,
                "",
                f"line {self.line}: environment variable '{match.group(1)}' is used outside a "
                "quoted string, so its value must be a number or true/false (quote it to use "
                "it as a string)",
            )
        self.out.append(value)
        self.pos = match.end()

    def _heredoc(self, match: re.Match[str]) -> None:
        """
        ``<<EOT`` / ``<<-EOT`` (``match`` is its opening line): no backslash escapes; ``<<-``
        removes the common indentation. The content (each line with its newline) becomes one
        quoted string.
        """
        text = self.text
        flush, marker = match.group(1) == "-", match.group(2)
        start_line, start_column = self.line, self._column(self.pos)
        lines: List[str] = []
        i = match.end()
        while True:
            if i >= len(text):
                raise self._syntax(
                    f"unterminated heredoc '<<{'-' if flush else ''}{marker}': no closing "
                    f"'{marker}' line",
                    start_column,
                )
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            line = text[i:end]
            if line.endswith("\r"):
                line = line[:-1]
            if line.strip() == marker:
                i = end
                break
            lines.append(line)
            i = end + 1
        if flush:
            lines = _dedent(lines)
        value: List[str] = []
        for offset, line in enumerate(lines):
            self.line = start_line + 1 + offset
            j = 0
            while j < len(line):
                if line[j] in "$%":
                    decoded, j = self._template(line, j, None)
                    value.append(decoded)
                else:
                    value.append(line[j])
                    j += 1
            value.append("\n")
        self.line = start_line
        self.out.append('"' + _encode_string("".join(value)) + '"')
        # The opening line's newline plus one per content line: keep them, so that what
        # follows the closing marker stays on its original line number.
        newlines = 1 + len(lines)
        self.out.append("\n" * newlines)
        self.line += newlines
        self.pos = i


def _dedent(lines: Sequence[str]) -> List[str]:
    """``<<-`` heredocs: remove the smallest indentation of the non-blank lines from each line."""
    widths = [len(line) - len(line.lstrip(" \t")) for line in lines if line.strip()]
    width = min(widths) if widths else 0
    return [line[min(width, len(line) - len(line.lstrip(" \t"))) :] for line in lines]


def _snippet(text: str, i: int) -> str:
    end = text.find("}", i)
    newline = text.find("\n", i)
    if end < 0 or (0 <= newline < end):
        return text[i : i + 20]
    return text[i : end + 1]


# ---------------------------------------------------------------------------------------------
# 2. HCL parsing
# ---------------------------------------------------------------------------------------------

_OPTIONS = SerializationOptions(
    # Quoted strings come back as written (quotes and escapes included), which tells them
    # apart from expressions, rendered "${...}" without quotes.
    strip_string_quotes=False,
    with_comments=False,
    with_meta=False,
    preserve_scientific_notation=False,
)


def _parse_hcl(text: str, source: str) -> Dict[str, Any]:
    try:
        tree = hcl2.parses_to_tree(text)
    except UnexpectedInput as e:
        raise ConfigParseError(source, _describe_syntax_error(e, text), e.line, e.column) from None
    except LarkError as e:
        raise ConfigParseError(source, str(e)) from None
    _check_layout(tree, source)
    try:
        data = hcl2.serialize(
            hcl2.transform(tree, discard_comments=True), serialization_options=_OPTIONS
        )
    except (LarkError, ValueError, RuntimeError, TypeError) as e:
        # hcl2's transformer raises assorted errors on constructs the grammar admits.
        raise ConfigParseError(source, str(e)) from None
    return data


def _describe_syntax_error(error: UnexpectedInput, text: str) -> str:
    lines = text.split("\n")
    line = lines[error.line - 1] if 0 < error.line <= len(lines) else ""
    here = line[error.column - 1 :] if error.column > 0 else ""
    if here.startswith(";"):
        return "';' is not a valid separator: write one attribute per line"
    if isinstance(error, UnexpectedEOF) or (
        isinstance(error, UnexpectedToken) and error.token.type == "$END"
    ):
        return "unexpected end of file"
    if isinstance(error, UnexpectedCharacters):
        return f"unexpected character {json.dumps(error.char, ensure_ascii=False)}"
    if isinstance(error, UnexpectedToken):
        words = str(error.token).split()
        return f"unexpected '{words[0][:40]}'" if words else "unexpected line break"
    return "syntax error"


def _check_layout(tree: Tree, source: str) -> None:
    """
    What hcl-rs rejects and hcl2's grammar lets through: attributes or blocks not separated by
    a newline (``a { b = 1 c = 2 }``), and a name used both as an attribute and as a block.
    """
    for body in tree.iter_subtrees_topdown():
        if body.data != "body":
            continue
        separated = True
        seen_as: Dict[str, str] = {}
        for child in body.children:
            if not isinstance(child, Tree):
                continue
            if child.data == "new_line_or_comment":
                if any("\n" in str(token) for token in child.scan_values(_is_token)):
                    separated = True
                continue
            if child.data not in ("attribute", "block"):
                continue
            name = _item_name(child)
            if not separated:
                raise ConfigParseError(
                    source,
                    f"'{name}' must start on a new line: write one attribute or block per line",
                    child.meta.line,
                    child.meta.column,
                )
            kind = str(child.data)
            if seen_as.setdefault(name, kind) != kind:
                raise ConfigParseError(
                    source,
                    f"'{name}' is written both as an attribute and as a block",
                    child.meta.line,
                    child.meta.column,
                )
            separated = False


def _is_token(value: object) -> bool:
    return isinstance(value, Token)


def _item_name(node: Tree) -> str:
    first = node.children[0]
    if isinstance(first, Tree):
        for token in first.scan_values(_is_token):
            return str(token)
    return str(first)


# ---------------------------------------------------------------------------------------------
# 3. Normalisation to the HCL JSON-spec mapping
# ---------------------------------------------------------------------------------------------


@attr.s(auto_exc=True, auto_attribs=True)
class _SchemaError(Exception):
    """A problem at ``key_path``; the public entry points add the file name."""

    key_path: str
    problem: str


_BLOCK = "__is_block__"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


def _name(raw: str) -> str:
    """A map key or block label: a quoted string, or a bare identifier kept as it is."""
    return _decode_string(raw) if _is_quoted(raw) else raw


def _is_labelled(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    if value.get(_BLOCK) is True:
        return True
    return len(value) == 1 and _is_labelled(next(iter(value.values())))


def _is_block_list(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(item, dict)
            and (item.get(_BLOCK) is True or (len(item) == 1 and _is_labelled(item)))
            for item in value
        )
    )


def _normalise_body(raw: Mapping[str, Any], path: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        if key == _BLOCK:
            continue
        name = _name(key)
        here = _join(path, name)
        if _is_block_list(value):
            out[name] = _normalise_blocks(name, value, here)
        else:
            out[name] = _normalise_value(value, here)
    return out


def _normalise_blocks(name: str, items: List[Dict[str, Any]], path: str) -> Any:
    unlabelled = [item for item in items if item.get(_BLOCK) is True]
    if len(unlabelled) == len(items):
        if len(items) == 1:
            return _normalise_body(items[0], path)
        return [_normalise_body(item, f"{path}[{i}]") for i, item in enumerate(items)]
    if unlabelled:
        raise _SchemaError(path, f"'{name}' blocks are written both with and without labels")
    merged: Dict[str, Any] = {}
    leaves: Set[Tuple[str, ...]] = set()
    for item in items:
        _merge_labelled(name, merged, item, path, (), leaves)
    return merged


def _merge_labelled(
    name: str,
    target: Dict[str, Any],
    wrapper: Dict[str, Any],
    path: str,
    labels: Tuple[str, ...],
    leaves: Set[Tuple[str, ...]],
) -> None:
    ((raw_label, inner),) = wrapper.items()
    label = _name(raw_label)
    here = _join(path, label)
    chain = (*labels, label)
    if chain in leaves:
        written = " ".join(f'"{part}"' for part in chain)
        raise _SchemaError(here, f"duplicate block: '{name} {written}' is defined more than once")
    if inner.get(_BLOCK) is True:
        if label in target:
            raise _SchemaError(here, f"'{name}' blocks are written with different label counts")
        leaves.add(chain)
        target[label] = _normalise_body(inner, here)
        return
    nested = target.setdefault(label, {})
    _merge_labelled(name, nested, inner, here, chain, leaves)


def _normalise_value(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {
            _name(key): _normalise_value(item, _join(path, _name(key)))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_normalise_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, str):
        return _literal(value, path)
    return value


def _literal(value: str, path: str) -> str:
    """
    hcl2's rendering of a string value back to the value. Anything unquoted is an expression
    (``a.b``, ``f(x)``, ``1 + 2``, rendered ``${...}``), which a configuration cannot hold.
    """
    if _is_quoted(value):
        return _decode_string(value)
    expression = value[2:-1] if value.startswith("${") and value.endswith("}") else value
    raise _SchemaError(
        path,
        f"unsupported expression '{expression}': only literal strings, numbers, booleans, "
        "lists and maps are allowed",
    )


# ---------------------------------------------------------------------------------------------
# 4. Conversion into schema objects
# ---------------------------------------------------------------------------------------------

Convert = Callable[[Any, str], Any]

_U8 = ("u8", 0, 2**8 - 1)
_U16 = ("u16", 0, 2**16 - 1)
_U32 = ("u32", 0, 2**32 - 1)
_U64 = ("u64", 0, 2**64 - 1)
_USIZE = ("usize", 0, 2**64 - 1)
_I32 = ("i32", -(2**31), 2**31 - 1)


def _unexpected(value: Any) -> str:
    """serde's description of a value of the wrong type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{format_float(value)}`"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _type_error(value: Any, path: str, expected: str) -> _SchemaError:
    return _SchemaError(path, f"invalid type: {_unexpected(value)}, expected {expected}")


def _integer(kind: Tuple[str, int, int]) -> Convert:
    name, low, high = kind

    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, path, name)
        if not low <= value <= high:
            raise _SchemaError(path, f"invalid value: integer `{value}`, expected {name}")
        return value

    return convert


def _f64(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, path, "f64")
    return float(value)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(value, path, "a boolean")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _type_error(value, path, "a string")
    return value


def _enum(*variants: str) -> Convert:
    expected = ", ".join(f"`{variant}`" for variant in variants)

    def convert(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _type_error(value, path, "a string")
        if value not in variants:
            raise _SchemaError(path, f"unknown variant `{value}`, expected one of {expected}")
        return value

    return convert


def _duration(value: Any, path: str) -> float:
    """A duration string, or a bare number of seconds written unquoted."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _type_error(value, path, 'a duration such as "10s"')
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as e:
            raise _SchemaError(path, str(e)) from None
    if value < 0:
        raise _SchemaError(
            path, f"invalid duration {format_float(float(value))}: must not be negative"
        )
    return float(value)


def _sequence(item: Convert) -> Convert:
    def convert(value: Any, path: str) -> Tuple[Any, ...]:
        if not isinstance(value, list):
            raise _type_error(value, path, "a sequence")
        return tuple(item(element, f"{path}[{i}]") for i, element in enumerate(value))

    return convert


def _string_map(value: Any, path: str) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise _type_error(value, path, "a map")
    return {key: _string(item, _join(path, key)) for key, item in value.items()}


def _string_or_strings(value: Any, path: str) -> Any:
    if isinstance(value, list):
        return _sequence(_string)(value, path)
    if not isinstance(value, str):
        raise _type_error(value, path, "a string or a sequence of strings")
    return value


def _optional(convert: Convert) -> Convert:
    """``null`` stands for an absent optional value, as serde does for ``Option``."""

    def optional(value: Any, path: str) -> Any:
        return None if value is None else convert(value, path)

    return optional


@attr.s(frozen=True, auto_attribs=True)
class _Field:
    """One key of a block: its converter, whether it is required, its attribute name."""

    key: str
    convert: Convert
    required: bool = False
    attribute: Optional[str] = None


def _struct(value: Any, path: str, fields: Sequence[_Field]) -> Dict[str, Any]:
    """
    Convert the keys of a block in file order (so the first error is the first in the file);
    unknown keys are errors with a suggestion, missing required keys serde's message.
    """
    if not isinstance(value, dict):
        raise _type_error(value, path, "a map")
    known = {field.key: field for field in fields}
    out: Dict[str, Any] = {}
    for key, item in value.items():
        field = known.get(key)
        if field is None:
            raise _SchemaError(path, _unknown_key(key, known))
        out[field.attribute or key] = field.convert(item, _join(path, key))
    for field in fields:
        if field.required and field.key not in value:
            raise _SchemaError(path, f"missing field `{field.key}`")
    return out


def _unknown_key(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown key '{key}' (did you mean '{close[0]}'?)"
    return f"unknown key '{key}'"


def _named(build: Callable[[str, Any, str], Any]) -> Convert:
    """A map of labelled blocks (``services "api" { }``) to a dict of built objects."""

    def convert(value: Any, path: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(value, path, "a map")
        return {name: build(name, body, _join(path, name)) for name, body in value.items()}

    return convert


_SERVER = (_Field("url", _string, required=True), _Field("weight", _integer(_U32)))


def _server(value: Any, path: str) -> ServerConfig:
    return ServerConfig(**_struct(value, path, _SERVER))


_STRATEGY = _enum("round-robin", "weighted", "least-connections", "random")
_SERVERS = _sequence(_server)

_HEALTH_CHECK = (
    _Field("path", _string, required=True),
    _Field("interval", _duration),
    _Field("timeout", _duration),
    _Field("unhealthy_threshold", _integer(_U32)),
    _Field("healthy_threshold", _integer(_U32)),
)
_STICKY = (
    _Field("cookie", _string, required=True),
    _Field("ttl", _duration),
    _Field("max_sessions", _integer(_USIZE)),
)
_PASSIVE_HEALTH = (
    _Field("enabled", _boolean),
    _Field("error_threshold", _integer(_U32)),
    _Field("window", _duration),
    _Field("recovery_time", _duration),
    _Field("error_statuses", _sequence(_integer(_U16))),
)
_LOAD_BALANCER = (
    _Field("strategy", _STRATEGY),
    _Field("servers", _SERVERS),
    _Field(
        "health_check",
        _optional(lambda v, p: HealthCheckConfig(**_struct(v, p, _HEALTH_CHECK))),
    ),
    _Field("sticky", _optional(lambda v, p: StickyConfig(**_struct(v, p, _STICKY)))),
    _Field("passive_health", lambda v, p: PassiveHealthConfig(**_struct(v, p, _PASSIVE_HEALTH))),
)
_TIMEOUTS = tuple(_Field(key, _duration) for key in ("connect", "response_header", "idle", "total"))
_SCALING = (
    _Field("min_replicas", _integer(_U32)),
    _Field("max_replicas", _integer(_U32)),
    _Field("container_concurrency", _integer(_U32)),
    _Field("target_utilization", _f64),
    _Field("scale_down_delay_secs", _integer(_U64)),
    _Field("buffer_timeout_secs", _integer(_U64)),
    _Field("buffer_size", _integer(_USIZE)),
    _Field("buffer_enabled", _boolean),
    _Field("executor", _string),
)
_REVISION = (
    _Field("name", _string, required=True),
    _Field("traffic_percent", _integer(_U32)),
    _Field("servers", _SERVERS),
    _Field("strategy", _STRATEGY),
)
_ROLLOUT = (
    _Field("from", _string, required=True, attribute="from_"),
    _Field("to", _string, required=True),
    _Field("step_percent", _integer(_U32)),
    _Field("step_interval_secs", _integer(_U64)),
    _Field("error_rate_threshold", _f64),
    _Field("latency_threshold_ms", _integer(_U64)),
)
_MIRROR = (_Field("service", _string, required=True), _Field("percentage", _integer(_U8)))
_FAILOVER = (_Field("service", _string, required=True),)
_SERVICE = (
    _Field(
        "load_balancer",
        lambda v, p: LoadBalancerConfig(**_struct(v, p, _LOAD_BALANCER)),
        required=True,
    ),
    _Field("timeouts", lambda v, p: TimeoutsConfig(**_struct(v, p, _TIMEOUTS))),
    _Field("scaling", _optional(lambda v, p: ScalingConfig(**_struct(v, p, _SCALING)))),
    _Field(
        "revisions",
        _sequence(lambda v, p: RevisionConfig(**_struct(v, p, _REVISION))),
    ),
    _Field("rollout", _optional(lambda v, p: RolloutConfig(**_struct(v, p, _ROLLOUT)))),
    _Field("mirror", _optional(lambda v, p: MirrorConfig(**_struct(v, p, _MIRROR)))),
    _Field("failover", _optional(lambda v, p: FailoverConfig(**_struct(v, p, _FAILOVER)))),
)

_STRINGS = _sequence(_string)
_TLS = (
    _Field("cert_file", _string, required=True),
    _Field("key_file", _string, required=True),
    _Field("min_version", _string),
    _Field("acme", _boolean),
    _Field("acme_email", _optional(_string)),
    _Field("acme_domains", _STRINGS),
    _Field("acme_staging", _boolean),
    _Field("acme_storage_path", _optional(_string)),
)
_FORWARDED_HEADERS = (_Field("trusted_ips", _STRINGS),)
_ENTRYPOINT = (
    _Field("address", _string, required=True),
    _Field("protocol", _enum("http", "tcp", "udp")),
    _Field("tls", _optional(lambda v, p: TlsConfig(**_struct(v, p, _TLS)))),
    _Field("max_connections", _optional(_integer(_U32))),
    _Field("tcp_allowed_ips", _STRINGS),
    _Field("udp_session_timeout_secs", _optional(_integer(_U64))),
    _Field("udp_max_sessions", _optional(_integer(_USIZE))),
    _Field(
        "forwarded_headers",
        lambda v, p: ForwardedHeadersConfig(**_struct(v, p, _FORWARDED_HEADERS)),
    ),
    _Field("max_request_body_bytes", _integer(_U64)),
)
_ROUTER = (
    _Field("rule", _string, required=True),
    _Field("service", _string, required=True),
    _Field("entrypoints", _STRINGS),
    _Field("middlewares", _STRINGS),
    _Field("priority", _integer(_I32)),
)

# Every key any middleware type reads (spec 2.2.4 plus the DECISIONS "New keys" table); a key
# that the declared type does not use is accepted, as in the reference.
MIDDLEWARE_OPTIONS: Tuple[Tuple[str, Convert], ...] = (
    ("header", _string),
    ("keys", _STRINGS),
    ("value", _string),
    ("username", _string),
    ("password", _string),
    ("rate", _integer(_U64)),
    ("burst", _integer(_U64)),
    ("redis_url", _string),
    ("key", _string),
    ("on_redis_error", _string),
    ("allowed_origins", _STRINGS),
    ("allowed_methods", _STRINGS),
    ("allowed_headers", _STRINGS),
    ("max_age", _integer(_U64)),
    ("allow_credentials", _boolean),
    ("expose_headers", _STRINGS),
    ("request_headers", _string_map),
    ("response_headers", _string_map),
    ("remove_request_headers", _STRINGS),
    ("remove_response_headers", _STRINGS),
    ("prefixes", _STRINGS),
    ("max_retries", _integer(_U32)),
    ("retry_interval_ms", _integer(_U64)),
    ("retry_on_statuses", _sequence(_integer(_U16))),
    ("retry_non_idempotent", _boolean),
    ("allowed_ips", _STRINGS),
    ("forward_auth_url", _string),
    ("forward_auth_response_headers", _STRINGS),
    ("max_body_bytes", _integer(_U64)),
    ("failure_threshold", _integer(_U32)),
    ("success_threshold", _integer(_U32)),
    ("cooldown_secs", _integer(_U64)),
    ("algorithms", _STRINGS),
    ("public_key_file", _string),
    ("jwks_url", _string),
    ("issuer", _string),
    ("audience", _string_or_strings),
    ("min_bytes", _integer(_U64)),
    ("realm", _string),
)
_MIDDLEWARE = (
    _Field("type", _string, required=True),
    *(_Field(key, _optional(convert)) for key, convert in MIDDLEWARE_OPTIONS),
)


def _entrypoint(name: str, value: Any, path: str) -> EntrypointConfig:
    return EntrypointConfig(name=name, **_struct(value, path, _ENTRYPOINT))


def _router(name: str, value: Any, path: str) -> RouterConfig:
    return RouterConfig(name=name, **_struct(value, path, _ROUTER))


def _service(name: str, value: Any, path: str) -> ServiceConfig:
    return ServiceConfig(name=name, **_struct(value, path, _SERVICE))


def _middleware(name: str, value: Any, path: str) -> MiddlewareConfig:
    fields = _struct(value, path, _MIDDLEWARE)
    kind = fields.pop("type")
    options = {key: option for key, option in fields.items() if option is not None}
    return MiddlewareConfig(name=name, type=kind, options=options)


_DISCOVERY_DEFAULTS: Dict[str, Any] = {"poll_interval_secs": 30, "timeout_secs": 5}
_KUBERNETES_DEFAULTS: Dict[str, Any] = {
    "namespace": "",
    "label_selector": "",
    "watch_interval_secs": 30,
    "ingress_route_crd": False,
}
_DOCKER_DEFAULTS: Dict[str, Any] = {
    "host": "/var/run/docker.sock",
    "label_prefix": "a3s",
    "poll_interval_secs": 10,
}
_FILE_PROVIDER = (_Field("watch", _boolean), _Field("directory", _optional(_string)))
_SEED = (_Field("url", _string, required=True),)
_DISCOVERY = (
    _Field("seeds", _sequence(lambda v, p: _struct(v, p, _SEED)), required=True),
    _Field("poll_interval_secs", _integer(_U64)),
    _Field("timeout_secs", _integer(_U64)),
)
_KUBERNETES = (
    _Field("namespace", _string),
    _Field("label_selector", _string),
    _Field("watch_interval_secs", _integer(_U64)),
    _Field("ingress_route_crd", _boolean),
)
_DOCKER = (
    _Field("host", _string),
    _Field("label_prefix", _string),
    _Field("poll_interval_secs", _integer(_U64)),
)


def _with_defaults(defaults: Mapping[str, Any], fields: Sequence[_Field]) -> Convert:
    """A provider block as a plain dict with every key present (defaults filled in)."""

    def convert(value: Any, path: str) -> Dict[str, Any]:
        return {**defaults, **_struct(value, path, fields)}

    return convert


_PROVIDERS = (
    _Field("file", _optional(lambda v, p: FileProviderConfig(**_struct(v, p, _FILE_PROVIDER)))),
    _Field("discovery", _optional(_with_defaults(_DISCOVERY_DEFAULTS, _DISCOVERY))),
    _Field("kubernetes", _optional(_with_defaults(_KUBERNETES_DEFAULTS, _KUBERNETES))),
    _Field("docker", _optional(_with_defaults(_DOCKER_DEFAULTS, _DOCKER))),
)
_ACCESS_LOG = (_Field("path", _string, required=True),)
_TRACING = (
    _Field("propagation", _enum("w3c", "b3")),
    _Field("sample_rate", _f64),
    _Field("service_name", _string),
    _Field("otlp_endpoint", _optional(_string)),
)
_DASHBOARD = (_Field("entrypoint", _string, required=True), _Field("middlewares", _STRINGS))
_GATEWAY = (
    _Field("entrypoints", _named(_entrypoint)),
    _Field("routers", _named(_router)),
    _Field("services", _named(_service)),
    _Field("middlewares", _named(_middleware)),
    _Field("providers", lambda v, p: ProvidersConfig(**_struct(v, p, _PROVIDERS))),
    _Field("shutdown_timeout_secs", _integer(_U64)),
    _Field("workers", _integer(_USIZE)),
    _Field("access_log", _optional(lambda v, p: AccessLogConfig(**_struct(v, p, _ACCESS_LOG)))),
    _Field("tracing", _optional(lambda v, p: TracingConfig(**_struct(v, p, _TRACING)))),
    _Field("dashboard", _optional(lambda v, p: DashboardConfig(**_struct(v, p, _DASHBOARD)))),
)


def _build_gateway(document: Dict[str, Any], source: str) -> GatewayConfig:
    return GatewayConfig(source=source, **_struct(document, "", _GATEWAY))
