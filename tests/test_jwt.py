"""
Tests for L{a3s_gateway.middleware.jwt}: token extraction, signature and algorithm checks with
HMAC secrets, PEM public keys and a JWKS fetched without blocking, the claims against the
injected clock, and the subject header.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from a3s_gateway.config.schema import MiddlewareConfig
from a3s_gateway.middleware.base import BuildContext, Middleware, Reply, RequestContext
from a3s_gateway.middleware.jwt import (
    JWKS_FETCH_TIMEOUT,
    JWKS_MIN_REFETCH,
    JWKS_REFRESH_INTERVAL,
    JWKS_RETRY_INTERVAL,
    MAX_JWKS_BYTES,
    MAX_TOKEN_BYTES,
    Jwt,
    build,
    load_public_key,
    parse_jwks,
)
from a3s_gateway.router.rule import RequestFacts

SECRET = "a-secret-that-is-long-enough-for-hs512-0123456789-0123456789-0123"
NOW = 1_700_000_000
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _pem(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _claims(**claims: Any) -> Dict[str, Any]:
    """Claims valid at L{NOW}: ``sub`` and ``exp`` an hour later, overridable."""
    payload: Dict[str, Any] = {"sub": "alice", "exp": NOW + 3600}
    payload.update(claims)
    return {k: v for k, v in payload.items() if v is not None}


def _token(
    payload: Optional[Dict[str, Any]] = None,
    key: Any = SECRET,
    algorithm: str = "HS256",
    kid: Optional[str] = None,
) -> bytes:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(
        _claims() if payload is None else payload, key, algorithm=algorithm, headers=headers
    ).encode("ascii")


def _raw_token(payload: Any, key: str = SECRET) -> bytes:
    """An HS256 token for any JSON payload (PyJWT's C{encode} insists on well-typed claims)."""
    data = json.dumps(payload).encode()
    return jwt.api_jws.PyJWS().encode(data, key, algorithm="HS256").encode("ascii")


def _ctx(headers: Sequence[Tuple[bytes, bytes]] = ()) -> RequestContext:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    facts = RequestFacts(
        method=b"GET", host=b"api", path=b"/", query=b"", headers=raw, client_ip="10.0.0.1"
    )
    return RequestContext(facts, raw, b"/", "r")


def _bearer(token: bytes, scheme: bytes = b"Bearer ") -> RequestContext:
    return _ctx([(b"Authorization", scheme + token)])


def _clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def _jwt(
    clock: Optional[Clock] = None, agent: Any = None, **options: object
) -> Tuple[Middleware, Clock]:
    clock = _clock() if clock is None else clock
    ctx = BuildContext(
        reactor=clock,
        agent=RequestTraversalAgent(Resource()) if agent is None else agent,
        router="r",
    )
    if "algorithms" not in options or str(options["algorithms"]).startswith("['HS"):
        options.setdefault("value", SECRET)
    return build(MiddlewareConfig(name="jwt", type="jwt", options=options), ctx), clock


def _result(result: object) -> Optional[Reply]:
    if isinstance(result, Deferred):
        outcomes: List[Optional[Reply]] = []
        result.addCallback(outcomes.append)
        assert outcomes, "the Deferred has not fired"
        return outcomes[0]
    assert result is None or isinstance(result, Reply), result
    return result


class _Assertions(SynchronousTestCase):
    def assertRejected(self, result: object, message: str, status: int = 401) -> None:
        """
        C{result} is a JSON answer with C{status} and C{{"error": message}}.
        """
        reply = _result(result)
        assert reply is not None, "the request was let through"
        self.assertEqual(reply.status, status)
        self.assertEqual(dict(reply.headers)[b"Content-Type"], b"application/json")
        self.assertEqual(reply.body, json.dumps({"error": message}, separators=(",", ":")).encode())

    def assertInvalid(self, result: object, kind: str) -> None:
        """
        C{result} is ``401 JWT validation failed: <kind>``.
        """
        self.assertRejected(result, f"JWT validation failed: {kind}")

    def assertPassed(self, result: object, ctx: RequestContext, subject: Optional[bytes]) -> None:
        """
        C{result} lets the request through with C{subject} as its only ``x-jwt-subject``.
        """
        self.assertIsNone(_result(result))
        expected = None if subject is None else [subject]
        self.assertEqual(ctx.headers.getRawHeaders(b"x-jwt-subject"), expected)


class ExtractionTests(_Assertions):
    """
    Finding the token in the header.
    """

    def setUp(self) -> None:
        self.middleware, self.clock = _jwt()

    def test_bearer_token(self) -> None:
        """
        A valid token after ``Bearer`` passes and its ``sub`` becomes ``x-jwt-subject``.
        """
        ctx = _bearer(_token())
        self.assertPassed(self.middleware.on_request(ctx), ctx, b"alice")

    def test_scheme_case_insensitive(self) -> None:
        """
        ``bearer`` and ``BEARER`` work like ``Bearer``, with extra spaces around the token.
        """
        for scheme in (b"bearer ", b"BEARER ", b"Bearer   "):
            ctx = _bearer(_token(), scheme)
            self.assertPassed(self.middleware.on_request(ctx), ctx, b"alice")

    def test_raw_token(self) -> None:
        """
        A header holding the bare token (no scheme) is accepted, as the reference does.
        """
        ctx = _ctx([(b"Authorization", _token())])
        self.assertPassed(self.middleware.on_request(ctx), ctx, b"alice")

    def test_missing_header(self) -> None:
        """
        No header: ``Missing authorization header``.
        """
        self.assertRejected(self.middleware.on_request(_ctx()), "Missing authorization header")

    def test_custom_header(self) -> None:
        """
        With ``header``, the token is read from that header (any case) and Authorization is
        ignored.
        """
        middleware, _ = _jwt(header="X-Token")
        ctx = _ctx([(b"x-token", b"Bearer " + _token())])
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertRejected(
            middleware.on_request(_bearer(_token())), "Missing authorization header"
        )

    def test_not_visible_ascii(self) -> None:
        """
        A header value with control or non-ASCII bytes: ``Invalid authorization header``.
        """
        for value in (b"Bearer \x00abc", "Bearer é".encode(), b"Bearer " + _token() + b"\x7f"):
            self.assertRejected(
                self.middleware.on_request(_ctx([(b"Authorization", value)])),
                "Invalid authorization header",
            )

    def test_missing_token(self) -> None:
        """
        Nothing after the scheme, or an empty value: ``Missing token``.
        """
        for value in (b"Bearer ", b"Bearer", b"bearer   ", b"", b"   "):
            self.assertRejected(
                self.middleware.on_request(_ctx([(b"Authorization", value)])), "Missing token"
            )

    def test_oversized_token(self) -> None:
        """
        A token longer than L{MAX_TOKEN_BYTES} is ``InvalidToken`` even when validly signed.
        """
        token = _token(_claims(padding="x" * MAX_TOKEN_BYTES))
        self.assertGreater(len(token), MAX_TOKEN_BYTES)
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidToken")

    def test_malformed(self) -> None:
        """
        Text that is not a JWS compact serialization is ``InvalidToken``.
        """
        good = _token().decode()
        for token in (
            "abc",
            "a.b.c",
            "a.b",
            "...",
            good + ".x",
            "!!!." + good.split(".", 1)[1],
            "Basic dXNlcjpwYXNz",
        ):
            self.assertInvalid(
                self.middleware.on_request(_ctx([(b"Authorization", token.encode())])),
                "InvalidToken",
            )

    def test_first_value_counts(self) -> None:
        """
        Only the header's first value is read.
        """
        ctx = _ctx([(b"Authorization", b"Bearer " + _token()), (b"Authorization", b"junk")])
        self.assertPassed(self.middleware.on_request(ctx), ctx, b"alice")
        ctx = _ctx([(b"Authorization", b"junk"), (b"Authorization", b"Bearer " + _token())])
        self.assertInvalid(self.middleware.on_request(ctx), "InvalidToken")

    @given(st.binary(max_size=400))
    def test_arbitrary_values_never_raise(self, value: bytes) -> None:
        """
        Whatever the Authorization header holds, the answer is a JSON 401.
        """
        reply = _result(self.middleware.on_request(_ctx([(b"Authorization", value)])))
        assert reply is not None
        self.assertEqual(reply.status, 401)
        self.assertEqual(dict(reply.headers)[b"Content-Type"], b"application/json")

    @given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
    def test_arbitrary_dotted_tokens_never_raise(self, text: str) -> None:
        """
        Visible-ASCII tokens built around dots (the JWS shape) are refused with a JSON 401.
        """
        for token in (text, f"{text}.{text}.{text}", f"eyJhbGciOiJIUzI1NiJ9.{text}.x"):
            reply = _result(self.middleware.on_request(_bearer(token.encode())))
            assert reply is not None
            self.assertEqual(reply.status, 401)


class HmacTests(_Assertions):
    """
    HS256 (and friends) with the ``value`` secret.
    """

    def setUp(self) -> None:
        self.middleware, self.clock = _jwt()

    def test_wrong_secret(self) -> None:
        """
        A token signed with another secret: ``InvalidSignature``.
        """
        token = _token(key=SECRET + "x")
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidSignature")

    def test_tampered_payload(self) -> None:
        """
        A token whose payload was changed after signing: ``InvalidSignature``.
        """
        header, _, signature = _token().decode().split(".")
        other = _token(_claims(sub="admin")).decode().split(".")[1]
        token = f"{header}.{other}.{signature}".encode()
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidSignature")

    def test_other_algorithm(self) -> None:
        """
        By default only HS256 is accepted: an HS384 token is ``InvalidAlgorithm``.
        """
        token = _token(algorithm="HS384")
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidAlgorithm")

    def test_none_algorithm(self) -> None:
        """
        An unsigned ``alg: none`` token is ``InvalidAlgorithm``, with or without a signature
        part.
        """
        token = jwt.encode(_claims(), "", algorithm="none").encode()
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidAlgorithm")
        self.assertInvalid(self.middleware.on_request(_bearer(token + b"c2ln")), "InvalidAlgorithm")

    def test_configured_algorithms(self) -> None:
        """
        ``algorithms`` lists the accepted HMAC algorithms.
        """
        middleware, _ = _jwt(algorithms=["HS384", "HS512"])
        for algorithm in ("HS384", "HS512"):
            ctx = _bearer(_token(algorithm=algorithm))
            self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(middleware.on_request(_bearer(_token())), "InvalidAlgorithm")

    def test_pem_secret_refused_at_build(self) -> None:
        """
        An HMAC secret that is a PEM key (PyJWT refuses those) fails when the middleware is
        built.
        """
        with self.assertRaises(ValueError) as raised:
            _jwt(value=_pem(RSA_KEY).decode())
        self.assertIn("unusable HMAC secret", str(raised.exception))

    def test_payload_not_an_object(self) -> None:
        """
        A validly signed payload that is not a JSON object is ``InvalidToken``.
        """
        token = _raw_token([1, 2])
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidToken")


class ClaimTests(_Assertions):
    """
    ``exp``, ``nbf``, ``iss`` and ``aud`` against the injected clock, with no leeway.
    """

    def setUp(self) -> None:
        self.middleware, self.clock = _jwt()

    def check(self, **claims: Any) -> object:
        return self.middleware.on_request(_bearer(_token(_claims(**claims))))

    def test_missing_exp(self) -> None:
        """
        A token without ``exp``: ``Missing required claim: exp``.
        """
        token = _token({"sub": "alice"})
        self.assertInvalid(
            self.middleware.on_request(_bearer(token)), "Missing required claim: exp"
        )

    def test_expiry_without_leeway(self) -> None:
        """
        The token is expired from its ``exp`` second on, with no leeway (the reference's 60 s
        are not kept); a second before it is fine.
        """
        self.assertIsNone(self.check(exp=NOW + 1))
        self.assertInvalid(self.check(exp=NOW), "ExpiredSignature")
        self.assertInvalid(self.check(exp=NOW - 1), "ExpiredSignature")
        self.assertInvalid(self.check(exp=NOW - 30), "ExpiredSignature")

    def test_expiry_follows_clock(self) -> None:
        """
        The same token passes, then fails once the clock reaches its ``exp``.
        """
        token = _token(_claims(exp=NOW + 10))
        self.assertIsNone(self.middleware.on_request(_bearer(token)))
        self.clock.advance(9.5)
        self.assertIsNone(self.middleware.on_request(_bearer(token)))
        self.clock.advance(0.5)
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "ExpiredSignature")

    def test_fractional_dates(self) -> None:
        """
        NumericDates may have fractions.
        """
        self.assertIsNone(self.check(exp=NOW + 0.5))
        self.assertInvalid(self.check(exp=NOW - 0.5), "ExpiredSignature")

    def test_exp_wrong_type(self) -> None:
        """
        An ``exp`` that is not a finite number is ``InvalidToken``.
        """
        for exp in (str(NOW + 60), True, [NOW + 60], float("inf"), float("nan")):
            self.assertInvalid(self.check(exp=exp), "InvalidToken")
        token = _token({"sub": "alice", "exp": None})
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidToken")

    def test_nbf(self) -> None:
        """
        A token is ``ImmatureSignature`` before its ``nbf`` and valid from it on.
        """
        self.assertInvalid(self.check(nbf=NOW + 1), "ImmatureSignature")
        self.assertIsNone(self.check(nbf=NOW))
        self.assertIsNone(self.check(nbf=NOW - 100))
        self.assertInvalid(self.check(nbf="soon"), "InvalidToken")

    def test_expired_before_immature(self) -> None:
        """
        ``exp`` is checked before ``nbf``.
        """
        self.assertInvalid(self.check(exp=NOW - 1, nbf=NOW + 1), "ExpiredSignature")

    def test_iat_not_checked(self) -> None:
        """
        ``iat`` is not checked (as in the reference): one in the future is fine.
        """
        self.assertIsNone(self.check(iat=NOW + 3600))

    def test_issuer(self) -> None:
        """
        With ``issuer``, ``iss`` must equal it; a missing or different one is
        ``InvalidIssuer``.
        """
        self.middleware, _ = _jwt(issuer="https://issuer.example")
        self.assertIsNone(self.check(iss="https://issuer.example"))
        self.assertInvalid(self.check(iss="https://evil.example"), "InvalidIssuer")
        token = _raw_token(_claims(iss=["https://issuer.example"]))
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidIssuer")
        self.assertInvalid(self.check(), "InvalidIssuer")

    def test_issuer_not_configured(self) -> None:
        """
        Without ``issuer``, any ``iss`` is fine.
        """
        self.assertIsNone(self.check(iss="anyone"))

    def test_audience(self) -> None:
        """
        With ``audience``, ``aud`` (a string or a list) must name it; a missing or different
        one is ``InvalidAudience``.
        """
        self.middleware, _ = _jwt(audience="api")
        self.assertIsNone(self.check(aud="api"))
        self.assertIsNone(self.check(aud=["web", "api"]))
        self.assertInvalid(self.check(aud="web"), "InvalidAudience")
        self.assertInvalid(self.check(aud=["web"]), "InvalidAudience")
        self.assertInvalid(self.check(aud=7), "InvalidAudience")
        self.assertInvalid(self.check(), "InvalidAudience")

    def test_audience_list(self) -> None:
        """
        ``audience`` may list several accepted audiences.
        """
        self.middleware, _ = _jwt(audience=["api", "admin"])
        self.assertIsNone(self.check(aud="admin"))
        self.assertIsNone(self.check(aud=["x", "api"]))
        self.assertInvalid(self.check(aud="web"), "InvalidAudience")

    def test_audience_not_configured(self) -> None:
        """
        Without ``audience``, any ``aud``, a list included (the reference refused lists), is
        fine.
        """
        self.assertIsNone(self.check(aud=["a", "b"]))

    def test_issuer_before_audience(self) -> None:
        """
        The claims fail in the reference's order: ``exp``, then ``iss``, then ``aud``.
        """
        self.middleware, _ = _jwt(issuer="i", audience="a")
        self.assertInvalid(self.check(iss="x", aud="x", exp=NOW), "ExpiredSignature")
        self.assertInvalid(self.check(iss="x", aud="x"), "InvalidIssuer")
        self.assertInvalid(self.check(iss="i", aud="x"), "InvalidAudience")

    def test_signature_before_claims(self) -> None:
        """
        A badly signed token is ``InvalidSignature`` whatever its claims.
        """
        token = _token({"sub": "x"}, key=SECRET + "x")
        self.assertInvalid(self.middleware.on_request(_bearer(token)), "InvalidSignature")


