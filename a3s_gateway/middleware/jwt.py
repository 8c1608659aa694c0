# -*- test-case-name: tests.test_jwt -*-
"""
The ``jwt`` middleware (spec 1.12.3 with the DECISIONS keys and fixes): a request passes only
with a valid JSON Web Token, verified with PyJWT.

Options:

 - ``algorithms`` (default ``["HS256"]``): the only ``alg`` values accepted; a token with any
   other ``alg`` (``none`` included) is ``InvalidAlgorithm``. The validator accepts HS256/384/512,
   RS*, PS*, ES* and EdDSA, never HMAC and public-key algorithms together (one key for both
   invites algorithm confusion);
 - ``value``: the HMAC secret, for HS* (as in the reference);
 - ``public_key_file``: a PEM public key or certificate, for the public-key algorithms;
 - ``jwks_url``: a JSON Web Key Set, for the public-key algorithms (see L{JwksSource});
 - ``issuer`` and ``audience`` (a string or a list): when set, ``iss`` must equal ``issuer`` and
   ``aud`` (a string or a list) must name one of the audiences;
 - ``header`` (default ``Authorization``).

The token is the header's first value after a ``Bearer`` scheme (case-insensitive). A value
without that scheme is taken as the raw token, as the reference does, so that clients written
for it keep working.

Claims are checked against the reactor's clock with no leeway (the reference's 60 s of leeway
is a quirk not kept): ``exp`` is required (``Missing required claim: exp``) and the token is
expired from that second on; ``nbf``, when present, must have passed (``ImmatureSignature``);
both must be numbers. ``iat`` is not checked, as in the reference. On success the request
carries ``x-jwt-subject: <sub>`` when ``sub`` is a non-empty string; a client's own
``x-jwt-subject`` is always removed first, so it can never reach the backend unvouched for
(the reference kept it when ``sub`` was empty). A ``sub`` with control characters cannot be
forwarded as a header and fails as ``InvalidToken``.

Rejections are ``401`` with ``Content-Type: application/json``:

 - ``{"error":"Missing authorization header"}``: no such header;
 - ``{"error":"Invalid authorization header"}``: a value that is not visible ASCII;
 - ``{"error":"Missing token"}``: nothing after ``Bearer``, or an empty value;
 - ``{"error":"JWT validation failed: <kind>"}`` with kind ``InvalidToken`` (malformed, not
   a JSON object, a claim of the wrong type, longer than L{MAX_TOKEN_BYTES} — not even
   decoded — or signed by a key id the JWKS does not have), ``InvalidSignature``,
   ``InvalidAlgorithm`` (also a key that cannot verify the token's ``alg``), ``ExpiredSignature``,
   ``ImmatureSignature``, ``Missing required claim: exp``, ``InvalidIssuer`` and
   ``InvalidAudience`` (also when the claim is missing).

With ``jwks_url``, requests that arrive while the first fetch is in flight wait for it (at most
L{JWKS_FETCH_TIMEOUT} seconds); as long as no fetch has succeeded, requests answer
``503 {"error":"JWT keys unavailable"}`` rather than a 401: the gateway, not the client's
token, is at fault, and 503 tells clients to retry rather than to discard their credentials.
A token is verified with the key set's key named by its ``kid``; with ``public_key_file`` too,
the file's key serves tokens without a ``kid`` or with one the set does not have.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import attr
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.api_key import visible_ascii
from a3s_gateway.middleware.base import (
    BuildContext,
    Middleware,
    Reply,
    RequestContext,
    RequestResult,
    json_reply,
)

DEFAULT_HEADER = "Authorization"
DEFAULT_ALGORITHMS = ("HS256",)

MAX_TOKEN_BYTES = 8192
"""Longer tokens are refused as ``InvalidToken`` without being decoded."""

JWKS_REFRESH_INTERVAL = 300.0
"""Seconds between key set fetches after a successful one."""

JWKS_RETRY_INTERVAL = 30.0
"""Seconds before the next fetch after a failed one."""

JWKS_MIN_REFETCH = 60.0
"""A request (an unknown ``kid``, no keys yet) starts a fetch at most this often, in seconds."""

JWKS_FETCH_TIMEOUT = 10.0
"""Seconds a key set fetch may take, body included."""

MAX_JWKS_BYTES = 1024 * 1024
"""The largest key set document read."""

SUBJECT_HEADER = b"x-jwt-subject"

_SIGNATURE_ONLY = {
    # PyJWT only checks the signature and the alg; the claims are checked here, against the
    # injected clock and with the reference's error names.
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}
_MISSING_HEADER = json_reply(401, "Missing authorization header")
_INVALID_HEADER = json_reply(401, "Invalid authorization header")
_MISSING_TOKEN = json_reply(401, "Missing token")
_UNAVAILABLE = json_reply(503, "JWT keys unavailable")
_FROM_JWK = {"RSA": RSAAlgorithm.from_jwk, "EC": ECAlgorithm.from_jwk, "OKP": OKPAlgorithm.from_jwk}
# The key types that can verify each algorithm family (the first two letters of an alg).
_FAMILIES: Dict[str, Tuple[type, ...]] = {
    "HS": (str,),
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_PRIVATE = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class Rejected(Exception):
    """
    A token refused with ``JWT validation failed: <kind>``.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    def reply(self) -> Reply:
        """The 401 answer."""
        return json_reply(401, f"JWT validation failed: {self.kind}")


