# -*- test-case-name: tests.test_basic_auth -*-
"""
The ``basic-auth`` middleware (spec 1.12.2 with this project's fixes): HTTP Basic authentication
(RFC 7617) against one configured ``username`` and ``password``.

Options: ``username`` and ``password`` (required; the validator guarantees both) and ``realm``
(default ``"a3s-gateway"``; the validator refuses quotes and control characters in it).

``password`` is either the password itself or one of these hashes, recognised by its prefix:

 - bcrypt, ``$2a$``, ``$2b$`` or ``$2y$`` (as ``htpasswd -B`` writes them), checked with the
   ``bcrypt`` package. bcrypt only ever uses a password's first 72 bytes, so longer candidates
   are cut there, as the hash's creator did;
 - ``{SHA}`` followed by the base64 SHA-1 digest of the password (``htpasswd -s``);
 - ``{SHA256}`` or ``{SHA512}`` followed by the digest in hex or in base64.

A value with one of those prefixes that is not a well-formed hash is a configuration error
(L{parse_password} raises ValueError); any other value, including other crypt formats such as
``$apr1$``, is a plain password. The username is compared exactly; a username containing ``:``
can never match, since the client's ``user:password`` is split at its first colon (RFC 7617).

Every comparison is constant-time: the username and plain or SHA passwords are compared as
digests with L{hmac.compare_digest}, and the username is compared even when the password is
wrong (and the other way round), so timing tells neither which part was wrong nor how much of
it matched.

Rejections are ``401`` with ``Content-Type: application/json`` and, unlike the reference, a
``WWW-Authenticate: Basic realm="<realm>", charset="UTF-8"`` challenge so that browsers prompt:

 - ``{"error":"Missing Authorization header"}`` when there is no ``Authorization`` header or its
   scheme is not Basic (the scheme name is case-insensitive: ``basic`` works);
 - ``{"error":"Invalid credentials"}`` for everything else: wrong credentials, no credentials
   after the scheme, not base64, no colon, oversized (more than L{MAX_CREDENTIALS} bytes).
   Decoded bytes are compared as they are, so bytes that are not UTF-8 simply do not match.

bcrypt costs tens to hundreds of milliseconds of CPU on purpose. It runs in the reactor's thread
pool when the reactor has one (never blocking the event loop), at most L{BCRYPT_CONCURRENCY}
checks at a time, and successful checks are remembered (see L{BasicAuth}) so that a client that
keeps sending the right credentials pays for bcrypt once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections import OrderedDict
from typing import Any, Optional, Union, cast

import attr
import bcrypt
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)

DEFAULT_REALM = "a3s-gateway"

MAX_CREDENTIALS = 8192
"""The longest base64 credentials (in bytes) that are decoded at all."""

BCRYPT_CONCURRENCY = 4
"""bcrypt checks running at once; the reactor's thread pool also resolves host names."""

VERIFIED_CACHE_SIZE = 64
"""How many distinct successful credentials (SHA-256 digests) are remembered."""

_BCRYPT_MAX_PASSWORD = 72
_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*\Z")
_HEX = re.compile(r"[0-9a-fA-F]*\Z")
# prefix -> hashlib name of the digest a {...} password holds.
_DIGESTS = {"{SHA}": "sha1", "{SHA256}": "sha256", "{SHA512}": "sha512"}


@attr.s(frozen=True, auto_attribs=True)
class DigestPassword:
    """
    A password known by a digest: C{{SHA}}-style hashes, and plain passwords (kept as their
    SHA-256 so that comparing takes the same time whatever the candidate's length).
    """

    algorithm: str
    digest: bytes
    slow = False

    def verify(self, candidate: bytes) -> bool:
        """Whether C{candidate} has the digest (constant-time)."""
        return hmac.compare_digest(hashlib.new(self.algorithm, candidate).digest(), self.digest)


@attr.s(frozen=True, auto_attribs=True)
class BcryptPassword:
    """
    A password known by its bcrypt hash.
    """

    hashed: bytes
    slow = True

    def verify(self, candidate: bytes) -> bool:
        """Whether C{candidate} (cut to bcrypt's 72 bytes) matches the hash."""
        try:
            return bcrypt.checkpw(candidate[:_BCRYPT_MAX_PASSWORD], self.hashed)
        except ValueError:
            return False


Password = Union[DigestPassword, BcryptPassword]


def _digest_text(text: str, size: int, prefix: str) -> bytes:
    """
    The C{size}-byte digest written in hex or base64 after C{prefix}.

    @raise ValueError: when C{text} is neither.
    """
    if len(text) == 2 * size and _HEX.match(text):
        return bytes.fromhex(text)
    try:
        digest = base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) == size:
        return digest
    raise ValueError(
        f"basic-auth middleware: the password starting with '{prefix}' is not a valid "
        f"{prefix} hash (expected the {size}-byte digest in base64 or hex)"
    )