class SubjectTests(_Assertions):
    """
    The ``x-jwt-subject`` header.
    """

    def setUp(self) -> None:
        self.middleware, _ = _jwt()

    def request(self, token: bytes) -> Tuple[object, RequestContext]:
        ctx = _ctx([(b"Authorization", b"Bearer " + token), (b"X-JWT-Subject", b"forged")])
        return self.middleware.on_request(ctx), ctx

    def test_replaces_client_value(self) -> None:
        """
        A client's ``x-jwt-subject`` is replaced by the token's ``sub``.
        """
        result, ctx = self.request(_token())
        self.assertPassed(result, ctx, b"alice")

    def test_removed_without_subject(self) -> None:
        """
        A client's ``x-jwt-subject`` is removed when ``sub`` is empty, absent or not a string
        (the reference kept it when ``sub`` was empty).
        """
        for sub in ("", None, 42, ["alice"]):
            result, ctx = self.request(_token(_claims(sub=sub)))
            self.assertPassed(result, ctx, None)

    def test_removed_on_refusal(self) -> None:
        """
        A refused request does not keep the client's ``x-jwt-subject`` either.
        """
        result, ctx = self.request(b"garbage")
        self.assertInvalid(result, "InvalidToken")
        self.assertIsNone(ctx.headers.getRawHeaders(b"x-jwt-subject"))

    def test_utf8_subject(self) -> None:
        """
        A non-ASCII ``sub`` is forwarded as UTF-8.
        """
        result, ctx = self.request(_token(_claims(sub="José")))
        self.assertPassed(result, ctx, "José".encode())

    def test_control_characters(self) -> None:
        """
        A ``sub`` with control characters (which cannot be a header value) or a lone surrogate
        is ``InvalidToken``.
        """
        for sub in ("alice\r\nX-Admin: 1", "a\x00b", "a\x7fb", "\ud800"):
            result, _ = self.request(_token(_claims(sub=sub)))
            self.assertInvalid(result, "InvalidToken")