@attr.s(frozen=True, auto_attribs=True)
class VerificationKey:
    """
    A key a token may be signed with.

    @ivar key: the HMAC secret or a C{cryptography} public key.
    @ivar algorithm: the only ``alg`` it verifies (a JWK's ``alg``), or None for any of the
        configured ones.
    """

    key: Any
    algorithm: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class KeySet:
    """
    The usable keys of a JWKS document: by ``kid``, and all of them (for tokens without one).
    """

    by_kid: Dict[str, VerificationKey]
    keys: Tuple[VerificationKey, ...]


def parse_jwks(document: bytes) -> KeySet:
    """
    The signature keys of a JWKS document. Keys that are not for signatures (``use`` other than
    ``sig``), symmetric (``oct``), of an unknown type or malformed are skipped; private key
    material is reduced to its public half.

    @raise ValueError: when the document is not a key set or holds no usable key.
    """
    parsed = json.loads(document)
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise ValueError('not a JSON Web Key Set (no "keys" list)')
    by_kid: Dict[str, VerificationKey] = {}
    keys: List[VerificationKey] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        loader = _FROM_JWK.get(str(entry.get("kty")))
        if loader is None:
            continue
        try:
            key = loader(entry)
        except Exception:
            # Whatever PyJWT or cryptography make of a malformed remote key, it is skipped.
            continue
        if isinstance(key, _PRIVATE):
            key = key.public_key()
        algorithm = entry.get("alg")
        verification = VerificationKey(key, algorithm if isinstance(algorithm, str) else None)
        keys.append(verification)
        kid = entry.get("kid")
        if isinstance(kid, str):
            by_kid[kid] = verification
    if not keys:
        raise ValueError("no usable signature key in the key set")
    return KeySet(by_kid, tuple(keys))


