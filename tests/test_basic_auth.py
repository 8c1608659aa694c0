"""
Tests for L{a3s_gateway.middleware.basic_auth}: Basic credentials against a plain password or a
bcrypt or SHA hash, the challenge on every refusal, and bcrypt kept off the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Callable, List, Optional, Sequence, Tuple

import bcrypt
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.basic_auth import (
    BCRYPT_CONCURRENCY,
    MAX_CREDENTIALS,
    VERIFIED_CACHE_SIZE,
    BcryptPassword,
    DigestPassword,
    build,
    decode_credentials,
    parse_password,
)
from a3s_gateway.router.rule import RequestFacts

# Cost 4, the cheapest bcrypt allows, keeps the tests fast.
BCRYPT_HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
LONG_PASSWORD = "p" * 72
LONG_HASH = bcrypt.hashpw(LONG_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
CHALLENGE = b'Basic realm="a3s-gateway", charset="UTF-8"'

_Work = Tuple[Callable[[bool, Any], None], Callable[..., Any], Tuple[Any, ...]]


class _QueuedPool:
    """
    A thread pool whose work runs only when the test says so (L{run}), on the test's thread.
    """

    def __init__(self, fail: bool = False) -> None:
        self.work: List[_Work] = []
        self.fail = fail

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any
    ) -> None:
        self.work.append((on_result, f, args))

    def run(self) -> None:
        while self.work:
            on_result, f, args = self.work.pop(0)
            if self.fail:
                on_result(False, Failure(RuntimeError("pool stopped")))
            else:
                on_result(True, f(*args))


@implementer(IReactorThreads)
class _ThreadedClock(Clock):
    """
    A L{Clock} with a L{_QueuedPool} as its thread pool.
    """

    def __init__(self, pool: _QueuedPool) -> None:
        super().__init__()
        self.pool = pool

    def getThreadPool(self) -> Any:
        return self.pool

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)

    def callInThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        raise NotImplementedError("the middleware uses the pool itself")

    def suggestThreadPoolSize(self, size: int) -> None:
        raise NotImplementedError("the middleware never resizes the pool")


def _basic_auth(reactor: Any = None, **options: object) -> Middleware:
    ctx = BuildContext(
        reactor=Clock() if reactor is None else reactor,
        agent=RequestTraversalAgent(Resource()),
        router="r",
    )
    return build(MiddlewareConfig(name="auth", type="basic-auth", options=options), ctx)


def _ctx(headers: Sequence[Tuple[bytes, bytes]] = ()) -> RequestContext:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/", query=b"", headers=raw, client_ip="10.0.0.1"
    )
    return RequestContext(facts, raw, b"/", "r")


def _basic(credentials: bytes, scheme: bytes = b"Basic") -> RequestContext:
    return _ctx([(b"Authorization", scheme + b" " + base64.b64encode(credentials))])


def _authorization(value: bytes) -> RequestContext:
    return _ctx([(b"Authorization", value)])


def _result(result: object) -> Optional[Reply]:
    """
    The outcome of a request phase that may have answered with a fired Deferred.
    """
    if isinstance(result, Deferred):
        outcomes: List[Optional[Reply]] = []
        result.addCallback(outcomes.append)
        assert outcomes, "the Deferred has not fired"
        return outcomes[0]
    assert result is None or isinstance(result, Reply), result
    return result


class _Assertions(SynchronousTestCase):
    def assertRefused(
        self, result: object, message: str = "Invalid credentials", challenge: bytes = CHALLENGE
    ) -> None:
        """
        C{result} is a 401 with C{message}, a JSON Content-Type and the Basic challenge.
        """
        reply = _result(result)
        assert reply is not None, "the request was let through"
        self.assertEqual(reply.status, 401)
        headers = dict(reply.headers)
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"WWW-Authenticate"], challenge)
        self.assertEqual(json.loads(reply.body), {"error": message})
        self.assertEqual(reply.body, json.dumps({"error": message}).replace(": ", ":").encode())

    def assertPassed(self, result: object) -> None:
        """
        C{result} lets the request through.
        """
        self.assertIsNone(_result(result))


class PlainPasswordTests(_Assertions):
    """
    A plain ``password``.
    """

    def setUp(self) -> None:
        self.middleware = _basic_auth(username="alice", password="wonder land")

    def test_right_credentials(self) -> None:
        """
        The configured user and password pass, and the header stays as it was.
        """
        ctx = _basic(b"alice:wonder land")
        self.assertPassed(self.middleware.on_request(ctx))
        self.assertEqual(
            ctx.headers.getRawHeaders(b"authorization"),
            [b"Basic " + base64.b64encode(b"alice:wonder land")],
        )

    def test_wrong_password(self) -> None:
        """
        A wrong password, a prefix of the right one and the right one extended are refused.
        """
        for credentials in (b"alice:wonder", b"alice:wonder land!", b"alice:WONDER LAND"):
            self.assertRefused(self.middleware.on_request(_basic(credentials)))

    def test_wrong_username(self) -> None:
        """
        The right password under another (or differently cased) user name is refused.
        """
        for credentials in (b"bob:wonder land", b"Alice:wonder land", b":wonder land"):
            self.assertRefused(self.middleware.on_request(_basic(credentials)))

    def test_missing_header(self) -> None:
        """
        No Authorization header: ``Missing Authorization header``, with the challenge.
        """
        self.assertRefused(self.middleware.on_request(_ctx()), "Missing Authorization header")

    def test_other_scheme(self) -> None:
        """
        Another scheme, or a scheme with no space after it, counts as no Basic header.
        """
        for value in (b"Bearer abc", b"Basicabc", b"Basic", b"Digest username=x", b""):
            self.assertRefused(
                self.middleware.on_request(_authorization(value)), "Missing Authorization header"
            )

    def test_scheme_case_insensitive(self) -> None:
        """
        ``basic`` and ``BASIC`` work as ``Basic``.
        """
        for scheme in (b"basic", b"BASIC", b"bAsIc"):
            self.assertPassed(self.middleware.on_request(_basic(b"alice:wonder land", scheme)))

    def test_extra_whitespace(self) -> None:
        """
        Extra spaces between the scheme and the credentials are tolerated.
        """
        encoded = base64.b64encode(b"alice:wonder land")
        self.assertPassed(self.middleware.on_request(_authorization(b"Basic   " + encoded)))

    def test_unpadded_base64(self) -> None:
        """
        Base64 credentials without their ``=`` padding are decoded.
        """
        encoded = base64.b64encode(b"alice:wonder land").rstrip(b"=")
        self.assertNotEqual(encoded, base64.b64encode(b"alice:wonder land"))
        self.assertPassed(self.middleware.on_request(_authorization(b"Basic " + encoded)))

    def test_odd_shapes(self) -> None:
        """
        Empty credentials, not base64, no colon, bytes that are not UTF-8 and oversized
        credentials are all ``Invalid credentials``.
        """
        for value in (
            b"Basic ",
            b"Basic !!!!",
            b"Basic a",
            b"Basic " + base64.b64encode(b"alicewonder land"),
            b"Basic " + base64.b64encode(b"\xff\xfe:\x80"),
            b"Basic " + base64.b64encode(b"alice:wonder land") + b"*",
            b"Basic " + b"A" * 10240,
            b"Basic " + base64.b64encode(b"alice:" + b"x" * 10240),
        ):
            self.assertRefused(self.middleware.on_request(_authorization(value)))

    def test_first_value_counts(self) -> None:
        """
        With two Authorization headers, only the first is read.
        """
        right = b"Basic " + base64.b64encode(b"alice:wonder land")
        wrong = b"Basic " + base64.b64encode(b"alice:nope")
        self.assertPassed(
            self.middleware.on_request(_ctx([(b"Authorization", right), (b"Authorization", wrong)]))
        )
        self.assertRefused(
            self.middleware.on_request(_ctx([(b"Authorization", wrong), (b"Authorization", right)]))
        )

    def test_colon_in_password(self) -> None:
        """
        The credentials split at the first colon: a password may contain colons.
        """
        middleware = _basic_auth(username="u", password="a:b:c")
        self.assertPassed(middleware.on_request(_basic(b"u:a:b:c")))
        self.assertRefused(middleware.on_request(_basic(b"u:a:b")))

    def test_empty_password(self) -> None:
        """
        An empty configured password is matched by ``user:`` only.
        """
        middleware = _basic_auth(username="u", password="")
        self.assertPassed(middleware.on_request(_basic(b"u:")))
        self.assertRefused(middleware.on_request(_basic(b"u:x")))

    def test_utf8_credentials(self) -> None:
        """
        Non-ASCII user names and passwords are compared as UTF-8.
        """
        middleware = _basic_auth(username="José", password="pässwörd")
        self.assertPassed(middleware.on_request(_basic("José:pässwörd".encode())))
        self.assertRefused(middleware.on_request(_basic("José:pässwörd".encode("latin-1"))))

    def test_realm(self) -> None:
        """
        ``realm`` names the challenge's realm; a backslash in it is escaped.
        """
        middleware = _basic_auth(username="u", password="p", realm="Staff \\ only")
        self.assertRefused(
            middleware.on_request(_basic(b"u:x")),
            challenge=b'Basic realm="Staff \\\\ only", charset="UTF-8"',
        )

    @given(st.binary(max_size=300))
    def test_arbitrary_authorization_never_raises(self, value: bytes) -> None:
        """
        Whatever bytes the Authorization header holds, the answer is one of the two 401s
        (or a pass, for the right credentials).
        """
        result = self.middleware.on_request(_authorization(value))
        if result is not None:
            reply = _result(result)
            assert reply is not None
            self.assertEqual(reply.status, 401)
            self.assertIn(
                json.loads(reply.body)["error"],
                ("Invalid credentials", "Missing Authorization header"),
            )

    @given(st.binary(max_size=100))
    def test_arbitrary_credentials_never_raise(self, credentials: bytes) -> None:
        """
        Whatever bytes are base64-encoded after ``Basic``, only the right ones pass.
        """
        result = self.middleware.on_request(_basic(credentials))
        if credentials == b"alice:wonder land":
            self.assertPassed(result)
        else:
            self.assertRefused(result)


class DigestPasswordTests(_Assertions):
    """
    ``{SHA}``, ``{SHA256}`` and ``{SHA512}`` passwords.
    """

    def test_htpasswd_sha(self) -> None:
        """
        ``{SHA}`` + base64 SHA-1, as ``htpasswd -s`` writes it.
        """
        digest = base64.b64encode(hashlib.sha1(b"s3cret").digest()).decode()
        middleware = _basic_auth(username="u", password="{SHA}" + digest)
        self.assertPassed(middleware.on_request(_basic(b"u:s3cret")))
        self.assertRefused(middleware.on_request(_basic(b"u:s3cret2")))
        self.assertRefused(middleware.on_request(_basic(b"u:{SHA}" + digest.encode())))

    def test_sha256_hex_and_base64(self) -> None:
        """
        ``{SHA256}`` accepts the digest in hex (either case) and in base64.
        """
        digest = hashlib.sha256(b"s3cret").digest()
        for written in (digest.hex(), digest.hex().upper(), base64.b64encode(digest).decode()):
            middleware = _basic_auth(username="u", password="{SHA256}" + written)
            self.assertPassed(middleware.on_request(_basic(b"u:s3cret")))
            self.assertRefused(middleware.on_request(_basic(b"u:other")))

    def test_sha512_hex_and_base64(self) -> None:
        """
        ``{SHA512}`` accepts the digest in hex and in base64.
        """
        digest = hashlib.sha512(b"s3cret").digest()
        for written in (digest.hex(), base64.b64encode(digest).decode()):
            middleware = _basic_auth(username="u", password="{SHA512}" + written)
            self.assertPassed(middleware.on_request(_basic(b"u:s3cret")))
            self.assertRefused(middleware.on_request(_basic(b"u:other")))

    def test_malformed_digest(self) -> None:
        """
        A hash prefix followed by something that is not a digest of the right size is a
        configuration error, raised when the middleware is built.
        """
        for password in (
            "{SHA}not base64!",
            "{SHA}" + base64.b64encode(b"short").decode(),
            "{SHA256}" + "ab" * 31,
            "{SHA512}" + hashlib.sha256(b"x").hexdigest(),
            "{SHA256}",
        ):
            with self.assertRaises(ValueError) as raised:
                _basic_auth(username="u", password=password)
            self.assertIn("basic-auth middleware", str(raised.exception))

    def test_parse_password(self) -> None:
        """
        L{parse_password} tells plain passwords and hashes apart; other crypt formats and
        lower-case prefixes are plain passwords.
        """
        self.assertEqual(
            parse_password("plain"), DigestPassword("sha256", hashlib.sha256(b"plain").digest())
        )
        self.assertEqual(parse_password(BCRYPT_HASH), BcryptPassword(BCRYPT_HASH.encode()))
        self.assertEqual(
            parse_password("{SHA}" + base64.b64encode(hashlib.sha1(b"x").digest()).decode()),
            DigestPassword("sha1", hashlib.sha1(b"x").digest()),
        )
        for plain in ("$apr1$abc$def", "{sha}abc", "{SSHA}abc", "$1$x$y"):
            self.assertEqual(
                parse_password(plain),
                DigestPassword("sha256", hashlib.sha256(plain.encode()).digest()),
            )

    def test_decode_credentials(self) -> None:
        """
        L{decode_credentials} decodes padded and unpadded base64 and refuses everything else.
        """
        self.assertEqual(decode_credentials(b"YTpi"), b"a:b")
        self.assertEqual(decode_credentials(b"YQ=="), b"a")
        self.assertEqual(decode_credentials(b"YQ"), b"a")
        self.assertEqual(decode_credentials(b""), b"")
        self.assertIsNone(decode_credentials(b"Y"))
        self.assertIsNone(decode_credentials(b"YQ-_"))
        self.assertIsNone(decode_credentials(b"A" * (MAX_CREDENTIALS + 4)))


class BcryptTests(_Assertions):
    """
    bcrypt passwords: correct, off the event loop, cached on success only.
    """

    def setUp(self) -> None:
        self.pool = _QueuedPool()
        self.middleware = _basic_auth(_ThreadedClock(self.pool), username="u", password=BCRYPT_HASH)

    def test_prefixes(self) -> None:
        """
        ``$2a$``, ``$2b$`` and ``$2y$`` hashes all work (without a thread pool, inline).
        """
        for prefix in ("$2a$", "$2b$", "$2y$"):
            middleware = _basic_auth(username="u", password=prefix + BCRYPT_HASH[4:])
            self.assertPassed(middleware.on_request(_basic(b"u:s3cret")))
            self.assertRefused(middleware.on_request(_basic(b"u:s3cre")))

    def test_malformed_hash(self) -> None:
        """
        A bcrypt prefix on something that is not a bcrypt hash is a configuration error.
        """
        for password in ("$2b$04$short", "$2b$99$" + BCRYPT_HASH[7:], BCRYPT_HASH + "x"):
            with self.assertRaises(ValueError) as raised:
                _basic_auth(username="u", password=password)
            self.assertIn("not a valid bcrypt hash", str(raised.exception))

    def test_runs_in_thread_pool(self) -> None:
        """
        The bcrypt check runs in the reactor's thread pool: the request phase answers with a
        Deferred that fires only once the pool has done the work.
        """
        result = self.middleware.on_request(_basic(b"u:s3cret"))
        assert isinstance(result, Deferred)
        self.assertNoResult(result)
        self.assertEqual(len(self.pool.work), 1)
        self.pool.run()
        self.assertIsNone(self.successResultOf(result))

    def test_success_cached(self) -> None:
        """
        After one successful check, the same credentials pass at once, without bcrypt.
        """
        first = self.middleware.on_request(_basic(b"u:s3cret"))
        self.pool.run()
        self.assertPassed(first)
        self.assertIsNone(self.middleware.on_request(_basic(b"u:s3cret")))
        self.assertEqual(self.pool.work, [])

    def test_failure_not_cached(self) -> None:
        """
        Wrong passwords pay for bcrypt every time: nothing about a failure is remembered.
        """
        for _ in range(3):
            result = self.middleware.on_request(_basic(b"u:wrong"))
            self.assertEqual(len(self.pool.work), 1)
            self.pool.run()
            self.assertRefused(result)

    def test_wrong_username_checks_password(self) -> None:
        """
        A wrong user name is refused, after the same bcrypt work as a right one (timing does
        not tell which part was wrong), and is not cached even with the right password.
        """
        for _ in range(2):
            result = self.middleware.on_request(_basic(b"mallory:s3cret"))
            self.assertEqual(len(self.pool.work), 1)
            self.pool.run()
            self.assertRefused(result)

    def test_concurrency_bounded(self) -> None:
        """
        At most L{BCRYPT_CONCURRENCY} checks are in the pool at once; the others wait their
        turn and are answered too.
        """
        results = [
            self.middleware.on_request(_basic(b"u:wrong%d" % i))
            for i in range(BCRYPT_CONCURRENCY + 3)
        ]
        self.assertEqual(len(self.pool.work), BCRYPT_CONCURRENCY)
        self.pool.run()
        for result in results:
            self.assertRefused(result)

    def test_cache_bounded(self) -> None:
        """
        At most L{VERIFIED_CACHE_SIZE} successful credentials are remembered, the least
        recently used forgotten first. (bcrypt reads 72 bytes of a password, so a longer one
        with any tail is right, which makes many distinct right credentials.)
        """
        middleware = _basic_auth(_ThreadedClock(self.pool), username="u", password=LONG_HASH)
        tails = [b"%d" % i for i in range(VERIFIED_CACHE_SIZE + 1)]
        for tail in tails:
            result = middleware.on_request(_basic(b"u:" + LONG_PASSWORD.encode() + tail))
            self.pool.run()
            self.assertPassed(result)
        self.assertIsNone(middleware.on_request(_basic(b"u:" + LONG_PASSWORD.encode() + tails[-1])))
        again = middleware.on_request(_basic(b"u:" + LONG_PASSWORD.encode() + tails[0]))
        self.assertEqual(len(self.pool.work), 1)
        self.pool.run()
        self.assertPassed(again)

    def test_long_password_cut_at_72_bytes(self) -> None:
        """
        Passwords longer than bcrypt's 72 bytes are checked on their first 72 bytes, as the
        hash was made; shorter ones must match in full.
        """
        middleware = _basic_auth(username="u", password=LONG_HASH)
        self.assertPassed(middleware.on_request(_basic(b"u:" + LONG_PASSWORD.encode() + b"x")))
        self.assertRefused(middleware.on_request(_basic(b"u:" + LONG_PASSWORD[:71].encode())))

    def test_nul_in_password(self) -> None:
        """
        A password with a NUL byte is refused, not an error.
        """
        self.assertRefused(
            _basic_auth(username="u", password=BCRYPT_HASH).on_request(_basic(b"u:s3\x00cret"))
        )

    def test_pool_failure(self) -> None:
        """
        When the thread pool cannot run the check, the request is refused (fail closed) and
        the problem logged.
        """
        pool = _QueuedPool(fail=True)
        middleware = _basic_auth(_ThreadedClock(pool), username="u", password=BCRYPT_HASH)
        result = middleware.on_request(_basic(b"u:s3cret"))
        pool.run()
        self.assertRefused(result)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