def _write(test: SynchronousTestCase, data: bytes) -> str:
    path = test.mktemp()
    with open(path, "wb") as f:
        f.write(data)
    return path


def _certificate(key: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


class PublicKeyFileTests(_Assertions):
    """
    RS*, PS*, ES* and EdDSA with ``public_key_file``.
    """

    def test_rs256(self) -> None:
        """
        An RS256 token signed by the key's owner passes; one signed by another key is
        ``InvalidSignature``.
        """
        middleware, _ = _jwt(algorithms=["RS256"], public_key_file=_write(self, _pem(RSA_KEY)))
        ctx = _bearer(_token(key=RSA_KEY, algorithm="RS256"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=OTHER_RSA_KEY, algorithm="RS256"))),
            "InvalidSignature",
        )

    def test_several_rsa_algorithms(self) -> None:
        """
        One RSA key verifies RS384 and PS256 tokens when both are listed.
        """
        path = _write(self, _pem(RSA_KEY))
        middleware, _ = _jwt(algorithms=["RS384", "PS256"], public_key_file=path)
        for algorithm in ("RS384", "PS256"):
            ctx = _bearer(_token(key=RSA_KEY, algorithm=algorithm))
            self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256"))),
            "InvalidAlgorithm",
        )

    def test_algorithm_confusion(self) -> None:
        """
        An HS256 token "signed" with the public key's PEM text is refused
        (``InvalidAlgorithm``): the public key is never used as an HMAC secret.
        """
        pem = _pem(RSA_KEY)
        middleware, _ = _jwt(algorithms=["RS256"], public_key_file=_write(self, pem))
        forged = jwt.api_jws.PyJWS()
        forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
        token = forged.encode(json.dumps(_claims()).encode(), pem, algorithm="HS256").encode()
        self.assertInvalid(middleware.on_request(_bearer(token)), "InvalidAlgorithm")

    def test_es256_certificate(self) -> None:
        """
        ``public_key_file`` may hold a certificate; its key verifies ES256 tokens.
        """
        middleware, _ = _jwt(
            algorithms=["ES256"], public_key_file=_write(self, _certificate(EC_KEY))
        )
        ctx = _bearer(_token(key=EC_KEY, algorithm="ES256"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_eddsa(self) -> None:
        """
        Ed25519 keys verify EdDSA tokens.
        """
        middleware, _ = _jwt(algorithms=["EdDSA"], public_key_file=_write(self, _pem(ED_KEY)))
        ctx = _bearer(_token(key=ED_KEY, algorithm="EdDSA"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_key_of_another_family(self) -> None:
        """
        A key that cannot verify the token's ``alg`` (an RSA key, an ES256 token) answers
        ``InvalidAlgorithm``.
        """
        middleware, _ = _jwt(
            algorithms=["RS256", "ES256"], public_key_file=_write(self, _pem(RSA_KEY))
        )
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=EC_KEY, algorithm="ES256"))),
            "InvalidAlgorithm",
        )

    def test_load_public_key(self) -> None:
        """
        L{load_public_key} reads public keys and certificates and refuses anything else.
        """
        self.assertIsInstance(load_public_key(_write(self, _pem(RSA_KEY))), rsa.RSAPublicKey)
        self.assertIsInstance(
            load_public_key(_write(self, _certificate(EC_KEY))), ec.EllipticCurvePublicKey
        )
        with self.assertRaises(ValueError):
            load_public_key(_write(self, b"not a key"))
        with self.assertRaises(OSError):
            load_public_key(os.path.join(self.mktemp(), "missing.pem"))