def load_public_key(path: str) -> Any:
    """
    The public key in the PEM file C{path}: a public key or a certificate.

    @raise ValueError: when the file holds neither.
    @raise OSError: when it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return load_pem_public_key(data)
    except ValueError:
        pass
    try:
        return x509.load_pem_x509_certificate(data).public_key()
    except ValueError:
        raise ValueError(
            f"JWT middleware: public_key_file {path} holds no PEM public key or certificate"
        ) from None


class _LimitedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes into C{done}; a longer one is aborted.
    Cancelling C{done} aborts the transfer too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: List[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(ValueError(f"key set larger than {self.limit} bytes"))
            self._abort()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class JwksSource:
    """
    A JSON Web Key Set fetched over HTTP without ever blocking the reactor (PyJWT's own
    C{PyJWKClient} uses blocking urllib, so it is not used).

    The set is fetched when the middleware is built, then every L{JWKS_REFRESH_INTERVAL} seconds
    (L{JWKS_RETRY_INTERVAL} after a failure). Requests may ask for an early fetch (a token with
    an unknown ``kid``: the issuer rotated its keys) at most once per L{JWKS_MIN_REFETCH}
    seconds, so that tokens with made-up ``kid`` values cannot make the gateway hammer the key
    server. A failed fetch keeps the keys from the last good one.

    @ivar keys: the last key set fetched, None until a fetch succeeds.
    """

    _log = Logger()

    def __init__(self, url: str, agent: IAgent, reactor: Any) -> None:
        self.url = url
        self.keys: Optional[KeySet] = None
        self._reactor = reactor
        self._client = HTTPClient(agent)
        self._fetching: Optional[Deferred[Any]] = None
        self._waiters: List[Deferred[None]] = []
        self._last_fetch: Optional[float] = None
        self._timer: Optional[IDelayedCall] = None
        self._stopped = False

    def start(self) -> None:
        """Fetch the key set now, and keep refreshing it."""
        self._fetch()

    def stop(self) -> None:
        """Stop refreshing; a fetch in flight is abandoned."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._fetching is not None:
            self._fetching.cancel()

    def refreshed(self) -> Optional[Deferred[None]]:
        """
        A Deferred that fires when a fresh fetch ends (the one in flight, or one started now),
        or None when no fetch may start now.
        """
        if self._fetching is None:
            now = self._reactor.seconds()
            if self._stopped or (
                self._last_fetch is not None and now - self._last_fetch < JWKS_MIN_REFETCH
            ):
                return None
            self._fetch()
            if self._fetching is None:
                return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fetch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._last_fetch = self._reactor.seconds()
        fetching: Deferred[Any] = self._client.get(
            self.url,
            headers=Headers({b"Accept": [b"application/json"]}),
            unbuffered=True,
            reactor=self._reactor,
        )
        self._fetching = fetching
        fetching.addCallback(self._read)
        fetching.addTimeout(JWKS_FETCH_TIMEOUT, self._reactor)
        fetching.addCallbacks(self._loaded, self._failed)

    def _read(self, response: IResponse) -> Deferred[KeySet]:
        body = _LimitedBody(MAX_JWKS_BYTES)
        response.deliverBody(body)
        return body.done.addCallback(self._parse, response.code)

    @staticmethod
    def _parse(document: bytes, code: int) -> KeySet:
        if code != 200:
            raise ValueError(f"HTTP status {code}")
        return parse_jwks(document)

    def _loaded(self, keys: KeySet) -> None:
        self.keys = keys
        self._log.info(
            "JWKS {url}: {count} signature key(s) loaded", url=self.url, count=len(keys.keys)
        )
        self._done(JWKS_REFRESH_INTERVAL)

    def _failed(self, failure: Failure) -> None:
        if not self._stopped:
            self._log.warn(
                "JWKS {url}: fetch failed ({problem}); keeping the previous keys",
                url=self.url,
                problem=failure.getErrorMessage() or repr(failure.value),
            )
        self._done(JWKS_RETRY_INTERVAL)

    def _done(self, next_fetch: float) -> None:
        self._fetching = None
        if not self._stopped:
            self._timer = self._reactor.callLater(next_fetch, self._fetch)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _fits(key: Any, algorithm: str) -> bool:
    """Whether C{key} is of the type that verifies C{algorithm} (an RSA key for PS256...)."""
    return isinstance(key, _FAMILIES[algorithm[:2]])