def parse_password(password: str) -> Password:
    """
    What the configured C{password} is: a bcrypt hash, a C{{SHA}} digest or a plain password.

    @raise ValueError: for a value with a hash prefix that is not a well-formed hash.
    """
    if password.startswith(("$2a$", "$2b$", "$2y$")):
        hashed = password.encode("utf-8")
        if not _BCRYPT.match(hashed):
            raise ValueError(
                "basic-auth middleware: the password starting with "
                f"'{password[:4]}' is not a valid bcrypt hash"
            )
        return BcryptPassword(hashed)
    for prefix, algorithm in _DIGESTS.items():
        if password.startswith(prefix):
            size = hashlib.new(algorithm).digest_size
            return DigestPassword(algorithm, _digest_text(password[len(prefix) :], size, prefix))
    return DigestPassword("sha256", hashlib.sha256(password.encode("utf-8")).digest())


def decode_credentials(token: bytes) -> Optional[bytes]:
    """
    The bytes of base64 C{token} (padding optional), or None when it is not base64 or is longer
    than L{MAX_CREDENTIALS}.
    """
    if len(token) > MAX_CREDENTIALS:
        return None
    data = token.rstrip(b"=")
    if not _BASE64.match(data) or len(data) % 4 == 1:
        return None
    return base64.b64decode(data + b"=" * (-len(data) % 4))


class BasicAuth(Middleware):
    """
    Lets a request through when its Basic credentials are the configured ones.

    bcrypt is slow by design, so successful bcrypt checks are cached: the SHA-256 of the
    client's decoded ``user:password`` is remembered in a small dict bounded to
    L{VERIFIED_CACHE_SIZE} entries (the least recently used one goes first) and a later request
    with the same credentials is accepted without bcrypt. Only successes are cached: a failure
    costs a full bcrypt check every time, so nothing an attacker sends grows the cache.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        username: bytes,
        password: Password,
        realm: str,
        reactor: Any,
    ) -> None:
        super().__init__(name)
        self._username = hashlib.sha256(username).digest()
        self._password = password
        challenge = (
            b'Basic realm="' + realm.replace("\\", "\\\\").encode("utf-8") + b'", charset="UTF-8"'
        )
        headers = ((b"WWW-Authenticate", challenge),)
        self._missing = json_reply(401, "Missing Authorization header", headers)
        self._invalid = json_reply(401, "Invalid credentials", headers)
        self._reactor = reactor
        self._threads = IReactorThreads.providedBy(reactor)
        self._semaphore = DeferredSemaphore(BCRYPT_CONCURRENCY)
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Answer 401 unless the ``Authorization`` header holds the configured Basic credentials.
        """
        values = ctx.headers.getRawHeaders(b"authorization")
        if not values:
            return self._missing
        scheme, space, token = values[0].partition(b" ")
        if not space or scheme.lower() != b"basic":
            return self._missing
        decoded = decode_credentials(token.strip(b" \t"))
        if decoded is None or b":" not in decoded:
            return self._invalid
        username, _, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(hashlib.sha256(username).digest(), self._username)
        if not self._password.slow:
            # Both comparisons always run: "&", not "and".
            return None if user_ok & self._password.verify(password) else self._invalid
        key = hashlib.sha256(decoded).digest()
        if key in self._verified:
            self._verified.move_to_end(key)
            return None
        checking: Deferred[bool] = self._semaphore.run(self._check_slow, password)
        result = checking.addCallback(self._settle, key, user_ok)
        return result.addErrback(self._failed)

    def _check_slow(self, password: bytes) -> Deferred[bool]:
        if not self._threads:
            return succeed(self._password.verify(password))
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, self._password.verify, password)

    def _settle(self, password_ok: bool, key: bytes, user_ok: bool) -> Optional[Reply]:
        if not (password_ok and user_ok):
            return self._invalid
        self._verified[key] = None
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return None

    def _failed(self, failure: Failure) -> Reply:
        # The thread pool refused the work (the reactor is stopping): fail closed.
        self._log.failure("basic-auth: password check failed", failure)
        return self._invalid


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    A L{BasicAuth} from the ``username``, ``password`` and ``realm`` options.

    @raise ValueError: when ``password`` has a hash prefix but is not a well-formed hash.
    """
    options = config.options
    return BasicAuth(
        config.name,
        cast(str, options["username"]).encode("utf-8"),
        parse_password(cast(str, options["password"])),
        cast(str, options.get("realm", DEFAULT_REALM)),
        ctx.reactor,
    )