def _jwk(key: Any, kid: Optional[str] = None, **members: Any) -> Dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk: Dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(members)
    return jwk


def _document(*keys: Dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


class _KeyServer(Resource):
    """
    A JWKS endpoint: answers C{document} with C{status}, or holds requests while C{hold}.
    """

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.status = 200
        self.hold = False
        self.held: List[Request] = []
        self.requests: List[Request] = []

    def render_GET(self, request: Request) -> object:
        self.requests.append(request)
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return self.document

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(self.status)
            request.write(self.document)
            request.finish()


class JwksTests(_Assertions):
    """
    Keys from ``jwks_url``, fetched over the build context's agent.
    """

    def setUp(self) -> None:
        self.server = _KeyServer(_document(_jwk(RSA_KEY, "k1"), _jwk(EC_KEY, "k2")))
        self.agent = RequestTraversalAgent(self.server)
        self.clock = _clock()

    def start(self, **options: object) -> Middleware:
        options.setdefault("algorithms", ["RS256", "ES256"])
        middleware, _ = _jwt(
            self.clock, self.agent, jwks_url="http://keys.example/jwks.json", **options
        )
        self.addCleanup(middleware.stop)
        return middleware

    def test_fetched_at_build(self) -> None:
        """
        The key set is fetched when the middleware is built (asking for JSON), and tokens
        signed by its keys pass, chosen by ``kid``.
        """
        middleware = self.start()
        self.assertEqual(len(self.server.requests), 1)
        request = self.server.requests[0]
        self.assertEqual(request.getHeader(b"accept"), b"application/json")
        self.assertEqual(request.uri, b"/jwks.json")
        for key, algorithm, kid in ((RSA_KEY, "RS256", "k1"), (EC_KEY, "ES256", "k2")):
            ctx = _bearer(_token(key=key, algorithm=algorithm, kid=kid))
            self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_wrong_key_for_kid(self) -> None:
        """
        A token whose ``kid`` names another key than the one that signed it fails:
        ``InvalidSignature`` for a key of its family, ``InvalidAlgorithm`` for another family.
        """
        self.server.document = _document(
            _jwk(RSA_KEY, "k1"), _jwk(OTHER_RSA_KEY, "k3"), _jwk(EC_KEY, "k2")
        )
        middleware = self.start()
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k3"))),
            "InvalidSignature",
        )
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k2"))),
            "InvalidAlgorithm",
        )

    def test_no_kid(self) -> None:
        """
        A token without ``kid`` is tried against every key of the set.
        """
        middleware = self.start()
        for key, algorithm in ((RSA_KEY, "RS256"), (EC_KEY, "ES256")):
            ctx = _bearer(_token(key=key, algorithm=algorithm))
            self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=OTHER_RSA_KEY, algorithm="RS256"))),
            "InvalidSignature",
        )

    def test_jwk_algorithm(self) -> None:
        """
        A JWK's ``alg`` restricts the key to that algorithm.
        """
        self.server.document = _document(_jwk(RSA_KEY, "k1", alg="RS384"))
        middleware = self.start(algorithms=["RS256", "RS384"])
        ctx = _bearer(_token(key=RSA_KEY, algorithm="RS384", kid="k1"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k1"))),
            "InvalidAlgorithm",
        )

    def test_unknown_kid_refetches(self) -> None:
        """
        A token with an unknown ``kid`` (the issuer rotated its keys) starts a fetch and is
        judged once it ends: with the new key set it passes.
        """
        middleware = self.start()
        self.clock.advance(JWKS_MIN_REFETCH)
        self.server.document = _document(_jwk(OTHER_RSA_KEY, "k9"))
        self.server.hold = True
        ctx = _bearer(_token(key=OTHER_RSA_KEY, algorithm="RS256", kid="k9"))
        result = middleware.on_request(ctx)
        assert isinstance(result, Deferred)
        self.assertNoResult(result)
        self.assertEqual(len(self.server.requests), 2)
        self.server.release()
        self.agent.flush()
        self.assertPassed(result, ctx, b"alice")

    def test_unknown_kid_rate_limited(self) -> None:
        """
        Within L{JWKS_MIN_REFETCH} seconds of the last fetch, an unknown ``kid`` does not
        start another: ``InvalidToken`` at once.
        """
        middleware = self.start()
        self.clock.advance(JWKS_MIN_REFETCH - 1)
        token = _token(key=OTHER_RSA_KEY, algorithm="RS256", kid="k9")
        self.assertInvalid(middleware.on_request(_bearer(token)), "InvalidToken")
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(1)
        self.assertInvalid(middleware.on_request(_bearer(token)), "InvalidToken")
        self.assertEqual(len(self.server.requests), 2)
        self.assertInvalid(middleware.on_request(_bearer(token)), "InvalidToken")
        self.assertEqual(len(self.server.requests), 2)

    def test_waits_for_first_fetch(self) -> None:
        """
        Requests that arrive while the first fetch is in flight wait for it; one fetch serves
        them all.
        """
        self.server.hold = True
        middleware = self.start()
        contexts = [_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k1")) for _ in range(3)]
        results = [middleware.on_request(ctx) for ctx in contexts]
        for result in results:
            self.assertNoResult(result)
        self.assertEqual(len(self.server.requests), 1)
        self.server.release()
        self.agent.flush()
        for result, ctx in zip(results, contexts):
            self.assertPassed(result, ctx, b"alice")

    def test_unavailable_until_first_success(self) -> None:
        """
        While no key set was ever fetched, requests answer ``503 JWT keys unavailable``; the
        fetch is retried after L{JWKS_RETRY_INTERVAL} seconds, and then tokens pass.
        """
        self.server.status = 500
        middleware = self.start()
        token = _token(key=RSA_KEY, algorithm="RS256", kid="k1")
        self.assertRejected(middleware.on_request(_bearer(token)), "JWT keys unavailable", 503)
        self.assertEqual(len(self.server.requests), 1)
        self.server.status = 200
        self.clock.advance(JWKS_RETRY_INTERVAL)
        self.assertEqual(len(self.server.requests), 2)
        ctx = _bearer(token)
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_waits_for_retry(self) -> None:
        """
        Without keys, a request between fetches answers 503 without starting a fetch of its
        own; one that arrives while a retry is in flight waits for it.
        """
        self.server.status = 503
        middleware = self.start()
        token = _token(key=RSA_KEY, algorithm="RS256", kid="k1")
        self.clock.pump([JWKS_RETRY_INTERVAL / 2])
        self.assertRejected(middleware.on_request(_bearer(token)), "JWT keys unavailable", 503)
        self.assertEqual(len(self.server.requests), 1)
        self.server.status = 200
        self.server.hold = True
        self.clock.pump([JWKS_RETRY_INTERVAL / 2])
        self.assertEqual(len(self.server.requests), 2)
        ctx = _bearer(token)
        result = middleware.on_request(ctx)
        self.assertNoResult(result)
        self.server.release()
        self.agent.flush()
        self.assertPassed(result, ctx, b"alice")

    def test_periodic_refresh(self) -> None:
        """
        The key set is fetched again every L{JWKS_REFRESH_INTERVAL} seconds and the new keys
        replace the old ones.
        """
        middleware = self.start()
        self.server.document = _document(_jwk(OTHER_RSA_KEY, "k1"))
        self.clock.advance(JWKS_REFRESH_INTERVAL - 1)
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.server.requests), 2)
        ctx = _bearer(_token(key=OTHER_RSA_KEY, algorithm="RS256", kid="k1"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")
        self.assertInvalid(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k1"))),
            "InvalidSignature",
        )

    def test_failed_refresh_keeps_keys(self) -> None:
        """
        A failed refresh (an error status, a document that is not a key set) keeps the
        previous keys, and the next attempt comes after L{JWKS_RETRY_INTERVAL} seconds.
        """
        middleware = self.start()
        self.server.status = 500
        self.clock.advance(JWKS_REFRESH_INTERVAL)
        self.server.status = 200
        self.server.document = b"<html>not json</html>"
        self.clock.advance(JWKS_RETRY_INTERVAL)
        self.assertEqual(len(self.server.requests), 3)
        ctx = _bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k1"))
        self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_fetch_timeout(self) -> None:
        """
        A key server that does not answer within L{JWKS_FETCH_TIMEOUT} seconds is a failed
        fetch: waiting requests get the 503.
        """
        self.server.hold = True
        middleware = self.start()
        result = middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256")))
        self.assertNoResult(result)
        self.clock.advance(JWKS_FETCH_TIMEOUT)
        self.assertRejected(result, "JWT keys unavailable", 503)

    def test_oversized_document(self) -> None:
        """
        A key set document larger than L{MAX_JWKS_BYTES} is refused.
        """
        keys = [_jwk(RSA_KEY, f"k{i}") for i in range(MAX_JWKS_BYTES // 400)]
        self.server.document = _document(*keys)
        self.assertGreater(len(self.server.document), MAX_JWKS_BYTES)
        middleware = self.start()
        self.agent.flush()
        self.assertRejected(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256", kid="k1"))),
            "JWT keys unavailable",
            503,
        )

    def test_stop(self) -> None:
        """
        Stopping abandons the fetch in flight (waiting requests get the 503) and the refresh
        timer.
        """
        self.server.hold = True
        middleware = self.start()
        result = middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256")))
        middleware.stop()
        self.assertRejected(result, "JWT keys unavailable", 503)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRejected(
            middleware.on_request(_bearer(_token(key=RSA_KEY, algorithm="RS256"))),
            "JWT keys unavailable",
            503,
        )

    def test_public_key_file_and_jwks(self) -> None:
        """
        With both, the JWKS key with the token's ``kid`` is used, and the file's key for
        tokens without a ``kid`` or with one the set does not have.
        """
        middleware = self.start(public_key_file=_write(self, _pem(OTHER_RSA_KEY)))
        for key, kid in ((RSA_KEY, "k1"), (OTHER_RSA_KEY, None), (OTHER_RSA_KEY, "k7")):
            ctx = _bearer(_token(key=key, algorithm="RS256", kid=kid))
            self.assertPassed(middleware.on_request(ctx), ctx, b"alice")

    def test_middleware_type(self) -> None:
        """
        L{build} makes a L{Jwt}.
        """
        self.assertIsInstance(self.start(), Jwt)


class ParseJwksTests(SynchronousTestCase):
    """
    L{parse_jwks}: the usable signature keys of a document.
    """

    def test_keys(self) -> None:
        """
        RSA, EC and OKP keys are read, indexed by ``kid`` when they have one.
        """
        keys = parse_jwks(_document(_jwk(RSA_KEY, "r"), _jwk(EC_KEY, "e"), _jwk(ED_KEY)))
        self.assertEqual(sorted(keys.by_kid), ["e", "r"])
        self.assertEqual(len(keys.keys), 3)
        self.assertIsInstance(keys.by_kid["r"].key, rsa.RSAPublicKey)
        self.assertIsNone(keys.by_kid["r"].algorithm)

    def test_skipped(self) -> None:
        """
        Encryption keys, symmetric keys, unknown types and malformed entries are skipped.
        """
        keys = parse_jwks(
            _document(
                _jwk(RSA_KEY, "enc", use="enc"),
                {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
                {"kty": "XYZ", "kid": "xyz"},
                {"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"},
                {"kty": "EC", "kid": "bad-ec", "crv": "P-999"},
                "not an object",  # type: ignore[arg-type]
                _jwk(RSA_KEY, "good"),
            )
        )
        self.assertEqual(list(keys.by_kid), ["good"])

    def test_private_keys_reduced(self) -> None:
        """
        A JWK with private key material is used as its public key.
        """
        private = RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)
        private["kid"] = "p"
        keys = parse_jwks(_document(private))
        self.assertIsInstance(keys.by_kid["p"].key, rsa.RSAPublicKey)

    def test_not_a_key_set(self) -> None:
        """
        Documents that are not key sets, or hold no usable key, are refused.
        """
        for document in (
            b"[]",
            b"{}",
            b'{"keys": {}}',
            b'{"keys": []}',
            _document({"kty": "oct", "k": "c2VjcmV0"}),
        ):
            with self.assertRaises(ValueError):
                parse_jwks(document)