def _numeric_date(value: object) -> float:
    """
    A NumericDate claim's value.

    @raise Rejected: ``InvalidToken`` for anything but a finite number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("InvalidToken")
    return float(value)


class Jwt(Middleware):
    """
    Lets a request through when it carries a valid token, and tells the backend its subject.

    @ivar header: the token header's name, as bytes.
    @ivar algorithms: the accepted ``alg`` values.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        clock: Any,
        header: bytes = DEFAULT_HEADER.encode("ascii"),
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        key: Optional[VerificationKey] = None,
        jwks: Optional[JwksSource] = None,
        issuer: Optional[str] = None,
        audience: Sequence[str] = (),
    ) -> None:
        super().__init__(name)
        self.header = header
        self.algorithms = tuple(algorithms)
        self._clock = clock
        self._key = key
        self._jwks = jwks
        self._issuer = issuer
        self._audience = frozenset(audience)

    def stop(self) -> None:
        """Stop refreshing the key set."""
        if self._jwks is not None:
            self._jwks.stop()

    def on_request(self, ctx: RequestContext) -> RequestResult:
        """
        Answer 401 (or 503) unless the request carries a valid token; on success set
        ``x-jwt-subject``.
        """
        ctx.headers.removeHeader(SUBJECT_HEADER)
        token = self._token(ctx.headers)
        if isinstance(token, Reply):
            return token
        try:
            algorithm, kid = self._header(token)
            keys = self._candidates(kid)
            if keys is None:
                return self._await_keys(ctx, token, algorithm, kid)
            return self._accept(ctx, token, algorithm, keys)
        except Rejected as e:
            return e.reply()

    def _token(self, headers: Headers) -> Union[bytes, Reply]:
        """
        The token in the header, or the rejection.
        """
        values = headers.getRawHeaders(self.header)
        if not values:
            return _MISSING_HEADER
        value = values[0]
        if not visible_ascii(value):
            return _INVALID_HEADER
        value = value.strip(b" \t")
        scheme, _, rest = value.partition(b" ")
        token = rest.strip(b" \t") if scheme.lower() == b"bearer" else value
        if not token:
            return _MISSING_TOKEN
        if len(token) > MAX_TOKEN_BYTES:
            return Rejected("InvalidToken").reply()
        return token

    def _header(self, token: bytes) -> Tuple[str, object]:
        """
        The token's ``alg`` (one of L{algorithms}) and ``kid`` (None when absent).

        @raise Rejected: for a malformed token or another ``alg``.
        """
        try:
            header = jwt.get_unverified_header(token)
        except Exception:
            # PyJWT parses client input here: whatever it raises, the token is malformed.
            raise Rejected("InvalidToken") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise Rejected("InvalidAlgorithm")
        return cast(str, algorithm), header.get("kid")

    def _candidates(self, kid: object) -> Optional[Sequence[VerificationKey]]:
        """
        The keys to try on a token with key id C{kid}: the JWKS key with that ``kid`` if there
        is one, else the configured key (HMAC secret or public key file); a token without a
        ``kid`` is tried against every JWKS key when there is no configured key. None when only
        a (fresher) key set could tell.
        """
        keys = self._jwks.keys if self._jwks is not None else None
        if isinstance(kid, str) and keys is not None and kid in keys.by_kid:
            return (keys.by_kid[kid],)
        if self._key is not None:
            return (self._key,)
        if kid is None and keys is not None:
            return keys.keys
        return None

    def _await_keys(
        self, ctx: RequestContext, token: bytes, algorithm: str, kid: object
    ) -> RequestResult:
        """
        Wait for a fresh key set, then judge the token; when no fetch may start now, refuse it.
        """
        assert self._jwks is not None
        refreshed = self._jwks.refreshed()
        if refreshed is None:
            return self._without_keys()
        waiting = refreshed.addCallback(lambda _: self._after_refresh(ctx, token, algorithm, kid))
        return waiting.addErrback(self._failed)

    def _after_refresh(
        self, ctx: RequestContext, token: bytes, algorithm: str, kid: object
    ) -> Optional[Reply]:
        keys = self._candidates(kid)
        if keys is None:
            return self._without_keys()
        try:
            return self._accept(ctx, token, algorithm, keys)
        except Rejected as e:
            return e.reply()

    def _without_keys(self) -> Reply:
        # No key set at all: the gateway's problem (503). A key set without the token's kid:
        # the token's.
        assert self._jwks is not None
        return _UNAVAILABLE if self._jwks.keys is None else Rejected("InvalidToken").reply()

    def _failed(self, failure: Failure) -> Reply:
        self._log.failure("jwt: unexpected failure judging a token", failure)
        return Rejected("InvalidToken").reply()

    def _accept(
        self,
        ctx: RequestContext,
        token: bytes,
        algorithm: str,
        keys: Sequence[VerificationKey],
    ) -> Optional[Reply]:
        """
        Verify C{token} and its claims; on success set the subject header.

        @raise Rejected: when the token is not valid.
        """
        payload = self._verify(token, algorithm, keys)
        self._check_claims(payload)
        subject = payload.get("sub")
        if isinstance(subject, str) and subject:
            try:
                value = subject.encode("utf-8")
            except UnicodeEncodeError:
                raise Rejected("InvalidToken") from None
            if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value):
                raise Rejected("InvalidToken")
            ctx.headers.setRawHeaders(SUBJECT_HEADER, [value])
        return None

    def _verify(
        self, token: bytes, algorithm: str, keys: Sequence[VerificationKey]
    ) -> Dict[str, Any]:
        """
        The token's payload once one of C{keys} verifies its signature.

        @raise Rejected: otherwise.
        """
        # A key of the token's family whose signature check failed says more than a key that
        # could not even try.
        kind: Optional[str] = None
        for candidate in keys:
            if (candidate.algorithm is not None and candidate.algorithm != algorithm) or not _fits(
                candidate.key, algorithm
            ):
                kind = kind or "InvalidAlgorithm"
                continue
            try:
                payload: Dict[str, Any] = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=list(self.algorithms),
                    options=_SIGNATURE_ONLY,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                kind = "InvalidSignature"
                continue
            except jwt.InvalidKeyError:
                # An EC key on another curve than the token's alg (a P-256 key, ES384).
                kind = kind or "InvalidAlgorithm"
                continue
            except jwt.InvalidAlgorithmError:
                raise Rejected("InvalidAlgorithm") from None
            except Exception:
                # Client input again: a payload that is not a JSON object, bad base64, ...
                raise Rejected("InvalidToken") from None
            return payload
        raise Rejected(kind or "InvalidSignature")

    def _check_claims(self, payload: Dict[str, Any]) -> None:
        """
        ``exp`` (required), ``nbf``, ``iss`` and ``aud``, in the reference's order.

        @raise Rejected: for the first failing claim.
        """
        if "exp" not in payload:
            raise Rejected("Missing required claim: exp")
        now = self._clock.seconds()
        if now >= _numeric_date(payload["exp"]):
            raise Rejected("ExpiredSignature")
        if "nbf" in payload and now < _numeric_date(payload["nbf"]):
            raise Rejected("ImmatureSignature")
        if self._issuer is not None and payload.get("iss") != self._issuer:
            raise Rejected("InvalidIssuer")
        if self._audience:
            audience = payload.get("aud")
            named = [audience] if isinstance(audience, str) else audience
            if not isinstance(named, list) or not any(
                isinstance(a, str) and a in self._audience for a in named
            ):
                raise Rejected("InvalidAudience")


def build(config: MiddlewareConfig, ctx: BuildContext) -> Middleware:
    """
    A L{Jwt} from its options; with ``jwks_url``, the key set's first fetch starts now.

    @raise ValueError: for an HMAC secret PyJWT refuses (a PEM or SSH key) or a
        ``public_key_file`` that holds no key.
    @raise OSError: for a ``public_key_file`` that cannot be read.
    """
    options = config.options
    algorithms = tuple(cast(Sequence[str], options.get("algorithms", DEFAULT_ALGORITHMS)))
    audience = options.get("audience", ())
    key: Optional[VerificationKey] = None
    jwks: Optional[JwksSource] = None
    if algorithms[0].startswith("HS"):
        secret = cast(str, options["value"])
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
        except jwt.InvalidKeyError as e:
            raise ValueError(f"JWT middleware: unusable HMAC secret: {e}") from None
        key = VerificationKey(secret)
    else:
        if "public_key_file" in options:
            key = VerificationKey(load_public_key(cast(str, options["public_key_file"])))
        if "jwks_url" in options:
            jwks = JwksSource(cast(str, options["jwks_url"]), ctx.agent, ctx.reactor)
    middleware = Jwt(
        config.name,
        ctx.reactor,
        header=cast(str, options.get("header", DEFAULT_HEADER)).encode("ascii"),
        algorithms=algorithms,
        key=key,
        jwks=jwks,
        issuer=cast(Optional[str], options.get("issuer")),
        audience=(audience,) if isinstance(audience, str) else cast(Sequence[str], audience),
    )
    if jwks is not None:
        jwks.start()
    return middleware
